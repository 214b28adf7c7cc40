"""The Tractor (Lang, Hogg & Mykytyn 2016) as an optional forced-photometry engine.

`tractor_photometry` measures the same targets as `mbphot.engine.solve.forced_photometry`,
on the same cutouts, with the same neighbours, sky and noise, but lets The Tractor render the
sources and solve for the fluxes, one cutout at a time. It exists to cross-check the native
engine against the community's reference forced-photometry code and to let users who trust
The Tractor run it inside the same pipeline.

The Tractor is not on PyPI (the PyPI packages called ``tractor`` and ``astrometry`` are
unrelated projects), so it is imported only when this engine is used.
"""

import numpy as np

from .prf import PRFTable
from .solve import FLAGS, MIN_COVERED_FRACTION, Measurement, _gather_cutouts, _neighbour_lists, start_measurement, total_variance

__all__ = ["INSTALL_HINT", "tractor_available", "tractor_photometry"]

INSTALL_HINT = (
    "The Tractor engine needs The Tractor (github.com/dstndstn/tractor) and astrometry.net's "
    "`astrometry.util` (github.com/dstndstn/astrometry.net). The Tractor is not on PyPI, and the "
    "PyPI packages named `tractor` and `astrometry` are unrelated projects: do not `pip install "
    "tractor`. On a machine with network access, with swig and a C compiler, run `pip install "
    "numpy setuptools wheel` and then `pip install --no-build-isolation "
    "git+https://github.com/dstndstn/tractor`; for `astrometry.util` either `pip install "
    "git+https://github.com/dstndstn/astrometry.net` (builds all of astrometry.net) or put a "
    "checkout of it on the path as the package `astrometry` (its pure-Python `util` modules are "
    "all this engine needs). Or use a platform where The Tractor is preinstalled, such as NASA "
    "Fornax; otherwise use the native engine (`mbphot`)."
)


def _import_tractor():
    """The Tractor and its optimizer, or an ImportError that says how to get them.

    The optimizer module is imported up front because it is where astrometry.net's
    ``astrometry.util`` is first needed, and because the unrelated PyPI ``tractor`` has no
    such module.
    """
    try:
        import tractor
        from tractor.lsqr_optimizer import LsqrOptimizer
    except ImportError as error:
        raise ImportError(f"could not import The Tractor ({error}). {INSTALL_HINT}") from error
    return tractor, LsqrOptimizer


def tractor_available() -> bool:
    """Whether The Tractor (the real one, with its optimizer) can be imported here."""
    try:
        _import_tractor()
    except ImportError:
        return False
    return True


def _covered_fraction(table: PRFTable, x: float, y: float, weight: np.ndarray, half_cutout: int):
    """Fraction of the target's PRF inside the cutout that falls on usable pixels.

    Computed from the same stamp as the native engine so both engines flag alike.
    """
    reach = min(half_cutout, table.half_size)
    in_stamp = slice(table.half_size - reach, table.half_size + reach + 1)
    in_cutout = slice(half_cutout - reach, half_cutout + reach + 1)
    stamp = table.stamp_at(x, y)[in_stamp, in_stamp]
    weight = weight[in_cutout, in_cutout]
    total = stamp.sum()
    return np.where(weight > 0, stamp, 0.0).sum() / total if total > 0 else 0.0


def _target_variance(sources, cutout, fit_sky):
    """The target's flux variance: the first diagonal element of the inverse Fisher matrix.

    The Tractor's own ``variance=True`` results are the inverse of the Fisher *diagonal*, the
    variance with every other parameter held fixed, which understates the error of a blended
    source. The full matrix is built here from The Tractor's unit-flux models (the model is
    linear in the fluxes, so they are its derivatives; The Tractor's ``getDerivs`` is not used
    because it drops a flux whose finite-difference step is lost in rounding, as happens for
    fluxes above ~1e16 image units). Parameters that touch no usable pixel are left out, as
    the native engine decouples them.
    """
    columns = []
    for source in sources:
        unit = np.zeros(cutout.shape)
        patch = source.getUnitFluxModelPatch(cutout)
        if patch is not None:
            patch.addTo(unit)
        columns.append(unit.ravel())
    if fit_sky:
        columns.append(np.ones(cutout.shape[0] * cutout.shape[1]))
    design = np.array(columns) * cutout.getInvError().ravel()
    fisher = design @ design.T
    constrained = np.flatnonzero(np.diag(fisher) > 0)
    if constrained.size == 0 or constrained[0] != 0:
        return np.nan
    return np.linalg.inv(fisher[np.ix_(constrained, constrained)])[0, 0]


