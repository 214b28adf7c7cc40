"""Batched forced photometry: PRF-shaped point sources at fixed positions, linear fluxes.

For each target a square cutout is fitted with the target and every catalogue source whose
PRF stamp reaches the cutout, each a PRF placed at its catalogue position with a free flux.
Positions never move. The weighted normal equations of a whole batch of cutouts are built
with one batched matrix product and solved together; the target is always the first unknown,
so its flux and its variance (the first diagonal element of the inverse normal matrix, which
carries the covariance with blended neighbours) are read from row 0.
"""

from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

from .prf import PRFTable

__all__ = [
    "FLAGS",
    "FRACFLUX_LIMIT",
    "MIN_COVERED_FRACTION",
    "Measurement",
    "RCHISQ_LIMIT",
    "finish_measurement",
    "forced_photometry",
    "is_blended",
    "start_measurement",
]

FLAGS = {
    "off_image": 1,
    "no_data": 2,
    "partial_coverage": 4,
    "fit_failed": 8,
    "blended": 16,
    "poor_fit": 32,
}
"""Bit flags set per source and band. 0 means a clean measurement."""

RCHISQ_LIMIT = 3.0
"""``poor_fit`` above this profile-weighted reduced chi^2: the source is not the PRF-shaped
point the fit assumes (resolved, a PRF far from the image's, or an unmodelled neighbour)."""
FRACFLUX_LIMIT = 10.0
"""``blended`` where the light the neighbours' models put into the target's profile exceeds
this many times the target's flux, or its 3-sigma noise level if larger (a non-detection's
fracflux is a ratio of two noises): the flux rests on how well their models subtract."""


class Measurement(NamedTuple):
    """What an engine returns, one value per target.

    Attributes
    ----------
    flux, flux_err : ndarray
        Total flux (image unit times pixels) and its 1-sigma uncertainty; NaN where not
        measured.
    flag : ndarray of int32
        Bit flags, see `FLAGS`.
    rchisq : ndarray
        Profile-weighted reduced chi^2: sum(P chi^2) / sum(P) over the target's usable
        pixels, P its unit-flux PRF, chi the residual of the whole fit over the noise. Near 1
        for a well-fitted point source.
    fracflux : ndarray
        Fraction of the flux in the target's profile that its neighbours' models put there:
        sum_j!=i <P_i, f_j P_j> / <P_i, f_i P_i> (inverse-variance weighted).
    fracmasked : ndarray
        Fraction of the target's PRF (within its cutout) on masked or no-data pixels.
    """

    flux: np.ndarray
    flux_err: np.ndarray
    flag: np.ndarray
    rchisq: np.ndarray
    fracflux: np.ndarray
    fracmasked: np.ndarray

_ELEMENT_BUDGET = 3_000_000
MIN_COVERED_FRACTION = 0.5
"""A target whose PRF (inside its cutout) has less than this on usable pixels is not measured."""


def start_measurement(shape, x, y, targets, cutout_size):
    """What every engine does first: check the cutout size, allocate NaN results, flag
    targets off the image.

    Returns
    -------
    x, y, targets : ndarray
        As float64 and int arrays.
    result : Measurement
        NaN values, flags with ``off_image`` set.
    measured : ndarray of int
        Positions in ``targets`` of the targets on the image.
    """
    if cutout_size % 2 != 1:
        raise ValueError(f"cutout_size must be odd so the target sits on a pixel, got {cutout_size}")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.intp)
    result = Measurement(*(np.full(targets.size, np.nan) for _ in range(2)), np.zeros(targets.size, dtype=np.int32),
                         *(np.full(targets.size, np.nan) for _ in range(3)))
    col = np.rint(x[targets])
    row = np.rint(y[targets])
    with np.errstate(invalid="ignore"):
        on_image = (col >= 0) & (col < shape[1]) & (row >= 0) & (row < shape[0])
    result.flag[~on_image] |= FLAGS["off_image"]
    return x, y, targets, result, np.flatnonzero(on_image)


def fit_quality_scale(rchisq):
    """The factor a flux error is scaled by for its fit's quality: sqrt(``rchisq``) where that
    exceeds 1 (the Birge ratio), else 1, also where ``rchisq`` is NaN."""
    return np.sqrt(np.fmax(np.asarray(rchisq, dtype=np.float64), 1.0))


