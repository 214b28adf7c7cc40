"""What the realistic field adds to the sources: sizes, astrometric errors, confusion.

Each effect draws from its own random stream (`stream`), so that switching one effect on or
off leaves the others, and the sources themselves, unchanged.
"""

import zlib

import numpy as np

from ._prfs import GALAXY_RE_BINS_ARCSEC

RESOLVED_FRACTION = 0.5
"""Share of the galaxies (star-forming and quiescent, never stars or AGN) drawn as discs."""
RE_LOG10_AT_1UJY = -0.6
RE_LOG10_PER_DEX_FLUX = 0.25
RE_LOG10_SCATTER = 0.15
"""log10 r_e (arcsec) = -0.6 + 0.25 log10(S_3.6 / 1 uJy) + N(0, 0.15), within 0.1-1": 0.17" at
the catalogue limit, 0.45" at 10 uJy, 0.8" at 100 uJy."""
FLUX_RADIUS_PSF_ARCSEC = 0.06
FLUX_RADIUS_SCATTER_DEX = 0.05
"""The catalogue's ``flux_radius_arcsec`` is a half-light radius as an HST/ACS-like image gives
it: sqrt(r_e^2 + 0.06^2) arcsec, scattered by 0.05 dex (12 %)."""
POSITION_SIGMA_BRIGHT_ARCSEC = 0.10
POSITION_SIGMA_FAINT_ARCSEC = 0.20
"""Per-axis scatter of catalogue positions from the light: 0.10" above 20 uJy at 3.6 um, rising
with log flux to 0.20" at 0.2 uJy (the catalogue limit)."""
IMAGE_OFFSET_MAX_ARCSEC = 0.1
"""Each image's light is offset from the catalogue frame by up to this (uniform in a disc)."""
CONFUSION_FLUX_RANGE_UJY = (0.02, 0.2)
"""The number counts continued a decade below the catalogue limit (0.2 uJy at 3.6 um before the
class factors): 2.98 times the catalogue density."""


def stream(spec, label: str) -> np.random.Generator:
    """The random stream of one effect of the field ``spec``."""
    return np.random.default_rng([spec.seed, int(round(spec.ra_deg * 1e4)), int(round(spec.dec_deg * 1e4)),
                                  int(round(spec.radius_arcmin * 1e3)), zlib.crc32(label.encode())])


def galaxy_sizes(spec, sed_class, flux36):
    """Size bin (-1: point source) and true half-light radius (0 for point sources) of each source."""
    rng = stream(spec, "sizes")
    n = len(flux36)
    galaxy = np.isin(np.asarray(sed_class), ["star_forming", "quiescent"])
    resolved = galaxy & (rng.uniform(0, 1, n) < RESOLVED_FRACTION)
    log_re = RE_LOG10_AT_1UJY + RE_LOG10_PER_DEX_FLUX * np.log10(np.maximum(flux36, 1e-6)) + rng.normal(0, RE_LOG10_SCATTER, n)
    bins = np.log10(GALAXY_RE_BINS_ARCSEC)
    nearest = np.abs(np.clip(log_re, bins[0], bins[-1])[:, None] - bins[None, :]).argmin(axis=1)
    size_bin = np.where(resolved, nearest, -1)
    re = np.where(resolved, np.asarray(GALAXY_RE_BINS_ARCSEC)[nearest], 0.0)
    return size_bin, re


def flux_radius(spec, re_arcsec):
    """The catalogue's size column (arcsec)."""
    rng = stream(spec, "flux_radius")
    return np.round(np.hypot(re_arcsec, FLUX_RADIUS_PSF_ARCSEC) * 10 ** rng.normal(0, FLUX_RADIUS_SCATTER_DEX, len(re_arcsec)), 3)


def position_sigma_arcsec(flux36):
    fraction = np.clip(np.log10(20.0 / np.maximum(flux36, 1e-6)) / 2.0, 0.0, 1.0)
    return POSITION_SIGMA_BRIGHT_ARCSEC + (POSITION_SIGMA_FAINT_ARCSEC - POSITION_SIGMA_BRIGHT_ARCSEC) * fraction


def catalogue_positions(spec, ra, dec, flux36):
    """Catalogue positions scattered from the true ones, and the per-axis sigma (arcsec)."""
    rng = stream(spec, "astrometry")
    sigma = position_sigma_arcsec(flux36)
    cos_dec = np.cos(np.radians(spec.dec_deg))
    n = len(ra)
    return (ra + rng.normal(0, 1, n) * sigma / 3600.0 / cos_dec, dec + rng.normal(0, 1, n) * sigma / 3600.0, sigma)


def image_offsets(spec, labels):
    """(dRA*cos(Dec), dDec) offsets in arcsec of each image's light from the catalogue frame."""
    rng = stream(spec, "image_offsets")
    radius = IMAGE_OFFSET_MAX_ARCSEC * np.sqrt(rng.uniform(0, 1, len(labels)))
    angle = rng.uniform(0, 2 * np.pi, len(labels))
    return {label: (r * np.cos(a), r * np.sin(a)) for label, r, a in zip(labels, radius, angle)}
