"""The PRFs the realistic sky is drawn with, and the stamp tables that draw it.

The PRF *files* given to the fitter are the simulator's published models (`_airy_prf` for
IRAC, a 120 x 120 peak-normalised PSF for GALEX). The *sky* is drawn with PRFs that differ
from them the way the real sky differs from a published PRF:

* IRAC (`irac_sky_prf`): an Airy pattern averaged over the band (0.85 m aperture), the native
  1.22" pixel and an elliptical pointing jitter, all turned by the roll angle, then the 0.6"
  mosaic pixel; 4 % broader than the file; with a halo whose level at the 17 x 17 box edge
  is the real COSMOS PRF files' and which continues to a 41 x 41 box (12", the radius of the
  IRAC calibration aperture). Two rolls, mixed with weights that vary across the field.
* GALEX (`galex_sky_psf`): a sum of pixel-integrated Gaussians fitted to the azimuthal
  enclosed-energy curves of the real GALEX PSF files (``PSFnuv_faint.fits``, ``PSFfuv.fits``).

Rendering splits each PRF into a *core* (inside a smooth taper), drawn as exact stamps at 65 x
65 sub-pixel phases, and *wings* (the rest), added by FFT convolution of an image of point
fluxes (each source spread bilinearly over its four nearest pixels) with the wing kernel. A
`BandModel` holds both, plus, per half-light-radius bin, stamp tables of exponential discs
convolved with the core by GalSim.
"""

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal, special

from ..bands import BANDS, IRAC_BANDS
from ..engine.prf import PRFTable, build_prf_table

IRAC_SKY_HALF_SIZE = 20
"""The sky's IRAC PRF reaches 20 pixels (12", the IRAC calibration aperture radius) from the
source; light beyond is part of the background, as in the IRAC calibration."""
IRAC_CORE_HALF_SIZE = 10
IRAC_TAPER_PIXELS = (7.0, 10.0)
"""The core keeps the PRF fully within 7 pixels and fades to zero at 10 (cosine squared)."""
IRAC_ROLL_DEG = (30.0, 110.0)
"""Roll angles of the two visits the mosaic mixes (COSMOS was seen in two visibility windows)."""
IRAC_BROADENING = 1.04
"""The sky's PRF FWHM over the file's: the published PRF is a few per cent sharper than the
mosaic's (pointing jitter, registration errors of the frames)."""
IRAC_JITTER_AXIS_RATIO = 1.3
"""Ratio of the jitter's long to short axis; gives core ellipticities of 0.02-0.06 (second
moments within 6 px), like the real COSMOS IRAC PRF files' 0.02-0.05."""
IRAC_MIN_JITTER_ARCSEC = 0.15
"""At least this much jitter (sigma), also where the diffraction pattern alone is as broad as
the band's nominal FWHM (channels 3 and 4)."""
IRAC_HALO_CORE_PIXELS = 4.0
REAL_IRAC_PRF_BORDER = {"irac1": 1.93e-4, "irac2": 2.17e-4, "irac3": 1.96e-4, "irac4": 2.40e-4}
"""Mean pixel value on the border of the real COSMOS PRF files PRF_IRAC_ch{1..4}.fits (17 x 17,
0.6" pixels, each summing to 1): the halo is scaled so the sky's PRF reaches the same level
there, relative to its own 17 x 17 sum (the pure Airy model has 0.7-1.6e-4)."""
IRAC_MIX_WAVELENGTH_ARCSEC = 300.0
"""Scale over which the weights of the two rolls change across the field."""

GALEX_SKY_HALF_SIZE = 60
GALEX_CORE_HALF_SIZE = 8
GALEX_TAPER_PIXELS = (5.0, 8.0)
GALEX_PSF_FILE_SIZE = 120
"""The real GALEX PSF files are 120 x 120 on the 1.5" grid, peak at 0-based pixel 59."""
GALEX_FILE_CORE_BROADENING = 1.04
"""The PSF file's core Gaussians (sigma <= 2 px) are 4 % wider than the sky's."""
GALEX_MGE_SIGMA_PIXELS = (1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0, 10.0, 12.0, 14.0, 16.0)
GALEX_MGE_WEIGHTS = {
    "nuv": (0.05394, 0.67337, 0.10103, 0.06216, 0.0, 0.0, 0.0, 0.04477, 0.06151, 0.0, 0.00342),
    "fuv": (0.32801, 0.52432, 0.0, 0.06782, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.08207),
}
"""Non-negative least-squares fit of Gaussians (sigmas above, in 1.5" pixels, before pixel
integration) to the enclosed energy (0.5-58 px) and the core pixels (r < 5 px) of the real
GALEX PSFs ``PSFnuv_faint.fits`` and ``PSFfuv.fits``. Radii enclosing 50/90/99/99.9 %: real
NUV 2.0/6.1/26/35 px, model 2.0/6.3/25/36; real FUV 1.4/4.5/31/42 px, model 1.4/4.5/33/47.
Peak pixel and the 9 pixels above half maximum match the files."""

