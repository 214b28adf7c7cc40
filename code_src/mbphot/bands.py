"""The band table: one place that says what each band's images are and how to read them.

Every other module asks this table for pixel scales, units, flux conversions, cutout sizes
and PRF widths, so that a band is described once.
"""

from dataclasses import dataclass

import numpy as np
from astropy import units as u

__all__ = [
    "Band", "BANDS", "BAND_NAMES", "IRAC_BANDS", "GALEX_BANDS", "get_band", "measured_columns", "parse_bands",
    "quality_columns", "unit_factor",
]

ARCSEC2_PER_SR = 4.254517e10
UJY_PER_MJY = 1e12


@dataclass(frozen=True)
class Band:
    """One photometric band of the pipeline.

    Attributes
    ----------
    name : str
        Short name used in column names (``irac1`` ... ``fuv``).
    instrument : str
        ``"IRAC"`` or ``"GALEX"``.
    wavelength_um : float
        Effective wavelength in micron.
    pixel_scale_arcsec : float
        Pixel scale of the mosaics the pipeline measures.
    image_unit : str
        Unit of the image pixels (FITS ``BUNIT`` style).
    ujy_per_pixel_unit : float
        Multiply an image pixel value (or a fitted PRF amplitude in image units, the PRF
        summing to one) by this to get microJy.
    cutout_arcsec : float
        Side of the square cutout fitted around each source.
    fwhm_arcsec : float
        Typical PRF FWHM, used by the simulator and for sanity checks.
    catalog_flux_column : str
        The COSMOS2015 column holding this band's catalogue flux (microJy).
    galex_code : str or None
        GALEX file-name band code (``nd`` or ``fd``), None for IRAC.
    prf_enclosed_fraction : float
        Each source's PRF model reaches out to the radius holding this fraction of the PRF's
        flux (99.9 %).
    prf_core_radius_pixels : float or None
        In scene mode, PRFs reaching beyond this radius are split into a core, fitted, and
        wings, subtracted by FFT (`mbphot.engine.build_prf_table`). The GALEX PSFs hold 90 %
        of their light within 6 pixels but need 36-43 pixels for 99.9 %: stamps that large
        would couple hundreds of neighbours in every fit at COSMOS density. IRAC's PRF
        measured to its 12.2" calibration aperture reaches 20 pixels: its core is 6 pixels.
        A source's model is its profile over the whole stamp whatever the core
        (`mbphot.engine.prf.placed_wings`): on the realistic bench field irac1's fluxes moved
        by a median 0.00-0.03 % from 10-pixel cores to 7 (S/N bins from 3 up), in two thirds
        of the engine's CPU time; from 7 to 6 pixels, IRAC's by a median 0.00-0.03 % (2 % of
        those at S/N > 10 by more than a sigma, as the size and position choices made on the
        cores change: their pulls' rms went from 1.16 to 1.10 in irac1, 1.01 to 1.27 in irac2),
        in 13 % less (replayed irac1 scenes: 0.447 against 0.515 s). 5-pixel cores flagged 6 %
        of irac1 and irac2 at S/N > 10.
    calibration_core_radius_pixels : float or None
        The same split for the calibration's fits (`mbphot.calibration`). It measures the
        PRF's profile from the residuals of those fits: with IRAC's 7-pixel cores it came out
        more compact than with 10-pixel ones, which moved irac1's fluxes on the realistic
        bench field by a median -0.2 to -0.3 % (S/N bins from 3 up). IRAC calibrates with
        10-pixel cores.
    calibration_radius_arcsec : float or None
        Radius of the aperture the instrument's flux calibration refers to, where the PRF
        file stops short of it: IRAC is calibrated in a 12.2" (10 native pixel) radius
        aperture (IRAC Instrument Handbook, 4.10), while the COSMOS PRF files keep 5.1" x
        5.1". The light between the file's box and this radius is measured from the image's
        stars and added to the PRF (`mbphot.engine.epsf.measure_prf`, ``extend_wings``).
    prf_star_min_snr, prf_star_max_neighbour_fraction : float
        The stars an image's PRF is measured from: at least this signal-to-noise, and at most
        this fraction of their light within the fit radius from modelled neighbours (which are
        subtracted, and fitted again with each new PRF). At COSMOS density few bright sources
        are isolated, at GALEX resolution hardly any: crowded stars are taken, as PSF
        photometry of crowded fields does, and at GALEX fainter ones too.
    prf_min_stars : int
        With fewer such stars the PRF file is used.
    resampled_noise : bool
        The mosaic is resampled from larger native pixels, so its noise is correlated between
        neighbouring pixels and each image's noise scale is measured (`mbphot.calibration`):
        IRAC (1.2" frames on a 0.6" grid). GALEX intensity maps are binned from photon lists
        on their own 1.5" grid, with independent Poisson noise.
    scene_arcmin : float
        Side of the sky cells fitted as one scene in scene mode (`mbphot.photometry`). Each
        scene also fits the sources of a margin around its cell (half a cutout, a stamp
        overlap and `scene_margin_tiles` sky tiles: 0.28' in IRAC, 1.4' in GALEX), and the
        fits with wings take more iterations in a larger scene. On partitions of the full
        realistic field (the wings then fitted by conjugate gradients alone) NUV's engine
        took 17 % less CPU in 12' cells than in 6' (24' was no faster on a 10' field),
        irac1's 24 % more in 4' cells and 10 % more in 12' than in 6' (still 4 % more in 12'
        with the smaller margin): GALEX 12', IRAC 6' (about 5,000 sources at COSMOS density).
    scene_margin_tiles : int
        Sky tiles (cutouts) in a scene's margin beyond half a cutout and a stamp overlap. A
        GALEX tile holds about 60 sources at COSMOS density, and the sky of a tile cut by the
        scene's edge trades light with them: without the extra tile the realistic bench
        field's edge fluxes moved by up to 1.3 sigma (p99 0.35) against a margin two tiles
        wider. IRAC's tiles hold about 4: without it, within 0.04 sigma (p99 0.004), for
        13 % fewer sources fitted.
    """

    name: str
    instrument: str
    wavelength_um: float
    pixel_scale_arcsec: float
    image_unit: str
    ujy_per_pixel_unit: float
    cutout_arcsec: float
    fwhm_arcsec: float
    catalog_flux_column: str
    galex_code: str | None = None
    prf_enclosed_fraction: float = 0.999
    prf_core_radius_pixels: float | None = None
    calibration_core_radius_pixels: float | None = None
    calibration_radius_arcsec: float | None = None
    prf_star_min_snr: float = 50.0
    prf_star_max_neighbour_fraction: float = 0.5
    prf_min_stars: int = 8
    resampled_noise: bool = False
    scene_arcmin: float = 6.0
    scene_margin_tiles: int = 1

    @property
    def cutout_size_pixels(self) -> int:
        """Odd cutout side in pixels, so that the target sits on the central pixel."""
        size = int(np.ceil(self.cutout_arcsec / self.pixel_scale_arcsec))
        return size if size % 2 == 1 else size + 1

    @property
    def has_sky_map(self) -> bool:
        """GALEX ships a sky-background tile beside each intensity tile; IRAC does not."""
        return self.instrument == "GALEX"


