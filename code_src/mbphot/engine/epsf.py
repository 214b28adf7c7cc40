"""The effective PRF of an image, measured from its own isolated stars, and its offset from
the catalogue.

A published PRF file is not the PRF of a given mosaic: the sky's PRF is rotated by the roll
angle, broadened by the pointing and resampling, and catalogue positions are off the light by
a fraction of an arcsecond per source plus a common offset per image. `measure_prf` builds the
image's effective PRF (Anderson & King 2000's ePSF: the pixel value at an offset u from a unit
source is P(u)) from bright, isolated, unsaturated, compact sources:

1. First-pass fluxes of every source (a `scene_photometry` fit with the file's PRF and a fitted
   sky, unless the caller gives them) model the neighbours, which are subtracted.
2. Selection: signal-to-noise above ``min_snr``; the neighbours' modelled light within the fit
   radius R below ``max_neighbour_fraction`` of the star's own; the aperture fully on data;
   the peak below ``saturation_level``; compact, i.e. its PRF-fit flux agrees with its
   aperture flux within the aperture (a resolved galaxy puts less light in the PRF fit).
3. Each star is registered (flux and sub-pixel shift fitted by Gauss-Newton; no local
   constant, which within R is degenerate with the PRF's outer profile) and the PRF within R
   is solved for as a cubic B-spline on a grid ``oversampling`` times finer than the pixels,
   by linear least squares over every star pixel (each star scaled by its flux, at its own
   sub-pixel phase), regularised toward the file's PRF (a small ridge plus a curvature
   penalty on the difference), so that where samples are sparse the correction is smooth and
   the file's shape is kept (where the stars are few or faint, the difference is held to
   about ``prior_error`` of the PRF's peak, which a few stars' noise would otherwise exceed),
   and constrained to put the same flux on the image at every sub-pixel phase. Registration,
   solve and a refit of the neighbours within R (jointly with the star, with the new PRF)
   alternate, with Anderson mixing of the rounds; stars whose fit stays poor (reduced chi^2
   or fit-to-aperture flux ratio off the others') are dropped and the PRF rebuilt.
4. Wings and normalisation: beyond R the file's wing shape is kept, scaled to match the
   measured PRF in the annulus just inside R (blended linearly over the last pixel), out to
   the pixel edges of the file's box; or, with ``file_wings``, at the file's own share of
   the total flux. The result is normalised to unit total flux:
   ``aperture_correction`` reports total / within-R. Whether the true wings hold more light
   than that (IRAC's reach beyond the 17 x 17 files) is measured from the stars' growth
   curves between R and ``wing_radius_pix``, neighbours masked (``wing_excess``); with
   ``extend_wings=True`` a significant excess is added to the PRF as an r^-3 wing beyond the
   box, so fits count it. It is off by default because sky-map errors and undetected
   neighbours also enter that estimate: check ``wing_excess`` against the instrument's
   aperture corrections before turning it on.
5. Centring: the result is shifted so that its core centroid (`prf.prf_centre`, the
   engine's convention) falls on the central sample; the stars' fitted shifts plus that
   re-centring are the light's offsets from the catalogue, and their median is the image's
   common offset (with a robust error). The caller adds it to every catalogue position.

With fewer than ``min_stars`` stars the file's PRF is returned with ``used_file=True`` and a
``reason``, for the caller to warn.

Use, per image (or region of a large image)::

    measured = measure_prf(image, sky, sigma, x, y, file_prf, file_oversampling,
                           candidates=catalogue_stars, saturation_level=...)
    if measured.used_file:
        warn(measured.reason)
    x_light, y_light = x + measured.offset_x_pix, y + measured.offset_y_pix
    table = build_prf_table(measured.prf, measured.oversampling)
    flux, flux_err, flag = scene_photometry(image, x_light, y_light, everything, table, ...)

then `calibrate.noise_inflation` on ``image - sky - render_sources(..., flux, table)`` and
`calibrate.prf_model_error` on ``measured.star_indices`` give the factor k and the term
epsilon of the final error sqrt((k * flux_err)^2 + (epsilon * flux)^2).
"""

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import splu
from scipy.spatial import cKDTree

from .kernels import add_interpolated_stamps
from .prf import PRFTable, build_prf_table, normalise_prf, prf_centre
from .scene import scene_photometry
from .solve import FLAGS

__all__ = ["ImageOffset", "MeasuredPRF", "fwhm_pixels", "image_offset", "measure_prf", "render_sources"]

_MAD_TO_SIGMA = 1.4826
_MEDIAN_EFFICIENCY = 1.2533  # error of a median over that of a mean, Gaussian samples
# Past registrations and PRF solves that the next PRF is extrapolated from (`_Mixing`).
_MIXING_DEPTH = 2


@dataclass(frozen=True, eq=False)
class MeasuredPRF:
    """The effective PRF of one image and how it was obtained.

    Attributes
    ----------
    prf : ndarray
        The PRF, sampled ``oversampling`` times per image pixel, normalised so that a unit
        source puts unit flux on the image (samples sum to ``oversampling**2``), core centroid
        on the central sample. Pass it to ``build_prf_table(prf, oversampling)``.
    oversampling : int
    n_stars : int
        Stars used (0 when nothing was measured).
    used_file : bool
        True when ``prf`` is the file's PRF (too few stars); see ``reason``.
    reason : str
        Why the file's PRF was used, or a one-line summary of the measurement.
    offset_x_pix, offset_y_pix : float
        Common offset of the light from the catalogue positions (median over the stars), in
        image pixels: the light of a source catalogued at (x, y) is at
        (x + offset_x_pix, y + offset_y_pix).
    offset_x_err_pix, offset_y_err_pix : float
        Robust 1-sigma errors of those medians (NaN with fewer than 3 stars).
    aperture_correction : float
        Total flux over the flux on the pixels within ``fit_radius_pix`` of a source centred
        on a pixel, for ``prf`` (the file's own ratio when ``used_file``). Informative: ``prf``
        is already normalised to total flux, so fits with it need no correction.
    fit_radius_pix : float
        Radius R within which the stars were measured; the file's wing shape is used beyond.
    fwhm_pix, file_fwhm_pix : float
        FWHM of the measured and the file's PRF (`fwhm_pixels`).
    star_indices : ndarray of int
        Catalogue indices of the stars used; with the file's PRF, of those found: too few to
        measure the PRF, they still measure its error (`calibrate.prf_model_error`).
    star_fluxes : ndarray
        Their fitted total fluxes with the measured PRF.
    star_shift_x_pix, star_shift_y_pix : ndarray
        Each star's offset of its light from its catalogue position.
    rchisq_file, rchisq_measured : float
        Median reduced chi^2 of the stars' fits (within R) with the file's and the measured PRF.
    wing_excess, wing_excess_err : float
        Light, per unit total flux, that the stars show between R and ``wing_radius_pix`` beyond
        what the PRF (file wings included) puts there (a few 0.01 where the true wings reach
        beyond the file's box), and its error (times ``noise_factor``); NaN if not measured.
    wings_extended : bool
        True when that excess was added to ``prf`` (``extend_wings``).
    """

    prf: np.ndarray
    oversampling: int
    n_stars: int
    used_file: bool
    reason: str
    offset_x_pix: float = 0.0
    offset_y_pix: float = 0.0
    offset_x_err_pix: float = np.nan
    offset_y_err_pix: float = np.nan
    aperture_correction: float = np.nan
    fit_radius_pix: float = np.nan
    fwhm_pix: float = np.nan
    file_fwhm_pix: float = np.nan
    star_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.intp))
    star_fluxes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    star_shift_x_pix: np.ndarray = field(default_factory=lambda: np.zeros(0))
    star_shift_y_pix: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rchisq_file: float = np.nan
    rchisq_measured: float = np.nan
    wing_excess: float = np.nan
    wing_excess_err: float = np.nan
    wings_extended: bool = False