GALAXY_RE_BINS_ARCSEC = tuple(np.round(np.geomspace(0.1, 1.0, 9), 4))
"""Half-light radii the resolved galaxies are drawn at (each galaxy takes the nearest)."""
GALAXY_N_PHASE = 9
POINT_N_PHASE = 65
OVERSAMPLING = 5


def _fwhm(image, spacing):
    """Effective FWHM (diameter of the circle with the area above half maximum)."""
    return 2.0 * np.sqrt((image >= image.max() / 2).sum() * spacing**2 / np.pi)


def _rotated_box(coords, width, angle_rad, subsample=4):
    """Indicator of a square of side ``width`` turned by ``angle``, averaged over sub-samples."""
    step = coords[1] - coords[0]
    offsets = (np.arange(subsample) + 0.5) / subsample - 0.5
    half_extent = width * 0.75
    keep = np.abs(coords) <= half_extent
    c = coords[keep]
    box = np.zeros((c.size, c.size))
    cos, sin = np.cos(angle_rad), np.sin(angle_rad)
    for oy in offsets:
        for ox in offsets:
            yy, xx = np.meshgrid(c + oy * step, c + ox * step, indexing="ij")
            u = xx * cos + yy * sin
            v = -xx * sin + yy * cos
            box += (np.abs(u) <= width / 2) & (np.abs(v) <= width / 2)
    return box / box.sum()


def _elliptical_gaussian(coords, sigma_long, sigma_short, angle_rad):
    reach = 5 * sigma_long
    c = coords[np.abs(coords) <= reach]
    yy, xx = np.meshgrid(c, c, indexing="ij")
    u = xx * np.cos(angle_rad) + yy * np.sin(angle_rad)
    v = -xx * np.sin(angle_rad) + yy * np.cos(angle_rad)
    kernel = np.exp(-0.5 * ((u / sigma_long) ** 2 + (v / sigma_short) ** 2))
    return kernel / kernel.sum()


def _fwhm_of_prf(prf_os, oversampling, reach_pixels=4, zoom=6):
    """Effective FWHM (arcsec at 0.6" pixels) of an oversampled PRF, measured on a cubic-spline
    zoom of its centre: the same measure for the file's PRF and the sky's."""
    centre, reach = prf_os.shape[0] // 2, reach_pixels * oversampling
    fine = ndimage.zoom(prf_os[centre - reach : centre + reach + 1, centre - reach : centre + reach + 1], zoom, order=3)
    return _fwhm(fine, 0.6 / oversampling / zoom)


@functools.lru_cache(maxsize=None)
def _airy_prf_of_file(name):
    from . import IRAC_PRF_HALF_SIZE, _airy_prf

    return _airy_prf(BANDS[name], OVERSAMPLING, IRAC_PRF_HALF_SIZE)