def finish_measurement(
    result: Measurement, measured, fitted, variance, covered, cutout_inside, unconstrained,
    rchisq=None, fracflux=None, blended=None,
):
    """What every engine does last: set the coverage, failure and quality flags, keep good fits.

    All arrays after ``measured`` hold one value per measured target; ``rchisq``,
    ``fracflux`` and ``blended`` (see `is_blended`) are None for an engine that does not
    measure them. A target whose ``rchisq`` exceeds 1 has its error scaled by its square root
    (the Birge ratio): its residual holds more than the noise and the PRF's calibrated pixel
    error explain, a neighbour or a profile the model lacks, which its flux carries too.
    """
    if rchisq is not None:
        variance = variance * fit_quality_scale(rchisq) ** 2
    flag = result.flag
    partial = (covered < 1.0 - 1e-9) | ~cutout_inside
    flag[measured[partial]] |= FLAGS["partial_coverage"]
    no_data = unconstrained | (covered < MIN_COVERED_FRACTION)
    flag[measured[no_data]] |= FLAGS["no_data"]
    failed = ~no_data & ~(np.isfinite(fitted) & np.isfinite(variance) & (variance > 0))
    flag[measured[failed]] |= FLAGS["fit_failed"]
    good = ~no_data & ~failed
    result.flux[measured[good]] = fitted[good]
    result.flux_err[measured[good]] = np.sqrt(variance[good])
    result.fracmasked[measured] = np.clip(1.0 - covered, 0.0, 1.0)
    if rchisq is not None:
        result.rchisq[measured[good]] = rchisq[good]
        flag[measured[good & (rchisq > RCHISQ_LIMIT)]] |= FLAGS["poor_fit"]
    if fracflux is not None:
        result.fracflux[measured[good]] = fracflux[good]
    if blended is not None:
        flag[measured[good & blended]] |= FLAGS["blended"]
    return result


def is_blended(neighbour_flux, flux, sigma):
    """Whether the neighbours' light in a target's profile (``neighbour_flux``: sum over
    neighbours j of <P_i, f_j P_j> / <P_i, P_i>) exceeds `FRACFLUX_LIMIT` times its flux or its
    3-sigma noise, whichever is larger (all in flux units)."""
    with np.errstate(invalid="ignore"):
        return np.abs(neighbour_flux) > FRACFLUX_LIMIT * np.maximum(np.abs(flux), 3.0 * sigma)


def _neighbour_lists(col, row, targets, reach):
    finite = np.flatnonzero(np.isfinite(col) & np.isfinite(row))
    tree = cKDTree(np.column_stack([col[finite], row[finite]]))
    centres = np.column_stack([col[targets], row[targets]])
    # Sorted, so that a target's neighbours come in catalogue order whatever other sources
    # were passed: the fit then sums in the same order in any partition of the field.
    found = tree.query_ball_point(centres, r=reach, p=np.inf, return_sorted=True)
    lists = []
    for target, members in zip(targets, found):
        members = finite[members]
        lists.append(np.concatenate([[target], members[members != target]]))
    return lists


def _stamp_windows(table: PRFTable, x, y, col, row, sources, half_cutout):
    """Every S x S window of each source's zero-padded stamp, as a strided view.

    Each source's stamp is interpolated once per call, however many cutouts it falls in;
    a cutout's design row is then a plain slice of the padded stamp. A last, all-zero stamp
    stands for the padding unknowns of short neighbour lists.
    """
    stamps = table.stamps_for(x[sources] - col[sources], y[sources] - row[sources])
    margin = 2 * half_cutout
    padded = np.zeros((sources.size + 1, stamps.shape[1] + 2 * margin, stamps.shape[2] + 2 * margin))
    padded[:-1, margin:-margin, margin:-margin] = stamps
    size = 2 * half_cutout + 1
    return np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(1, 2))


def _design_matrices(windows, unique_index, col, row, members, centre_col, centre_row, half_cutout, half_stamp):
    """Design tensor (batch, unknowns, cutout pixels) for one batch of cutouts."""
    present = members >= 0
    safe = np.where(present, members, 0)
    # Window start in the padded stamp: the cutout's first pixel seen from the stamp.
    start_row = np.where(present, half_cutout + half_stamp - (row[safe] - centre_row[:, None]), 0)
    start_col = np.where(present, half_cutout + half_stamp - (col[safe] - centre_col[:, None]), 0)
    stamp = np.where(present, unique_index[safe], windows.shape[0] - 1)
    design = windows[stamp, start_row, start_col]
    return design.reshape(members.shape[0], members.shape[1], -1)