@dataclass(frozen=True, eq=False)
class ImageOffset:
    """Common offset of an image's light from the catalogue, in image pixels.

    The light of a source catalogued at (x, y) is at (x + dx_pix, y + dy_pix). Errors are
    robust 1-sigma errors of the medians (NaN with fewer than 3 sources).
    """

    dx_pix: float
    dy_pix: float
    dx_err_pix: float
    dy_err_pix: float
    n_sources: int
    source_indices: np.ndarray


# ---------------------------------------------------------------------------------------------
# PRFs as functions of the offset u (image pixels) from the source position


class _FileProfile:
    """The file's PRF as a smooth function of the offset from its core centroid.

    The samples are the PRF at pixel offsets up to the box's edge, so the function runs on
    half a pixel and more beyond it: the spline is taken over the samples padded with zeros,
    and ``grid_extent`` (pixels) reaches where it has fallen to zero. Sampled only out to the
    last sample, an oversampled copy would lose the outer half pixel of the box, which for
    the 17 x 17 IRAC files holds about 1 % of the light.
    """

    _PAD_PIXELS = 2

    def __init__(self, prf, oversampling):
        self.oversampling = int(oversampling)
        self.samples = normalise_prf(prf, oversampling)
        centre = prf_centre(self.samples)
        rows, cols = self.samples.shape
        self.half_extent = min(centre[0], rows - 1 - centre[0], centre[1], cols - 1 - centre[1]) / self.oversampling
        pad = self._PAD_PIXELS * self.oversampling
        self.coefficients = ndimage.spline_filter(np.pad(self.samples, pad), order=3, mode="constant")
        self.centre = (centre[0] + pad, centre[1] + pad)
        self.grid_extent = self.half_extent + self._PAD_PIXELS

    def __call__(self, ux, uy):
        ux, uy = np.broadcast_arrays(np.asarray(ux, dtype=np.float64), np.asarray(uy, dtype=np.float64))
        coords = np.stack([self.centre[0] + self.oversampling * uy, self.centre[1] + self.oversampling * ux])
        return ndimage.map_coordinates(self.coefficients, coords, order=3, mode="constant", cval=0.0,
                                       prefilter=False)


def _bspline_weights(fraction):
    """Cubic B-spline weights of the four nodes around each position, and their derivatives."""
    f = fraction[..., None]
    powers = np.concatenate([np.ones_like(f), f, f * f, f * f * f], axis=-1)
    basis = np.array([[1, -3, 3, -1], [4, 0, -6, 3], [1, 3, 3, -3], [0, 0, 0, 1]], dtype=np.float64) / 6.0
    derivative = np.array([[-3, 6, -3, 0], [0, -12, 9, 0], [3, 6, -9, 0], [0, 0, 3, 0]], dtype=np.float64) / 6.0
    # derivative rows hold the coefficients of (1, f, f^2) for d/df.
    weights = powers @ basis.T
    slopes = powers[..., :3] @ derivative[:, :3].T
    return weights, slopes


class _SplineProfile:
    """A PRF as a cubic B-spline surface with nodes ``1/oversampling`` pixel apart, centred on
    the central node; linear in its coefficients, so a least-squares solve can fit them."""

    def __init__(self, coefficients, oversampling):
        self.coefficients = coefficients
        self.oversampling = int(oversampling)
        self.centre = (coefficients.shape[0] - 1) / 2

    @classmethod
    def from_function(cls, function, oversampling, half_size_pix):
        n = 2 * int(np.ceil(half_size_pix * oversampling)) + 1
        offsets = (np.arange(n) - (n - 1) / 2) / oversampling
        values = function(offsets[None, :], offsets[:, None])
        return cls(ndimage.spline_filter(values, order=3, mode="mirror"), oversampling)

    def _terms(self, ux, uy):
        n = self.coefficients.shape[0]
        tx = self.centre + np.asarray(ux, dtype=np.float64) * self.oversampling
        ty = self.centre + np.asarray(uy, dtype=np.float64) * self.oversampling
        fx, fy = np.floor(tx), np.floor(ty)
        wx, dwx = _bspline_weights(tx - fx)
        wy, dwy = _bspline_weights(ty - fy)
        ix = fx.astype(np.intp)[..., None] + np.arange(-1, 3)
        iy = fy.astype(np.intp)[..., None] + np.arange(-1, 3)
        wx = np.where((ix >= 0) & (ix < n), wx, 0.0)
        wy = np.where((iy >= 0) & (iy < n), wy, 0.0)
        dwx = np.where((ix >= 0) & (ix < n), dwx, 0.0)
        dwy = np.where((iy >= 0) & (iy < n), dwy, 0.0)
        return np.clip(ix, 0, n - 1), np.clip(iy, 0, n - 1), wx, wy, dwx, dwy

    def evaluate(self, ux, uy, gradient=False):
        ix, iy, wx, wy, dwx, dwy = self._terms(ux, uy)
        c = self.coefficients[iy[..., :, None], ix[..., None, :]]
        value = np.einsum("...a,...b,...ab->...", wy, wx, c)
        if not gradient:
            return value
        gx = np.einsum("...a,...b,...ab->...", wy, dwx, c) * self.oversampling
        gy = np.einsum("...a,...b,...ab->...", dwy, wx, c) * self.oversampling
        return value, gx, gy

    def design(self, ux, uy):
        """Sparse entries (sample, coefficient, weight) of the values at (ux, uy)."""
        ix, iy, wx, wy, _, _ = self._terms(ux, uy)
        n = self.coefficients.shape[0]
        weights = (wy[:, :, None] * wx[:, None, :]).reshape(ux.size, 16)
        columns = (iy[:, :, None] * n + ix[:, None, :]).reshape(ux.size, 16)
        rows = np.repeat(np.arange(ux.size), 16)
        return rows, columns.ravel(), weights.ravel()


class _Composite:
    """The measured PRF within R joined to the file's wings beyond it, shifted by ``shift``
    (the model at u is the inner profile at u + shift): the function `measure_prf` returns
    sampled."""

    def __init__(self, inner, file_profile, radius, scale=1.0, wing_scale=1.0, shift=(0.0, 0.0)):
        self.inner, self.file, self.radius = inner, file_profile, radius
        self.scale, self.wing_scale, self.shift = scale, wing_scale, shift

    def __call__(self, ux, uy):
        ux = np.asarray(ux, dtype=np.float64) + self.shift[0]
        uy = np.asarray(uy, dtype=np.float64) + self.shift[1]
        ux, uy = np.broadcast_arrays(ux, uy)
        r = np.hypot(ux, uy)
        blend = np.clip(self.radius - r, 0.0, 1.0)
        value = (1.0 - blend) * self.wing_scale * self.file(ux, uy)
        inside = blend > 0
        value[inside] += blend[inside] * self.scale * self.inner.evaluate(ux[inside], uy[inside])
        return value


