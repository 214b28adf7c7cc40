"""HEASARC: the Chandra COSMOS Legacy catalogue (``ccosmoscat``) around the field.

`astroquery.heasarc.Heasarc` (0.4.8 and later) queries HEASARC's Xamin TAP service; the cone
asks for the columns the cross-match uses and writes them with the upper-case names, units and
the ``ID`` row number of the catalogue HEASARC's browse interface exports (the simulated
catalogue has the same).
"""

import warnings
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astroquery.exceptions import NoResultsWarning

from ..io import atomic_path
from .cache import ArchiveError, call_with_retries, is_cached
from .config import Endpoints

__all__ = ["CHANDRA_COLUMNS", "query_chandra", "heasarc_client"]

CHANDRA_TABLE = "ccosmoscat"
CHANDRA_COLUMNS = {
    "NAME": None, "RA": "deg", "DEC": "deg", "ERROR_RADIUS": "arcsec",
    "FLUX": "erg / (s cm2)", "SB_FLUX": "erg / (s cm2)", "HB_FLUX": "erg / (s cm2)",
    "HARDNESS_RATIO": None, "SOURCE_NUMBER": None,
}
ROW_COLUMN = "__row"
"""Xamin's row number of every table, exported by HEASARC's browse interface as ``ID``."""


def heasarc_client(endpoints: Endpoints):
    """An `astroquery.heasarc.HeasarcClass` talking to ``endpoints.heasarc``.

    ``HeasarcClass.VO_URL`` is copied from ``conf.VO_URL`` when astroquery is imported, so a
    later change of the setting does not reach it; it is set on this instance instead (as the
    maintainers advise, astropy/astroquery#493), leaving the shared ``Heasarc`` untouched.
    """
    from astroquery.heasarc import HeasarcClass

    client = HeasarcClass()
    client.VO_URL = endpoints.heasarc
    return client


def _as_sample_chandra(table: Table) -> Table:
    names = {name.lower(): name for name in table.colnames}
    missing = [name for name in (*CHANDRA_COLUMNS, ROW_COLUMN) if name.lower() not in names]
    if missing:
        raise ArchiveError(f"HEASARC's {CHANDRA_TABLE} answer lacks the column(s) {', '.join(missing)}")
    chandra = Table()
    for name, unit in CHANDRA_COLUMNS.items():
        column = table[names[name.lower()]]
        if name == "NAME":
            chandra[name] = np.array([str(v).strip() for v in column], dtype=str)
        elif name == "SOURCE_NUMBER":
            chandra[name] = np.asarray(column, dtype=np.int64)
        else:
            chandra[name] = np.ma.filled(np.ma.asarray(column, dtype=np.float64), np.nan)
        chandra[name].unit = unit
    chandra["ID"] = np.asarray(table[names[ROW_COLUMN]], dtype=np.int64)
    chandra.meta["ORIGIN"] = f"HEASARC Xamin TAP, table {CHANDRA_TABLE}"
    return chandra


def query_chandra(ra_deg: float, dec_deg: float, radius_arcmin: float, path, endpoints: Endpoints) -> Path:
    """Write the ``ccosmoscat`` sources within ``radius_arcmin`` of (ra, dec) to ``path`` (FITS).

    A field without X-ray sources is not an error (a small field may have none): the file then
    holds the columns and no rows. A complete file already at ``path`` is reused.
    """
    path = Path(path)
    if is_cached(path):
        return path
    client = heasarc_client(endpoints)
    columns = ", ".join(name.lower() for name in CHANDRA_COLUMNS) + f", {ROW_COLUMN}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoResultsWarning)  # no X-ray source is a valid answer
        table = call_with_retries(
            lambda: client.query_region(
                SkyCoord(ra_deg * u.deg, dec_deg * u.deg), catalog=CHANDRA_TABLE, radius=radius_arcmin * u.arcmin, columns=columns
            ),
            service="HEASARC TAP",
            url=f"{endpoints.heasarc}/tap",
            endpoints=endpoints,
        )
    chandra = _as_sample_chandra(table)
    with atomic_path(path) as temporary:
        chandra.write(temporary, format="fits")
    return path