def _gather_cutouts(image, sky, sigma, centre_col, centre_row, half_cutout):
    offsets = np.arange(-half_cutout, half_cutout + 1)
    rows = centre_row[:, None] + offsets
    cols = centre_col[:, None] + offsets
    inside = ((rows >= 0) & (rows < image.shape[0]))[:, :, None] & (
        (cols >= 0) & (cols < image.shape[1])
    )[:, None, :]
    r = np.clip(rows, 0, image.shape[0] - 1)[:, :, None]
    c = np.clip(cols, 0, image.shape[1] - 1)[:, None, :]
    data = np.asarray(image[r, c], dtype=np.float64)
    sky_values = np.broadcast_to(sky, image.shape)[r, c] if np.ndim(sky) else np.full(data.shape, float(sky))
    sigma_values = (
        np.broadcast_to(sigma, image.shape)[r, c] if np.ndim(sigma) else np.full(data.shape, float(sigma))
    )
    valid = inside & np.isfinite(data) & np.isfinite(sky_values) & np.isfinite(sigma_values) & (sigma_values > 0)
    residual = np.where(valid, data - np.where(valid, sky_values, 0.0), 0.0)
    weight = np.where(valid, 1.0 / np.where(valid, sigma_values, 1.0) ** 2, 0.0)
    n_batch = centre_col.size
    return residual.reshape(n_batch, -1), weight.reshape(n_batch, -1), inside.reshape(n_batch, -1)


def _solve_batch(design, data, weight):
    weighted = design * weight[:, None, :]
    normal = weighted @ design.transpose(0, 2, 1)
    rhs = weighted @ data[:, :, None]
    n_unknown = normal.shape[1]
    diagonal = np.einsum("bkk->bk", normal)
    unconstrained = diagonal <= 0
    # Unknowns that touch no usable pixel (padding, or a neighbour on masked pixels) are
    # decoupled with a unit diagonal; a tiny ridge keeps coincident sources solvable.
    ridge = 1e-10 * diagonal.max(axis=1, keepdims=True)
    normal[:, np.arange(n_unknown), np.arange(n_unknown)] = np.where(unconstrained, 1.0, diagonal + ridge)
    unit = np.zeros_like(rhs)
    unit[:, 0, 0] = 1.0
    try:
        solution = np.linalg.solve(normal, np.concatenate([rhs, unit], axis=2))
    except np.linalg.LinAlgError:
        solution = np.stack([np.linalg.pinv(m) @ np.concatenate([r, u], axis=1) for m, r, u in zip(normal, rhs, unit)])
    return solution[:, :, 0], solution[:, 0, 1], unconstrained[:, 0], diagonal


def total_variance(variance, flux, neighbour_light, noise_scale, prf_error, neighbour_error=None):
    """The flux variance with the noise's correlation and the PRF model's error added.

    ``noise_scale`` (>= 1) is how much the real noise of a PRF-weighted sum exceeds the
    white-noise prediction (correlated noise of a resampled mosaic, confusion);
    ``prf_error`` is the fractional error of a flux fitted with a PRF that is not exactly
    the source's. The light its neighbours' models put into its profile
    (``neighbour_light``, in flux units) carries ``neighbour_error`` (default
    ``prf_error``): the model's error pixel by pixel, which, off a neighbour's centre, does
    not average out over the target's profile as it does over the neighbour's own.
    """
    neighbour_error = prf_error if neighbour_error is None else neighbour_error
    return noise_scale**2 * variance + (prf_error * flux) ** 2 + (neighbour_error * neighbour_light) ** 2