def fwhm_pixels(prf: np.ndarray, oversampling: int = 1) -> float:
    """FWHM of a PRF in image pixels, as the diameter of the circle whose area is that of the
    region above half the peak (oversampled samples each count ``1/oversampling**2``)."""
    prf = np.nan_to_num(np.asarray(prf, dtype=np.float64))
    fine = 4 if oversampling < 4 else 1  # resample coarse PRFs so the area is not pixel-quantised
    if fine > 1:
        prf = ndimage.zoom(prf, fine, order=3)
    area = np.count_nonzero(prf >= 0.5 * prf.max()) / (oversampling * fine) ** 2
    return float(2.0 * np.sqrt(area / np.pi))


def _sample(function, oversampling, half_extent_pix):
    n = 2 * int(np.floor(half_extent_pix * oversampling)) + 1
    offsets = (np.arange(n) - (n - 1) / 2) / oversampling
    return function(offsets[None, :], offsets[:, None]), offsets


# ---------------------------------------------------------------------------------------------
# Star cutouts: data minus sky minus modelled neighbours, within R of the catalogue position


@dataclass
class _Stars:
    index: np.ndarray  # catalogue indices
    x: np.ndarray  # catalogue positions
    y: np.ndarray
    ux: list  # per star: pixel offsets from the catalogue position (aperture pixels)
    uy: list
    data: list  # data - sky - neighbours
    sigma: list
    neighbours: list  # the subtracted neighbour light on those pixels
    # Per star: data - sky - the light of the neighbours beyond R (first-pass fluxes), and the
    # offsets (dx, dy) of the neighbours within R, whose fluxes `_refit_neighbours` fits.
    base: list = field(default_factory=list)
    near: list = field(default_factory=list)


def render_sources(shape, x, y, flux, table: PRFTable, skip=None) -> np.ndarray:
    """Image of point sources (flux times the table's stamp) at 0-based positions (x, y).

    Sources with a non-finite position or flux, or listed in ``skip``, are left out. With the
    fitted fluxes, ``image - sky - render_sources(...)`` is the residual that
    `calibrate.noise_inflation` samples.
    """
    image_rows, image_cols = shape
    half = table.half_size
    pad = 2 * half
    model = np.zeros((image_rows + 2 * pad, image_cols + 2 * pad))
    use = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux)
    if skip is not None:
        use[np.asarray(skip, dtype=np.intp)] = False
    col, row = np.rint(x), np.rint(y)
    use &= (col >= -half) & (col < image_cols + half) & (row >= -half) & (row < image_rows + half)
    chosen = np.flatnonzero(use)
    add_interpolated_stamps(
        table.stamps, float(table.phases[0]), float(table.phases[1] - table.phases[0]), x[chosen] - col[chosen],
        y[chosen] - row[chosen], col[chosen].astype(np.intp), row[chosen].astype(np.intp),
        np.asarray(flux, dtype=np.float64)[chosen], model,
    )
    return model[pad : pad + image_rows, pad : pad + image_cols]


def _first_pass(image, sky, sigma, x, y, table, radius):
    cutout = 2 * int(np.ceil(2 * radius)) + 1
    on = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    flux, flux_err, flag = scene_photometry(image, x, y, on, table, cutout, sky, sigma, fit_sky=True)[:3]
    all_flux = np.full(x.size, np.nan)
    # Blended and poorly fitted sources still model their light; only unmeasured ones do not.
    all_flux[on] = np.where(flag & ~(FLAGS["blended"] | FLAGS["poor_fit"]) == 0, flux, np.nan)
    return all_flux


def _stamp_on(table, x, y, rows, cols):
    """A source's stamp (``table``, unit flux, at pixel position (x, y)) on the given pixels."""
    stamp = table.stamp_at(x, y)
    h = table.half_size
    dr, dc = rows - int(np.rint(y)) + h, cols - int(np.rint(x)) + h
    ok = (dr >= 0) & (dr <= 2 * h) & (dc >= 0) & (dc <= 2 * h)
    values = np.zeros(rows.size)
    values[ok] = stamp[dr[ok], dc[ok]]
    return values


def _cutouts(image, sky, sigma, x, y, members, radius, neighbour_model, own_model_flux, table, near_tree=None):
    """Aperture pixels (centres within ``radius`` of the catalogue position) of each member;
    members whose aperture leaves the image or has unusable pixels are dropped.

    With ``near_tree`` (a `cKDTree` of every source's position), the neighbours whose centres
    lie within ``radius`` are listed for `_refit_neighbours`."""
    rows_n, cols_n = image.shape
    reach = int(np.ceil(radius)) + 1
    grid = np.arange(-reach, reach + 1)
    kept = []
    stars = _Stars(np.zeros(0, dtype=np.intp), np.zeros(0), np.zeros(0), [], [], [], [], [])
    for i in members:
        col, row = int(np.rint(x[i])), int(np.rint(y[i]))
        if col - reach < 0 or row - reach < 0 or col + reach >= cols_n or row + reach >= rows_n:
            continue
        rr, cc = np.meshgrid(row + grid, col + grid, indexing="ij")
        ux, uy = cc - x[i], rr - y[i]
        inside = np.hypot(ux, uy) <= radius
        rr, cc, ux, uy = rr[inside], cc[inside], ux[inside], uy[inside]
        values = image[rr, cc]
        sky_values = np.broadcast_to(sky, image.shape)[rr, cc]
        sigma_values = np.broadcast_to(sigma, image.shape)[rr, cc]
        if not (np.all(np.isfinite(values)) and np.all(np.isfinite(sky_values))
                and np.all(np.isfinite(sigma_values)) and np.all(sigma_values > 0)):
            continue
        neighbours = neighbour_model[rr, cc].copy()
        if np.isfinite(own_model_flux[i]):
            neighbours -= own_model_flux[i] * _stamp_on(table, x[i], y[i], rr, cc)
        kept.append(i)
        stars.ux.append(ux)
        stars.uy.append(uy)
        stars.data.append(values - sky_values - neighbours)
        stars.sigma.append(sigma_values)
        stars.neighbours.append(neighbours)
        if near_tree is not None:
            near = np.array([j for j in near_tree.query_ball_point((x[i], y[i]), radius)
                             if j != i and np.isfinite(own_model_flux[j])], dtype=np.intp)
            far = neighbours.copy()
            for j in near:
                far -= own_model_flux[j] * _stamp_on(table, x[j], y[j], rr, cc)
            stars.base.append(values - sky_values - far)
            stars.near.append(np.column_stack([x[near] - x[i], y[near] - y[i]]))
    stars.index = np.asarray(kept, dtype=np.intp)
    stars.x, stars.y = x[stars.index], y[stars.index]
    return stars


