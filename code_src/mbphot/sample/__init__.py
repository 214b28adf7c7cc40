"""The embedded default: a simulated COSMOS-like field with known truth.

`make_sample_field` writes, deterministically from a `SampleSpec` (centre, radius, seed,
realism), the same kinds of files the archives serve, in the same formats and units, so the
same loaders read both:

* a COSMOS2015-like catalogue with the lower-case columns IRSA TAP returns (fluxes in microJy,
  catalogue fluxes are truth plus measurement noise, NaN where a value is missing);
* IRAC science and uncertainty mosaics per channel (TAN WCS, ``BUNIT = 'MJy/sr'``);
* two overlapping GALEX tiles per band, intensity (``-int``) and sky background (``-skybg``)
  in counts/s and effective exposure (``-rrhr``) in seconds, each cut from a tile with its own tangent point, like the real COSMOS files;
* a Chandra catalogue with the HEASARC ``ccosmoscat`` columns, positions scattered by their
  error radii, plus a few X-ray sources without a counterpart;
* the PRF/PSF files given to the fitter (IRAC PRFs 5x oversampled, GALEX PSFs on the 1.5"
  grid and peak-normalised, as the real GALEX files are);
* a truth table (true flux per band, true X-ray counterpart), for validation only.

Populations follow COSMOS2015 in spirit: about 150 sources per arcmin^2, star-forming and
quiescent galaxies, stars, and AGN with power-law infrared SEDs that fall in the Lacy wedge.

Realism
-------
``SampleSpec.realism`` (a `Realism`, or ``"ideal"`` / ``"realistic"``) chooses how far the sky
departs from what the fitter is given. The ideal field (the default) is drawn with the very PRF
files, white IRAC noise equal to the ``unc`` map, a GALEX sky map equal to the true sky, sources
exactly at the catalogue positions and none below the catalogue limit; its files are byte for
byte those of the simulator before realism existed. Each `Realism` switch adds one effect of
real COSMOS images (``docs/simulator.md`` gives magnitudes and what each does to a fitter):

* ``prf_mismatch``: IRAC sky PRF turned by two roll angles mixed smoothly across the field, 4 %
  broader than the file, with wings beyond the file's 17 x 17 box to 41 x 41 pixels (`_prfs`);
* ``galex_psf_wings``: GALEX sky PSFs as extended as the real files (99.9 % within 36 / 47 px),
  a 120 x 120 peak-normalised PSF file with a 4 % broader core (`_prfs`);
* ``astrometric_noise``: catalogue positions 0.10-0.20" (per axis) from the light, and each
  image offset by up to 0.1" (`_sources`);
* ``resolved_galaxies``: half the galaxies are exponential discs, r_e 0.1-1", convolved with the
  sky PRF by GalSim; catalogue column ``flux_radius_arcsec`` (`_prfs`, `_sources`);
* ``confusion``: three times the catalogue's density of sources a decade below its limit, in the
  images only (`_sources`);
* ``correlated_noise``: IRAC noise resampled from four dithered 1.2" frames, ``unc`` the exact
  per-pixel sigma (`_noise`);
* ``galex_depth``: a 40 ks tile and a 1.5 ks (MIS) tile with zero-count pixels, ``-rrhr`` zero
  outside a 0.6 deg footprint whose edge crosses the field;
* ``sky_error``: ``-skybg`` off the true sky by a smooth 4 % rms pattern (`_noise`);
* ``detection_blending``: the catalogue detected at 0.8" seeing, so that a source with no peak
  of its own beside a brighter one is part of its catalogue entry (`_sources`).

Each effect draws from its own random stream, so the sources and the other effects do not
change when one is switched. The truth table of a realistic field adds the true positions,
sizes and positional sigmas, and records the images' offsets and the number of faint sources.

Rendering
---------
Fields of any size fit in memory: the images are rendered strip by strip straight into their
files, each strip from the sources whose PRF stamps reach it, large fields by worker processes.
Realistic images add PRF wings and the faint sources by FFT convolution on fixed blocks of rows
(`_render`). The noise is drawn from random streams in image and row order, so the files depend
neither on the strips nor on the number of processes. The whole of COSMOS (48' radius, 1.1e6
sources in the catalogue, 4 GB of files) takes about a minute and a half on 2 cores and 2 GB
of memory when ideal. Realistic, with 4.3e6 faint sources besides, it took 5 minutes on 2
cores shared with other jobs, 3.9 GB in the main process and 0.7 GB per worker.
"""

import multiprocessing
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from astropy.wcs import WCS
from scipy import ndimage, signal, special

from ..bands import BANDS, GALEX_BANDS, IRAC_BANDS
from ..engine.prf import build_prf_table
from ..resources import available_cpus, exit_with_parent
from . import _noise, _prfs, _render, _sources
from ._realism import REALISM_LEVELS, Realism

__all__ = ["SampleSpec", "Realism", "REALISM_LEVELS", "make_sample_field", "sample_files"]

SAMPLE_VERSION = 2
"""Bumped whenever the simulator changes, so that fields made by an older one are rebuilt."""
REALISTIC_VERSION = 5
"""Bumped whenever the realistic effects change: only non-ideal fields are then rebuilt."""
SOURCES_PER_ARCMIN2 = 150.0
HALO_ARCMIN = 1.0
IRAC_PRF_OVERSAMPLING = 5
IRAC_PRF_HALF_SIZE = 8  # 17 x 17 mosaic pixels, the extent of the COSMOS IRAC PRF files
GALEX_PSF_HALF_SIZE = 30
TELESCOPE_DIAMETER_M = 0.85
IRAC_NATIVE_PIXEL_ARCSEC = 1.22
IRAC_NOISE_UJY_PER_PIXEL = {"irac1": 0.018, "irac2": 0.021, "irac3": 0.13, "irac4": 0.15}
CATALOG_NOISE_UJY = {"irac1": 0.08, "irac2": 0.1, "irac3": 0.6, "irac4": 0.8, "nuv": 0.05, "fuv": 0.05}
GALEX_SKY_COUNTS_PER_S = {"nuv": 3.0e-3, "fuv": 6.0e-4}
GALEX_EXPTIME_S = {"nuv": 51011.2, "fuv": 45212.0}
GALEX_FOV_RADIUS_DEG = 0.6
GALEX_RESPONSE_FALLOFF = 0.7
"""The response falls as 1 - 0.7 (off-axis / FOV radius)^2, reaching zero at `GALEX_EDGE_DEG`."""
GALEX_EDGE_DEG = GALEX_FOV_RADIUS_DEG / np.sqrt(GALEX_RESPONSE_FALLOFF)
GALEX_TILE_OFFSETS_DEG = (("COSMOS_SIM_01", -0.30, 0.05), ("COSMOS_SIM_02", 0.30, -0.05))
CHANDRA_FLUX_LIMIT_CGS = 2.0e-15
N_CHANDRA_WITHOUT_COUNTERPART = 3
SED_CLASSES = ("star_forming", "quiescent", "star", "agn")
SED_FRACTIONS = (0.70, 0.17, 0.05, 0.08)
STRIP_PIXELS = 2**21
"""Pixels per rendered strip (16 MB as float64): a full-COSMOS image never sits in memory, and
the sources rendered twice (within a PRF half-width of a strip's edge) stay a few per cent."""
RENDER_BATCH_STAMP_PIXELS = 2**16
"""Stamp pixels rendered per batch of sources, so that the temporaries (0.5 MB) stay in the cache."""
PARALLEL_MIN_STAMP_PIXELS = 5e8
"""Rendering work (stamp pixels over all images) below which starting worker processes costs
more than it saves: the default 3' field needs about 1e8."""
MAX_AUTO_RENDER_WORKERS = 4
"""Beyond a few workers the noise, drawn in this process, sets the pace; each worker holds
about 0.5 GB (0.7 GB for a realistic field)."""


@dataclass(frozen=True)
class SampleSpec:
    """What the simulated field is made from; the files are a pure function of it.

    Attributes
    ----------
    ra_deg, dec_deg : float
        Field centre.
    radius_arcmin : float
        Field radius; the catalogue reaches `HALO_ARCMIN` further, the images further still.
    seed : int
    realism : Realism or str
        Which real-sky effects the images have: ``"ideal"`` (none, the default), ``"realistic"``
        (all), or a `Realism` with chosen switches.
    """

    ra_deg: float = 150.01
    dec_deg: float = 2.20
    radius_arcmin: float = 3.0
    seed: int = 42
    realism: Realism = Realism()

    def __post_init__(self):
        object.__setattr__(self, "realism", Realism.named(self.realism))

    @property
    def tag(self) -> str:
        """Names the field; realism other than ideal is part of it, so fields never share a folder."""
        tag = f"ra{self.ra_deg:.4f}_dec{self.dec_deg:+.4f}_r{self.radius_arcmin:g}_s{self.seed}"
        return tag if self.realism.is_ideal else f"{tag}_{self.realism.name}"

    @property
    def stamp(self) -> str:
        """What the COMPLETE file of a finished field holds; a field with another is rebuilt.

        Ideal fields keep the stamp they had before realism existed, so they are not rebuilt.
        """
        geometry = (f"SampleSpec(ra_deg={self.ra_deg!r}, dec_deg={self.dec_deg!r}, "
                    f"radius_arcmin={self.radius_arcmin!r}, seed={self.seed!r})")
        if self.realism.is_ideal:
            return f"mbphot.sample version {SAMPLE_VERSION}: {geometry}\n"
        return f"mbphot.sample version {SAMPLE_VERSION}, realism version {REALISTIC_VERSION}: {geometry} {self.realism!r}\n"

    @property
    def catalog_radius_arcmin(self) -> float:
        """The catalogue reaches beyond the field so edge sources have their neighbours."""
        return self.radius_arcmin + HALO_ARCMIN

    @property
    def image_half_side_arcmin(self) -> float:
        return self.catalog_radius_arcmin + 0.3