def forced_photometry(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    targets: np.ndarray,
    prf_table: PRFTable,
    cutout_size: int,
    sky,
    sigma,
    fit_sky: bool = False,
    *,
    noise_scale: float = 1.0,
    prf_error: float = 0.0,
    pixel_error: float | None = None,
    neighbour_error: float | None = None,
) -> Measurement:
    """Forced PRF photometry of ``targets`` on one image.

    Parameters
    ----------
    image : ndarray
        The image (any linear unit), NaN where there is no data. A memory map works: only
        the cutouts are read.
    x, y : ndarray
        0-based pixel positions of *every* catalogue source on this image (pixel centres at
        integers); sources off the image still count as neighbours of targets near the edge.
    targets : ndarray of int
        Indices into ``x``/``y`` of the sources to measure.
    prf_table : PRFTable
        The band's PRF, see `build_prf_table`.
    cutout_size : int
        Odd side of the square cutout in pixels.
    sky : ndarray or float
        Sky level per pixel (same shape as ``image``) or one value, subtracted before the fit.
    sigma : ndarray or float
        Per-pixel noise (1-sigma), same shape as ``image`` or one value.
    fit_sky : bool
        Also fit a constant sky offset in each cutout (on top of ``sky``), with the sources;
        its covariance with the fluxes enters the uncertainties.
    noise_scale, prf_error : float
        Added to the uncertainties, see `total_variance`.
    pixel_error : float, optional
        ``rchisq`` counts each pixel's residual against its noise and ``pixel_error`` times
        its model: how well the PRF model fits a point source pixel by pixel
        (`mbphot.calibration.Calibration.pixel_error`). Default ``prf_error``.
    neighbour_error : float, optional
        Fractional error of the light the neighbours' models put into a target's profile
        (`mbphot.engine.solve.total_variance`; `mbphot.calibration.Calibration.neighbour_error`).
        Default ``pixel_error``.

    Returns
    -------
    Measurement
        Fluxes (image unit times pixels, since the PRF sums to one), uncertainties, flags
        and quality metrics of the targets. The PRF's wings (`PRFTable.wings`) are not
        modelled: give this engine a table of the whole PRF.
    """
    pixel_error = prf_error if pixel_error is None else pixel_error
    neighbour_error = pixel_error if neighbour_error is None else neighbour_error
    if prf_table.wings is not None:
        raise ValueError("the per-source engine needs a PRF table without a core/wing split (core_radius=None)")
    x, y, targets, result, measured = start_measurement(image.shape, x, y, targets, cutout_size)
    if measured.size == 0:
        return result
    col = np.rint(x)
    row = np.rint(y)
    half_cutout = cutout_size // 2

    col_int = np.nan_to_num(col, nan=-(10**9)).astype(np.intp)
    row_int = np.nan_to_num(row, nan=-(10**9)).astype(np.intp)
    lists = _neighbour_lists(col, row, targets[measured], reach=half_cutout + prf_table.half_size)
    n_members = np.array([len(m) for m in lists])
    sources = np.unique(np.concatenate(lists))
    unique_index = np.zeros(x.size, dtype=np.intp)
    unique_index[sources] = np.arange(sources.size)
    windows = _stamp_windows(prf_table, x, y, col_int, row_int, sources, half_cutout)
    order = np.argsort(n_members, kind="stable")
    sorted_unknowns = n_members[order] + int(fit_sky)
    start = 0
    while start < order.size:
        # A batch holds problems of one size only: padding a problem to another's size would
        # change LAPACK's blocking, and with it the last bits of the result, depending on
        # which targets happen to share a call.
        same_size = int(np.searchsorted(sorted_unknowns, sorted_unknowns[start], side="right")) - start
        n_batch = max(1, min(same_size, _ELEMENT_BUDGET // (int(sorted_unknowns[start]) * cutout_size**2)))
        batch = order[start : start + n_batch]
        n_unknown = n_members[batch[0]]
        start += n_batch

        members = np.full((batch.size, n_unknown), -1, dtype=np.intp)
        for i, b in enumerate(batch):
            members[i, : n_members[b]] = lists[b]
        centre_col = col_int[targets[measured[batch]]]
        centre_row = row_int[targets[measured[batch]]]
        data, weight, inside = _gather_cutouts(image, sky, sigma, centre_col, centre_row, half_cutout)
        design = _design_matrices(
            windows, unique_index, col_int, row_int, members, centre_col, centre_row, half_cutout, prf_table.half_size
        )
        if fit_sky:
            design = np.concatenate([design, np.ones((design.shape[0], 1, design.shape[2]))], axis=1)
        solution, variance, unconstrained, diagonal = _solve_batch(design, data, weight)
        fitted = solution[:, 0]

        target_prf = design[:, 0, :]
        prf_in_cutout = target_prf.sum(axis=1)
        covered = np.where(weight > 0, target_prf, 0.0).sum(axis=1) / np.where(prf_in_cutout > 0, prf_in_cutout, 1.0)
        model = np.einsum("bk,bkp->bp", solution, design)
        chi_squared = (data - model) ** 2 * weight / (1.0 + pixel_error**2 * model**2 * weight)
        on_data = np.where(weight > 0, target_prf, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            rchisq = (on_data * chi_squared).sum(axis=1) / on_data.sum(axis=1)
            # Target-neighbour couplings <P_0, P_k>_w, sky excluded: row 0 of the normal matrix.
            coupling = np.einsum("bp,bkp->bk", target_prf * weight, design[:, 1 : n_unknown, :])
            neighbour_flux = (coupling * solution[:, 1:n_unknown]).sum(axis=1) / diagonal[:, 0]
            fracflux = neighbour_flux / np.abs(fitted)
            neighbour_light = np.abs(coupling * solution[:, 1:n_unknown]).sum(axis=1) / diagonal[:, 0]
        blended = is_blended(neighbour_flux, fitted, noise_scale * np.sqrt(variance))
        variance = total_variance(variance, fitted, neighbour_light, noise_scale, prf_error, neighbour_error)
        finish_measurement(
            result, measured[batch], fitted, variance, covered, inside.all(axis=1), unconstrained,
            rchisq, fracflux, blended,
        )
    return result