def _refit_neighbours(stars: _Stars, fit, profile):
    """Fit each star's neighbours within R again, jointly with the star, with ``profile``, and
    take their light off the star's data.

    Their first-pass fluxes were fitted with the prior PRF; where it is too broad, a neighbour
    a few pixels from a star is fitted too faint, and the light left on the star's profile
    broadens the PRF measured from it, toward the prior. At GALEX's COSMOS density a star has
    a dozen catalogued neighbours within R, and their light reaches that of the star's own
    profile 5 pixels out: refitted with each new PRF, they stop holding it near the prior.
    """
    for k in range(stars.index.size):
        offsets = stars.near[k]
        if offsets.shape[0] == 0:
            stars.data[k] = stars.base[k]
            continue
        ux, uy, weight = stars.ux[k], stars.uy[k], 1.0 / stars.sigma[k]
        columns = [profile(ux - fit["sx"][k], uy - fit["sy"][k])]
        columns += [profile(ux - dx, uy - dy) for dx, dy in offsets]
        design = np.column_stack(columns)
        flux, *_ = np.linalg.lstsq(design * weight[:, None], stars.base[k] * weight, rcond=None)
        stars.data[k] = stars.base[k] - design[:, 1:] @ flux[1:]


def _subset(stars: _Stars, keep) -> _Stars:
    keep = np.flatnonzero(keep)
    lists = (stars.ux, stars.uy, stars.data, stars.sigma, stars.neighbours, stars.base, stars.near)
    return _Stars(stars.index[keep], stars.x[keep], stars.y[keep], *[
        [values[k] for k in keep] if values else [] for values in lists
    ])


def _register(stars: _Stars, profile, flux0, iterations=8, max_shift=1.5, fit_shift=True, fit_background=False,
              start=None):
    """Fit flux, shift and (``fit_background``) a local constant of every star with ``profile``
    (Gauss-Newton; with ``fit_shift`` False only flux and constant, at the catalogue position).
    ``start`` (a previous result) gives the starting shifts.

    While a PRF is being built the constant stays zero: within the fit radius a constant and
    the PRF's outer profile are nearly degenerate, and alternating the two lets the wings
    drift negative. The sky map and the subtracted neighbours are trusted instead.

    Returns flux, flux_err, shift_x, shift_y, background, reduced chi^2, the statistical error
    of the aperture-minus-fit flux and the aperture flux (the aperture sum corrected by the
    profile's own fraction inside it).
    """
    n = stars.index.size
    out = {name: np.full(n, np.nan) for name in ("flux", "flux_err", "sx", "sy", "b", "rchisq", "ap", "ap_err")}
    for k in range(n):
        ux, uy, d, s = stars.ux[k], stars.uy[k], stars.data[k], stars.sigma[k]
        w = 1.0 / s
        flux = flux0[k] if np.isfinite(flux0[k]) and flux0[k] > 0 else max(d.sum(), 1e-30)
        sx = sy = b = 0.0
        if start is not None and fit_shift and np.isfinite(start["sx"][k]) and np.isfinite(start["sy"][k]):
            sx, sy = float(start["sx"][k]), float(start["sy"][k])
        for _ in range(iterations if fit_shift else 1):
            value, gx, gy = profile.evaluate(ux - sx, uy - sy, gradient=True)
            model = flux * value + b
            jac = np.column_stack([value, -flux * gx, -flux * gy, np.ones_like(value)]) * w[:, None]
            if not fit_shift:
                jac[:, 1:3] = 0.0
            if not fit_background:
                jac[:, 3] = 0.0
            step, *_ = np.linalg.lstsq(jac, (d - model) * w, rcond=None)
            flux += step[0]
            sx = float(np.clip(sx + step[1], -max_shift, max_shift))
            sy = float(np.clip(sy + step[2], -max_shift, max_shift))
            b += step[3]
            if abs(step[1]) < 1e-4 and abs(step[2]) < 1e-4:
                break
        value = profile.evaluate(ux - sx, uy - sy)
        columns = [value, np.ones_like(value)] if fit_background else [value]
        design = np.column_stack(columns) * w[:, None]
        try:
            covariance = np.linalg.inv(design.T @ design)
        except np.linalg.LinAlgError:
            continue
        residual = (d - flux * value - b) * w
        # Aperture flux, corrected to total by the profile's fraction in the aperture, with
        # the fitted local constant removed; both it and the fit flux are linear in the data.
        fraction = value.sum()
        fit_coefficients = (covariance @ (design * w[:, None]).T)  # rows: flux(, b)
        aperture_coefficients = np.full(value.size, 1.0 / fraction)
        if fit_background:
            aperture_coefficients -= fit_coefficients[1] * value.size / fraction
        out["flux"][k], out["sx"][k], out["sy"][k], out["b"][k] = flux, sx, sy, b
        out["flux_err"][k] = np.sqrt(covariance[0, 0])
        out["rchisq"][k] = residual @ residual / max(value.size - 2 - 2 * fit_background, 1)
        out["ap"][k] = (d - b).sum() / fraction
        out["ap_err"][k] = np.sqrt(np.sum(((aperture_coefficients - fit_coefficients[0]) * s) ** 2))
    return out


def _snr(stars: _Stars, profile, flux):
    snr = np.zeros(stars.index.size)
    for k in range(stars.index.size):
        value = profile(stars.ux[k], stars.uy[k])
        snr[k] = flux[k] * np.sqrt(np.sum((value / stars.sigma[k]) ** 2))
    return snr


def _robust_sigma(values):
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.nan
    return _MAD_TO_SIGMA * float(np.median(np.abs(values - np.median(values))))


def _median_and_error(values):
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return 0.0, np.nan
    median = float(np.median(values))
    if values.size < 3:
        return median, np.nan
    return median, _MEDIAN_EFFICIENCY * _robust_sigma(values) / np.sqrt(values.size)


@dataclass
class _Selection:
    stars: _Stars
    fit: dict
    reason: str
    fluxes: np.ndarray = None
    neighbour_model: np.ndarray = None


