"""HEASARC: the Chandra X-ray catalogue of COSMOS around the field.

The catalogue of choice is the **Chandra COSMOS Legacy survey** point-source catalogue
(Civano et al. 2016, ApJ 819, 62: 4,016 sources over the whole 2.2 deg^2 of COSMOS), which
HEASARC serves as table ``clscat`` (IVOA identifier ``ivo://nasa.heasarc/clscat``). Where that
table cannot be used, the older **C-COSMOS** catalogue ``ccosmoscat`` (Elvis et al. 2009: 1,761
sources over the central 0.9 deg^2 only) is used with a warning, and a second warning when
the field reaches beyond C-COSMOS's area, where it has no sources at all. A cone without any
X-ray source is written (an empty table is a valid answer for a small field) but never
silently: it warns too.

Both are read with one ADQL cone through pyvo's TAP client on HEASARC's Xamin TAP service
(``<heasarc>/tap``, the service `astroquery.heasarc` 0.4.8 queries), with mbphot's session and
time-out. Whatever the table, the columns are written with the names, units and order of
``ccosmoscat`` that the cross-match reads (`CHANDRA_COLUMNS`), each taken from the first of a
few names the tables use for it (`COLUMN_CANDIDATES`).
"""

import logging
import warnings
from pathlib import Path

import numpy as np
import pyvo
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from ..io import atomic_path
from .cache import ArchiveError, ArchiveUnreachableError, TimeoutSession, call_with_retries, is_cached
from .config import Endpoints

__all__ = ["CHANDRA_COLUMNS", "LEGACY_TABLE", "CCOSMOS_TABLE", "XrayCatalogWarning", "query_chandra"]

logger = logging.getLogger("mbphot.archive.heasarc")

LEGACY_TABLE = "clscat"
CCOSMOS_TABLE = "ccosmoscat"
CHANDRA_COLUMNS = {
    "NAME": None, "RA": "deg", "DEC": "deg", "ERROR_RADIUS": "arcsec",
    "FLUX": "erg / (s cm2)", "SB_FLUX": "erg / (s cm2)", "HB_FLUX": "erg / (s cm2)",
    "HARDNESS_RATIO": None, "SOURCE_NUMBER": None,
}
COLUMN_CANDIDATES = {
    "NAME": ("name", "id_x", "source_name"),
    "RA": ("ra",),
    "DEC": ("dec",),
    "ERROR_RADIUS": ("error_radius", "pos_err", "position_error", "radec_error"),
    "FLUX": ("flux", "full_flux", "flux_f", "f_flux"),
    "SB_FLUX": ("sb_flux", "soft_flux", "flux_s", "s_flux"),
    "HB_FLUX": ("hb_flux", "hard_flux", "flux_h", "h_flux"),
    "HARDNESS_RATIO": ("hardness_ratio", "hr"),
    "SOURCE_NUMBER": ("source_number", "src_number", "seq_number"),
}
"""mbphot's column name to the names HEASARC's tables use for it, first match wins."""
OPTIONAL = {"HARDNESS_RATIO", "SOURCE_NUMBER"}
ROW_COLUMN = "__row"
"""Xamin's row number of every table, exported by HEASARC's browse interface as ``ID``."""
CCOSMOS_CENTRE_DEG = (150.12, 2.21)
CCOSMOS_RADIUS_DEG = 0.5
"""C-COSMOS covers about 0.9 deg^2 around this centre (Elvis et al. 2009, figure 1): a field
reaching beyond this circle may lie partly outside it (approximate, on the generous side)."""


class XrayCatalogWarning(UserWarning):
    """The X-ray catalogue is not the Legacy one, or does not cover the field, or is empty there."""


def _cone(table: str, ra_deg: float, dec_deg: float, radius_arcmin: float) -> str:
    return (
        f"SELECT * FROM {table} WHERE CONTAINS(POINT('ICRS', ra, dec), "
        f"CIRCLE('ICRS', {ra_deg:.7f}, {dec_deg:.7f}, {radius_arcmin / 60.0:.7f})) = 1"
    )