def tractor_photometry(
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
) -> Measurement:
    """Forced PRF photometry of ``targets`` with The Tractor, one cutout per target.

    Same inputs, outputs and flags as `mbphot.engine.solve.forced_photometry`: each target's
    ``cutout_size`` x ``cutout_size`` cutout, centred on its nearest pixel, is modelled by The
    Tractor with a ``PointSource`` for the target and for every source whose PRF stamp reaches
    the cutout, all at their fixed catalogue positions, with only the fluxes (and, with
    ``fit_sky``, a ``ConstantSky``) free. The PSF is a ``PixelizedPSF`` made from the table's
    zero-phase stamp, which The Tractor shifts to each source's sub-pixel position with a
    Lanczos-3 kernel. The Tractor's pixel convention (0-based, pixel centres on integers) is the
    one used here, so positions only move by the cutout's origin.

    Parameters
    ----------
    image : ndarray
        The image (any linear unit), NaN where there is no data.
    x, y : ndarray
        0-based pixel positions of *every* catalogue source on this image (pixel centres at
        integers).
    targets : ndarray of int
        Indices into ``x``/``y`` of the sources to measure.
    prf_table : PRFTable
        The band's PRF, see `mbphot.engine.build_prf_table`.
    cutout_size : int
        Odd side of the square cutout in pixels.
    sky : ndarray or float
        Sky level per pixel (same shape as ``image``) or one value, subtracted before the fit.
    sigma : ndarray or float
        Per-pixel noise (1-sigma), same shape as ``image`` or one value; the inverse variance
        given to The Tractor is ``1 / sigma**2``, zero where the image, sky or sigma is not
        finite or sigma is not positive.
    fit_sky : bool
        Also fit a constant sky offset in each cutout (on top of ``sky``).

    noise_scale, prf_error : float
        Added to the uncertainties, see `mbphot.engine.solve.total_variance` (the neighbours'
        share is not computed here).

    Returns
    -------
    Measurement
        Fitted total fluxes (image unit times pixels) and their 1-sigma uncertainties from
        the inverse Fisher matrix, including the covariance with blended neighbours and the
        sky; NaN where the source could not be measured. Flags as
        `mbphot.engine.solve.forced_photometry`, ``fit_failed`` where The Tractor raised or
        returned a non-finite flux or variance. ``fracmasked`` is measured; ``rchisq`` and
        ``fracflux`` are NaN (this engine exists to cross-check fluxes).

    Raises
    ------
    ImportError
        If The Tractor (with astrometry.net's ``astrometry.util``) is not installed.
    ValueError
        If ``cutout_size`` is even.
    """
    tractor, LsqrOptimizer = _import_tractor()
    x, y, targets, result, measured = start_measurement(image.shape, x, y, targets, cutout_size)
    flux, flux_err, flag = result.flux, result.flux_err, result.flag
    if measured.size == 0:
        return result
    col = np.rint(x)
    row = np.rint(y)
    half_cutout = cutout_size // 2

    lists = _neighbour_lists(col, row, targets[measured], reach=half_cutout + prf_table.half_size)
    psf = tractor.PixelizedPSF(prf_table.stamp_at(0.0, 0.0))
    optimizer = LsqrOptimizer()
    for index, members in zip(measured, lists):
        target = targets[index]
        centre_col = np.array([int(col[target])])
        centre_row = np.array([int(row[target])])
        data, weight, inside = _gather_cutouts(image, sky, sigma, centre_col, centre_row, half_cutout)
        data = data.reshape(cutout_size, cutout_size)
        weight = weight.reshape(cutout_size, cutout_size)
        covered = _covered_fraction(prf_table, x[target], y[target], weight, half_cutout)
        result.fracmasked[index] = 1.0 - covered
        if covered < 1.0 - 1e-9 or not inside.all():
            flag[index] |= FLAGS["partial_coverage"]
        if covered < MIN_COVERED_FRACTION:
            flag[index] |= FLAGS["no_data"]
            continue

        origin_x = centre_col[0] - half_cutout
        origin_y = centre_row[0] - half_cutout
        sources = [
            tractor.PointSource(tractor.PixPos(x[m] - origin_x, y[m] - origin_y), tractor.Flux(0.0)) for m in members
        ]
        for source in sources:
            source.freezeParam("pos")
        cutout = tractor.Image(
            data=data,
            invvar=weight,
            psf=psf,
            wcs=tractor.NullWCS(),
            photocal=tractor.LinearPhotoCal(1.0),
            sky=tractor.ConstantSky(0.0),
        )
        if fit_sky:
            cutout.freezeAllBut("sky")
        else:
            cutout.freezeAllParams()
        model = tractor.Tractor([cutout], sources, optimizer=optimizer)
        try:
            model.optimize_forced_photometry(sky=fit_sky, priors=False, shared_params=False, wantims=False)
            fitted = sources[0].getBrightness().getValue()
            variance = _target_variance(sources, cutout, fit_sky)
        except (AssertionError, ArithmeticError, ValueError):
            # The Tractor signals numerical trouble (it works in float32) with assertions and
            # arithmetic errors, a singular Fisher matrix raises LinAlgError (a ValueError):
            # one bad cutout must not stop a field. Anything else is a bug and propagates.
            fitted = variance = np.nan
        if not (np.isfinite(fitted) and np.isfinite(variance) and variance > 0):
            flag[index] |= FLAGS["fit_failed"]
            continue
        flux[index] = fitted
        flux_err[index] = np.sqrt(total_variance(variance, fitted, 0.0, noise_scale, prf_error))
    return result
