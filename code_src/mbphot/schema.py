"""The science catalogue's schema: every column's unit, description and UCD, in one table.

`catalog.science_catalog` takes units, descriptions and UCDs (IVOA Unified Content
Descriptors, https://www.ivoa.net/documents/UCD1+/) from here and writes them to FITS
(``TUNITn``, ``TCOMMn``, ``TUCDn``) and to Parquet (each field's metadata). Columns are
named for what they hold and carry their unit in the name where one applies
(``_ujy``, ``_arcsec``, ``_cgs``).

* Catalogue columns (`CATALOG_COLUMNS`): COSMOS2015 (Laigle et al. 2016) as retrieved, the
  Chandra counterpart found with nway, and the AB magnitudes derived here.
* Per-band columns (`band_columns`): what the photometry engine writes for each band, and the
  magnitudes derived from it. Columns the engine does not write (older engines have no
  ``_rchisq``) are simply absent; an entry applies when its column is present.
* Quality flags (`FLAG_DESCRIPTIONS`, `flag_table`): the bits of ``<band>_flag``, from
  `mbphot.engine.solve.FLAGS`.

Magnitudes are AB: m = 23.9 - 2.5 log10(F / µJy) (Oke & Gunn 1983). Missing values are NaN
in float columns and -1 in id columns; a zero never stands for "not detected".
"""

from dataclasses import dataclass

from .bands import BANDS

__all__ = [
    "Column",
    "CATALOG_COLUMNS",
    "FLAG_DESCRIPTIONS",
    "MAG_LIMIT_SNR",
    "AB_ZEROPOINT_UJY",
    "band_columns",
    "column",
    "flag_table",
    "flag_names",
    "markdown_column_table",
    "markdown_flag_table",
]

AB_ZEROPOINT_UJY = 23.9
"""AB magnitude of 1 µJy: m_AB = 23.9 - 2.5 log10(F / µJy)."""

MAG_LIMIT_SNR = 3.0
"""Below this S/N a band gets an upper limit instead of a magnitude."""


@dataclass(frozen=True)
class Column:
    """One catalogue column.

    Attributes
    ----------
    name : str
        Column name.
    unit : str or None
        Unit as an astropy/VOUnit string (``"uJy"``, ``"deg"``, ``"mag"``); None for
        dimensionless quantities, ids, names and flags.
    description : str
        One line on what the column holds (written to FITS ``TCOMMn``).
    ucd : str
        IVOA UCD1+ word(s); empty when none fits.
    """

    name: str
    unit: str | None
    description: str
    ucd: str = ""


_XRAY_UNIT = "erg / (s cm2)"

