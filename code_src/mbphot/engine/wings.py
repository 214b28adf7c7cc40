"""A PRF's outer profile, measured from the whole image rather than from a few isolated stars.

A PRF measured from stars (`mbphot.engine.epsf.measure_prf`) is reliable only where the stars
are bright against their neighbours and the sky: within a few FWHM. Beyond, the light of an
IRAC PRF (5-10 % of the flux out to the 12" calibration aperture) is fainter than the light of
the neighbours and the errors of the sky map, and a PRF whose wings are too weak does harm
twice: every flux fitted with it is too low, and the missing wing light of each bright source
is fitted as flux of its faint neighbours.

Here the wings are measured from every source of a section at once. The residual of a fit
(data minus sky minus the sources modelled with the current PRF) holds, around every source,
its flux times the PRF's error. Written as a radial profile, piecewise linear between nodes
(hat functions ``h_k(r)``), the error's image is ``sum_k w_k (F * h_k)``, where ``F`` is the
image of the fitted fluxes at the sources' positions: linear in the node values ``w_k``, which
a weighted least-squares fit of the residual gives. A constant per sky tile is fitted with
them, so that a smooth error of the sky map is not taken for wing light; what tells the two
apart is that wing light follows the sources. The fluxes depend on the PRF in turn:
`refine_wings` alternates the two fits, as the caller's fit function allows.

Everything here is pure: arrays in, arrays out.
"""

import numpy as np
from scipy import signal

from .prf import normalise_prf, point_weights

__all__ = ["flux_image", "fit_radial_correction", "with_radial_correction", "wing_nodes"]


def wing_nodes(inner_radius_pix: float, outer_radius_pix: float, n_nodes: int = 8) -> np.ndarray:
    """Radii of the profile's nodes: the correction is zero at the first, free at the others
    and zero beyond the last, the outer radius (light beyond it counts as sky, as in the
    instrument's calibration aperture).

    Spaced more finely where the profile changes fastest (geometric spacing).
    """
    if not 0 < inner_radius_pix < outer_radius_pix:
        raise ValueError(f"need 0 < inner < outer radius, got {inner_radius_pix}, {outer_radius_pix}")
    return np.geomspace(inner_radius_pix, outer_radius_pix, n_nodes + 1)


def _hat(radius, nodes, k):
    """Piecewise linear function of ``radius``: 1 at ``nodes[k]``, 0 at its neighbours (the
    last node's ends there)."""
    centre = nodes[k]
    high = nodes[k + 1] if k + 1 < nodes.size else None
    if k == 0:
        rising = (radius <= centre).astype(np.float64)
    else:
        low = nodes[k - 1]
        rising = np.clip((radius - low) / (centre - low), 0.0, 1.0) * (radius <= centre)
    if high is None:
        return rising
    falling = np.clip((high - radius) / (high - centre), 0.0, 1.0) * (radius > centre)
    return rising + falling


def _free(nodes, outer_zero=False):
    """The nodes whose value is fitted: all but the first, unless the first is the centre, and
    but the last with ``outer_zero``."""
    return range(0 if nodes[0] == 0 else 1, nodes.size - (1 if outer_zero else 0))


def flux_image(shape, x, y, flux) -> np.ndarray:
    """Image of point fluxes placed by `point_weights` at their 0-based positions (x, y);
    non-finite entries are left out."""
    use = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & (flux != 0)
    rows, cols, weights = point_weights(x[use], y[use])
    inside = (cols >= 0) & (cols < shape[1]) & (rows >= 0) & (rows < shape[0])
    values = weights * flux[use][None, :]
    return np.bincount(
        (rows * shape[1] + cols)[inside], values[inside], minlength=shape[0] * shape[1]
    ).reshape(shape)


