"""Reading the images the photometry measures: sections through memory maps, in the band's
unit, with NaN for no data; and where files derived from an image are cached."""

import functools
import hashlib
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy import ndimage

from ..bands import Band, unit_factor
from ..io import read_header

# A GALEX zero is no data only inside a square of zeros this wide (`_read_image`).
_NO_DATA_BOX = 5


def _derived_file(cache_dir: Path, source, suffix: str) -> Path:
    """Where something derived from the file ``source`` is cached: named for the file, its
    size and its modification time, so that a changed file is derived afresh."""
    path = Path(source).resolve()
    status = path.stat()
    digest = hashlib.sha1(f"{path}|{status.st_size}|{status.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir / f"{path.name.removesuffix('.gz').removesuffix('.fits')}_{digest}{suffix}"


# Worker processes measure many partitions of the same images: read each header once.
@functools.lru_cache(maxsize=64)
def _cached_header(path) -> fits.Header:
    return read_header(path)


def _read_map(path, section) -> np.ndarray:
    """A section of an image as float64, read through a memory map: only its pages are read.

    Slicing the memory-mapped array is much faster than astropy's ``section``, which reads
    row by row; scaled integer images (BSCALE/BZERO), which astropy would scale whole, and
    compressed files still go through ``section``.
    """
    with fits.open(path, memmap=True) as hdul:
        hdu = hdul[0]
        scaled = "BSCALE" in hdu.header or "BZERO" in hdu.header
        if scaled or str(path).endswith(".gz"):
            return np.array(hdu.section[section], dtype=np.float64)
        return np.array(hdu.data[section], dtype=np.float64)


def _read_in_band_unit(path, band: Band, section) -> np.ndarray:
    """A section of a map in the band's image unit: converted from the file's ``BUNIT`` where
    it is another known unit (`mbphot.bands.unit_factor`, e.g. uJy per pixel); as it is when
    ``BUNIT`` is empty, the band's, or unknown (files mode refuses unknown units up front)."""
    values = _read_map(path, section)
    bunit = str(_cached_header(path).get("BUNIT", "")).strip()
    factor = unit_factor(bunit, band) if bunit else None
    if factor is not None and factor != 1.0:
        values *= factor
    return values


def _read_image(path, band: Band, section=(slice(None), slice(None))) -> np.ndarray:
    """An image, or a section of it, as float64 with NaN for no data.

    GALEX intensity maps are exactly zero where the detector saw nothing (outside the field
    of view), but a pixel of a shallow tile can also hold zero counts: only zeros in a
    `_NO_DATA_BOX` square of zeros are no data. (Where the effective-exposure map exists,
    `_background._read_section` also takes its zeros as no data.) At the Medium Imaging Survey's depth
    about 40 % of FUV sky pixels are zero, and 25 zero neighbours by chance happen once in
    1e10 pixels.
    """
    image = _read_in_band_unit(path, band, section)
    if band.instrument == "GALEX":
        zero = image == 0
        # Outside the image counts as no data, so a section's edge within an image can only
        # err on its outer `_NO_DATA_BOX - 1` pixels, which sections read as padding.
        structure = np.ones((_NO_DATA_BOX, _NO_DATA_BOX), dtype=bool)
        eroded = ndimage.binary_erosion(zero, structure, border_value=1)
        image[ndimage.binary_dilation(eroded, structure) & zero] = np.nan
    return image