@functools.lru_cache(maxsize=None)
def irac_sky_prf(name: str, roll_deg: float, oversampling: int = OVERSAMPLING) -> np.ndarray:
    """The IRAC PRF the realistic sky is drawn with, at one roll angle.

    Returns
    -------
    ndarray, shape (2 * 20 * oversampling + 1,) * 2
        Samples ``oversampling`` per 0.6" pixel, each the flux fraction in a mosaic pixel
        centred there; they sum to ``oversampling**2`` (the whole 41 x 41-pixel PRF is 1).
    """
    band = BANDS[name]
    pixel = band.pixel_scale_arcsec
    half_size = IRAC_SKY_HALF_SIZE
    fine = pixel / oversampling / 2.0
    n = 2 * (2 * half_size * oversampling + 8) + 1
    coords = (np.arange(n) - n // 2) * fine
    rr = np.hypot(*np.meshgrid(coords, coords, indexing="ij"))
    airy = np.zeros_like(rr)
    for factor in np.linspace(0.88, 1.12, 7):  # the band's width: smooths the rings
        wavelength_m = band.wavelength_um * 1e-6 * factor
        v = np.pi * 0.85 * np.radians(rr / 3600.0) / wavelength_m
        with np.errstate(invalid="ignore", divide="ignore"):
            pattern = np.where(v > 0, (2 * special.j1(v) / v) ** 2, 1.0)
        airy += pattern / pattern.sum()
    roll = np.radians(roll_deg)
    base = signal.fftconvolve(airy, _rotated_box(coords, 1.22, roll), mode="same")
    base = signal.fftconvolve(base, _rotated_box(coords, pixel, 0.0), mode="same")
    ratio = np.sqrt(IRAC_JITTER_AXIS_RATIO)
    extent = half_size * oversampling
    offsets = (np.arange(2 * extent + 1) - extent) / oversampling
    radius = np.hypot(*np.meshgrid(offsets, offsets, indexing="ij"))
    # Halo: the real files' level at the 17 x 17 box border, continued as r^-3.
    halo = (1.0 + (radius / IRAC_HALO_CORE_PIXELS) ** 2) ** -1.5

    def border_and_sum(image):
        pixels = image[::oversampling, ::oversampling]  # integer phases: the 41 x 41 pixels
        box = pixels[half_size - 8 : half_size + 9, half_size - 8 : half_size + 9]
        border = np.concatenate([box[0], box[-1], box[1:-1, 0], box[1:-1, -1]])
        return border.mean(), box.sum()

    def with_jitter(sigma):
        prf = signal.fftconvolve(base, _elliptical_gaussian(coords, sigma * ratio, sigma / ratio, roll), mode="same")
        prf = np.clip(prf[::2, ::2], 0.0, None)
        centre = prf.shape[0] // 2
        prf = prf[centre - extent : centre + extent + 1, centre - extent : centre + extent + 1]
        prf_border, prf_box = border_and_sum(prf)
        halo_border, halo_box = border_and_sum(halo)
        target_border = REAL_IRAC_PRF_BORDER[name]
        amplitude = max(0.0, (target_border * prf_box - prf_border) / (halo_border - target_border * halo_box))
        return prf + amplitude * halo

    target = IRAC_BROADENING * _fwhm_of_prf(_airy_prf_of_file(name), oversampling)
    low, high = IRAC_MIN_JITTER_ARCSEC, 1.5
    if _fwhm_of_prf(with_jitter(low), oversampling) < target:
        for _ in range(14):
            mid = (low + high) / 2
            if _fwhm_of_prf(with_jitter(mid), oversampling) < target:
                low = mid
            else:
                high = mid
    prf = with_jitter(low)
    return prf * (oversampling**2 / prf.sum())


@functools.cache
def irac_calibration_fraction(name: str, oversampling: int = OVERSAMPLING) -> float:
    """The fraction of the sky's IRAC PRF (`irac_sky_prf`, mean of the rolls) that the IRAC
    calibration calls a point source's flux: its light within 12.2" less the background the
    ring from 12.2" to 24.4" gives it (IRAC Instrument Handbook, 10 and 10-20 native pixels).
    The light beyond 12.2" (the PRF box's corners) counts as sky, so a source of calibrated
    flux F puts F over this fraction on the image, a few tenths of a per cent more."""
    radius_pix = BANDS[name].calibration_radius_arcsec / BANDS[name].pixel_scale_arcsec
    fractions = []
    for roll in IRAC_ROLL_DEG:
        prf = irac_sky_prf(name, roll, oversampling)
        offsets = (np.arange(prf.shape[0]) - prf.shape[0] // 2) / oversampling
        radius = np.hypot(*np.meshgrid(offsets, offsets, indexing="ij"))
        aperture = radius <= radius_pix
        # Samples are per-pixel fluxes on a grid ``oversampling`` finer; the ring reaches beyond
        # the box, where the PRF is zero.
        ring_area = np.pi * 3.0 * (radius_pix * oversampling) ** 2
        ring_mean = prf[(radius > radius_pix) & (radius <= 2 * radius_pix)].sum() / ring_area
        fractions.append((prf[aperture].sum() - ring_mean * aperture.sum()) / prf.sum())
    return float(np.mean(fractions))


def _pixel_integrated_gaussians(offsets, sigmas, weights):
    """Sum of unit-flux Gaussians integrated over 1-pixel boxes centred at ``offsets`` (pixels)."""
    image = np.zeros((offsets.size, offsets.size))
    for sigma, weight in zip(sigmas, weights):
        if weight <= 0:
            continue
        edges = special.ndtr((offsets + 0.5) / sigma) - special.ndtr((offsets - 0.5) / sigma)
        image += weight * np.outer(edges, edges)
    return image


@functools.lru_cache(maxsize=None)
def galex_sky_psf(name: str, oversampling: int = OVERSAMPLING) -> np.ndarray:
    """The GALEX PSF the realistic sky is drawn with, 121 x 121 pixels, sampled ``oversampling``
    times per 1.5" pixel (each sample the flux in a pixel centred there; sum ``oversampling**2``)."""
    extent = GALEX_SKY_HALF_SIZE * oversampling
    offsets = (np.arange(2 * extent + 1) - extent) / oversampling
    weights = np.asarray(GALEX_MGE_WEIGHTS[name])
    psf = _pixel_integrated_gaussians(offsets, GALEX_MGE_SIGMA_PIXELS, weights)
    return psf * (oversampling**2 / psf.sum())


def galex_file_psf(name: str) -> np.ndarray:
    """The realistic field's GALEX PSF file: 120 x 120, peak 1 at pixel (59, 59), its core
    `GALEX_FILE_CORE_BROADENING` wider than the sky's."""
    offsets = np.arange(GALEX_PSF_FILE_SIZE) - (GALEX_PSF_FILE_SIZE // 2 - 1)
    sigmas = [s * GALEX_FILE_CORE_BROADENING if s <= 2.0 else s for s in GALEX_MGE_SIGMA_PIXELS]
    psf = _pixel_integrated_gaussians(offsets.astype(float), sigmas, GALEX_MGE_WEIGHTS[name])
    return psf / psf.max()


def _taper(shape_half, oversampling, inner, outer):
    offsets = (np.arange(2 * shape_half + 1) - shape_half) / oversampling
    radius = np.hypot(*np.meshgrid(offsets, offsets, indexing="ij"))
    ramp = np.clip((radius - inner) / (outer - inner), 0.0, 1.0)
    return np.cos(0.5 * np.pi * ramp) ** 2


def _with_stamp_sums(table: PRFTable, total: float) -> PRFTable:
    """The table with every stamp scaled to sum to ``total`` exactly (flux conservation)."""
    stamps = table.stamps * (total / table.stamps.sum(axis=(-2, -1), keepdims=True))
    return PRFTable(stamps=stamps, phases=table.phases, half_size=table.half_size)


def galaxy_tables(core_os, oversampling, pixel_arcsec, core_half, total, n_phase=GALAXY_N_PHASE):
    """`galaxy_table` for every `GALAXY_RE_BINS_ARCSEC` bin."""
    import galsim

    fine = pixel_arcsec / oversampling
    prf = galsim.InterpolatedImage(galsim.Image(np.ascontiguousarray(core_os), scale=fine), normalization="flux")
    return tuple(galaxy_table(prf, oversampling, pixel_arcsec, re, core_half, total, n_phase) for re in GALAXY_RE_BINS_ARCSEC)


def galaxy_table(prf, oversampling, pixel_arcsec, re_arcsec, core_half, total, n_phase=GALAXY_N_PHASE):
    """Stamps of an exponential disc of half-light radius ``re_arcsec`` convolved with a PRF core.

    GalSim convolves the disc exactly with the core ``prf``, a ``galsim.InterpolatedImage`` of
    its samples; the result is sampled with ``method="no_pixel"``, the PRF already holding the
    pixel, on the core's own fine grid, then tabulated like a PRF, each stamp summing to
    ``total`` (the core's share of the flux).
    """
    import galsim

    extra = int(np.ceil(5.5 * re_arcsec / pixel_arcsec))  # 99.9 % of the disc's light
    half = core_half + extra
    fine = pixel_arcsec / oversampling
    disc = galsim.Exponential(half_light_radius=re_arcsec)
    size = 2 * (half + 1) * oversampling + 1
    image = galsim.Convolve(disc, prf).drawImage(nx=size, ny=size, scale=fine, method="no_pixel")
    table = build_prf_table(
        image.array, oversampling, n_phase=n_phase, enclosed_fraction=1.0, max_half_size=half, dtype=np.float64
    )
    return _with_stamp_sums(table, total)


@dataclass(frozen=True, eq=False)
class BandModel:
    """How a band's realistic images are drawn.

    Attributes
    ----------
    components : tuple of PRFTable
        Core stamp tables, one per PRF the sky mixes (IRAC: two rolls; GALEX: one). Each
        stamp sums to the core's share of the flux.
    galaxies : tuple of tuple of PRFTable
        Per component, one table per `GALAXY_RE_BINS_ARCSEC` bin (empty without galaxies).
    wing : ndarray or None
        Wing kernel on the image grid, centred, summing to the flux outside the cores; None
        when the cores hold all the flux.
    full : tuple of ndarray
        Per component, core (at phase 0) plus wing on the image grid: the kernel the faint
        sources below the catalogue limit are drawn with by FFT.
    """

    components: tuple
    galaxies: tuple
    wing: np.ndarray | None
    full: tuple

    @property
    def stamp_half_size(self) -> int:
        tables = list(self.components) + [t for bins in self.galaxies for t in bins]
        return max(t.half_size for t in tables)

    @property
    def fft_half_size(self) -> int:
        return max(kernel.shape[0] // 2 for kernel in self.full)


def _on_grid(image_os, oversampling, half):
    """Samples of an oversampled PRF at whole-pixel offsets, ``half`` pixels each way."""
    centre = image_os.shape[0] // 2
    return image_os[centre - half * oversampling : centre + half * oversampling + 1 : oversampling,
                    centre - half * oversampling : centre + half * oversampling + 1 : oversampling]


def _pad_to(kernel, half):
    pad = half - kernel.shape[0] // 2
    return np.pad(kernel, pad) if pad > 0 else kernel


@functools.lru_cache(maxsize=None)
def band_model(name: str, realism) -> BandModel:
    """The `BandModel` of band ``name`` under ``realism`` (cached per process)."""
    from . import GALEX_PSF_HALF_SIZE, IRAC_PRF_HALF_SIZE, IRAC_PRF_OVERSAMPLING, _airy_prf, _galex_psf

    band = BANDS[name]
    pixel = band.pixel_scale_arcsec
    os_ = OVERSAMPLING
    if name in IRAC_BANDS:
        if realism.prf_mismatch:
            full_prfs = [irac_sky_prf(name, roll) for roll in IRAC_ROLL_DEG]
            core_half, taper_pixels = IRAC_CORE_HALF_SIZE, IRAC_TAPER_PIXELS
        else:
            full_prfs = [_airy_prf(band, IRAC_PRF_OVERSAMPLING, IRAC_PRF_HALF_SIZE)]
            core_half, taper_pixels = IRAC_PRF_HALF_SIZE, None
    else:
        if realism.galex_psf_wings:
            full_prfs = [galex_sky_psf(name)]
            core_half, taper_pixels = GALEX_CORE_HALF_SIZE, GALEX_TAPER_PIXELS
        else:
            full_prfs = [_galex_psf(band, os_, GALEX_PSF_HALF_SIZE)]
            core_half, taper_pixels = 20, None  # the ideal field's stamps (``max_half_size=20``)

    cores_os, wings = [], []
    for prf in full_prfs:
        prf = prf * (os_**2 / prf.sum())
        if taper_pixels is not None:
            core = prf * _taper(prf.shape[0] // 2, os_, *taper_pixels)
        else:
            centre, reach = prf.shape[0] // 2, core_half * os_
            core = np.zeros_like(prf)
            core[centre - reach : centre + reach + 1, centre - reach : centre + reach + 1] = \
                prf[centre - reach : centre + reach + 1, centre - reach : centre + reach + 1]
        cores_os.append(core)
        wing_os = prf - core
        if wing_os.max() > 0:
            wing = _on_grid(wing_os, os_, prf.shape[0] // 2 // os_)
            wings.append(wing * ((1.0 - core.sum() / prf.sum()) / wing.sum()))
    # One wing kernel for all components (the rolls' wings differ by < 1e-4 of the flux); every
    # core then holds the rest exactly, so that a source's stamp and wing sum to its flux.
    wing = np.mean(wings, axis=0) if wings else None
    core_total = 1.0 - (wing.sum() if wing is not None else 0.0)
    components, galaxies, cores = [], [], []
    for core in cores_os:
        table = build_prf_table(
            core, os_, n_phase=POINT_N_PHASE, enclosed_fraction=1.0, max_half_size=core_half, dtype=np.float64
        )
        components.append(_with_stamp_sums(table, core_total))
        if realism.resolved_galaxies:
            galaxies.append(galaxy_tables(core, os_, pixel, core_half, core_total))
        core_grid = _on_grid(core, os_, core_half)
        cores.append(core_grid * (core_total / core_grid.sum()))
    half = max([k.shape[0] // 2 for k in cores] + ([wing.shape[0] // 2] if wing is not None else []))
    full = tuple(_pad_to(core, half) + (_pad_to(wing, half) if wing is not None else 0.0) for core in cores)
    return BandModel(components=tuple(components), galaxies=tuple(galaxies), wing=wing, full=full)


def roll_weight(x_arcsec, y_arcsec, phases):
    """Weight of the first roll's PRF at field offsets (arcsec): smooth, between 0.1 and 0.9."""
    k = 2 * np.pi / IRAC_MIX_WAVELENGTH_ARCSEC
    return 0.5 + 0.4 * np.sin(k * x_arcsec + phases[0]) * np.cos(k * 0.8 * y_arcsec + phases[1])