def sample_files(directory: Path) -> dict:
    """Relative paths of the files a sample field directory holds."""
    files = {
        "catalog": "catalog/cosmos2015.fits",
        "truth": "catalog/truth.fits",
        "chandra": "chandra/ccosmoscat.fits",
        "bands": {},
    }
    for name in IRAC_BANDS:
        channel = name[-1]
        files["bands"][name] = {
            "prf": f"prf/PRF_IRAC_ch{channel}.fits",
            "images": [
                {
                    "image": f"irac/irac_ch{channel}_go2_sci.fits",
                    "unc": f"irac/irac_ch{channel}_go2_unc.fits",
                    "sky": None,
                    "exposure": None,
                    "tile": "COSMOS_SIM",
                }
            ],
        }
    for name in GALEX_BANDS:
        code = BANDS[name].galex_code
        files["bands"][name] = {
            "prf": f"prf/PSF{name}.fits",
            "images": [
                {
                    "image": f"galex/{tile}-{code}-int.fits",
                    "unc": None,
                    "sky": f"galex/{tile}-{code}-skybg.fits",
                    "exposure": f"galex/{tile}-{code}-rrhr.fits",
                    "tile": tile,
                }
                for tile, _, _ in GALEX_TILE_OFFSETS_DEG
            ],
        }
    return files


