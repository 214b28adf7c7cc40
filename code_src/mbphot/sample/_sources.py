"""What the realistic field adds to the sources: sizes, astrometric errors, confusion.

Each effect draws from its own random stream (`stream`), so that switching one effect on or
off leaves the others, and the sources themselves, unchanged.
"""

import zlib

import numpy as np
from scipy.spatial import cKDTree

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
class factors): 2.98 times the catalogue density, of which `undetected` keeps 2.8 times."""
DETECTION_WAVELENGTH_UM = 1.0
"""COSMOS2015 detects on a chi^2 sum of z++YJHKs images: a source is catalogued by its light near
1 um, not at 3.6 um (`undetected`)."""
_NUV_WAVELENGTH_UM = 0.2316


DETECTION_FWHM_ARCSEC = 0.8
"""Resolution of the catalogue's detection image (COSMOS2015: a chi^2 sum of ground-based
zYJHKs images, about 0.8" seeing): two sources are two catalogue entries only where it shows
two peaks (`detection_primaries`)."""
DETECTION_SEARCH_ARCSEC = 2.0
"""Pairs farther apart than this always show two peaks at 0.8" seeing (the contrast it would
take, above 10^5, is beyond the counts' range)."""
_PAIRS_PER_CHUNK = 50_000


def stream(spec, label: str) -> np.random.Generator:
    """The random stream of one effect of the field ``spec``."""
    return np.random.default_rng([spec.seed, int(round(spec.ra_deg * 1e4)), int(round(spec.dec_deg * 1e4)),
                                  int(round(spec.radius_arcmin * 1e3)), zlib.crc32(label.encode())])


def undetected(flux36_ujy, flux_nuv_ujy, limit_ujy=CONFUSION_FLUX_RANGE_UJY[1]):
    """Which of the sources drawn below the catalogue limit the catalogue does miss.

    A source is missed where both its 3.6 um flux and its flux at `DETECTION_WAVELENGTH_UM`
    are below ``limit_ujy``. The 1 um flux is interpolated in log flux and log wavelength
    between NUV and 3.6 um where the source is bluer than flat in f_nu (brighter at 1 um than
    at 3.6 um), and taken as the 3.6 um flux otherwise. The counts draw stars five and AGN three
    times brighter at 3.6 um than the galaxies at the same place in the counts, up to 1 uJy, and
    some stars ten to a hundred times brighter still in NUV: up to 30 uJy (AB 20) in NUV, at
    AB 23 near 1 um, where COSMOS2015 is complete. Kept, they sat unseen in the PSF cores of
    catalogued sources and put 2 % of the NUV fluxes beyond 3 sigma of their errors.
    """
    flux36_ujy, flux_nuv_ujy = np.asarray(flux36_ujy, dtype=float), np.asarray(flux_nuv_ujy, dtype=float)
    slope = np.log(3.6 / DETECTION_WAVELENGTH_UM) / np.log(3.6 / _NUV_WAVELENGTH_UM)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.maximum(1.0, np.where(flux36_ujy > 0, flux_nuv_ujy / flux36_ujy, 1.0) ** slope)
    return flux36_ujy * lift < limit_ujy


def galaxy_sizes(spec, sed_class, flux36):
    """Per source, the galaxy tables it is drawn with and its true half-light radius: the
    tabulated radius below it (index into `GALAXY_RE_BINS_ARCSEC`, -1 for a point source), its
    position towards the next one in log radius (0-1; `_render.render_rows` draws the disc as
    the two tables weighted by it), and the radius (arcsec, 0 for a point source)."""
    rng = stream(spec, "sizes")
    n = len(flux36)
    galaxy = np.isin(np.asarray(sed_class), ["star_forming", "quiescent"])
    resolved = galaxy & (rng.uniform(0, 1, n) < RESOLVED_FRACTION)
    log_re = RE_LOG10_AT_1UJY + RE_LOG10_PER_DEX_FLUX * np.log10(np.maximum(flux36, 1e-6)) + rng.normal(0, RE_LOG10_SCATTER, n)
    bins = np.log10(GALAXY_RE_BINS_ARCSEC)
    log_re = np.clip(log_re, bins[0], bins[-1])
    below = np.clip(np.searchsorted(bins, log_re, side="right") - 1, 0, bins.size - 2)
    towards_next = np.clip((log_re - bins[below]) / (bins[below + 1] - bins[below]), 0.0, 1.0)
    size_bin = np.where(resolved, below, -1)
    return size_bin, np.where(resolved, towards_next, 0.0), np.where(resolved, 10**log_re, 0.0)


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