CATALOG_COLUMNS = {c.name: c for c in (
    Column("ra", "deg", "right ascension (ICRS), COSMOS2015 position", "pos.eq.ra;meta.main"),
    Column("dec", "deg", "declination (ICRS), COSMOS2015 position", "pos.eq.dec;meta.main"),
    Column("id", None, "COSMOS2015 source id (Laigle et al. 2016)", "meta.id;meta.main"),
    Column("ks_flux_aper2", "uJy", "COSMOS2015 Ks flux in a 2\" aperture", "phot.flux.density;em.IR.K"),
    Column("ks_fluxerr_aper2", "uJy", "error of ks_flux_aper2", "stat.error;phot.flux.density;em.IR.K"),
    Column("photoz", None, "COSMOS2015 photometric redshift", "src.redshift.phot"),
    Column("type", None, "COSMOS2015 type: 0 galaxy, 1 star, 2 X-ray source, -9 failed fit", "src.class"),
    Column("splash_1_flux", "uJy", "COSMOS2015 (SPLASH) IRAC 3.6 um flux", "phot.flux.density;em.IR.3-4um"),
    Column("splash_1_flux_err", "uJy", "error of splash_1_flux", "stat.error;phot.flux.density;em.IR.3-4um"),
    Column("splash_1_mag", "mag", "COSMOS2015 IRAC 3.6 um AB magnitude", "phot.mag;em.IR.3-4um"),
    Column("splash_1_magerr", "mag", "error of splash_1_mag", "stat.error;phot.mag;em.IR.3-4um"),
    Column("splash_2_flux", "uJy", "COSMOS2015 (SPLASH) IRAC 4.5 um flux", "phot.flux.density;em.IR.4-8um"),
    Column("splash_2_flux_err", "uJy", "error of splash_2_flux", "stat.error;phot.flux.density;em.IR.4-8um"),
    Column("splash_3_flux", "uJy", "COSMOS2015 (SPLASH) IRAC 5.8 um flux", "phot.flux.density;em.IR.4-8um"),
    Column("splash_3_flux_err", "uJy", "error of splash_3_flux", "stat.error;phot.flux.density;em.IR.4-8um"),
    Column("splash_4_flux", "uJy", "COSMOS2015 (SPLASH) IRAC 8.0 um flux", "phot.flux.density;em.IR.8-15um"),
    Column("splash_4_flux_err", "uJy", "error of splash_4_flux", "stat.error;phot.flux.density;em.IR.8-15um"),
    Column("flux_galex_nuv", "uJy", "COSMOS2015 GALEX NUV flux", "phot.flux.density;em.UV.200-300nm"),
    Column("mag_galex_nuv", "mag", "COSMOS2015 GALEX NUV AB magnitude", "phot.mag;em.UV.200-300nm"),
    Column("magerr_galex_nuv", "mag", "error of mag_galex_nuv", "stat.error;phot.mag;em.UV.200-300nm"),
    Column("flux_galex_fuv", "uJy", "COSMOS2015 GALEX FUV flux", "phot.flux.density;em.UV.100-200nm"),
    Column("mag_galex_fuv", "mag", "COSMOS2015 GALEX FUV AB magnitude", "phot.mag;em.UV.100-200nm"),
    Column("magerr_galex_fuv", "mag", "error of mag_galex_fuv", "stat.error;phot.mag;em.UV.100-200nm"),
    Column("flux_chandra_05_2", _XRAY_UNIT, "COSMOS2015's Chandra 0.5-2 keV flux (NaN: none)", "phot.flux;em.X-ray.soft"),
    Column("flux_chandra_2_10", _XRAY_UNIT, "COSMOS2015's Chandra 2-10 keV flux (NaN: none)", "phot.flux;em.X-ray.hard"),
    Column("flux_chandra_05_10", _XRAY_UNIT, "COSMOS2015's Chandra 0.5-10 keV flux (NaN: none)", "phot.flux;em.X-ray"),
    Column("r_mag_auto", "mag", "COSMOS2015 Subaru r+ AB magnitude (AUTO)", "phot.mag;em.opt.R"),
    Column("r_magerr_auto", "mag", "error of r_mag_auto", "stat.error;phot.mag;em.opt.R"),
    Column("flux_24", "uJy", "COSMOS2015 MIPS 24 um flux", "phot.flux.density;em.IR.15-30um"),
    Column("fluxerr_24", "uJy", "error of flux_24", "stat.error;phot.flux.density;em.IR.15-30um"),
    # The nway counterpart (crossmatch.match_chandra / merge_chandra).
    Column("chandra_match", None, "True when nway found a confident Chandra counterpart", "meta.code"),
    Column("chandra_id", None, "Chandra COSMOS source number (SOURCE_NUMBER) of the counterpart; -1: none",
           "meta.id.cross"),
    Column("chandra_name", None, "Chandra source name of the counterpart; empty: none", "meta.id.cross"),
    Column("chandra_ra", "deg", "right ascension of the Chandra counterpart", "pos.eq.ra"),
    Column("chandra_dec", "deg", "declination of the Chandra counterpart", "pos.eq.dec"),
    Column("chandra_error_radius_arcsec", "arcsec", "Chandra positional error (ERROR_RADIUS)",
           "stat.error;pos.eq"),
    Column("chandra_separation_arcsec", "arcsec", "separation between the source and its Chandra counterpart",
           "pos.angDistance"),
    Column("xray_flux_05_10_cgs", _XRAY_UNIT, "Chandra 0.5-10 keV flux of the counterpart (NaN: not detected)",
           "phot.flux;em.X-ray"),
    Column("xray_flux_05_2_cgs", _XRAY_UNIT, "Chandra 0.5-2 keV flux of the counterpart (NaN: not detected)",
           "phot.flux;em.X-ray.soft"),
    Column("xray_flux_2_10_cgs", _XRAY_UNIT, "Chandra 2-10 keV flux of the counterpart (NaN: not detected)",
           "phot.flux;em.X-ray.hard"),
    Column("hardness_ratio", None, "X-ray hardness ratio (H-S)/(H+S); NaN unless detected in both bands",
           "arith.ratio;phot.flux;em.X-ray"),
    Column("nway_p_any", None, "nway p_any: probability that the Chandra source has a counterpart",
           "stat.probability"),
    Column("nway_p_i", None, "nway p_i: probability that this source is the counterpart", "stat.probability"),
)}
"""Catalogue-wide columns by name."""

_BAND_EM_UCD = {
    "irac1": "em.IR.3-4um",
    "irac2": "em.IR.4-8um",
    "irac3": "em.IR.4-8um",
    "irac4": "em.IR.8-15um",
    "nuv": "em.UV.200-300nm",
    "fuv": "em.UV.100-200nm",
}

FLAG_DESCRIPTIONS = {
    "off_image": "the source lies off the band's images; not measured",
    "no_data": "too little of the source's profile on usable pixels, or unconstrained; flux NaN",
    "partial_coverage": "the cutout is partly off the image or on masked pixels",
    "fit_failed": "the fit did not give a finite flux and a positive variance; flux NaN",
    "blended": "blended or contaminated: much of the flux in the target's profile comes from neighbours",
    "poor_fit": "poor fit or likely resolved: `rchisq` above 3, residuals larger than the image's bright point sources' (`rchisq` counts the PRF's calibrated pixel error)",
}
"""What each bit of ``<band>_flag`` means, by the name the engine gives it."""