def _select(image, sky, sigma, x, y, file_profile, file_table, radius, *, candidates, fluxes, min_snr,
            max_neighbour_fraction, saturation_level, compact_tolerance, max_stars, noise_factor=1.0):
    """Bright, isolated, unsaturated, compact sources, registered with the file's PRF."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if fluxes is None:
        fluxes = _first_pass(image, sky, sigma, x, y, file_table, radius)
    fluxes = np.asarray(fluxes, dtype=np.float64)
    pool = np.arange(x.size) if candidates is None else np.unique(np.asarray(candidates, dtype=np.intp))
    pool = pool[np.isfinite(fluxes[pool]) & (fluxes[pool] > 0) & np.isfinite(x[pool]) & np.isfinite(y[pool])]
    neighbour_model = render_sources(image.shape, x, y, np.nan_to_num(fluxes, nan=0.0), file_table)
    stars = _cutouts(image, sky, sigma, x, y, pool, radius, neighbour_model, fluxes, file_table,
                     near_tree=cKDTree(np.column_stack([np.nan_to_num(x, nan=-1e9), np.nan_to_num(y, nan=-1e9)])))
    counts = [f"{pool.size} candidates", f"{stars.index.size} fully on data"]
    if stars.index.size == 0:
        return _Selection(stars, {}, "; ".join(counts))

    snr = _snr(stars, file_profile, fluxes[stars.index])
    own_light = np.array([fluxes[i] * file_profile(u, v).sum() for i, u, v in zip(stars.index, stars.ux, stars.uy)])
    neighbour_light = np.array([np.abs(n).sum() for n in stars.neighbours])
    keep = (snr >= min_snr) & (neighbour_light <= max_neighbour_fraction * own_light)
    counts.append(f"{int(np.sum(snr >= min_snr))} with S/N >= {min_snr:g}")
    counts.append(f"{int(keep.sum())} isolated")
    if saturation_level is not None:
        peaks = np.array([np.max(d + n) for d, n in zip(stars.data, stars.neighbours)])
        keep &= peaks < saturation_level
        counts.append(f"{int(keep.sum())} unsaturated")
    stars = _subset(stars, keep)
    if stars.index.size > max_stars:
        # The brightest max_stars: S/N beyond a few hundred adds little and costs time.
        order = np.argsort(-fluxes[stars.index])[:max_stars]
        stars = _subset(stars, np.isin(np.arange(stars.index.size), order))
    if stars.index.size == 0:
        return _Selection(stars, {}, "; ".join(counts))

    fit = _register(stars, _SplineProfile.from_function(file_profile, 4, radius + 2), fluxes[stars.index])
    good = np.isfinite(fit["flux"]) & (fit["flux"] > 0)
    compact = _compact(fit, good, compact_tolerance, relative_to="upper", noise_factor=noise_factor)
    counts.append(f"{int(compact.sum())} compact")
    stars = _subset(stars, compact)
    fit = {name: values[compact] for name, values in fit.items()}
    return _Selection(stars, fit, "; ".join(counts), fluxes, neighbour_model)


def _compact(fit, good, tolerance, relative_to, noise_factor=1.0):
    """Sources whose PRF-fit to aperture flux ratio is that of a point source.

    A resolved source puts less of its light in the PRF fit than in the aperture. With the
    file's PRF (``relative_to="upper"``), point sources share a ratio that need not be 1: the
    reference is the upper quartile of the ratios, since galaxies only lower it. With the
    measured PRF (``"median"``), outliers either side are dropped. The ratio's error is the
    aperture's, times ``noise_factor`` for noise correlated between pixels.
    """
    ratio = fit["flux"] / fit["ap"]
    ratio_err = noise_factor * fit["ap_err"] / np.abs(fit["ap"])
    ok = good & np.isfinite(ratio) & np.isfinite(ratio_err)
    if not ok.any():
        return ok
    reference = np.percentile(ratio[ok], 75) if relative_to == "upper" else np.median(ratio[ok])
    allowed = np.maximum(tolerance * reference, 3.0 * ratio_err)
    if relative_to == "upper":
        return ok & (ratio >= reference - allowed)
    return ok & (np.abs(ratio - reference) <= allowed)


def _phase_sum_rows(composite, n_phase):
    """Rows giving, for each of ``n_phase``^2 sub-pixel phases, the sum over pixels of the
    composite PRF of a source at that phase: the inner spline's part as a linear map of its
    coefficients (sparse) and the file wings' part as numbers."""
    inner, radius = composite.inner, composite.radius
    reach = int(np.ceil(radius)) + 1
    grid = np.arange(-reach, reach + 1, dtype=np.float64)
    phases = (np.arange(n_phase) + 0.5) / n_phase - 0.5
    py, px, gy, gx = np.meshgrid(phases, phases, grid, grid, indexing="ij")
    ux, uy = (gx - px).reshape(n_phase**2, -1), (gy - py).reshape(n_phase**2, -1)
    blend = np.clip(radius - np.hypot(ux, uy), 0.0, 1.0)
    wings = ((1.0 - blend) * composite.wing_scale * composite.file(ux, uy)).sum(axis=1)
    n = inner.coefficients.shape[0]
    rows, columns, weights = inner.design(ux.ravel(), uy.ravel())
    per_pixel = ux.shape[1]
    matrix = sparse.csr_matrix((weights * blend.ravel()[rows], (rows // per_pixel, columns)),
                               shape=(n_phase**2, n * n))
    return matrix, wings


def _solve_inner(stars, fit, composite, prior, ridge, smoothness, prior_error=None, flatness=1e2):
    """Least-squares B-spline coefficients of the PRF within R from the registered stars.

    The regularisation toward ``prior`` (the file's PRF) is relative to the median data
    weight of a coefficient, but never weaker than a ridge that holds each coefficient's
    difference to about ``prior_error`` of the prior's peak (`measure_prf`). Besides it, the
    flux a source puts on the image must not depend on its sub-pixel phase: a ripple at the
    pixel frequency would be invisible in the data, since each star's own flux absorbs it,
    but would bias every fit by up to a per cent. It is suppressed by a strong penalty on the
    spread, over phases, of the sum of the PRF over pixels (Anderson & King 2000 renormalise
    per phase to the same end).
    """
    inner = composite.inner
    n = inner.coefficients.shape[0]
    rows, cols, values, rhs = [], [], [], []
    offset = 0
    for k in range(stars.index.size):
        ux = stars.ux[k] - fit["sx"][k]
        uy = stars.uy[k] - fit["sy"][k]
        w = 1.0 / stars.sigma[k]
        r, c, v = inner.design(ux, uy)
        rows.append(r + offset)
        cols.append(c)
        values.append(v * (fit["flux"][k] * w)[r])
        rhs.append((stars.data[k] - fit["b"][k]) * w)
        offset += ux.size
    design = sparse.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                               shape=(offset, n * n))
    rhs = np.concatenate(rhs)
    normal = (design.T @ design).tocsr()
    diagonal = normal.diagonal()
    scale = np.median(diagonal[diagonal > 0])
    prior_weight = scale
    if prior_error is not None:
        prior_weight = max(scale, 1.0 / (ridge * (prior_error * prior.coefficients.max()) ** 2))
    second = sparse.diags([np.ones(n - 2), -2 * np.ones(n - 2), np.ones(n - 2)], [0, 1, 2], shape=(n - 2, n))
    identity = sparse.identity(n)
    curvature = sparse.vstack([sparse.kron(identity, second), sparse.kron(second, identity)]).tocsr()
    penalty = prior_weight * (ridge * sparse.identity(n * n) + smoothness * (curvature.T @ curvature))
    prior_vector = prior.coefficients.ravel()
    sums, wings = _phase_sum_rows(composite, inner.oversampling)
    sums = sums.toarray() / composite.scale  # the composite scales the inner spline; this solve does not
    centred = sums - sums.mean(axis=0)
    wings_centred = wings - wings.mean()
    # The phase penalty flatness * scale * |centred c + wings_centred|^2 couples every
    # coefficient: add its low-rank normal matrix U U^T by the Woodbury identity.
    factor = splu((normal + penalty).tocsc())
    low_rank = np.sqrt(flatness * scale) * centred.T
    rhs_total = design.T @ rhs + penalty @ prior_vector - flatness * scale * (centred.T @ wings_centred)
    base = factor.solve(rhs_total)
    through = factor.solve(low_rank)
    small = np.eye(low_rank.shape[1]) + low_rank.T @ through
    solution = base - through @ np.linalg.solve(small, low_rank.T @ base)
    return _SplineProfile(solution.reshape(n, n), inner.oversampling)


def _normalised(inner, file_profile, radius, oversampling, shift=(0.0, 0.0), file_wings=False):
    """The composite PRF with unit total flux over the file's box: its wings beyond R either
    matched to the measured PRF at R, or (``file_wings``) holding the file's own share of the
    total flux."""
    composite = _Composite(inner, file_profile, radius, shift=shift)
    if file_wings:
        composite.wing_scale = 0.0
        inner_part = _sample(composite, oversampling, file_profile.grid_extent)[0].sum() / oversampling**2
        composite.scale, composite.wing_scale = 0.0, 1.0
        wing_part = _sample(composite, oversampling, file_profile.grid_extent)[0].sum() / oversampling**2
        composite.scale = (1.0 - wing_part) / inner_part
        return composite
    n = 2 * int(np.ceil((radius + 1) * oversampling)) + 1
    offsets = (np.arange(n) - (n - 1) / 2) / oversampling
    ux, uy = np.meshgrid(offsets, offsets)
    ring = (np.hypot(ux, uy) <= radius) & (np.hypot(ux, uy) > radius - 1.0)
    measured_ring = inner.evaluate(ux[ring], uy[ring]).sum()
    file_ring = file_profile(ux[ring], uy[ring]).sum()
    composite.wing_scale = measured_ring / file_ring if file_ring > 0 else 1.0
    samples, _ = _sample(composite, oversampling, file_profile.grid_extent)
    total = samples.sum() / oversampling**2
    composite.scale /= total
    composite.wing_scale /= total
    return composite


def _centred(composite, oversampling, half_extent):
    """Shift the composite so its core centroid lands on the central sample."""
    for _ in range(3):
        samples, offsets = _sample(composite, oversampling, half_extent)
        cy, cx = prf_centre(samples)
        centre = (samples.shape[0] - 1) / 2
        dx, dy = (cx - centre) / oversampling, (cy - centre) / oversampling
        composite.shift = (composite.shift[0] + dx, composite.shift[1] + dy)
        if abs(dx) < 1e-4 and abs(dy) < 1e-4:
            break
    samples, _ = _sample(composite, oversampling, half_extent)
    return samples


def _wing_excess(image, sky, sigma, x, y, indices, selection, fit, composite, file_table, wing_radius):
    """Light the PRF misses between the fit radius R and ``wing_radius``, per unit total flux,
    from the stars' growth curves: (sum of star pixels there) / flux - (the PRF's sum there),
    an inverse-variance mean over the stars (those beyond 5 robust sigmas left out).

    Positive where the true wings are brighter than the file's shape or reach beyond its box.
    Pixels with modelled neighbour light above a fifth of the noise are left out, stars with
    less than 30 % of the annulus left are skipped. Returns (excess, error, number of stars); NaN without stars whose wing annulus is all on
    data.
    """
    stars = _cutouts(image, sky, sigma, x, y, indices, wing_radius, selection.neighbour_model, selection.fluxes,
                     file_table)
    position = {index: k for k, index in enumerate(indices)}
    unshifted = _Composite(composite.inner, composite.file, composite.radius, composite.scale, composite.wing_scale)
    excess, error = [], []
    for k, index in enumerate(stars.index):
        j = position[index]
        ux, uy = stars.ux[k] - fit["sx"][j], stars.uy[k] - fit["sy"][j]
        # Pixels where a neighbour's modelled light exceeds a fifth of the noise are left out
        # (the model is only a first pass, with the file's PRF, and galaxies are not points):
        # the PRF's own sum is taken over the same pixels, so this costs area, not accuracy.
        annulus = (np.hypot(ux, uy) > composite.radius) & (np.abs(stars.neighbours[k]) < 0.2 * stars.sigma[k])
        ring_pixels = np.count_nonzero(np.hypot(ux, uy) > composite.radius)
        if np.count_nonzero(annulus) < 0.3 * ring_pixels:
            continue
        flux = fit["flux"][j]
        excess.append(stars.data[k][annulus].sum() / flux - unshifted(ux[annulus], uy[annulus]).sum())
        error.append(np.sqrt(np.sum(stars.sigma[k][annulus] ** 2)) / flux)
    excess, error = np.asarray(excess), np.asarray(error)
    if excess.size == 0:
        return np.nan, np.nan, 0
    keep = np.abs(excess - np.median(excess)) <= 5 * max(_robust_sigma(excess), 1e-12)
    weight = 1.0 / error[keep] ** 2
    mean = float(np.sum(weight * excess[keep]) / np.sum(weight))
    chi2 = np.sum(weight * (excess[keep] - mean) ** 2) / max(keep.sum() - 1, 1)
    return mean, float(np.sqrt(max(chi2, 1.0) / np.sum(weight))), int(keep.sum())


def _with_extra_wings(samples, oversampling, excess, inner_radius, outer_radius):
    """Samples on a grid reaching ``outer_radius``, with ``excess`` (per unit flux) added as an
    r^-3 wing (the fall-off of a diffraction wing) between ``inner_radius`` and
    ``outer_radius``, renormalised to unit total flux."""
    n_old = samples.shape[0]
    n_new = 2 * int(np.floor(outer_radius * oversampling)) + 1
    pad = max((n_new - n_old) // 2, 0)
    extended = np.pad(samples, pad)
    offsets = (np.arange(extended.shape[0]) - (extended.shape[0] - 1) / 2) / oversampling
    r = np.hypot(offsets[None, :], offsets[:, None])
    wing = np.where((r > inner_radius) & (r <= outer_radius), np.maximum(r, 1e-9) ** -3.0, 0.0)
    wing *= excess * oversampling**2 / wing.sum()
    return normalise_prf(extended + wing, oversampling)


class _Mixing:
    """Anderson mixing of the PRF's alternation of registration, solve and neighbour refit.

    Each round maps the PRF it was given to a new one, and the PRF is the fixed point of that
    map. Where neighbours hold much of a star's light a few pixels out, the map moves the PRF
    only part of the way each round (its neighbours' fluxes, fitted with the previous PRF,
    keep some of its error), and plain iteration would take tens of rounds. Anderson mixing
    (Walker & Ni 2011) takes the combination of the last rounds' outputs whose residual
    (output - input) is least, which for a nearly linear map converges in a few rounds.
    """

    def __init__(self, depth):
        self.depth, self.inputs, self.outputs = depth, [], []

    def next(self, given: "_SplineProfile", returned: "_SplineProfile") -> "_SplineProfile":
        """The PRF to continue from, after a round turned ``given`` into ``returned`` (both at
        unit total flux)."""
        self.inputs = (self.inputs + [given.coefficients.ravel()])[-(self.depth + 1):]
        self.outputs = (self.outputs + [returned.coefficients.ravel()])[-(self.depth + 1):]
        residuals = [out - inp for inp, out in zip(self.inputs, self.outputs)]
        mixed = self.outputs[-1]
        if len(residuals) > 1:
            differences = np.column_stack([residuals[-1] - earlier for earlier in residuals[:-1]])
            weights, *_ = np.linalg.lstsq(differences, residuals[-1], rcond=None)
            mixed = mixed - sum(weight * (self.outputs[-1] - earlier) for weight, earlier in zip(weights, self.outputs[:-1]))
        return _SplineProfile(mixed.reshape(returned.coefficients.shape), returned.oversampling)


_SAMPLES_PER_FWHM = 5.0


def _default_radius(file_fwhm, fit_radius_pix):
    return float(fit_radius_pix) if fit_radius_pix is not None else max(2.0 * file_fwhm, 3.0)


def measure_prf(
    image: np.ndarray,
    sky,
    sigma,
    x: np.ndarray,
    y: np.ndarray,
    file_prf: np.ndarray,
    file_oversampling: int = 1,
    *,
    candidates=None,
    fluxes=None,
    oversampling: int | None = None,
    fit_radius_pix: float | None = None,
    min_snr: float = 50.0,
    max_neighbour_fraction: float = 0.1,
    saturation_level: float | None = None,
    compact_tolerance: float = 0.03,
    min_stars: int = 8,
    max_stars: int = 200,
    iterations: int = 8,
    ridge: float = 1e-3,
    smoothness: float = 3e-2,
    prior_error: float | None = 0.1,
    wing_radius_pix: float | None = None,
    extend_wings: bool = False,
    file_wings: bool = False,
    noise_factor: float = 1.0,
) -> MeasuredPRF:
    """Measure the effective PRF of an image from its isolated stars (see the module docstring).

    Parameters
    ----------
    image : ndarray
        The image section, NaN where there is no data.
    sky, sigma : ndarray or float
        Sky level and per-pixel 1-sigma noise, maps of the image's shape or single values.
    x, y : ndarray
        0-based pixel positions of *every* catalogue source on the section (their light is
        modelled and subtracted around the stars).
    file_prf : ndarray
        The band's PRF as its file gives it, any normalisation (GALEX files are
        peak-normalised), sampled ``file_oversampling`` times per image pixel.
    file_oversampling : int
        Samples per image pixel of ``file_prf``.
    candidates : array of int, optional
        Indices into ``x``/``y`` of the sources that may serve as stars (e.g. the catalogue's
        stars). All sources by default; the selection below applies to them either way.
    fluxes : ndarray, optional
        First-pass fluxes of every source (NaN where unknown). Default: a `scene_photometry`
        fit of the section with the file's PRF and a fitted sky.
    oversampling : int, optional
        Samples per image pixel of the measured PRF. Default: enough for
        `_SAMPLES_PER_FWHM` samples across the file PRF's FWHM (2 for IRAC's 0.6" mosaics and
        for GALEX). A finer grid than the PRF needs only adds freedom: from a few tens of
        stars, each sampling one sub-pixel phase, its noise biases every flux fitted with it
        low (by the noise's share of the PRF's power) and scatters them with their phase.
    fit_radius_pix : float, optional
        Radius R (image pixels) within which the stars are measured; the file's wing shape is
        used beyond it. Default: twice the file PRF's FWHM, at least 3.
    min_snr : float
        Least PRF-fit signal-to-noise of a star.
    max_neighbour_fraction : float
        Most modelled neighbour light within R, as a fraction of the star's own.
    saturation_level : float, optional
        Stars whose brightest pixel (above the sky) reaches this are skipped (IRAC).
    compact_tolerance : float
        A star's PRF-fit to aperture flux ratio may fall this fraction (or three times its
        statistical error, if larger) below that of point sources; more resolved sources are
        rejected.
    min_stars : int
        With fewer stars the file's PRF is returned (``used_file=True``).
    max_stars : int
        At most this many stars, the brightest, are used.
    iterations : int
        Alternations of star registration and PRF solve.
    ridge, smoothness : float
        Regularisation toward the file's PRF, relative to the median data weight of a spline
        coefficient: a ridge on the difference and a curvature penalty on it.
    prior_error : float or None
        How far, as a fraction of its peak, the PRF is expected to differ from the file's
        sample by sample: where the stars' data weigh less than that prior (few stars, or
        faint ones), both penalties are raised to it, so that the measured PRF follows the
        stars only as far as they measure it. Eight to eleven IRAC 8 um stars at S/N 50-100,
        measured with the relative penalties alone, gave PRFs 5-8 % off the bright sources
        pixel by pixel (`mbphot.calibration.Calibration.pixel_error`) and fluxes up to 2 %
        high on the bench's realistic field; IRAC 3.6 um's hundreds of stars outweigh this
        prior, IRAC 8 um's ten weigh about a hundredth of it. Tighter priors keep too much of
        a file that is far off: at 0.05, 80 stars of a crowded field whose file is 14 %
        broader than the sky's fitted isolated sources 1 % high (tests/test_epsf.py). None:
        the relative penalties only.
    wing_radius_pix : float, optional
        Outer radius of the stars' growth curves that measure the light beyond R
        (``wing_excess``). Default 1.5 times the file's half box.
    extend_wings : bool
        Where the growth curves show light beyond R that the PRF lacks (``wing_excess`` above
        three times its error), add it as an r^-3 wing from the file's half box out to
        ``wing_radius_pix`` on a larger grid, so fits with the PRF count it. Off by default:
        an error in the sky map or light of undetected neighbours enters the estimate as wing
        light, so check ``wing_excess`` against the instrument's aperture corrections first.
    file_wings : bool
        Keep the file's wings beyond R at their own share of the total flux (a file whose
        wings were measured, as GALEX's were), scaling only the measured part within R. By
        default the wings are matched to the measured PRF in the ring just inside R, which
        a file whose core is broader than the sky's sets too high or too low.
    noise_factor : float
        How much the image's noise, correlated between neighbouring pixels, inflates an error
        computed from ``sigma`` as if the pixels were independent (a resampled mosaic's:
        `mbphot.engine.calibrate.correlated_noise_scale`). The first compactness test, against
        the file's PRF, and ``wing_excess`` take their errors times this. On the bench's
        realistic IRAC 8 um field (factor 2.6) that test with the white errors of 1-4 % kept
        7 of 13 isolated stars, whose PRF-fit to aperture ratios scatter by 10 %, and the
        file's PRF was used. The test against the measured PRF keeps the white errors: with
        the true ones it let in stars 5-7 % off, whose scatter then read as a PRF-model error
        of 2.9 % (`mbphot.engine.calibrate.prf_model_error`, IRAC 5.8 um).

    Returns
    -------
    MeasuredPRF
    """
    image = np.asarray(image, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    file_profile = _FileProfile(file_prf, file_oversampling)
    file_table = build_prf_table(file_prf, file_oversampling)
    file_fwhm = fwhm_pixels(file_profile.samples, file_oversampling)
    radius = _default_radius(file_fwhm, fit_radius_pix)
    if oversampling is None:
        oversampling = max(1, int(np.ceil(_SAMPLES_PER_FWHM / file_fwhm)))
    if radius + 1 > file_profile.half_extent:
        radius = file_profile.half_extent - 1

    selection = _select(image, sky, sigma, x, y, file_profile, file_table, radius, candidates=candidates,
                        fluxes=fluxes, min_snr=min_snr, max_neighbour_fraction=max_neighbour_fraction,
                        saturation_level=saturation_level, compact_tolerance=compact_tolerance,
                        max_stars=max_stars, noise_factor=noise_factor)
    stars, fit = selection.stars, selection.fit
    file_rchisq = float(np.median(fit["rchisq"])) if stars.index.size else np.nan

    def fallback(reason):
        sx, sx_err = _median_and_error(fit["sx"]) if stars.index.size else (0.0, np.nan)
        sy, sy_err = _median_and_error(fit["sy"]) if stars.index.size else (0.0, np.nan)
        inside = _aperture_fraction(file_profile, radius)
        return MeasuredPRF(
            prf=file_profile.samples, oversampling=file_profile.oversampling, n_stars=0, used_file=True,
            reason=reason, offset_x_pix=sx, offset_y_pix=sy, offset_x_err_pix=sx_err, offset_y_err_pix=sy_err,
            aperture_correction=1.0 / inside, fit_radius_pix=radius, fwhm_pix=file_fwhm, file_fwhm_pix=file_fwhm,
            rchisq_file=file_rchisq, star_indices=stars.index.copy(),
        )

    if stars.index.size < min_stars:
        return fallback(f"only {stars.index.size} usable stars, fewer than {min_stars} "
                        f"({selection.reason}): the file's PRF is used")

    prior = _SplineProfile.from_function(file_profile, oversampling, radius + 2)
    inner = prior
    composite = _normalised(inner, file_profile, radius, oversampling, file_wings=file_wings)
    for rebuild in range(2):
        mixing = _Mixing(_MIXING_DEPTH)
        for _ in range(iterations if rebuild == 0 else max(1, iterations // 2)):
            fit = _register(stars, composite_inner(composite), fit["flux"], start=fit)
            usable = np.isfinite(fit["flux"]) & (fit["flux"] > 0)
            if not usable.all():
                stars, fit = _subset(stars, usable), {k: v[usable] for k, v in fit.items()}
            inner = _solve_inner(stars, fit, composite, prior, ridge, smoothness, prior_error)
            inner = mixing.next(composite_inner(composite), composite_inner(
                _normalised(inner, file_profile, radius, oversampling, file_wings=file_wings)))
            composite = _normalised(inner, file_profile, radius, oversampling, file_wings=file_wings)
            _refit_neighbours(stars, fit, composite)
        fit = _register(stars, composite_inner(composite), fit["flux"], start=fit)
        good = np.isfinite(fit["flux"]) & (fit["flux"] > 0)
        chi_ok = fit["rchisq"] <= np.median(fit["rchisq"][good]) + 5 * max(_robust_sigma(fit["rchisq"][good]), 0.1)
        keep = _compact(fit, good, compact_tolerance, relative_to="median") & chi_ok
        if keep.all() or rebuild == 1:
            break
        stars, fit = _subset(stars, keep), {k: v[keep] for k, v in fit.items()}
        if stars.index.size < min_stars:
            return fallback(f"only {stars.index.size} stars fit the measured PRF, fewer than {min_stars}: "
                            "the file's PRF is used")

    samples = _centred(composite, oversampling, file_profile.grid_extent)
    wing_radius = wing_radius_pix if wing_radius_pix is not None else 1.5 * file_profile.half_extent
    excess, excess_err, _ = _wing_excess(image, sky, sigma, x, y, stars.index, selection, fit, composite, file_table,
                                             wing_radius)
    excess_err = noise_factor * excess_err
    extended = bool(extend_wings and np.isfinite(excess) and excess > 3 * excess_err and wing_radius > file_profile.half_extent)
    if extended:
        samples = _with_extra_wings(samples, oversampling, excess, file_profile.half_extent, wing_radius)
    shift_x = fit["sx"] + composite.shift[0]
    shift_y = fit["sy"] + composite.shift[1]
    offset_x, offset_x_err = _median_and_error(shift_x)
    offset_y, offset_y_err = _median_and_error(shift_y)
    prf = normalise_prf(samples, oversampling)
    inside = _aperture_fraction(composite, radius) / (1.0 + excess if extended else 1.0)
    return MeasuredPRF(
        prf=prf, oversampling=oversampling, n_stars=int(stars.index.size), used_file=False,
        reason=f"measured from {stars.index.size} stars ({selection.reason})",
        offset_x_pix=offset_x, offset_y_pix=offset_y, offset_x_err_pix=offset_x_err, offset_y_err_pix=offset_y_err,
        aperture_correction=1.0 / inside, fit_radius_pix=radius, fwhm_pix=fwhm_pixels(prf, oversampling),
        file_fwhm_pix=file_fwhm, star_indices=stars.index.copy(), star_fluxes=fit["flux"].copy(),
        star_shift_x_pix=shift_x, star_shift_y_pix=shift_y, rchisq_file=file_rchisq,
        rchisq_measured=float(np.median(fit["rchisq"])), wing_excess=excess, wing_excess_err=excess_err,
        wings_extended=extended,
    )


def composite_inner(composite):
    """The composite's inner spline scaled to unit total flux (what the stars are fitted with)."""
    return _SplineProfile(composite.inner.coefficients * composite.scale, composite.inner.oversampling)


def _aperture_fraction(function, radius):
    """Fraction of a PRF function's flux on pixels whose centres lie within ``radius`` of a
    source centred on a pixel (an average over phases would differ by far less than 1 %)."""
    reach = int(np.ceil(radius))
    grid = np.arange(-reach, reach + 1, dtype=np.float64)
    ux, uy = np.meshgrid(grid, grid)
    inside = np.hypot(ux, uy) <= radius
    return float(np.sum(function(ux[inside], uy[inside])))


def image_offset(
    image: np.ndarray,
    sky,
    sigma,
    x: np.ndarray,
    y: np.ndarray,
    prf: np.ndarray,
    oversampling: int = 1,
    *,
    candidates=None,
    fluxes=None,
    fit_radius_pix: float | None = None,
    min_snr: float = 30.0,
    max_neighbour_fraction: float = 0.1,
    saturation_level: float | None = None,
    compact_tolerance: float = 0.03,
    max_stars: int = 300,
) -> ImageOffset:
    """Common offset of an image's light from the catalogue: the median fitted shift of its
    bright, isolated, compact sources, with a robust error.

    Each selected source (same criteria as `measure_prf`) is fitted with ``prf`` for flux,
    sub-pixel shift and a local constant; the median of the shifts is robust to the sources
    whose own position is wrong. `measure_prf` reports the same figure for its stars.

    Parameters
    ----------
    image, sky, sigma, x, y, candidates, fluxes, fit_radius_pix, min_snr,
    max_neighbour_fraction, saturation_level, compact_tolerance, max_stars
        As in `measure_prf`.
    prf : ndarray
        The PRF to register the sources with (a file's or a measured one), any normalisation,
        core centroid as the centre (`prf.prf_centre`).
    oversampling : int
        Samples per image pixel of ``prf``.

    Returns
    -------
    ImageOffset
    """
    image = np.asarray(image, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    profile = _FileProfile(prf, oversampling)
    radius = _default_radius(fwhm_pixels(profile.samples, oversampling), fit_radius_pix)
    radius = min(radius, profile.half_extent - 1)
    selection = _select(image, sky, sigma, x, y, profile, build_prf_table(prf, oversampling), radius,
                        candidates=candidates, fluxes=fluxes, min_snr=min_snr,
                        max_neighbour_fraction=max_neighbour_fraction, saturation_level=saturation_level,
                        compact_tolerance=compact_tolerance, max_stars=max_stars)
    if selection.stars.index.size == 0:
        return ImageOffset(0.0, 0.0, np.nan, np.nan, 0, np.zeros(0, dtype=np.intp))
    dx, dx_err = _median_and_error(selection.fit["sx"])
    dy, dy_err = _median_and_error(selection.fit["sy"])
    return ImageOffset(dx, dy, dx_err, dy_err, int(selection.stars.index.size), selection.stars.index.copy())