def _tan_wcs(ra_deg, dec_deg, pixel_scale_arcsec, shape, crval=None):
    """TAN WCS of an image of ``shape`` centred on (ra, dec), tangent point ``crval``."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cdelt = [-pixel_scale_arcsec / 3600.0, pixel_scale_arcsec / 3600.0]
    wcs.wcs.crval = list(crval) if crval is not None else [ra_deg, dec_deg]
    wcs.wcs.crpix = [(shape[1] + 1) / 2.0, (shape[0] + 1) / 2.0]
    wcs.wcs.radesys = "ICRS"
    wcs.wcs.equinox = 2000.0
    if crval is not None:
        x, y = wcs.all_world2pix([[ra_deg, dec_deg]], 0)[0]
        wcs.wcs.crpix = [wcs.wcs.crpix[0] - (x - (shape[1] - 1) / 2.0), wcs.wcs.crpix[1] - (y - (shape[0] - 1) / 2.0)]
    return wcs


def _draw_sources(spec: SampleSpec, rng: np.random.Generator, flux_range_ujy=None) -> Table:
    """The sources over the images' area; ``flux_range_ujy`` (low, high) draws the number counts
    between those 3.6 um fluxes (before the class factors) instead of above the catalogue limit."""
    half_side_deg = spec.image_half_side_arcmin / 60.0
    area_arcmin2 = (2 * spec.image_half_side_arcmin) ** 2
    density = SOURCES_PER_ARCMIN2
    if flux_range_ujy is not None:
        low, high = flux_range_ujy
        density = SOURCES_PER_ARCMIN2 * ((low / 0.2) ** -0.6 - (high / 0.2) ** -0.6)
    n = rng.poisson(density * area_arcmin2)
    cos_dec = np.cos(np.radians(spec.dec_deg))
    ra = spec.ra_deg + rng.uniform(-half_side_deg, half_side_deg, n) / cos_dec
    dec = spec.dec_deg + rng.uniform(-half_side_deg, half_side_deg, n)
    sed = rng.choice(len(SED_CLASSES), size=n, p=SED_FRACTIONS)

    # IRAC 3.6um counts: N(>S) ~ S^-0.6 above 0.2 uJy, flattening above 30 uJy.
    flux36 = 0.2 * (1.0 - rng.uniform(0, 1, n)) ** (-1.0 / 0.6)
    if flux_range_ujy is not None:  # the same draws, mapped onto the counts between low and high
        u = 1.0 - (flux36 / 0.2) ** -0.6
        flux36 = low * (1.0 - u * (1.0 - (high / low) ** -0.6)) ** (-1.0 / 0.6)
    bright = flux36 > 30.0
    flux36[bright] = 30.0 * (flux36[bright] / 30.0) ** 0.5
    flux36 *= np.select([sed == 2, sed == 3], [5.0, 3.0], 1.0)
    flux36 = np.minimum(flux36, 3000.0)

    def normal(mean, sd):
        return rng.normal(mean, sd, n)

    log_lambda = np.log10([3.6, 4.5, 5.8, 8.0])
    alpha_agn = normal(1.0, 0.35)
    star_forming = sed == 0
    quiescent = sed == 1
    star = sed == 2
    agn = sed == 3
    log45 = np.select(
        [star_forming, quiescent, star, agn],
        [normal(-0.05, 0.07), normal(-0.12, 0.05), -2 * (log_lambda[1] - log_lambda[0]) + normal(0, 0.03),
         alpha_agn * (log_lambda[1] - log_lambda[0]) + normal(0, 0.04)],
    )
    log58 = np.select(
        [star_forming, quiescent, star, agn],
        [normal(-0.12, 0.12), normal(-0.30, 0.08), -2 * (log_lambda[2] - log_lambda[0]) + normal(0, 0.03),
         alpha_agn * (log_lambda[2] - log_lambda[0]) + normal(0, 0.05)],
    )
    log80_45 = np.select(
        [star_forming, quiescent, star, agn],
        [normal(-0.05, 0.25), normal(-0.35, 0.10), -2 * (log_lambda[3] - log_lambda[1]) + normal(0, 0.03),
         alpha_agn * (log_lambda[3] - log_lambda[1]) + normal(0, 0.05)],
    )
    log_nuv = np.select(
        [star_forming, quiescent, star, agn],
        [normal(-0.9, 0.35), normal(-2.2, 0.3), normal(-0.8, 0.8), normal(-1.0, 0.4)],
    )
    log_fuv_nuv = np.select(
        [star_forming, quiescent, star, agn],
        [normal(-0.15, 0.2), normal(-0.6, 0.3), normal(-0.8, 0.5), normal(-0.3, 0.25)],
    )
    flux45 = flux36 * 10**log45
    true = {
        "irac1": flux36,
        "irac2": flux45,
        "irac3": flux36 * 10**log58,
        "irac4": flux45 * 10**log80_45,
        "nuv": flux36 * 10**log_nuv,
    }
    true["fuv"] = true["nuv"] * 10**log_fuv_nuv

    log_xray = np.select(
        [agn, star_forming],
        [-14.9 + 0.8 * np.log10(flux36 / 20.0) + normal(0, 0.45), -16.8 + np.log10(flux36 / 20.0) + normal(0, 0.4)],
        -np.inf,
    )
    hardness = np.clip(np.where(agn, normal(-0.2, 0.35), normal(-0.5, 0.2)), -0.95, 0.95)
    photoz = np.select(
        [star_forming, quiescent, star, agn],
        [rng.uniform(0.2, 3.0, n), rng.uniform(0.3, 2.0, n), np.zeros(n), rng.uniform(0.5, 3.5, n)],
    )
    order = np.lexsort((ra, dec))
    sources = Table(
        {
            "ra": ra,
            "dec": dec,
            "sed_class": np.array(SED_CLASSES)[sed],
            "photoz": photoz,
            "xray_flux_cgs": 10**log_xray,
            "xray_hardness": hardness,
            **{f"true_{b}_flux_ujy": true[b] for b in BANDS},
        }
    )[order]
    sources["id"] = np.arange(1, len(sources) + 1, dtype=np.int64) + 500000
    return sources


def _airy_prf(band, oversampling, half_size):
    """Pixel-response function of a diffraction-limited 0.85 m telescope on the 0.6" grid.

    Airy pattern, convolved with the native 1.22" detector pixel, a pointing jitter chosen so
    that the FWHM matches the band's, and the 0.6" mosaic pixel; sampled ``oversampling``
    times per mosaic pixel. Each sample is the flux fraction in a mosaic pixel centred there.
    """
    pixel = band.pixel_scale_arcsec
    fine = pixel / oversampling / 2.0
    n = 2 * (2 * half_size * oversampling + 8) + 1
    coords = (np.arange(n) - n // 2) * fine
    rr = np.hypot(*np.meshgrid(coords, coords, indexing="ij"))
    wavelength_m = band.wavelength_um * 1e-6
    v = np.pi * TELESCOPE_DIAMETER_M * np.radians(rr / 3600.0) / wavelength_m
    with np.errstate(invalid="ignore", divide="ignore"):
        airy = np.where(v > 0, (2 * special.j1(v) / v) ** 2, 1.0)

    def box(width_arcsec):
        half = width_arcsec / 2.0
        profile = np.clip(np.minimum(coords + fine / 2, half) - np.maximum(coords - fine / 2, -half), 0, None)
        return np.outer(profile, profile)

    base = signal.fftconvolve(airy, box(IRAC_NATIVE_PIXEL_ARCSEC), mode="same")
    base = signal.fftconvolve(base, box(pixel), mode="same")

    def with_jitter(sigma_arcsec):
        if sigma_arcsec <= 0:
            return base
        return ndimage.gaussian_filter(base, sigma_arcsec / fine)

    def fwhm(image):
        profile = image[n // 2]
        above = coords[profile >= profile.max() / 2]
        return above.max() - above.min() + fine

    low, high = 0.0, 1.5
    for _ in range(30):
        mid = (low + high) / 2
        if fwhm(with_jitter(mid)) < band.fwhm_arcsec:
            low = mid
        else:
            high = mid
    prf = with_jitter((low + high) / 2)[::2, ::2]
    centre = prf.shape[0] // 2
    extent = half_size * oversampling
    prf = prf[centre - extent : centre + extent + 1, centre - extent : centre + extent + 1]
    return prf * (oversampling**2 / prf.sum())


def _galex_psf(band, oversampling, half_size):
    """GALEX-like PSF: a Gaussian core with broad wings, pixel-integrated, 1.5" grid."""
    pixel = band.pixel_scale_arcsec
    n = 2 * half_size * oversampling + 1
    offsets = (np.arange(n) - n // 2) / oversampling * pixel
    core_sigma = band.fwhm_arcsec / 2.3548 * 0.97
    wing_sigma = core_sigma * 2.5
    fine = np.linspace(-0.5, 0.5, 9) * pixel
    grid = offsets[:, None] + fine[None, :]
    rr2 = grid[:, None, :, None] ** 2 + grid[None, :, None, :] ** 2
    profile = 0.85 / core_sigma**2 * np.exp(-rr2 / (2 * core_sigma**2)) + 0.15 / wing_sigma**2 * np.exp(
        -rr2 / (2 * wing_sigma**2)
    )
    psf = profile.mean(axis=(2, 3))
    return psf * (oversampling**2 / psf.sum())


def _band_prf(name):
    """The band's PRF as its file holds it, and the stamp table its images are rendered with.

    Returns
    -------
    file_prf : ndarray
        The PRF image written to the band's PRF file.
    table : PRFTable
    """
    band = BANDS[name]
    if name in IRAC_BANDS:
        prf = _airy_prf(band, IRAC_PRF_OVERSAMPLING, IRAC_PRF_HALF_SIZE)
        return prf, build_prf_table(prf, IRAC_PRF_OVERSAMPLING, n_phase=65, enclosed_fraction=1.0, dtype=np.float64)
    truth_psf = _galex_psf(band, 5, GALEX_PSF_HALF_SIZE)
    table = build_prf_table(truth_psf, 5, n_phase=65, enclosed_fraction=1.0, max_half_size=20, dtype=np.float64)
    file_psf = _galex_psf(band, 1, GALEX_PSF_HALF_SIZE)
    return file_psf / file_psf.max(), table


def _render_rows(table, start_row, stop_row, width, x, y, flux):
    """Rows ``start_row:stop_row`` of an image of point sources.

    Each source adds its flux times its PRF stamp at its sub-pixel position. Every pixel sums
    its sources' contributions one by one in source order (``np.add.at``), whatever the strip
    and the batch, so an image rendered strip by strip is bit-identical to one rendered whole.

    Parameters
    ----------
    table : PRFTable
    start_row, stop_row : int
        The strip's rows in the image.
    width : int
        Columns of the image.
    x, y : ndarray
        0-based pixel positions of the sources, each within a stamp half-width of the strip.
    flux : ndarray
        Source fluxes, in the unit the image gets per unit-sum stamp.

    Returns
    -------
    ndarray, shape (stop_row - start_row, width)
    """
    half_size = table.half_size
    offsets = np.arange(-half_size, half_size + 1)
    # Sources reach a stamp half-width beyond the strip, their stamps two: a margin that wide
    # takes every stamp whole, so no stamp pixel needs testing for being on the strip.
    margin = 2 * half_size
    padded_width = width + 2 * margin
    padded = np.zeros((stop_row - start_row + 2 * margin) * padded_width)
    stencil = (offsets[:, None] * padded_width + offsets[None, :]).ravel()
    batch = max(1, RENDER_BATCH_STAMP_PIXELS // stencil.size)
    for first in range(0, len(x), batch):
        x_batch, y_batch = x[first : first + batch], y[first : first + batch]
        col = np.rint(x_batch).astype(np.intp)
        row = np.rint(y_batch).astype(np.intp)
        weights = table.stamps_for(x_batch - col, y_batch - row) * flux[first : first + batch, None, None]
        index = ((row - start_row + margin) * padded_width + col + margin)[:, None] + stencil
        np.add.at(padded, index.ravel(), weights.ravel())
    rows = padded.reshape(-1, padded_width)
    return rows[margin : margin + stop_row - start_row, margin : margin + width]


_WORKER_TABLES = {}
"""The stamp tables a rendering worker process has built, by band."""


def _band_model(name, realism):
    """What band ``name``'s images are drawn with: the ideal field's `PRFTable`, or a realistic
    `_prfs.BandModel`."""
    if realism.is_ideal:
        return _band_prf(name)[1]
    return _prfs.band_model(name, realism)


def _render_strip(model, key, arguments):
    if key[1].is_ideal:
        return _render_rows(model, *arguments)
    return _render.render_rows(model, key, *arguments)


def _render_rows_in_worker(key, *strip):
    """A strip rendered in a worker, which builds each band's model itself on first use (the
    same function gives the same model): sending the tables took seconds per worker. It keeps
    one band's model at a time, the images coming band by band."""
    if key not in _WORKER_TABLES:
        _WORKER_TABLES.clear()
        _WORKER_TABLES[key] = _band_model(*key)
    return _render_strip(_WORKER_TABLES[key], key, strip)


@dataclass(frozen=True, eq=False)
class _ImagePlan:
    """One image to simulate: its pixel grid and the sources rendered onto it.

    Attributes
    ----------
    band : str
    tile : str or None
        The GALEX tile; None for IRAC.
    wcs : WCS
    shape : tuple of int
    x, y : ndarray
        0-based pixel positions of all sources.
    flux : ndarray
        Fluxes (microJy) the sources put on the image: the true ones, over the calibration
        fraction of the sky's PRF for realistic IRAC (`_prfs.irac_calibration_fraction`).
    useful : ndarray of bool or None
        Sources that can change the image (None: all); the others are not rendered.
    centre : tuple of float or None
        GALEX pointing centre (deg); None for IRAC.
    weight, size_bin, size_frac, faint, exptime_s, offset_arcsec
        Realistic fields only: each source's share of the first PRF (IRAC rolls), its galaxy
        tables (`_sources.galaxy_sizes`; size_bin -1: point source), the faint sources
        ``(x, y, flux, weight)``, the tile's exposure and the image's offset from the catalogue
        frame.
    """

    band: str
    tile: str | None
    wcs: WCS
    shape: tuple
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    useful: np.ndarray | None = None
    centre: tuple | None = None
    weight: np.ndarray | None = None
    size_bin: np.ndarray | None = None
    size_frac: np.ndarray | None = None
    faint: tuple | None = None
    exptime_s: float | None = None
    offset_arcsec: tuple = (0.0, 0.0)


def _plan_images(spec, sources, tables) -> list:
    """Every image of the field, in the order the noise is drawn: IRAC channels, then GALEX
    bands tile by tile."""
    ra, dec = np.asarray(sources["ra"]), np.asarray(sources["dec"])
    flux = {name: np.asarray(sources[f"true_{name}_flux_ujy"]) for name in BANDS}
    pixel = BANDS["irac1"].pixel_scale_arcsec
    size = int(2 * np.ceil(spec.image_half_side_arcmin * 60.0 / pixel) + 1)
    wcs = _tan_wcs(spec.ra_deg, spec.dec_deg, pixel, (size, size))
    x, y = wcs.all_world2pix(np.column_stack([ra, dec]), 0).T
    plans = [_ImagePlan(name, None, wcs, (size, size), x, y, flux[name]) for name in IRAC_BANDS]

    pixel = BANDS["nuv"].pixel_scale_arcsec
    size = int(2 * np.ceil(spec.image_half_side_arcmin * 60.0 / pixel) + 1)
    cos_dec = np.cos(np.radians(spec.dec_deg))
    tiles = []
    for tile, d_ra, d_dec in GALEX_TILE_OFFSETS_DEG:
        centre = (spec.ra_deg + d_ra / cos_dec, spec.dec_deg + d_dec)
        wcs = _tan_wcs(spec.ra_deg, spec.dec_deg, pixel, (size, size), crval=centre)
        off_axis_deg = np.hypot((ra - centre[0]) * cos_dec, dec - centre[1])
        tiles.append((tile, centre, wcs, *wcs.all_world2pix(np.column_stack([ra, dec]), 0).T, off_axis_deg))
    for name in GALEX_BANDS:
        # A source whose stamp lies wholly outside the field of view, where the exposure is
        # zero, cannot change the tile; twice the stamp's reach covers the projection.
        reach_deg = 2 * (tables[name].half_size + 1) * np.sqrt(2) * pixel / 3600.0
        for tile, centre, wcs, x, y, off_axis_deg in tiles:
            plans.append(_ImagePlan(name, tile, wcs, (size, size), x, y, flux[name],
                                    off_axis_deg < GALEX_EDGE_DEG + reach_deg, centre))
    return plans


GALEX_REALISTIC_TILES = (("COSMOS_SIM_01", -0.30, 0.05, 40000.0), ("COSMOS_SIM_02", 0.58, -0.03, 1500.0))
"""Realistic GALEX tiles: (name, RA and Dec offsets of the pointing from the field centre in
deg, exposure in s): a deep tile (COSMOS-like, 40 ks) and one at Medium Imaging Survey depth
(1.5 ks) whose footprint edge crosses the field about 1' west of its centre."""
GALEX_REALISTIC_SKY_COUNTS_PER_S = {"nuv": 3.0e-3, "fuv": 2.0e-4}
"""Median of the real deep COSMOS GALEX mosaics (COSMOS_galex_{nuv,fuv}_mosaic_15arcmin.fits):
NUV 3.0e-3, FUV 2.0e-4 counts/s per 1.5" pixel (the ideal field has 6e-4 in FUV)."""
GALEX_FOOTPRINT_RADIUS_DEG = 0.6
"""Radius of a realistic tile's circular footprint; the exposure is zero beyond."""
GALEX_REALISTIC_FALLOFF = 0.3
"""Within the footprint the realistic response falls as 1 - 0.3 (off-axis / 0.6 deg)^2."""


def _ones_like(array):
    """Ones the shape of ``array`` that take no memory (a read-only broadcast view)."""
    return np.broadcast_to(np.float64(1.0), np.shape(array))


def _realistic_tiles(realism):
    if realism.galex_depth:
        return GALEX_REALISTIC_TILES
    return tuple((tile, d_ra, d_dec, None) for tile, d_ra, d_dec in GALEX_TILE_OFFSETS_DEG)


def _plan_realistic(spec, sources, faint, models) -> list:
    """The realistic field's images, in the same order as `_plan_images`."""
    realism = spec.realism
    cos_dec = np.cos(np.radians(spec.dec_deg))
    tiles = _realistic_tiles(realism)
    labels = list(IRAC_BANDS) + [f"{name}-{tile[0]}" for name in GALEX_BANDS for tile in tiles]
    offsets = _sources.image_offsets(spec, labels) if realism.astrometric_noise else {}
    mix_rng = _sources.stream(spec, "roll_mix")
    mix_phases = mix_rng.uniform(0, 2 * np.pi, 2)

    def positions(table, wcs, label):
        dx, dy = offsets.get(label, (0.0, 0.0))
        ra = np.asarray(table["ra"]) + dx / 3600.0 / cos_dec
        dec = np.asarray(table["dec"]) + dy / 3600.0
        if len(ra) == 0:
            return np.zeros(0), np.zeros(0)
        return wcs.all_world2pix(np.column_stack([ra, dec]), 0).T

    plans = []
    pixel = BANDS["irac1"].pixel_scale_arcsec
    size = int(2 * np.ceil(spec.image_half_side_arcmin * 60.0 / pixel) + 1)
    wcs = _tan_wcs(spec.ra_deg, spec.dec_deg, pixel, (size, size))
    centre = (size - 1) / 2.0

    def roll_weight(x, y):
        if not realism.prf_mismatch:
            return _ones_like(x)
        return _prfs.roll_weight((x - centre) * pixel, (y - centre) * pixel, mix_phases)

    size_bin, size_frac = np.asarray(sources["size_bin"]), np.asarray(sources["size_frac"])
    for name in IRAC_BANDS:
        x, y = positions(sources, wcs, name)
        fx, fy = positions(faint, wcs, name)
        # True fluxes are IRAC-calibrated ones: the sky's PRF holds a little light beyond them.
        light = 1.0 / _prfs.irac_calibration_fraction(name) if realism.prf_mismatch else 1.0
        faint_flux = light * np.asarray(faint[f"true_{name}_flux_ujy"]) if len(faint) else np.zeros(0)
        plans.append(_ImagePlan(name, None, wcs, (size, size), x, y, light * np.asarray(sources[f"true_{name}_flux_ujy"]),
                                weight=roll_weight(x, y), size_bin=size_bin, size_frac=size_frac,
                                faint=(fx, fy, faint_flux, roll_weight(fx, fy), None),
                                offset_arcsec=offsets.get(name, (0.0, 0.0))))

    pixel = BANDS["nuv"].pixel_scale_arcsec
    size = int(2 * np.ceil(spec.image_half_side_arcmin * 60.0 / pixel) + 1)
    edge_deg = GALEX_FOOTPRINT_RADIUS_DEG if realism.galex_depth else GALEX_EDGE_DEG
    for name in GALEX_BANDS:
        model = models[name]
        reach_deg = 2 * (max(model.stamp_half_size, model.fft_half_size) + 2) * np.sqrt(2) * pixel / 3600.0
        for tile, d_ra, d_dec, exptime in tiles:
            tile_centre = (spec.ra_deg + d_ra / cos_dec, spec.dec_deg + d_dec)
            wcs = _tan_wcs(spec.ra_deg, spec.dec_deg, pixel, (size, size), crval=tile_centre)
            label = f"{name}-{tile}"
            x, y = positions(sources, wcs, label)
            fx, fy = positions(faint, wcs, label)

            def useful(table):
                if len(table) == 0:
                    return np.zeros(0, dtype=bool)
                off_axis = np.hypot((np.asarray(table["ra"]) - tile_centre[0]) * cos_dec,
                                    np.asarray(table["dec"]) - tile_centre[1])
                return off_axis < edge_deg + reach_deg

            faint_flux = np.asarray(faint[f"true_{name}_flux_ujy"]) if len(faint) else np.zeros(0)
            plans.append(_ImagePlan(name, tile, wcs, (size, size), x, y, np.asarray(sources[f"true_{name}_flux_ujy"]),
                                    useful(sources), tile_centre, weight=_ones_like(x), size_bin=size_bin,
                                    size_frac=size_frac,
                                    faint=(fx, fy, faint_flux, _ones_like(fx), useful(faint)),
                                    exptime_s=exptime if exptime is not None else GALEX_EXPTIME_S[name],
                                    offset_arcsec=offsets.get(label, (0.0, 0.0))))
    return plans


class _StripRenderer:
    """Renders the signal of the field's images strip by strip, in order.

    With more than one worker, worker processes render the strips a few ahead of the caller,
    across image boundaries, while the caller adds the noise of the strips already done: the
    noise comes from the field's random streams, drawn in image and row order, so the files
    do not depend on the number of processes or on the strips.

    Parameters
    ----------
    plans : list of _ImagePlan
        The images, in the order the caller takes them.
    models : dict
        Band name to what its images are rendered with: the `PRFTable` (ideal field) or the
        `_prfs.BandModel` (realistic).
    n_workers : int
        Worker processes; 1 renders in this process.
    realism : Realism
    """

    def __init__(self, plans, models, n_workers, realism=Realism()):
        self._models = models
        self._realism = realism
        self._tasks = (task for plan in plans for task in self._strip_tasks(plan))
        self._pending = deque()
        self._lookahead_strips = 2 * n_workers
        self._pool = None
        if n_workers > 1:
            # Spawned like the photometry workers: forking a process that may hold threads
            # (a notebook kernel) is unsafe. They die with this process, however it ends.
            self._pool = ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=exit_with_parent, initargs=(os.getpid(),))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def _strip_tasks(self, plan):
        """``(plan, start_row, render arguments)`` per strip: the sources whose stamps reach it."""
        if not self._realism.is_ideal:
            yield from self._realistic_strip_tasks(plan)
            return
        height, width = plan.shape
        half_size = self._models[plan.band].half_size
        col, row = np.rint(plan.x), np.rint(plan.y)
        reaches = (col > -half_size - 1) & (col < width + half_size)
        reaches &= (row > -half_size - 1) & (row < height + half_size)
        if plan.useful is not None:
            reaches &= plan.useful
        candidates = np.flatnonzero(reaches)
        candidates = candidates[np.argsort(row[candidates], kind="stable")]
        candidate_rows = row[candidates]
        for start_row in _strip_starts(plan.shape):
            stop_row = min(start_row + _rows_per_strip(width), height)
            low, high = np.searchsorted(candidate_rows, [start_row - half_size, stop_row + half_size])
            members = np.sort(candidates[low:high])  # back in source order: see _render_rows
            yield plan, start_row, (start_row, stop_row, width, plan.x[members], plan.y[members], plan.flux[members])

    def _realistic_strip_tasks(self, plan):
        height, width = plan.shape
        model = self._models[plan.band]
        reach = max(model.stamp_half_size, model.fft_half_size) + 2

        def sorted_candidates(x, y, useful):
            keep = (x > -reach) & (x < width + reach) & (y > -reach) & (y < height + reach)
            if useful is not None:
                keep &= useful
            candidates = np.flatnonzero(keep)
            candidates = candidates[np.argsort(y[candidates], kind="stable")]
            return candidates, y[candidates]

        bright, bright_rows = sorted_candidates(plan.x, plan.y, plan.useful)
        fx, fy, fflux, fweight, fuseful = plan.faint
        faint, faint_rows = sorted_candidates(fx, fy, fuseful)
        block = _render.FFT_BLOCK_ROWS
        for start_row in _strip_starts(plan.shape, block):
            stop_row = min(start_row + _rows_per_strip(width, block), height)
            low, high = np.searchsorted(bright_rows, [start_row - reach, stop_row + reach])
            members = np.sort(bright[low:high])
            low, high = np.searchsorted(faint_rows, [start_row - reach, stop_row + reach])
            faint_members = np.sort(faint[low:high])
            yield plan, start_row, (
                start_row, stop_row, height, width,
                (plan.x[members], plan.y[members], plan.flux[members], plan.weight[members]),
                plan.size_bin[members], plan.size_frac[members],
                (fx[faint_members], fy[faint_members], fflux[faint_members], fweight[faint_members]),
            )

    def strips(self, plan):
        """Yield ``(start_row, signal)`` for the strips of ``plan``, the next image, top to bottom."""
        block = 1 if self._realism.is_ideal else _render.FFT_BLOCK_ROWS
        key = (plan.band, self._realism)
        for start_row in _strip_starts(plan.shape, block):
            if self._pool is None:
                task_plan, task_row, arguments = next(self._tasks)
                rendered = _render_strip(self._models[plan.band], key, arguments)
            else:
                while len(self._pending) <= self._lookahead_strips:
                    task = next(self._tasks, None)
                    if task is None:
                        break
                    task_plan, task_row, arguments = task
                    self._pending.append((task_plan, task_row, self._pool.submit(
                        _render_rows_in_worker, (task_plan.band, self._realism), *arguments)))
                task_plan, task_row, future = self._pending.popleft()
                rendered = future.result()
            if task_plan is not plan or task_row != start_row:
                raise RuntimeError("images taken out of their planned order")
            yield start_row, rendered


def _rows_per_strip(width, block=1):
    """Rows per strip; realistic fields cut strips on whole FFT blocks (``block`` rows)."""
    return max(block, (STRIP_PIXELS // width) // block * block)


def _strip_starts(shape, block=1):
    """First row of every strip of an image of ``shape``."""
    return range(0, shape[0], _rows_per_strip(shape[1], block))


def _render_workers(n_workers, plans, models):
    """Worker processes for rendering: ``n_workers`` (0 = one per core), or by default one per
    core up to `MAX_AUTO_RENDER_WORKERS`, none for fields too small to gain."""
    if n_workers is not None:
        return max(1, n_workers if n_workers > 0 else available_cpus())
    stamp_pixels = 0
    for plan in plans:
        model = models[plan.band]
        size = 2 * (model.half_size if hasattr(model, "half_size") else model.stamp_half_size) + 1
        stamp_pixels += (plan.useful.sum() if plan.useful is not None else plan.x.size) * size**2
    return 1 if stamp_pixels < PARALLEL_MIN_STAMP_PIXELS else min(available_cpus(), MAX_AUTO_RENDER_WORKERS)


def _write_fits(path: Path, data, header):
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(data=np.asarray(data, dtype=np.float32), header=header).writeto(path)


class _FitsRowWriter:
    """Writes a float32 primary image block of rows by block of rows, top to bottom.

    The file is byte for byte what `_write_fits` writes for the whole image, without ever
    holding it in memory.
    """

    def __init__(self, path: Path, header, shape):
        path.parent.mkdir(parents=True, exist_ok=True)
        # A one-pixel image gives the primary header `_write_fits` writes; then its size.
        primary = fits.PrimaryHDU(data=np.zeros((1, 1), dtype=np.float32), header=header).header
        primary["NAXIS1"], primary["NAXIS2"] = shape[1], shape[0]
        self._path = path
        self._stream = fits.StreamingHDU(path, primary)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc_info):
        self._stream.close()
        if exc_type is None and not self._stream.writecomplete:
            raise RuntimeError(f"{self._path}: fewer rows written than the header announces")

    def write(self, rows):
        self._stream.write(np.asarray(rows, dtype=np.float32))


@dataclass(frozen=True)
class _SmoothPattern:
    """A gentle large-scale variation, like residual backgrounds and coverage maps."""

    shape: tuple
    amplitude: float
    coefficients: tuple

    @classmethod
    def draw(cls, shape, rng, amplitude):
        return cls(shape, amplitude, tuple(rng.uniform(-1, 1, 3)))

    def rows(self, start_row, stop_row):
        """The pattern on rows ``start_row:stop_row`` of the image."""
        a, b, c = self.coefficients
        yy = (np.arange(start_row, stop_row) / max(self.shape))[:, None]
        xx = np.arange(self.shape[1]) / max(self.shape)
        return self.amplitude * (a * (xx - 0.5) + b * (yy - 0.5) + c * (xx - 0.5) * (yy - 0.5))


def _make_irac(plan, rng, out, renderer):
    band = BANDS[plan.band]
    noise_pattern = _SmoothPattern.draw(plan.shape, rng, 0.6)
    pedestal_pattern = _SmoothPattern.draw(plan.shape, rng, 0.1)
    header = plan.wcs.to_header()
    header["BUNIT"] = "MJy/sr"
    header["TELESCOP"] = "Spitzer"
    header["INSTRUME"] = "IRAC"
    header["CHNLNUM"] = int(plan.band[-1])
    header["WAVELEN"] = (band.wavelength_um, "[um]")
    header["ORIGIN"] = "mbphot.sample (simulated)"
    channel = plan.band[-1]
    with (_FitsRowWriter(out / f"irac/irac_ch{channel}_go2_sci.fits", header, plan.shape) as science,
          _FitsRowWriter(out / f"irac/irac_ch{channel}_go2_unc.fits", header, plan.shape) as uncertainty):
        for start_row, signal_ujy in renderer.strips(plan):
            stop_row = start_row + signal_ujy.shape[0]
            noise_ujy = IRAC_NOISE_UJY_PER_PIXEL[plan.band] * (1.0 + np.abs(noise_pattern.rows(start_row, stop_row)))
            pedestal_ujy = 0.05 + pedestal_pattern.rows(start_row, stop_row)
            image_ujy = signal_ujy + pedestal_ujy + rng.normal(0.0, 1.0, signal_ujy.shape) * noise_ujy
            science.write(image_ujy / band.ujy_per_pixel_unit)
            uncertainty.write(noise_ujy / band.ujy_per_pixel_unit)


def _make_galex(spec, plan, rng, out, renderer):
    band = BANDS[plan.band]
    sky_pattern = _SmoothPattern.draw(plan.shape, rng, 0.2)
    header = plan.wcs.to_header()
    header["BUNIT"] = ""
    header["TELESCOP"] = "GALEX"
    header["BAND"] = 1 if plan.band == "nuv" else 2
    header["TILENAME"] = plan.tile
    header["RA_CENT"] = plan.centre[0]
    header["DEC_CENT"] = plan.centre[1]
    header["EXPTIME"] = GALEX_EXPTIME_S[plan.band]
    header["ORIGIN"] = "mbphot.sample (simulated)"
    cos_dec = np.cos(np.radians(spec.dec_deg))
    stem = f"galex/{plan.tile}-{band.galex_code}"
    with (_FitsRowWriter(out / f"{stem}-int.fits", header, plan.shape) as intensity_file,
          _FitsRowWriter(out / f"{stem}-skybg.fits", header, plan.shape) as sky_file,
          _FitsRowWriter(out / f"{stem}-rrhr.fits", header, plan.shape) as exposure_file):
        for start_row, signal_ujy in renderer.strips(plan):
            stop_row = start_row + signal_ujy.shape[0]
            signal_cps = signal_ujy / band.ujy_per_pixel_unit
            sky_cps = GALEX_SKY_COUNTS_PER_S[plan.band] * (1.0 + sky_pattern.rows(start_row, stop_row))
            columns, rows = np.meshgrid(np.arange(plan.shape[1]), np.arange(start_row, stop_row))
            ra_grid, dec_grid = plan.wcs.all_pix2world(columns, rows, 0)
            off_axis_deg = np.hypot((ra_grid - plan.centre[0]) * cos_dec, dec_grid - plan.centre[1])
            response = np.clip(1.0 - GALEX_RESPONSE_FALLOFF * (off_axis_deg / GALEX_FOV_RADIUS_DEG) ** 2, 0.0, None)
            exposure_s = GALEX_EXPTIME_S[plan.band] * response
            counts = rng.poisson(np.clip(signal_cps + sky_cps, 0, None) * exposure_s)
            with np.errstate(invalid="ignore", divide="ignore"):
                intensity_file.write(np.where(exposure_s > 0, counts / exposure_s, 0.0))
            sky_file.write(sky_cps)
            exposure_file.write(exposure_s)


def _irac_header(plan):
    band = BANDS[plan.band]
    header = plan.wcs.to_header()
    header["BUNIT"] = "MJy/sr"
    header["TELESCOP"] = "Spitzer"
    header["INSTRUME"] = "IRAC"
    header["CHNLNUM"] = int(plan.band[-1])
    header["WAVELEN"] = (band.wavelength_um, "[um]")
    header["ORIGIN"] = "mbphot.sample (simulated)"
    return header


def _make_irac_realistic(spec, plan, rng, out, renderer):
    """An IRAC mosaic of the realistic field: noise from dithered native frames (or white),
    from the image's own random streams; the smooth patterns from the field's stream."""
    band = BANDS[plan.band]
    noise_pattern = _SmoothPattern.draw(plan.shape, rng, 0.6)
    pedestal_pattern = _SmoothPattern.draw(plan.shape, rng, 0.1)
    if spec.realism.correlated_noise:
        frames = [_sources.stream(spec, f"noise-{plan.band}-{i}") for i in range(len(_noise.IRAC_DITHERS))]
        dithered = _noise.DitheredNoise(plan.shape, frames)
    else:
        white = _sources.stream(spec, f"noise-{plan.band}")
    header = _irac_header(plan)
    channel = plan.band[-1]
    with (_FitsRowWriter(out / f"irac/irac_ch{channel}_go2_sci.fits", header, plan.shape) as science,
          _FitsRowWriter(out / f"irac/irac_ch{channel}_go2_unc.fits", header, plan.shape) as uncertainty):
        for start_row, signal_ujy in renderer.strips(plan):
            stop_row = start_row + signal_ujy.shape[0]
            level_ujy = IRAC_NOISE_UJY_PER_PIXEL[plan.band] * (1.0 + np.abs(noise_pattern.rows(start_row, stop_row)))
            if spec.realism.correlated_noise:
                unit_noise, unit_sigma = dithered.rows(start_row, stop_row)
            else:
                unit_noise, unit_sigma = white.standard_normal(signal_ujy.shape), 1.0
            pedestal_ujy = 0.05 + pedestal_pattern.rows(start_row, stop_row)
            science.write((signal_ujy + pedestal_ujy + unit_noise * level_ujy) / band.ujy_per_pixel_unit)
            uncertainty.write(level_ujy * unit_sigma / band.ujy_per_pixel_unit)


def _make_galex_realistic(spec, plan, rng, out, renderer):
    """A GALEX tile of the realistic field: Poisson counts at the tile's depth inside its
    footprint, and a sky map with a smooth error against the true sky."""
    realism = spec.realism
    band = BANDS[plan.band]
    sky_pattern = _SmoothPattern.draw(plan.shape, rng, 0.2)
    counts_rng = _sources.stream(spec, f"counts-{plan.band}-{plan.tile}")
    sky_error = None
    if realism.sky_error:
        sky_error = _noise.SkyError(plan.shape, band.pixel_scale_arcsec, _sources.stream(spec, f"sky-{plan.band}-{plan.tile}"))
    header = plan.wcs.to_header()
    header["BUNIT"] = ""
    header["TELESCOP"] = "GALEX"
    header["BAND"] = 1 if plan.band == "nuv" else 2
    header["TILENAME"] = plan.tile
    header["RA_CENT"] = plan.centre[0]
    header["DEC_CENT"] = plan.centre[1]
    header["EXPTIME"] = plan.exptime_s
    header["ORIGIN"] = "mbphot.sample (simulated)"
    cos_dec = np.cos(np.radians(spec.dec_deg))
    stem = f"galex/{plan.tile}-{band.galex_code}"
    with (_FitsRowWriter(out / f"{stem}-int.fits", header, plan.shape) as intensity_file,
          _FitsRowWriter(out / f"{stem}-skybg.fits", header, plan.shape) as sky_file,
          _FitsRowWriter(out / f"{stem}-rrhr.fits", header, plan.shape) as exposure_file):
        for start_row, signal_ujy in renderer.strips(plan):
            stop_row = start_row + signal_ujy.shape[0]
            signal_cps = signal_ujy / band.ujy_per_pixel_unit
            sky_level = (GALEX_REALISTIC_SKY_COUNTS_PER_S if realism.galex_depth else GALEX_SKY_COUNTS_PER_S)[plan.band]
            sky_cps = sky_level * (1.0 + sky_pattern.rows(start_row, stop_row))
            columns, rows = np.meshgrid(np.arange(plan.shape[1]), np.arange(start_row, stop_row))
            ra_grid, dec_grid = plan.wcs.all_pix2world(columns, rows, 0)
            off_axis_deg = np.hypot((ra_grid - plan.centre[0]) * cos_dec, dec_grid - plan.centre[1])
            if realism.galex_depth:
                inside = off_axis_deg < GALEX_FOOTPRINT_RADIUS_DEG
                response = np.where(inside, 1.0 - GALEX_REALISTIC_FALLOFF * (off_axis_deg / GALEX_FOOTPRINT_RADIUS_DEG) ** 2, 0.0)
            else:
                response = np.clip(1.0 - GALEX_RESPONSE_FALLOFF * (off_axis_deg / GALEX_FOV_RADIUS_DEG) ** 2, 0.0, None)
            exposure_s = plan.exptime_s * response
            counts = counts_rng.poisson(np.clip(signal_cps + sky_cps, 0, None) * exposure_s)
            with np.errstate(invalid="ignore", divide="ignore"):
                intensity_file.write(np.where(exposure_s > 0, counts / exposure_s, 0.0))
            sky_file.write(sky_cps * sky_error.rows(start_row, stop_row) if sky_error is not None else sky_cps)
            exposure_file.write(exposure_s)


def _write_prfs(out, prfs):
    """The PRF files, beside the images, as the archives serve them."""
    for name in IRAC_BANDS:
        header = fits.Header()
        header["OVERSAMP"] = (IRAC_PRF_OVERSAMPLING, "PRF samples per mosaic pixel")
        header["PIXSCALE"] = (BANDS[name].pixel_scale_arcsec / IRAC_PRF_OVERSAMPLING, "[arcsec] PRF sample spacing")
        header["COMMENT"] = "Model PRF: Airy (0.85 m) x 1.22\" pixel x jitter x 0.6\" pixel"
        _write_fits(out / f"prf/PRF_IRAC_ch{name[-1]}.fits", prfs[name], header)
    for name in GALEX_BANDS:
        header = fits.Header()
        header["COMMENT"] = "Model GALEX PSF on the 1.5\" grid, peak-normalised like the GALEX files"
        if prfs[name].shape[0] == _prfs.GALEX_PSF_FILE_SIZE:
            header["COMMENT"] = "120 x 120 like the real GALEX PSF files; its core is 4 % broader than the sky's"
        _write_fits(out / f"prf/PSF{name}.fits", prfs[name], header)


def _catalog_noise(rng, true_ujy, band_name, fractional=0.03):
    sigma = np.hypot(CATALOG_NOISE_UJY[band_name], fractional * np.abs(true_ujy))
    return true_ujy + rng.normal(0, 1, true_ujy.size) * sigma, sigma


def _ab_mag(flux_ujy):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(flux_ujy > 0, 23.9 - 2.5 * np.log10(np.where(flux_ujy > 0, flux_ujy, 1.0)), np.nan)


def _make_chandra_and_catalog(spec, sources, rng, out, realistic=None):
    """The Chandra catalogue, the COSMOS2015-like catalogue and the truth table.

    ``realistic`` (realistic fields only) holds ``n_faint`` (sources in the images below the
    catalogue limit), ``offsets`` (each image's offset, arcsec) and ``primary`` (None, or each
    source's catalogue entry, `_sources.detection_primaries`); ``sources`` then has the
    catalogue positions ``cat_ra``, ``cat_dec``, ``pos_sigma_arcsec`` and ``true_re_arcsec``.
    """
    centre_ra, centre_dec = spec.ra_deg, spec.dec_deg
    cos_dec = np.cos(np.radians(centre_dec))
    sep_arcmin = 60.0 * np.hypot((sources["ra"] - centre_ra) * cos_dec, sources["dec"] - centre_dec)
    in_catalog = sep_arcmin <= spec.catalog_radius_arcmin
    detected = in_catalog & (sources["xray_flux_cgs"] > CHANDRA_FLUX_LIMIT_CGS)
    primary = None if realistic is None else realistic.get("primary")
    if primary is not None:
        sources = _blended_entries(sources, primary)
        in_catalog &= primary == np.arange(primary.size)

    n_det = int(detected.sum())
    flux = np.asarray(sources["xray_flux_cgs"])[detected]
    hardness = np.asarray(sources["xray_hardness"])[detected]
    # Like C-COSMOS: about 0.4" for a typical source, 1.5" for the faintest.
    error_radius = np.round(0.1 + 0.5 * np.sqrt(CHANDRA_FLUX_LIMIT_CGS / flux) * rng.uniform(0.5, 1.5, n_det), 2)
    ra = np.asarray(sources["ra"])[detected] + rng.normal(0, 1, n_det) * error_radius / 3600.0 / cos_dec
    dec = np.asarray(sources["dec"])[detected] + rng.normal(0, 1, n_det) * error_radius / 3600.0

    n_lonely = N_CHANDRA_WITHOUT_COUNTERPART
    radius_deg = np.sqrt(rng.uniform(0, 1, n_lonely)) * spec.catalog_radius_arcmin / 60.0
    angle = rng.uniform(0, 2 * np.pi, n_lonely)
    ra = np.concatenate([ra, centre_ra + radius_deg * np.cos(angle) / cos_dec])
    dec = np.concatenate([dec, centre_dec + radius_deg * np.sin(angle)])
    flux = np.concatenate([flux, CHANDRA_FLUX_LIMIT_CGS * rng.uniform(1.0, 2.0, n_lonely)])
    hardness = np.concatenate([hardness, rng.uniform(-0.6, 0.6, n_lonely)])
    error_radius = np.concatenate([error_radius, np.round(rng.uniform(0.8, 1.5, n_lonely), 2)])

    # COSMOS2015's id_chandra09 refers to SOURCE_NUMBER; HEASARC's ID is a row number.
    chandra_id = np.arange(1, flux.size + 1) + 100
    hard = flux * (1 + hardness) / 2
    soft = flux * (1 - hardness) / 2
    soft_detected = soft > 0.3 * CHANDRA_FLUX_LIMIT_CGS
    hard_detected = hard > 0.5 * CHANDRA_FLUX_LIMIT_CGS
    soft_cat = np.where(soft_detected, soft * rng.normal(1, 0.1, flux.size), 0.0)
    hard_cat = np.where(hard_detected, hard * rng.normal(1, 0.1, flux.size), 0.0)
    hr_cat = np.where(soft_detected & hard_detected, (hard_cat - soft_cat) / (hard_cat + soft_cat), 0.0)
    names = [
        "CXOC J{}{}".format(
            f"{int(r / 15):02d}{int((r / 15 % 1) * 60):02d}{(r / 15 * 3600) % 60:04.1f}",
            f"{'+' if d >= 0 else '-'}{int(abs(d)):02d}{int(abs(d) % 1 * 60):02d}{int(abs(d) * 3600 % 60):02d}",
        )
        for r, d in zip(ra, dec)
    ]
    chandra = Table(
        {
            "NAME": names,
            "RA": ra,
            "DEC": dec,
            "ERROR_RADIUS": error_radius,
            "FLUX": flux * rng.normal(1, 0.08, flux.size),
            "SB_FLUX": soft_cat,
            "HB_FLUX": hard_cat,
            "HARDNESS_RATIO": np.round(hr_cat, 2),
            "SOURCE_NUMBER": chandra_id,
            "ID": np.arange(1, flux.size + 1),
        }
    )
    for column, unit in (("RA", "deg"), ("DEC", "deg"), ("ERROR_RADIUS", "arcsec")):
        chandra[column].unit = unit
    for column in ("FLUX", "SB_FLUX", "HB_FLUX"):
        chandra[column].unit = "erg / (s cm2)"
    chandra.meta["ORIGIN"] = "mbphot.sample (simulated ccosmoscat)"
    (out / "chandra").mkdir(parents=True, exist_ok=True)
    chandra.write(out / "chandra/ccosmoscat.fits")

    counterpart = np.full(len(sources), -1, dtype=np.int64)
    counterpart[np.flatnonzero(detected)] = chandra_id[:n_det]
    if primary is not None:
        # An X-ray source on a part of a blended entry is that entry's counterpart.
        part = np.flatnonzero((primary != np.arange(primary.size)) & (counterpart > 0))
        free = counterpart[primary[part]] < 0
        counterpart[primary[part[free]]] = counterpart[part[free]]
    cat_sources = sources[in_catalog]
    cat_counterpart = counterpart[in_catalog]
    n = len(cat_sources)
    catalog = Table()
    catalog["ra"] = cat_sources["cat_ra" if realistic is not None else "ra"]
    catalog["dec"] = cat_sources["cat_dec" if realistic is not None else "dec"]
    catalog["id"] = cat_sources["id"]
    ks, ks_err = _catalog_noise(rng, cat_sources["true_irac1_flux_ujy"] * 10 ** rng.normal(-0.15, 0.15, n), "irac1")
    catalog["ks_flux_aper2"], catalog["ks_fluxerr_aper2"] = ks, ks_err
    catalog["photoz"] = np.round(cat_sources["photoz"] + rng.normal(0, 0.03, n) * (1 + cat_sources["photoz"]), 4)
    catalog["type"] = np.where(cat_sources["sed_class"] == "star", 1, np.where(cat_counterpart > 0, 2, 0)).astype(np.int32)
    for channel in range(1, 5):
        value, error = _catalog_noise(rng, np.asarray(cat_sources[f"true_irac{channel}_flux_ujy"]), f"irac{channel}")
        catalog[f"splash_{channel}_flux"] = value
        catalog[f"splash_{channel}_flux_err"] = error
        if channel == 1:
            catalog["splash_1_mag"] = _ab_mag(value)
            catalog["splash_1_magerr"] = 2.5 / np.log(10) * error / np.abs(value)
    for name in GALEX_BANDS:
        value, error = _catalog_noise(rng, np.asarray(cat_sources[f"true_{name}_flux_ujy"]), name, 0.05)
        catalog[f"flux_galex_{name}"] = value
        catalog[f"mag_galex_{name}"] = _ab_mag(value)
        catalog[f"magerr_galex_{name}"] = 2.5 / np.log(10) * error / np.abs(value)
    det = cat_counterpart > 0
    chandra_row = np.where(det, cat_counterpart - 101, 0)
    for column, source in (("flux_chandra_05_2", soft_cat), ("flux_chandra_2_10", hard_cat), ("flux_chandra_05_10", flux)):
        catalog[column] = np.where(det, source[chandra_row], np.nan)
    catalog["id_chandra09"] = MaskedColumn(np.where(det, cat_counterpart, 0), mask=~det, dtype=np.int64)
    r_flux = np.asarray(cat_sources["true_irac1_flux_ujy"]) * 10 ** rng.normal(-0.5, 0.3, n)
    catalog["r_mag_auto"] = _ab_mag(r_flux + rng.normal(0, 0.02, n))
    catalog["r_magerr_auto"] = 2.5 / np.log(10) * 0.02 / np.abs(r_flux)
    f24 = np.asarray(cat_sources["true_irac4_flux_ujy"]) * 10 ** rng.normal(0.6, 0.4, n)
    catalog["flux_24"] = np.where(f24 > 60, f24 + rng.normal(0, 15, n), np.nan)
    catalog["fluxerr_24"] = np.where(f24 > 60, 15.0, np.nan)
    for column in catalog.colnames:
        if "flux" in column and "chandra" not in column:
            catalog[column].unit = "uJy"
        elif column.startswith(("splash_1_mag", "mag", "r_mag")):
            catalog[column].unit = "mag"
    catalog["ra"].unit = catalog["dec"].unit = "deg"
    for column in ("flux_chandra_05_2", "flux_chandra_2_10", "flux_chandra_05_10"):
        catalog[column].unit = "erg / (s cm2)"
    if realistic is not None:
        # Like a half-light radius from a higher-resolution (HST/ACS-like) image, with scatter.
        catalog["flux_radius_arcsec"] = _sources.flux_radius(spec, np.asarray(cat_sources["true_re_arcsec"]))
        catalog["flux_radius_arcsec"].unit = "arcsec"
    catalog.meta["ORIGIN"] = "mbphot.sample (simulated COSMOS2015)"
    (out / "catalog").mkdir(parents=True, exist_ok=True)
    catalog.write(out / "catalog/cosmos2015.fits")

    truth = Table()
    truth["id"] = cat_sources["id"]
    truth["sed_class"] = cat_sources["sed_class"]
    for name in BANDS:
        truth[f"true_{name}_flux_ujy"] = cat_sources[f"true_{name}_flux_ujy"]
        truth[f"true_{name}_flux_ujy"].unit = "uJy"
    truth["true_chandra_id"] = cat_counterpart
    if realistic is not None:
        truth["true_ra"] = cat_sources["ra"]
        truth["true_dec"] = cat_sources["dec"]
        truth["true_re_arcsec"] = cat_sources["true_re_arcsec"]
        truth["pos_sigma_arcsec"] = cat_sources["pos_sigma_arcsec"]
        for column, unit in (("true_ra", "deg"), ("true_dec", "deg"), ("true_re_arcsec", "arcsec"),
                             ("pos_sigma_arcsec", "arcsec")):
            truth[column].unit = unit
        truth.meta["REALISM"] = spec.realism.name
        truth.meta["NFAINT"] = (realistic["n_faint"], "sources below catalogue limit, in images")
        for label, (dx, dy) in realistic["offsets"].items():
            code = _offset_code(label)
            truth.meta[f"DX_{code}"] = (round(dx, 5), f"[arcsec] {label} offset RA*cos(Dec)")
            truth.meta[f"DY_{code}"] = (round(dy, 5), f"[arcsec] {label} offset Dec")
    truth.write(out / "catalog/truth.fits")


def _blended_entries(sources, primary):
    """``sources`` with each catalogue entry's (``primary``) parts summed into it: true fluxes
    added, true and catalogue positions weighted by the detection (3.6 um) flux."""
    sources = sources.copy()
    entry = np.asarray(primary)
    weight = np.maximum(np.asarray(sources["true_irac1_flux_ujy"], dtype=np.float64), 0.0)
    total_weight = np.bincount(entry, weight, minlength=entry.size)
    parts = entry != np.arange(entry.size)
    for column in ("ra", "dec", "cat_ra", "cat_dec"):
        value = np.asarray(sources[column], dtype=np.float64)
        offset = value - value[entry]  # about the entry's own, so that RA's wrap cannot bite
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_offset = np.bincount(entry, weight * offset, minlength=entry.size) / total_weight
        sources[column] = np.where(parts, value, value + np.nan_to_num(mean_offset))
    for name in BANDS:
        column = f"true_{name}_flux_ujy"
        sources[column] = np.where(parts, sources[column], np.bincount(entry, np.asarray(sources[column]), minlength=entry.size))
    return sources


def _offset_code(label):
    """Short FITS key code of an image: ``I1``..``I4`` (IRAC), ``N1``, ``F2`` (GALEX band, tile)."""
    if label.startswith("irac"):
        return f"I{label[-1]}"
    band, tile = label.split("-", 1)
    return f"{band[0].upper()}{tile[-1]}"


def image_offsets_from_truth(truth_meta) -> dict:
    """The images' offsets (arcsec) recorded in a realistic field's truth table metadata:
    ``{(band, tile or None): (d_ra_cos_dec, d_dec)}``."""
    offsets = {}
    for name in IRAC_BANDS:
        if f"DX_I{name[-1]}" in truth_meta:
            offsets[(name, None)] = (truth_meta[f"DX_I{name[-1]}"], truth_meta[f"DY_I{name[-1]}"])
    for name in GALEX_BANDS:
        for tile, *_ in GALEX_TILE_OFFSETS_DEG:
            code = f"{name[0].upper()}{tile[-1]}"
            if f"DX_{code}" in truth_meta:
                offsets[(name, tile)] = (truth_meta[f"DX_{code}"], truth_meta[f"DY_{code}"])
    return offsets


def make_sample_field(spec: SampleSpec, directory, n_workers: int | None = None) -> Path:
    """Write the simulated field for ``spec`` into ``directory``.

    A complete field made by this version of the simulator is reused; one made by another
    version is rebuilt, with everything derived from it in the folder.

    The files are built in a temporary folder beside ``directory`` and moved into place only
    when all are written, so an interrupted run never leaves a half-made field. The images are
    rendered and written strip by strip, adding to each strip only the sources whose PRF
    stamps reach it, so memory stays near a gigabyte even for the whole of COSMOS (1e6 sources).

    Parameters
    ----------
    spec : SampleSpec
        Centre, radius and seed.
    directory : path-like
        Where the field goes; created.
    n_workers : int, optional
        Processes rendering the images; 0 = one per core. By default one per core (at most
        `MAX_AUTO_RENDER_WORKERS`) for fields large enough to gain from them, else none beyond
        this one. The files do not depend on it.

    Returns
    -------
    Path
        ``directory``.
    """
    directory = Path(directory)
    stamp = spec.stamp
    complete = directory / "COMPLETE"
    if complete.is_file() and complete.read_text() == stamp:
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([spec.seed, int(round(spec.ra_deg * 1e4)), int(round(spec.dec_deg * 1e4)),
                                 int(round(spec.radius_arcmin * 1e3))])
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        if not spec.realism.is_ideal:
            _make_realistic(spec, rng, staging, n_workers)
            (staging / "COMPLETE").write_text(stamp)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(staging, directory)
            return directory
        sources = _draw_sources(spec, rng)
        prfs, tables = {}, {}
        for name in BANDS:
            prfs[name], tables[name] = _band_prf(name)
        _write_prfs(staging, prfs)
        plans = _plan_images(spec, sources, tables)
        with _StripRenderer(plans, tables, _render_workers(n_workers, plans, tables)) as renderer:
            for plan in plans:
                if plan.tile is None:
                    _make_irac(plan, rng, staging, renderer)
                else:
                    _make_galex(spec, plan, rng, staging, renderer)
        _make_chandra_and_catalog(spec, sources, rng, staging)
        (staging / "COMPLETE").write_text(stamp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory



def _make_realistic(spec, rng, out, n_workers):
    """Every file of a field with some realism (see `Realism`) into ``out``.

    The sources are those of the ideal field of the same spec (the same random draws); each
    effect then draws from its own stream, so that switching one leaves the others unchanged.
    """
    realism = spec.realism
    sources = _draw_sources(spec, rng)
    flux36 = np.asarray(sources["true_irac1_flux_ujy"])
    if realism.resolved_galaxies:
        size_bin, size_frac, true_re = _sources.galaxy_sizes(spec, sources["sed_class"], flux36)
    else:
        size_bin, size_frac, true_re = np.full(len(sources), -1), np.zeros(len(sources)), np.zeros(len(sources))
    sources["size_bin"], sources["size_frac"] = size_bin, size_frac
    sources["true_re_arcsec"] = true_re
    if realism.astrometric_noise:
        cat_ra, cat_dec, sigma = _sources.catalogue_positions(spec, np.asarray(sources["ra"]), np.asarray(sources["dec"]), flux36)
    else:
        cat_ra, cat_dec, sigma = np.asarray(sources["ra"]), np.asarray(sources["dec"]), np.zeros(len(sources))
    sources["cat_ra"], sources["cat_dec"], sources["pos_sigma_arcsec"] = cat_ra, cat_dec, sigma
    primary = None
    if realism.detection_blending:
        primary = _sources.detection_primaries(sources["ra"], sources["dec"], flux36, true_re)
    if realism.confusion:
        faint = _draw_sources(spec, _sources.stream(spec, "confusion"), flux_range_ujy=_sources.CONFUSION_FLUX_RANGE_UJY)
        faint = faint[_sources.undetected(faint["true_irac1_flux_ujy"], faint["true_nuv_flux_ujy"])]
        # Faint galaxies are drawn as points: at r_e <~ 0.2" and S/N < 1 their shape is lost in the noise.
    else:
        faint = Table({"ra": np.zeros(0), "dec": np.zeros(0), **{f"true_{b}_flux_ujy": np.zeros(0) for b in BANDS}})

    prfs, models = {}, {}
    for name in BANDS:
        if name in GALEX_BANDS and realism.galex_psf_wings:
            prfs[name] = _prfs.galex_file_psf(name)
        else:
            prfs[name] = _band_prf(name)[0]
        models[name] = _band_model(name, realism)
    _write_prfs(out, prfs)
    plans = _plan_realistic(spec, sources, faint, models)
    with _StripRenderer(plans, models, _render_workers(n_workers, plans, models), realism) as renderer:
        for plan in plans:
            if plan.tile is None:
                _make_irac_realistic(spec, plan, rng, out, renderer)
            else:
                _make_galex_realistic(spec, plan, rng, out, renderer)
    offsets = {plan.band if plan.tile is None else f"{plan.band}-{plan.tile}": plan.offset_arcsec for plan in plans}
    _make_chandra_and_catalog(spec, sources, rng, out, {"n_faint": len(faint), "offsets": offsets, "primary": primary})