def _without_tile_means(image, weight, tile_size):
    """``image`` less its weighted mean in each ``tile_size`` square (tiles from pixel 0)."""
    ny, nx = image.shape
    pad_y, pad_x = (-ny) % tile_size, (-nx) % tile_size
    shape = ((ny + pad_y) // tile_size, tile_size, (nx + pad_x) // tile_size, tile_size)
    padded = np.pad(image * weight, ((0, pad_y), (0, pad_x))).reshape(shape)
    weights = np.pad(weight, ((0, pad_y), (0, pad_x))).reshape(shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = padded.sum(axis=(1, 3)) / weights.sum(axis=(1, 3))
    means = np.nan_to_num(means)
    expanded = np.repeat(np.repeat(means, tile_size, axis=0), tile_size, axis=1)[:ny, :nx]
    return image - expanded


def fit_radial_correction(residual, sigma, points, nodes, tile_size, margin=0, outer_zero=False):
    """Node values of the radial profile that, added to the PRF, best explain ``residual``.

    Parameters
    ----------
    residual : ndarray
        Data minus sky minus the model of every source with the current PRF (NaN where
        unusable).
    sigma : ndarray or float
        Per-pixel noise.
    points : ndarray
        `flux_image` of the fluxes the model used, same shape.
    nodes : ndarray
        `wing_nodes`; the profile is zero at ``nodes[0]``.
    tile_size : int
        Side of the sky tiles whose constants are fitted too.
    margin : int
        Pixels along the edges left out (their sources' light is partly off the section).
    outer_zero : bool
        Keep the last node at zero, so the correction falls continuously to zero there (a
        PRF whose outer wings are right), instead of ending at the last node (the edge of a
        calibration aperture).

    Returns
    -------
    values, errors : ndarray
        Per free node (all but a first one off the centre, and but the last with
        ``outer_zero``): the PRF's pixel value per unit flux to add there, and its
        statistical error (white noise).
    """
    residual = np.asarray(residual, dtype=np.float64)
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), residual.shape)
    usable = np.isfinite(residual) & np.isfinite(sigma) & (sigma > 0)
    if margin > 0:
        usable[:margin], usable[-margin:], usable[:, :margin], usable[:, -margin:] = False, False, False, False
    weight = np.where(usable, 1.0 / np.where(usable, sigma, 1.0) ** 2, 0.0)
    reach = int(np.ceil(nodes[-1]))
    offsets = np.arange(-reach, reach + 1)
    radius = np.hypot(offsets[:, None], offsets[None, :])
    target = _without_tile_means(np.where(usable, residual, 0.0), weight, tile_size)
    basis = [
        _without_tile_means(signal.fftconvolve(points, _hat(radius, nodes, k), mode="same"), weight, tile_size)
        for k in _free(nodes, outer_zero)
    ]
    normal = np.array([[np.sum(weight * a * b) for b in basis] for a in basis])
    n_free = len(basis)
    right = np.array([np.sum(weight * a * target) for a in basis])
    try:
        covariance = np.linalg.inv(normal)
    except np.linalg.LinAlgError:
        return np.full(n_free, np.nan), np.full(n_free, np.nan)
    return covariance @ right, np.sqrt(np.clip(np.diag(covariance), 0.0, None))


def with_radial_correction(prf, oversampling, nodes, values, outer_zero=False) -> np.ndarray:
    """The PRF (samples ``oversampling`` per pixel) plus the radial profile given by ``values``
    at the free nodes (see `fit_radial_correction`), on a grid large enough to hold it,
    normalised to unit flux.

    Samples the correction would make negative are set to zero.
    """
    prf = normalise_prf(prf, oversampling)
    reach = int(np.ceil(nodes[-1])) + 1
    half = max(prf.shape[0] // 2, reach * oversampling)
    pad = half - prf.shape[0] // 2
    grown = np.pad(prf, pad) if pad > 0 else prf.copy()
    offsets = (np.arange(grown.shape[0]) - grown.shape[0] // 2) / oversampling
    radius = np.hypot(offsets[:, None], offsets[None, :])
    correction = sum(value * _hat(radius, nodes, k) for k, value in zip(_free(nodes, outer_zero), values))
    return normalise_prf(np.clip(grown + correction, 0.0, None), oversampling)