def _irac(channel: int, wavelength_um: float, fwhm_arcsec: float) -> Band:
    pixel_scale_arcsec = 0.6
    return Band(
        name=f"irac{channel}",
        instrument="IRAC",
        wavelength_um=wavelength_um,
        pixel_scale_arcsec=pixel_scale_arcsec,
        image_unit="MJy/sr",
        ujy_per_pixel_unit=UJY_PER_MJY / ARCSEC2_PER_SR * pixel_scale_arcsec**2,
        cutout_arcsec=10.0,
        fwhm_arcsec=fwhm_arcsec,
        catalog_flux_column=f"splash_{channel}_flux",
        calibration_radius_arcsec=12.2,
        resampled_noise=True,
        prf_core_radius_pixels=6.0,
        calibration_core_radius_pixels=10.0,
        scene_margin_tiles=0,
    )


BANDS: dict[str, Band] = {
    band.name: band
    for band in (
        _irac(1, 3.6, 1.66),
        _irac(2, 4.5, 1.72),
        _irac(3, 5.8, 1.88),
        _irac(4, 8.0, 1.98),
        Band("nuv", "GALEX", 0.2267, 1.5, "count/s", 33.73, 40.0, 5.3, "flux_galex_nuv", "nd", 0.999, 8.0,
             calibration_core_radius_pixels=8.0, prf_star_min_snr=20.0, scene_arcmin=12.0),
        Band("fuv", "GALEX", 0.1516, 1.5, "count/s", 107.6, 40.0, 4.2, "flux_galex_fuv", "fd", 0.999, 8.0,
             calibration_core_radius_pixels=8.0, prf_star_min_snr=20.0, scene_arcmin=12.0),
    )
}
BAND_NAMES: tuple[str, ...] = tuple(BANDS)
IRAC_BANDS: tuple[str, ...] = tuple(n for n, b in BANDS.items() if b.instrument == "IRAC")
GALEX_BANDS: tuple[str, ...] = tuple(n for n, b in BANDS.items() if b.instrument == "GALEX")