def _engine_flags() -> dict:
    from .engine.solve import FLAGS

    return dict(FLAGS)


def flag_names(value: int) -> list[str]:
    """The names of the bits set in a flag value, lowest bit first."""
    return [name for name, bit in sorted(_engine_flags().items(), key=lambda item: item[1]) if int(value) & bit]


def flag_table() -> list[tuple[int, str, str]]:
    """The quality flag bits the engine sets: ``(bit value, name, description)``, by value."""
    return [(bit, name, FLAG_DESCRIPTIONS.get(name, "see mbphot.engine.solve"))
            for name, bit in sorted(_engine_flags().items(), key=lambda item: item[1])]


def band_columns(band: str) -> dict:
    """The schema entries of one band's columns, by name, in catalogue order."""
    spec = BANDS[band]
    if spec.instrument == "IRAC":
        label = f"IRAC {spec.wavelength_um:.1f} um"
    else:
        label = f"GALEX {band.upper()}"
    em = _BAND_EM_UCD.get(band, "")
    flux_ucd = f"phot.flux.density;{em}"
    mag_ucd = f"phot.mag;{em}"
    entries = (
        Column(f"{band}_flux_ujy", "uJy", f"{label} forced-photometry flux (PRF fit); NaN: not measured", flux_ucd),
        Column(f"{band}_flux_err_ujy", "uJy", f"1-sigma error of {band}_flux_ujy", f"stat.error;{flux_ucd}"),
        Column(f"{band}_flag", None, f"{label} quality bit flags, 0 = clean (bits: FLAGBITS, docs/catalog.md)",
               "meta.code.qual"),
        Column(f"{band}_rchisq", None, f"{label} profile-weighted reduced chi2 of the fit residuals",
               "stat.fit.chi2"),
        Column(f"{band}_fracflux", None, f"{label} fraction of the flux in the target's profile from neighbours",
               f"arith.ratio;{flux_ucd}"),
        Column(f"{band}_fracmasked", None, f"{label} fraction of the target's profile on masked/no-data pixels",
               "arith.ratio;instr.pixel"),
        Column(f"{band}_mag_ab", "mag",
               f"{label} AB magnitude where S/N >= {MAG_LIMIT_SNR:g}, else NaN", mag_ucd),
        Column(f"{band}_mag_ab_err", "mag", f"1-sigma error of {band}_mag_ab, 1.0857 err/flux",
               f"stat.error;{mag_ucd}"),
        Column(f"{band}_mag_ab_limit", "mag",
               f"{label} {MAG_LIMIT_SNR:g}-sigma AB limit where S/N < {MAG_LIMIT_SNR:g}: the source is fainter "
               f"than this (flux below max(flux, 0) + {MAG_LIMIT_SNR:g} err); else NaN",
               f"{mag_ucd};stat.min"),
    )
    return {entry.name: entry for entry in entries}


_SCHEMA = dict(CATALOG_COLUMNS)
for _band in BANDS:
    _SCHEMA.update(band_columns(_band))
del _band


def column(name: str) -> Column:
    """The schema entry of a column.

    Columns the schema does not know (extra columns of a user's own catalogue) get a
    dimensionless entry that says where they come from.
    """
    entry = _SCHEMA.get(name)
    if entry is None:
        return Column(name, None, "carried over from the input catalogue (not described by mbphot)")
    return entry


def known_columns() -> dict:
    """Every column the schema describes, by name."""
    return dict(_SCHEMA)


def markdown_column_table(bands=None) -> str:
    """The schema as a Markdown table (``docs/catalog.md``); per-band columns shown for ``{band}``."""
    lines = ["| column | unit | UCD | description |", "| --- | --- | --- | --- |"]
    for entry in CATALOG_COLUMNS.values():
        lines.append(f"| `{entry.name}` | {entry.unit or ''} | `{entry.ucd}` | {entry.description} |")
    for entry in band_columns("irac1").values():
        name = entry.name.replace("irac1", "{band}")
        description = entry.description.replace("IRAC 3.6 um ", "").replace("irac1", "{band}")
        ucd = entry.ucd.replace(_BAND_EM_UCD["irac1"], "em.*")
        lines.append(f"| `{name}` | {entry.unit or ''} | `{ucd}` | {description} |")
    return "\n".join(lines)


def markdown_flag_table() -> str:
    """The quality flag bits as a Markdown table (``docs/catalog.md``)."""
    lines = ["| bit value | name | meaning |", "| --- | --- | --- |"]
    lines += [f"| {bit} | `{name}` | {description} |" for bit, name, description in flag_table()]
    return "\n".join(lines)
