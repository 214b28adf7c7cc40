"""Local sky level and pixel noise from source-masked pixels.

The sky is measured on a grid of boxes (sigma-clipped median of the pixels that no catalogue
source touches), smoothed over neighbouring boxes and interpolated back to every pixel, the
approach of SExtractor and photutils' Background2D. The noise is the sigma-clipped scatter of
differences between adjacent pixels, which is the white pixel noise the fit needs. Measuring the sky in a cutout full of
sources would bias it high; masking the catalogue positions avoids that.
"""

import warnings

import numpy as np
from astropy.stats import sigma_clipped_stats
from scipy import ndimage

__all__ = ["box_statistics", "grid_to_pixels", "smooth_grid", "source_mask", "sky_and_rms_maps"]


def source_mask(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, radius_pixels: float) -> np.ndarray:
    """Boolean image, True within ``radius_pixels`` of any source at 0-based (x, y).

    Each disk offset is stamped for all sources at once: at catalogue densities this is
    several times faster than dilating an image of points.
    """
    mask = np.zeros(shape, dtype=bool)
    col = np.rint(np.asarray(x, dtype=np.float64))
    row = np.rint(np.asarray(y, dtype=np.float64))
    r = int(np.ceil(radius_pixels))
    near = np.isfinite(col) & np.isfinite(row)
    near &= (row >= -r) & (row < shape[0] + r) & (col >= -r) & (col < shape[1] + r)
    col, row = col[near].astype(np.intp), row[near].astype(np.intp)
    for d_row in range(-r, r + 1):
        for d_col in range(-r, r + 1):
            if d_row**2 + d_col**2 > radius_pixels**2:
                continue
            rows, cols = row + d_row, col + d_col
            inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
            mask[rows[inside], cols[inside]] = True
    return mask


def _clipped_box_statistics(values: np.ndarray, box_size: int, min_fraction: float):
    ny, nx = values.shape
    pad_y, pad_x = (-ny) % box_size, (-nx) % box_size
    padded = np.pad(values, ((0, pad_y), (0, pad_x)), constant_values=np.nan)
    n_box_y, n_box_x = padded.shape[0] // box_size, padded.shape[1] // box_size
    blocks = padded.reshape(n_box_y, box_size, n_box_x, box_size).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(n_box_y, n_box_x, box_size * box_size)
    n_valid = np.isfinite(blocks).sum(axis=2)
    with warnings.catch_warnings():
        # boxes beyond the mosaic edge are all NaN by design
        warnings.simplefilter("ignore")
        _, median, std = sigma_clipped_stats(blocks, sigma=3.0, maxiters=5, axis=2)
    too_few = n_valid < min_fraction * box_size * box_size
    median = np.where(too_few, np.nan, median)
    std = np.where(too_few, np.nan, std)
    return median, std


def box_statistics(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    sky: np.ndarray | None = None,
    box_size: int = 32,
    min_fraction: float = 0.2,
    with_rms: bool = True,
):
    """Sky level and pixel noise of each ``box_size`` square box of an image.

    Boxes start at pixel (0, 0), so the boxes of a horizontal strip of an image whose first
    row is a multiple of ``box_size`` are exactly the whole image's boxes of those rows: an
    image can be measured strip by strip, in parallel, with identical results.

    Parameters
    ----------
    image : ndarray
        The image, NaN where there is no data.
    mask : ndarray of bool, optional
        True for pixels to leave out (sources); see `source_mask`.
    sky : ndarray, optional
        A sky map that came with the image (GALEX ``-skybg``); the noise is measured around it.
    box_size : int
        Side of the boxes in pixels.
    min_fraction : float
        A box needs at least this fraction of usable pixels; others get NaN.
    with_rms : bool
        Also measure the noise (skip it where an uncertainty map gives the noise).

    Returns
    -------
    median, rms : ndarray
        Sigma-clipped median and pixel noise per box (``rms`` is None without ``with_rms``).
    """
    values = np.array(image, dtype=np.float64)
    if sky is not None:
        values = values - sky
    if mask is not None:
        values[mask] = np.nan
    median, _ = _clipped_box_statistics(values, box_size, min_fraction)
    if not with_rms:
        return median, None
    # Differences of horizontally adjacent pixels carry the white pixel noise and cancel
    # what is smooth on the PRF scale (faint sources, which the fit models anyway).
    differences = np.full_like(values, np.nan)
    differences[:, 1:] = (values[:, 1:] - values[:, :-1]) / np.sqrt(2.0)
    _, rms = _clipped_box_statistics(differences, box_size, min_fraction)
    return median, rms


def smooth_grid(grid: np.ndarray) -> np.ndarray:
    """Fill boxes without a measurement from the median of the others, then take the median
    over each box and its neighbours (which removes boxes spoilt by a bright source)."""
    if not np.isfinite(grid).any():
        return np.full(grid.shape, np.nan)
    filled = np.where(np.isfinite(grid), grid, np.nanmedian(grid))
    return ndimage.median_filter(filled, size=3, mode="nearest")


def grid_to_pixels(smoothed: np.ndarray, rows: np.ndarray, cols: np.ndarray, box_size: int) -> np.ndarray:
    """A smoothed box grid interpolated (bilinearly between box centres) to the pixels
    ``rows`` x ``cols`` (0-based image indices); any section of an image gets the values the
    whole image would."""
    grid_rows = (np.asarray(rows) + 0.5) / box_size - 0.5
    grid_cols = (np.asarray(cols) + 0.5) / box_size - 0.5
    coords = np.meshgrid(grid_rows, grid_cols, indexing="ij")
    return ndimage.map_coordinates(smoothed, coords, order=1, mode="nearest")


def sky_and_rms_maps(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    sky: np.ndarray | None = None,
    box_size: int = 32,
    min_fraction: float = 0.2,
) -> tuple[np.ndarray, np.ndarray]:
    """Sky level and per-pixel noise maps of a whole image.

    See `box_statistics` for the parameters; the box grids are smoothed (`smooth_grid`) and
    interpolated to every pixel (`grid_to_pixels`). Where ``sky`` is given it is returned as
    the sky map.

    Returns
    -------
    sky_map, rms_map : ndarray
        Both with the image's shape.
    """
    median, rms = box_statistics(image, mask, sky, box_size, min_fraction)
    rows, cols = np.arange(image.shape[0]), np.arange(image.shape[1])
    rms_map = grid_to_pixels(smooth_grid(rms), rows, cols, box_size)
    if sky is None:
        sky_map = grid_to_pixels(smooth_grid(median), rows, cols, box_size)
    else:
        sky_map = np.asarray(sky, dtype=np.float64)
    return sky_map, rms_map