def get_band(name: str) -> Band:
    """Return the `Band` called ``name``, with an error that lists the known bands."""
    try:
        return BANDS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown band {name!r}; choose from {', '.join(BAND_NAMES)}"
        ) from None


def measured_columns(band: str) -> tuple[str, str, str]:
    """Names of a band's measured flux, uncertainty (both microJy) and flag columns."""
    return f"{band}_flux_ujy", f"{band}_flux_err_ujy", f"{band}_flag"


def quality_columns(band: str) -> tuple[str, str, str]:
    """Names of a band's quality metrics: profile-weighted reduced chi^2, the fraction of the
    flux in the profile from neighbours, and the fraction of the profile on masked pixels
    (see `mbphot.engine.solve.Measurement`)."""
    return f"{band}_rchisq", f"{band}_fracflux", f"{band}_fracmasked"


def parse_bands(bands) -> list[str]:
    """Normalise a band selection (a list, or a comma-separated string) to band names.

    ``"all"`` or None selects every band. Order follows the band table.
    """
    if bands is None or (isinstance(bands, str) and bands.strip().lower() == "all"):
        return list(BAND_NAMES)
    if isinstance(bands, str):
        bands = [b for b in bands.replace(" ", "").split(",") if b]
    if not isinstance(bands, (list, tuple)) or not bands:
        raise ValueError(
            f"bands must be a non-empty list of band names or 'all', got {bands!r}; "
            f"choose from {', '.join(BAND_NAMES)}"
        )
    names = {get_band(b).name for b in bands}
    return [n for n in BAND_NAMES if n in names]


UNIT_ALIASES = {"counts/s": "count/s", "counts/sec": "count/s", "count/sec": "count/s", "cps": "count/s",
                "mjy/sr": "MJy/sr"}
"""``BUNIT`` spellings astropy does not parse, mapped to ones it does (lower case)."""


def unit_factor(bunit: str, band: Band) -> float | None:
    """What to multiply pixel values in ``bunit`` by to get them in the band's unit, or None.

    Parameters
    ----------
    bunit : str
        A FITS ``BUNIT``: a surface brightness or rate in the band's own kind of unit (e.g.
        ``MJy/sr``, ``kJy/sr``, ``count/s``), or a flux density per pixel (``uJy``,
        ``Jy/pixel``), converted with the band's pixel size (`Band.ujy_per_pixel_unit`).
    band : Band

    Returns
    -------
    float or None
        None when the unit is unknown or not convertible.

    Examples
    --------
    >>> from mbphot.bands import BANDS
    >>> round(unit_factor("uJy", BANDS["irac1"]), 4), unit_factor("MJy/sr", BANDS["irac1"])
    (0.1182, 1.0)
    """
    text = UNIT_ALIASES.get(bunit.strip().lower(), bunit.strip())
    try:
        unit = u.Unit(text)
        target = u.Unit(band.image_unit)
    except ValueError:
        return None
    if unit.is_equivalent(target):
        return float(unit.to(target))
    for per_pixel in (unit, unit * u.pix):
        if per_pixel.is_equivalent(u.uJy):
            return float(per_pixel.to(u.uJy)) / band.ujy_per_pixel_unit
    return None
