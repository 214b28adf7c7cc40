"""The science catalogue: one row per source, units on every column, written atomically.

The catalogue is an astropy Table, so units travel with it into both FITS (``TUNIT``) and
Parquet (astropy's column metadata; pandas reads the same file as a plain DataFrame). The
run's parameters are stored in the table metadata under ``PARAMS`` (JSON).
"""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from astropy import units as u
from astropy.table import Table

from .io import atomic_path

__all__ = ["column_unit", "science_catalog", "write_catalog", "read_catalog", "write_table"]

CATALOG_NAME = "multiband_catalog"
XRAY_FLUX_UNIT = u.erg / u.s / u.cm**2

_UNIT_RULES = (
    (r"^(ra|dec|chandra_ra|chandra_dec)$", u.deg),
    (r"_arcsec$", u.arcsec),
    (r"^(flux_chandra_|xray_flux_)", XRAY_FLUX_UNIT),
    (r"(_flux_ujy|_flux_err_ujy)$", u.uJy),
    (r"^(splash_\d_flux|flux_galex_|ks_flux|ks_fluxerr|flux_24|fluxerr_24)", u.uJy),
    (r"(^|_)mag", u.ABmag),
)


def column_unit(name: str) -> u.UnitBase:
    """The unit of a catalogue column, from its name (dimensionless when none applies)."""
    for pattern, unit in _UNIT_RULES:
        if re.search(pattern, name):
            return u.mag if unit is u.ABmag else unit
    return u.dimensionless_unscaled


def science_catalog(frame: pd.DataFrame, parameters: dict) -> Table:
    """Turn the merged photometry + cross-match table into the science catalogue.

    Parameters
    ----------
    frame : pandas.DataFrame
        Catalogue columns, ``<band>_flux_ujy``/``_flux_err_ujy``/``_flag`` and the Chandra
        match columns.
    parameters : dict
        The run's parameters, recorded in the metadata.

    Returns
    -------
    astropy.table.Table
        With a unit on every column (``mag`` for AB magnitudes, dimensionless for ids,
        names, flags, probabilities and ratios). Missing values are NaN, and -1 for ids
        (``id_chandra09``, ``chandra_id``) of sources without an X-ray counterpart.
    """
    table = Table.from_pandas(frame.reset_index(drop=True))
    for name in table.colnames:
        column = table[name]
        if getattr(column, "mask", None) is not None and column.dtype.kind in "fiu":
            # Plain columns keep their units in every format: NaN for a missing float,
            # -1 for a missing id (no Chandra counterpart).
            table[name] = column.filled(np.nan if column.dtype.kind == "f" else -1)
        table[name].unit = column_unit(name)
    table.meta["PARAMS"] = json.dumps(parameters, default=str, sort_keys=True)
    return table


def write_table(frame: pd.DataFrame, path) -> Path:
    """Write an intermediate DataFrame as Parquet, atomically."""
    with atomic_path(path) as temporary:
        frame.to_parquet(temporary, index=False)
    return Path(path)


def write_catalog(table: Table, output_dir) -> dict:
    """Write the science catalogue as Parquet and FITS under ``output_dir/catalog``.

    Returns
    -------
    dict
        ``{"parquet": Path, "fits": Path}``.
    """
    directory = Path(output_dir) / "catalog"
    paths = {"parquet": directory / f"{CATALOG_NAME}.parquet", "fits": directory / f"{CATALOG_NAME}.fits"}
    for kind, path in paths.items():
        with atomic_path(path) as temporary:
            table.write(temporary, format="parquet" if kind == "parquet" else "fits")
    return paths


def read_catalog(path) -> pd.DataFrame:
    """Read the science catalogue (Parquet or FITS) as a DataFrame."""
    table = Table.read(path)
    for name in table.colnames:
        if table[name].dtype.kind == "S":
            table[name] = np.char.decode(table[name], "utf-8")
    return table.to_pandas()