def _as_sample_chandra(table: Table, name: str) -> Table:
    """The answer with ``ccosmoscat``'s column names, units and order (missing values NaN)."""
    by_lower = {column.lower(): column for column in table.colnames}
    chandra = Table()
    for column, unit in CHANDRA_COLUMNS.items():
        source = next((by_lower[c] for c in COLUMN_CANDIDATES[column] if c in by_lower), None)
        if source is None:
            if column in OPTIONAL:
                continue
            raise ArchiveError(
                f"HEASARC's {name} answer has no column for {column} (looked for {', '.join(COLUMN_CANDIDATES[column])}; "
                f"it has {', '.join(table.colnames)})"
            )
        values = table[source]
        if column == "NAME":
            chandra[column] = np.array([str(v).strip() for v in values], dtype=str)
        elif column == "SOURCE_NUMBER":
            chandra[column] = np.asarray(np.ma.filled(values, -1), dtype=np.int64)
        else:
            chandra[column] = np.ma.filled(np.ma.asarray(values, dtype=np.float64), np.nan)
        if column == "ERROR_RADIUS" and str(getattr(values, "unit", "") or "").lower() in ("deg", "degree", "degrees"):
            chandra[column] = chandra[column] * 3600.0  # IRSA-style position errors in degrees
        chandra[column].unit = unit
    if ROW_COLUMN in by_lower:
        chandra["ID"] = np.asarray(table[by_lower[ROW_COLUMN]], dtype=np.int64)
    else:
        chandra["ID"] = np.arange(1, len(chandra) + 1, dtype=np.int64)
    chandra.meta["ORIGIN"] = f"HEASARC Xamin TAP, table {name}"
    chandra.meta["XRAYCAT"] = name
    return chandra


def _outside_ccosmos(ra_deg: float, dec_deg: float, radius_arcmin: float) -> bool:
    centre = SkyCoord(*CCOSMOS_CENTRE_DEG, unit="deg")
    distance = SkyCoord(ra_deg * u.deg, dec_deg * u.deg).separation(centre).deg
    return distance + radius_arcmin / 60.0 > CCOSMOS_RADIUS_DEG


def query_chandra(ra_deg: float, dec_deg: float, radius_arcmin: float, path, endpoints: Endpoints) -> Path:
    """Write the Chandra COSMOS sources within ``radius_arcmin`` of (ra, dec) to ``path`` (FITS).

    The Legacy catalogue (``clscat``) is used; where HEASARC cannot serve it, C-COSMOS
    (``ccosmoscat``) is used with an `XrayCatalogWarning`, and another one if the field reaches
    beyond C-COSMOS's area. A cone without X-ray sources is written and warned about. The
    table used is in the file's header (``XRAYCAT``). A complete file already at ``path`` is
    reused.

    Raises
    ------
    ArchiveUnreachableError
        HEASARC cannot be reached.
    ArchiveError
        Neither table can be read.
    """
    path = Path(path)
    if is_cached(path):
        return path
    url = f"{endpoints.heasarc}/tap"
    service = pyvo.dal.TAPService(url, session=TimeoutSession(endpoints.timeout_s))

    def cone(table: str) -> Table:
        answer = call_with_retries(
            lambda: service.run_sync(_cone(table, ra_deg, dec_deg, radius_arcmin)).to_table(),
            service="HEASARC TAP", url=url, endpoints=endpoints,
        )
        return _as_sample_chandra(answer, table)

    try:
        chandra = cone(LEGACY_TABLE)
    except ArchiveUnreachableError:
        raise
    except ArchiveError as error:
        warnings.warn(
            f"HEASARC's Chandra COSMOS Legacy catalogue ({LEGACY_TABLE}, Civano et al. 2016) could not be used ({error}); "
            f"using C-COSMOS ({CCOSMOS_TABLE}, Elvis et al. 2009), which covers only the central 0.9 deg^2 of COSMOS",
            XrayCatalogWarning, stacklevel=2,
        )
        chandra = cone(CCOSMOS_TABLE)
        if _outside_ccosmos(ra_deg, dec_deg, radius_arcmin):
            warnings.warn(
                f"the field (RA {ra_deg}, Dec {dec_deg}, {radius_arcmin:g} arcmin) reaches beyond C-COSMOS's area: "
                "X-ray sources there are missing from the cross-match, not absent from the sky",
                XrayCatalogWarning, stacklevel=2,
            )
    if len(chandra) == 0:
        warnings.warn(
            f"HEASARC's {chandra.meta['XRAYCAT']} has no X-ray source within {radius_arcmin:g} arcmin of RA {ra_deg}, "
            f"Dec {dec_deg}: the science catalogue will have no Chandra counterparts",
            XrayCatalogWarning, stacklevel=2,
        )
    logger.info("%d X-ray sources from HEASARC %s", len(chandra), chandra.meta["XRAYCAT"])
    with atomic_path(path) as temporary:
        chandra.write(temporary, format="fits")
    return path