def _second_peak(separation, flux_ratio, sigma_first, sigma_second):
    """Whether the fainter of two Gaussian sources (``flux_ratio`` <= 1 of the brighter's flux)
    makes a local maximum of their summed profile, along the line through both centres."""
    steps = np.linspace(0.0, 1.5, 97)
    along = separation[:, None] * steps[None, :]
    first = np.exp(-0.5 * (along / sigma_first[:, None]) ** 2) / sigma_first[:, None] ** 2
    second = (flux_ratio / sigma_second**2)[:, None] * np.exp(-0.5 * ((along - separation[:, None]) / sigma_second[:, None]) ** 2)
    profile = first + second
    rising = np.diff(profile, axis=1) > 0
    # A peak beyond the brighter one's centre: the profile rises again after falling.
    falling_then_rising = (~rising[:, :-1]) & rising[:, 1:]
    return falling_then_rising.any(axis=1)


def detection_primaries(ra, dec, detection_flux, re_arcsec):
    """For each source, the index of the catalogue entry it is part of (itself if detected).

    The detection image blurs each source to a Gaussian of the image's seeing
    (`DETECTION_FWHM_ARCSEC`) and its own size (half-light radius ``re_arcsec``, as a Gaussian
    of that half-light radius). A fainter source that makes no peak of its own beside a
    brighter one is part of the brighter one's entry. Pairs are taken brightest first; a
    source already part of another entry takes no others.
    """
    ra, dec = np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64)
    flux = np.maximum(np.asarray(detection_flux, dtype=np.float64), 0.0)
    primary = np.arange(ra.size)
    if ra.size < 2:
        return primary
    cos_dec = np.cos(np.radians(np.mean(dec)))
    xy = np.column_stack([ra * cos_dec, dec]) * 3600.0
    pairs = cKDTree(xy).query_pairs(DETECTION_SEARCH_ARCSEC, output_type="ndarray")
    if pairs.size == 0:
        return primary
    swap = flux[pairs[:, 1]] > flux[pairs[:, 0]]
    brighter = np.where(swap, pairs[:, 1], pairs[:, 0])
    fainter = np.where(swap, pairs[:, 0], pairs[:, 1])
    seeing_sigma = DETECTION_FWHM_ARCSEC / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    sigma = np.hypot(seeing_sigma, np.asarray(re_arcsec, dtype=np.float64) / np.sqrt(2.0 * np.log(2.0)))
    separation = np.hypot(*(xy[brighter] - xy[fainter]).T)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(flux[brighter] > 0, flux[fainter] / flux[brighter], 1.0)
    merged = np.zeros(separation.size, dtype=bool)
    for start in range(0, separation.size, _PAIRS_PER_CHUNK):
        chunk = slice(start, start + _PAIRS_PER_CHUNK)
        merged[chunk] = ~_second_peak(separation[chunk], ratio[chunk], sigma[brighter[chunk]], sigma[fainter[chunk]])
    brighter, fainter = brighter[merged], fainter[merged]
    order = np.lexsort((fainter, brighter, -flux[brighter]))
    has_parts = np.zeros(ra.size, dtype=bool)
    for first, second in zip(brighter[order], fainter[order]):
        if primary[first] == first and primary[second] == second and not has_parts[second]:
            primary[second] = first
            has_parts[first] = True
    return primary
