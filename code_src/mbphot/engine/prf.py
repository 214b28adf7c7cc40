"""Point-response functions: normalisation, centring and exact sub-pixel placement.

A PRF file is an image of the response to a point source, sampled either on the image pixel
grid (``oversampling=1``, like the COSMOS IRAC PRFs and the GALEX PSFs) or finer. Files come
with different normalisations (GALEX PSFs are peak-normalised): a PRF is always rescaled so
that a source of unit flux puts unit flux on the image. Its wings are kept: the stamp used to
model a source is cut at a radius holding ``enclosed_fraction`` of the flux of the *whole*
PRF, never renormalised to the cut.

A PRF with broad wings (the GALEX PSFs hold 5-10 % of their light beyond 12 pixels and need a
radius of 36-43 pixels to enclose 99.9 %) is split into a *core*, tabulated as stamps like any
other PRF, and *wings*, one kernel on the image grid that the engine convolves with the
sources' fluxes (by FFT) instead of fitting. The split is a smooth taper in radius around the
source's true position, so core and wings are each a shifted copy of one smooth function and
their sum is the whole PRF at every sub-pixel phase.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .kernels import sample_spline

__all__ = ["PRFTable", "normalise_prf", "prf_centre", "build_prf_table", "prf_table_arrays"]


def normalise_prf(prf: np.ndarray, oversampling: int = 1) -> np.ndarray:
    """Return the PRF scaled so that a unit-flux source puts unit flux on the image.

    An oversampled PRF holds ``oversampling**2`` samples per image pixel, so its samples sum
    to ``oversampling**2`` once normalised. NaNs (padding in some files) become zeros.

    Parameters
    ----------
    prf : ndarray
        PRF image, any normalisation (peak or sum).
    oversampling : int
        PRF samples per image pixel along each axis.

    Returns
    -------
    ndarray
        float64 PRF whose samples sum to ``oversampling**2``.
    """
    prf = np.nan_to_num(np.asarray(prf, dtype=np.float64), nan=0.0)
    total = prf.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("PRF image sums to zero or a non-finite value; check the PRF file")
    return prf * (oversampling**2 / total)


def prf_centre(prf: np.ndarray) -> tuple[float, float]:
    """Centre of a PRF as the centroid of its core (pixels above 5 % of the peak).

    Files differ in convention (an even-sized GALEX PSF peaks at pixel 59 of 120, not at 59.5):
    the centroid of the core is where the catalogue position should land.

    Returns
    -------
    (y, x) : tuple of float
        0-based array coordinates of the centre.
    """
    core = np.where(prf >= 0.05 * prf.max(), prf, 0.0)
    labels, _ = ndimage.label(core > 0)
    peak_label = labels[np.unravel_index(np.argmax(prf), prf.shape)]
    core = np.where(labels == peak_label, core, 0.0)
    y, x = ndimage.center_of_mass(core)
    return float(y), float(x)


def _enclosed_radius(prf: np.ndarray, centre: tuple[float, float], fraction: float) -> float:
    yy, xx = np.indices(prf.shape)
    radius = np.hypot(yy - centre[0], xx - centre[1]).ravel()
    order = np.argsort(radius)
    cumulative = np.cumsum(prf.ravel()[order]) / prf.sum()
    index = min(np.searchsorted(cumulative, fraction), radius.size - 1)
    return float(radius[order][index])


@dataclass(frozen=True)
class PRFTable:
    """PRF stamps precomputed on a grid of sub-pixel phases.

    ``stamps[iy, ix]`` is the image of a unit-flux source whose position lies
    ``phases[iy]`` pixels (in y) and ``phases[ix]`` pixels (in x) from the centre of the
    stamp's central pixel. A source at 0-based pixel position (x, y) uses the stamp centred on
    pixel (round(x), round(y)), interpolated between the phases around x - round(x),
    y - round(y) (see `stamps_for`).

    Attributes
    ----------
    stamps : ndarray of float32 or float64, shape (n_phase, n_phase, size, size)
        The engine's tables are single precision (`build_prf_table`'s default): its kernels
        read four stamps of a table for every stamp they place, and a realistic image's
        tables (28 of 1.5 MB each in IRAC, in double precision) outgrow the processor's
        caches. Their rounding, 6e-8 of a pixel's value, moved the realistic bench's irac1
        fluxes by at most 1e-5 sigma; its scenes took 5 % less time. The simulator draws
        images with double-precision tables. Any other type is stored as float64.
    phases : ndarray, shape (n_phase,)
        Sub-pixel offsets from -0.5 to +0.5 inclusive.
    half_size : int
        Stamp half-width in image pixels; ``size = 2 * half_size + 1``.
    """

    stamps: np.ndarray
    phases: np.ndarray
    half_size: int
    wings: np.ndarray | None = None
    """The PRF beyond the core (image grid, odd square, centred on its middle pixel), for a
    source on a pixel centre; None when the stamps hold the whole PRF."""

    def __post_init__(self):
        # One memory layout for every table, and one of two types: the compiled kernels are
        # specialised on them, and a table of another would compile them again inside the
        # first fit that uses it.
        dtype = np.float32 if np.asarray(self.stamps).dtype == np.float32 else np.float64
        object.__setattr__(self, "stamps", np.ascontiguousarray(self.stamps, dtype=dtype))

    @property
    def n_phase(self) -> int:
        return self.phases.size

    def stamps_for(self, offset_x: np.ndarray, offset_y: np.ndarray) -> np.ndarray:
        """Stamps for sources at sub-pixel offsets (from their nearest pixel centre).

        Bilinear interpolation between the four neighbouring phases (1/(n_phase - 1) pixel
        apart): a bright source placed at the nearest phase instead would leave residuals
        well above the noise.

        Returns
        -------
        ndarray, shape offset_x.shape + (size, size)
        """
        step = self.phases[1] - self.phases[0]
        position_x = np.clip((np.asarray(offset_x) - self.phases[0]) / step, 0, self.n_phase - 1)
        position_y = np.clip((np.asarray(offset_y) - self.phases[0]) / step, 0, self.n_phase - 1)
        low_x = np.minimum(np.floor(position_x).astype(np.intp), self.n_phase - 2)
        low_y = np.minimum(np.floor(position_y).astype(np.intp), self.n_phase - 2)
        weight_x = (position_x - low_x)[..., None, None]
        weight_y = (position_y - low_y)[..., None, None]
        stamps = self.stamps
        return (1 - weight_y) * ((1 - weight_x) * stamps[low_y, low_x] + weight_x * stamps[low_y, low_x + 1]) + (
            weight_y * ((1 - weight_x) * stamps[low_y + 1, low_x] + weight_x * stamps[low_y + 1, low_x + 1])
        )

    def stamp_at(self, x: float, y: float) -> np.ndarray:
        """The stamp for one source at pixel position (x, y), centred on its nearest pixel."""
        return self.stamps_for(np.asarray(x - np.rint(x)), np.asarray(y - np.rint(y)))


def build_prf_table(
    prf: np.ndarray,
    oversampling: int = 1,
    n_phase: int = 33,
    enclosed_fraction: float = 0.999,
    max_half_size: int | None = None,
    core_radius: float | None = None,
    dtype=np.float32,
) -> PRFTable:
    """Precompute PRF stamps at ``n_phase`` x ``n_phase`` sub-pixel phases.

    Each stamp is the normalised PRF resampled at the image pixel centres by cubic-spline
    interpolation of the PRF samples, so the placement is exact at the PRF's own sample
    phases and smooth in between; `PRFTable.stamps_for` interpolates between phases.

    Parameters
    ----------
    prf : ndarray
        PRF image in any normalisation.
    oversampling : int
        PRF samples per image pixel.
    n_phase : int
        Number of phases per axis, spanning -0.5 to +0.5 pixel (odd, so 0 is one of them).
    enclosed_fraction : float
        The stamp's radius holds this fraction of the whole PRF's flux.
    max_half_size : int, optional
        Upper limit on the stamp half-width in image pixels.
    core_radius : float, optional
        Split the PRF at this radius (image pixels) into a wing kernel (`PRFTable.wings`:
        the PRF tapered off inside the radius over its last `_TAPER_WIDTH` pixels, reaching to
        the ``enclosed_fraction`` radius) and stamps of the core's reach, the PRF less the
        wings as the engine places them (`placed_wings`). Ignored when the whole PRF lies
        within it.
    dtype : numpy dtype
        The stamps' type: single precision for the engine (see `PRFTable.stamps`), double
        to draw images.

    Returns
    -------
    PRFTable
    """
    stamps, phases, half_size, wings = prf_table_arrays(prf, oversampling, n_phase, enclosed_fraction, max_half_size, core_radius)
    return PRFTable(stamps=stamps.astype(dtype, copy=False), phases=phases, half_size=half_size, wings=wings)


def prf_table_arrays(
    prf: np.ndarray,
    oversampling: int = 1,
    n_phase: int = 33,
    enclosed_fraction: float = 0.999,
    max_half_size: int | None = None,
    core_radius: float | None = None,
) -> tuple:
    """`build_prf_table`'s table as arrays (stamps, phases, half_size, wings), the stamps a
    fresh array that callers may change in place before making their own table: an array of
    a realistic IRAC table's size is two megabytes of fresh pages, and with a table made and
    copied per intermediate step each worker took 0.20-0.57 s to make an image's 28 tables,
    against 0.16-0.24 s.
    """
    if n_phase < 3 or n_phase % 2 == 0:
        raise ValueError(f"n_phase must be an odd number >= 3, got {n_phase}")
    normalised = normalise_prf(prf, oversampling)
    centre_y, centre_x = prf_centre(normalised)
    radius_pixels = _enclosed_radius(normalised, (centre_y, centre_x), enclosed_fraction)
    half_size = max(1, int(np.ceil(radius_pixels / oversampling)))
    extent_pixels = (min(normalised.shape) - 1) / 2 / oversampling
    half_size = min(half_size, max(1, int(np.floor(extent_pixels))))
    if max_half_size is not None:
        half_size = min(half_size, max_half_size)
    split = core_radius is not None and core_radius < half_size
    wing_half_size = half_size
    if split:
        half_size = int(np.ceil(core_radius))

    coefficients = ndimage.spline_filter(normalised, order=3, mode="constant")
    phases = np.linspace(-0.5, 0.5, n_phase)
    centre = (centre_y, centre_x)
    if not split:
        return spline_stamps(coefficients, centre, oversampling, phases, half_size), phases, half_size, None
    wing_grid = np.arange(-wing_half_size, wing_half_size + 1, dtype=np.float64)
    whole = spline_stamps(coefficients, centre, oversampling, np.zeros(1), wing_half_size)[0, 0]
    wings = whole * (1.0 - _core_taper(np.hypot(*np.meshgrid(wing_grid, wing_grid, indexing="ij")), core_radius))
    placed = placed_wings(wings, phases, half_size)
    return spline_stamps(coefficients, centre, oversampling, phases, half_size, placed=placed), phases, half_size, wings


def placed_wings(wings, phases, half_size):
    """The wing kernel ``wings`` as the engine adds it around a source at each pair of
    ``phases`` (`point_weights`), on the pixels of a stamp of ``half_size``; shape
    (n_phase, n_phase, size, size), indexed as `PRFTable.stamps`.

    A table's stamps are its profile less these: the model of a source, stamps plus placed
    wings, is then its profile exactly over the whole stamp, whatever the placement's
    interpolation error and whatever the profile (a variant of the PRF, a disc), and the
    point PRF's wings beyond it.
    """
    wing_half_size = (wings.shape[0] - 1) // 2
    grid = np.arange(-half_size, half_size + 1, dtype=np.float64)
    wing_grid = np.arange(-wing_half_size, wing_half_size + 1, dtype=np.float64)
    # Stamp pixel k of a source at phase p takes the kernel's pixel j from the placement tap
    # k - j, at distance k - j - p from the source.
    weights = cubic_convolution(grid[None, :, None] - wing_grid[None, None, :] - np.asarray(phases)[:, None, None])
    n_phase, size = weights.shape[:2]
    # Matrix products (BLAS) rather than einsum: a fifth of the time for IRAC's 41-pixel kernel.
    by_row = (weights.reshape(-1, wings.shape[0]) @ wings).reshape(n_phase, size, -1)
    placed = by_row.reshape(-1, wings.shape[1]) @ weights.reshape(-1, wings.shape[1]).T
    return np.ascontiguousarray(placed.reshape(n_phase, size, n_phase, size).transpose(0, 2, 1, 3))


def cubic_convolution(distance):
    """Keys' (1981) cubic convolution kernel (a = -1/2) at ``distance`` (pixels): the weights
    that interpolate a pixel grid to a point between its pixels, exact for quadratics."""
    s = np.abs(np.asarray(distance, dtype=np.float64))
    inner = (1.5 * s - 2.5) * s * s + 1.0
    outer = ((-0.5 * s + 2.5) * s - 4.0) * s + 2.0
    return np.where(s <= 1.0, inner, np.where(s < 2.0, outer, 0.0))


def point_weights(x, y):
    """Where and how much of a point at 0-based (x, y) goes on the pixel grid, so that an image
    of such points convolved with a kernel sampled on pixels is the kernel interpolated to
    each point's sub-pixel position: the `cubic_convolution` weights of the 4 x 4 pixels
    around it. They sum to one and reproduce quadratics.

    Returns ``(rows, cols, weights)``, each of shape (16, n)."""
    col, row = np.floor(x).astype(np.intp), np.floor(y).astype(np.intp)
    taps = np.arange(-1, 3)
    per_col = cubic_convolution(taps[:, None] - (x - col)[None, :])
    per_row = cubic_convolution(taps[:, None] - (y - row)[None, :])
    rows = np.broadcast_to((row[None, :] + taps[:, None])[:, None, :], (4, 4, row.size))
    cols = np.broadcast_to((col[None, :] + taps[:, None])[None, :, :], (4, 4, col.size))
    weights = per_row[:, None, :] * per_col[None, :, :]
    return rows.reshape(16, -1), cols.reshape(16, -1), weights.reshape(16, -1)


def _spline_taps(coordinates, n):
    """The cubic B-spline's four coefficients and their weights at each of ``coordinates``, on
    ``n`` coefficients: ``ndimage.map_coordinates(..., order=3, mode="constant",
    prefilter=False)`` along one axis (mirrored coefficients beyond an edge, zero outside
    [0, n - 1]). Returns ``(taps, weights)``, each of shape (coordinates.size, 4)."""
    low = np.floor(coordinates).astype(np.intp)
    t = coordinates - low
    weights = np.stack([(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3], axis=1) / 6.0
    taps = low[:, None] + np.arange(-1, 3)
    period = 2 * (n - 1) if n > 1 else 1
    taps = np.mod(taps, period)
    taps = np.where(taps > n - 1, period - taps, taps)
    weights[(coordinates < 0) | (coordinates > n - 1)] = 0.0
    return taps, weights


_NOTHING_PLACED = np.zeros((0, 0, 0, 0))


def spline_stamps(coefficients, centre, oversampling, phases, half_size, scale=1.0, placed=None, dtype=np.float64):
    """Stamps of the spline of ``coefficients`` (`scipy.ndimage.spline_filter`'s, of a profile
    sampled ``oversampling`` times per pixel) for a source ``centre`` (array coordinates) at
    every pair of ``phases``, on the pixels within ``half_size`` of its own; times ``scale``,
    less ``placed`` where given (same shape, e.g. `placed_wings`). Shape (n_phase, n_phase,
    size, size), indexed as `PRFTable.stamps`, of type ``dtype``.

    The spline is separable: sampled along rows, then along columns, straight into the
    tables' layout (`mbphot.engine.kernels.sample_spline`). As two sparse products, a
    transpose, a scaling, a subtraction and a cast, a realistic IRAC image's 28 tables took
    a fresh worker 0.066-0.103 s, against 0.038-0.065 s.
    """
    grid = np.arange(-half_size, half_size + 1, dtype=np.float64)
    # Phase p's stamp pixel i is the row p * size + i of the taps.
    offsets = (grid[None, :] - np.asarray(phases, dtype=np.float64)[:, None]).ravel()
    row_taps, row_weights = _spline_taps(centre[0] + oversampling * offsets, coefficients.shape[0])
    col_taps, col_weights = _spline_taps(centre[1] + oversampling * offsets, coefficients.shape[1])
    stamps = np.empty((len(phases), len(phases), grid.size, grid.size), dtype=dtype)
    sample_spline(
        coefficients, row_taps, row_weights, col_taps, col_weights, float(scale),
        _NOTHING_PLACED if placed is None else placed, stamps,
    )
    return stamps


_TAPER_WIDTH = 3.0


def _core_taper(radius, core_radius):
    """1 inside ``core_radius - _TAPER_WIDTH``, falling as a raised cosine to 0 at ``core_radius``."""
    inner = core_radius - _TAPER_WIDTH
    fraction = np.clip((radius - inner) / _TAPER_WIDTH, 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * fraction))
