"""The PRF of each image: read from a file, tabulated for the image grid, and, once per worker
process, loaded with the image's calibration."""

import functools

import numpy as np
from astropy.io import fits

from ..bands import BANDS, Band
from ..calibration import Calibration
from ..engine import PRFTable
from ..engine.prf import prf_table_arrays
from ..engine.scene import disc_tables


def read_prf(path, band: Band) -> tuple[np.ndarray, int]:
    """A PRF file's image and its samples per image pixel.

    The sampling comes from the header: ``OVERSAMP`` if present, else the ratio of the band's
    pixel scale to ``PIXSCALE`` (arcsec per PRF sample), else the image grid itself.
    """
    with fits.open(path) as hdul:
        hdu = next(h for h in hdul if h.data is not None and h.data.ndim == 2)
        prf = np.asarray(hdu.data, dtype=np.float64)
        header = hdu.header
    if "OVERSAMP" in header:
        oversampling = int(header["OVERSAMP"])
    elif "PIXSCALE" in header:
        oversampling = max(1, int(round(band.pixel_scale_arcsec / float(header["PIXSCALE"]))))
    else:
        oversampling = 1
    return prf, oversampling


def tabulate_prf(prf, oversampling, band: Band, split_wings: bool = False, flux_fraction: float = 1.0) -> PRFTable:
    """Tabulate a PRF for the band's image grid; with ``split_wings`` (scene mode), a PRF
    reaching beyond the band's ``prf_core_radius_pixels`` is split into core stamps and a
    wing kernel. The PRF of a source of unit total flux is scaled by ``flux_fraction``
    (`mbphot.calibration.Calibration.flux_fraction`: below 1 where the PRF lacks light the
    calibration aperture counts, above 1 where it holds too much). The stamps
    are single precision, as the engine's tables are (`mbphot.engine.PRFTable`)."""
    core_radius = band.prf_core_radius_pixels if split_wings else None
    stamps, phases, half_size, wings = prf_table_arrays(
        prf, oversampling=oversampling, enclosed_fraction=band.prf_enclosed_fraction, core_radius=core_radius
    )
    wings = None if wings is None else wings * flux_fraction
    stamps *= flux_fraction
    return PRFTable(stamps=stamps.astype(np.float32), phases=phases, half_size=half_size, wings=wings)


def load_prf(path, band: Band, split_wings: bool = False) -> PRFTable:
    """Read a PRF file and tabulate it for the band's image grid (`read_prf`, `tabulate_prf`)."""
    return tabulate_prf(*read_prf(path, band), band, split_wings)


# Worker processes measure many partitions of the same images: tabulate each image's PRF once.
@functools.lru_cache(maxsize=16)
def _calibrated(path, split_wings: bool) -> tuple[PRFTable, Calibration]:
    """An image's calibration (saved by `_calibrate._calibrate_image`) and its PRF, tabulated."""
    calibration, band, _ = _stored_calibration(path)
    return tabulate_prf(calibration.prf, calibration.oversampling, band, split_wings, calibration.flux_fraction), calibration


def read_calibration(path) -> tuple[Calibration, Band, np.ndarray]:
    """A saved calibration, its band, and the image pixel (x, y) of its section's corner."""
    with np.load(path) as stored:
        origin = stored["section_origin"] if "section_origin" in stored else np.zeros(2)
        return Calibration.from_arrays(stored), BANDS[str(stored["band"])], np.asarray(origin, dtype=np.float64)


# The worker's tables of one image all come from one reading of its calibration.
_stored_calibration = functools.lru_cache(maxsize=16)(read_calibration)


@functools.lru_cache(maxsize=16)
def _variant_tables(path, split_wings: bool) -> tuple[list, object, np.ndarray]:
    """The tables of the PRF's variants across the image (`mbphot.engine.variation`), the
    variation and its section's corner; no tables where the PRF does not vary."""
    table, calibration = _calibrated(path, split_wings)
    variation = calibration.variation
    _, _, origin = _stored_calibration(path)
    if variation is None:
        return [], None, origin
    tables = disc_tables(
        list(variation.variant_prfs(calibration.prf)), calibration.oversampling, table, calibration.flux_fraction
    )
    return tables, variation, origin
