"""Resolved sources in scene mode: each source's size bin from the catalogue, the PRF convolved
with one disc per bin, and the catalogue sizes' error, the prior of the sizes the fit takes as
unknowns."""

import functools

import numpy as np
import pandas as pd

from ..bands import BANDS, Band
from ..engine.scene import extended_profiles
from ._prf import _calibrated

SIZE_COLUMN = "flux_radius_arcsec"
"""Catalogue column of each source's half-light radius in a high-resolution image (arcsec);
where present, scene mode fits resolved sources with their PRF-convolved disc."""
HIGH_RESOLUTION_PSF_ARCSEC = 0.06
"""Half-light radius of the PSF of the image the sizes come from (HST/ACS F814W)."""
SIZE_BINS_ARCSEC = np.geomspace(0.1, 1.6, 17)
"""Edges of the bins of intrinsic half-light radius fitted with one disc each (at the bin's
geometric centre, within 9 % of any radius in the bin); smaller sources are points."""
CATALOGUE_SIZE_ERROR_DEX = 0.05
"""Assumed error of a catalogue half-light radius (12 %, as for HST/ACS sizes of galaxies a
few magnitudes above the limit): the prior of the sizes scene mode fits, over which the fluxes
of bright resolved sources are marginalised (`SIZE_PRIOR_SIGMA_BINS`)."""
SIZE_PRIOR_SIGMA_BINS = CATALOGUE_SIZE_ERROR_DEX / np.log10(SIZE_BINS_ARCSEC[1] / SIZE_BINS_ARCSEC[0])
"""`CATALOGUE_SIZE_ERROR_DEX` in units of the bins: the prior's sigma when scene mode refits
the sizes of bright resolved sources (``sizes`` of `mbphot.engine.scene.scene_photometry`)."""


def size_radii_pix(band: Band) -> np.ndarray:
    """The disc half-light radius each bin of `SIZE_BINS_ARCSEC` is fitted with, in ``band``'s
    pixels: the bin's geometric centre."""
    return np.sqrt(SIZE_BINS_ARCSEC[:-1] * SIZE_BINS_ARCSEC[1:]) / band.pixel_scale_arcsec


def size_bins(catalog: pd.DataFrame) -> np.ndarray:
    """Each source's bin of `SIZE_BINS_ARCSEC` by its intrinsic half-light radius, -1 for a
    point source or where the catalogue has no `SIZE_COLUMN`.

    The column is a half-light radius measured at high resolution (HST/ACS-like); the
    intrinsic radius is sqrt(r^2 - r_psf^2), r_psf = `HIGH_RESOLUTION_PSF_ARCSEC`.
    """
    if SIZE_COLUMN not in catalog:
        return np.full(len(catalog), -1, dtype=np.intp)
    measured = catalog[SIZE_COLUMN].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        intrinsic = np.sqrt(np.clip(measured**2 - HIGH_RESOLUTION_PSF_ARCSEC**2, 0.0, None))
        index = np.searchsorted(SIZE_BINS_ARCSEC, intrinsic, side="right") - 1
    resolved = np.isfinite(intrinsic) & (intrinsic >= SIZE_BINS_ARCSEC[0])
    return np.where(resolved, np.minimum(index, SIZE_BINS_ARCSEC.size - 2), -1).astype(np.intp)


@functools.lru_cache(maxsize=16)
def _extended_tables(path, split_wings: bool, band_name: str) -> list:
    """The image's PRF convolved with exponential discs of the `SIZE_BINS_ARCSEC` radii."""
    table, calibration = _calibrated(path, split_wings)
    return extended_profiles(
        calibration.prf, calibration.oversampling, size_radii_pix(BANDS[band_name]), table, calibration.flux_fraction
    )
