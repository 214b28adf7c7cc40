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

__all__ = ["source_mask", "sky_and_rms_maps"]


def source_mask(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, radius_pixels: float) -> np.ndarray:
    """Boolean image, True within ``radius_pixels`` of any source at 0-based (x, y)."""
    mask = np.zeros(shape, dtype=bool)
    col = np.rint(np.asarray(x)).astype(np.intp)
    row = np.rint(np.asarray(y)).astype(np.intp)
    inside = (row >= 0) & (row < shape[0]) & (col >= 0) & (col < shape[1])
    mask[row[inside], col[inside]] = True
    r = int(np.ceil(radius_pixels))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return ndimage.binary_dilation(mask, structure=(xx**2 + yy**2) <= radius_pixels**2)


def _box_statistics(values: np.ndarray, box_size: int, min_fraction: float):
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


def _fill_and_upsample(grid: np.ndarray, shape: tuple[int, int], box_size: int) -> np.ndarray:
    if not np.isfinite(grid).any():
        return np.full(shape, np.nan)
    filled = np.where(np.isfinite(grid), grid, np.nanmedian(grid))
    smoothed = ndimage.median_filter(filled, size=3, mode="nearest")
    rows = (np.arange(shape[0]) + 0.5) / box_size - 0.5
    cols = (np.arange(shape[1]) + 0.5) / box_size - 0.5
    coords = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(smoothed, coords, order=1, mode="nearest")


def sky_and_rms_maps(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    sky: np.ndarray | None = None,
    box_size: int = 32,
    min_fraction: float = 0.2,
) -> tuple[np.ndarray, np.ndarray]:
    """Sky level and per-pixel noise maps of an image.

    Parameters
    ----------
    image : ndarray
        The image, NaN where there is no data.
    mask : ndarray of bool, optional
        True for pixels to leave out (sources); see `source_mask`.
    sky : ndarray, optional
        A sky map that came with the image (GALEX ``-skybg``). When given it is returned as
        the sky and the noise is measured around it.
    box_size : int
        Side of the boxes in pixels.
    min_fraction : float
        A box needs at least this fraction of usable pixels; others are filled from the
        median of the rest.

    Returns
    -------
    sky_map, rms_map : ndarray
        Both with the image's shape.
    """
    values = np.array(image, dtype=np.float64)
    if sky is not None:
        values = values - sky
    if mask is not None:
        values[mask] = np.nan
    # Differences of horizontally adjacent pixels carry the white pixel noise and cancel
    # what is smooth on the PRF scale (faint sources, which the fit models anyway).
    differences = np.full_like(values, np.nan)
    differences[:, 1:] = (values[:, 1:] - values[:, :-1]) / np.sqrt(2.0)
    median, _ = _box_statistics(values, box_size, min_fraction)
    _, std = _box_statistics(differences, box_size, min_fraction)
    rms_map = _fill_and_upsample(std, values.shape, box_size)
    if sky is None:
        sky_map = _fill_and_upsample(median, values.shape, box_size)
    else:
        sky_map = np.asarray(sky, dtype=np.float64)
    return sky_map, rms_map
