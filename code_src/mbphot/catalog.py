"""The science catalogue: one row per source, described column by column, written atomically.

Every column takes its unit, description and UCD from `mbphot.schema`. The catalogue is an
astropy Table, written to

* FITS: ``TUNITn``, ``TCOMMn`` (description) and ``TUCDn`` per column; the provenance as
  header keywords;
* Parquet: each field's metadata holds ``unit``, ``description`` and ``ucd``, and the file's
  metadata the provenance (``mbphot_provenance``, JSON); astropy's own table metadata is kept,
  so ``Table.read`` gives the units back and pandas reads the same file as a DataFrame.

Provenance (`PROVENANCE_KEYS`): the package version (``MBPVERS``), the UTC date (``DATE``),
the data source (``DATASRC``), whether the field is simulated (``SIMULATE``), the PRF used per
band (``PRFSRC``, JSON), the flag bits (``FLAGBITS``, JSON) and the run's parameters
(``PARAMS``, JSON).

Derived here: AB magnitudes with errors where S/N >= 3 and 3-sigma limits where S/N < 3
(`add_magnitudes`). X-ray fluxes of non-detections are NaN, never 0, and the catalogue keeps
one Chandra id, ``chandra_id`` (COSMOS2015's ``id_chandra09`` holds the same C-COSMOS source
numbers from COSMOS2015's own association, and is dropped).
"""

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from astropy import units as u
from astropy.io import fits
from astropy.table import Table

from . import schema
from .bands import BANDS, measured_columns
from .io import atomic_path

__all__ = ["column_unit", "add_magnitudes", "provenance", "science_catalog", "write_catalog", "read_catalog",
           "write_table"]

CATALOG_NAME = "multiband_catalog"
XRAY_FLUX_UNIT = u.erg / u.s / u.cm**2
DROPPED_COLUMNS = ("id_chandra09",)
"""Input columns left out of the science catalogue (duplicates of ``chandra_id``)."""
ZERO_IS_MISSING = ("xray_flux_05_10_cgs", "xray_flux_05_2_cgs", "xray_flux_2_10_cgs",
                   "flux_chandra_05_2", "flux_chandra_2_10", "flux_chandra_05_10")
"""X-ray flux columns in which the archives write 0.0 for "not detected"; NaN here."""
PROVENANCE_KEYS = ("MBPVERS", "DATE", "DATASRC", "SIMULATE", "PRFSRC", "FLAGBITS", "PARAMS")
DATA_SOURCE_DESCRIPTIONS = {
    "sample": "simulated COSMOS-like field (mbphot.sample), not real data",
    "archive": "COSMOS2015 (IRSA), Spitzer IRAC (IRSA), GALEX (MAST), Chandra COSMOS Legacy (HEASARC)",
    "files": "the user's own files (files manifest)",
}
_MAG_PER_LN = 2.5 / np.log(10.0)


def column_unit(name: str) -> u.UnitBase:
    """The unit of a catalogue column from the schema (dimensionless when it has none)."""
    unit = schema.column(name).unit
    return u.dimensionless_unscaled if unit is None else u.Unit(unit)


def add_magnitudes(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``<band>_mag_ab``, ``_mag_ab_err`` and ``_mag_ab_limit`` after each band's columns.

    Where S/N = flux / err >= `schema.MAG_LIMIT_SNR` (3): m = 23.9 - 2.5 log10(F / µJy) and
    its error 1.0857 err / F, limit NaN. Where S/N < 3 (error finite and > 0): magnitude and
    error NaN, and the limit is the magnitude of max(F, 0) + 3 err, the flux the source is
    below at 3 sigma. Where the band was not measured (flux or error NaN), all three are NaN.
    The band's flag is not looked at: a flagged measurement keeps its magnitude and its flag.

    Returns
    -------
    pandas.DataFrame
        A copy of ``frame`` with the columns inserted after each band's last engine column.
    """
    out = frame.copy()
    for band in BANDS:
        flux_name, err_name, _ = measured_columns(band)
        if flux_name not in out or err_name not in out:
            continue
        flux = out[flux_name].to_numpy(dtype=float, na_value=np.nan)
        err = out[err_name].to_numpy(dtype=float, na_value=np.nan)
        usable = np.isfinite(flux) & np.isfinite(err) & (err > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(usable, flux / err, np.nan)
            detected = usable & (snr >= schema.MAG_LIMIT_SNR)
            mag = np.where(detected, schema.AB_ZEROPOINT_UJY - 2.5 * np.log10(flux), np.nan)
            mag_err = np.where(detected, _MAG_PER_LN * err / flux, np.nan)
            limit_flux = np.maximum(flux, 0.0) + schema.MAG_LIMIT_SNR * err
            limit = np.where(usable & ~detected, schema.AB_ZEROPOINT_UJY - 2.5 * np.log10(limit_flux), np.nan)
        after = max(out.columns.get_loc(name) for name in schema.band_columns(band) if name in out.columns)
        for offset, (name, values) in enumerate(
            ((f"{band}_mag_ab", mag), (f"{band}_mag_ab_err", mag_err), (f"{band}_mag_ab_limit", limit))
        ):
            if name in out:
                out[name] = values
            else:
                out.insert(after + 1 + offset, name, values)
    return out


def _prf_sources(manifest, bands) -> dict:
    if manifest is None:
        return {}
    return {band: str(entry.get("prf_source", "")) for band, entry in manifest.bands.items() if band in bands}


def _load_manifest(parameters: dict):
    """The run's manifest, found from its parameters; None where there is none."""
    from .manifest import Manifest
    from .params import RunParameters

    try:
        path = RunParameters(**parameters).manifest_path
    except (TypeError, ValueError):
        return None
    return Manifest.load(path) if path.is_file() else None


def provenance(parameters: dict, manifest=None, bands=None) -> dict:
    """The catalogue's provenance metadata (`PROVENANCE_KEYS`).

    Parameters
    ----------
    parameters : dict
        The run's parameters (``RunParameters.as_dict()``).
    manifest : mbphot.Manifest, optional
        The field's manifest, for the PRF used per band (its ``prf_source``).
    bands : iterable of str, optional
        The bands in the catalogue (default: every band of the manifest).

    Returns
    -------
    dict
        ``MBPVERS`` (package version), ``DATE`` (UTC, ISO 8601), ``DATASRC`` (the data
        source and what it is), ``SIMULATE`` (True for the simulated field), ``PRFSRC``
        (JSON: band to PRF source), ``FLAGBITS`` (JSON: flag name to bit value) and
        ``PARAMS`` (JSON: the parameters).
    """
    from . import __version__

    source = str(parameters.get("data_source", ""))
    description = DATA_SOURCE_DESCRIPTIONS.get(source, "")
    return {
        "MBPVERS": __version__,
        "DATE": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "DATASRC": f"{source}: {description}" if description else source,
        "SIMULATE": source == "sample",
        "PRFSRC": json.dumps(_prf_sources(manifest, BANDS if bands is None else set(bands)), sort_keys=True),
        "FLAGBITS": json.dumps({name: bit for bit, name, _ in schema.flag_table()}),
        "PARAMS": json.dumps(parameters, default=str, sort_keys=True),
    }


def science_catalog(frame: pd.DataFrame, parameters: dict, manifest=None) -> Table:
    """Turn the merged photometry + cross-match table into the science catalogue.

    Parameters
    ----------
    frame : pandas.DataFrame
        Catalogue columns, ``<band>_flux_ujy``/``_flux_err_ujy``/``_flag`` (and the engine's
        quality columns) and the Chandra match columns.
    parameters : dict
        The run's parameters, recorded in the metadata.
    manifest : mbphot.Manifest, optional
        The field's manifest, for the PRF provenance; by default the one the parameters
        point to, where it exists.

    Returns
    -------
    astropy.table.Table
        Columns described by `mbphot.schema` (``unit``, ``description``, ``meta["ucd"]``),
        magnitudes added (`add_magnitudes`), X-ray non-detections NaN, ``id_chandra09``
        dropped, provenance in ``meta``. Missing values are NaN, and -1 for
        ``chandra_id`` of sources without an X-ray counterpart.
    """
    frame = frame.drop(columns=[c for c in DROPPED_COLUMNS if c in frame.columns])
    frame = add_magnitudes(frame.reset_index(drop=True))
    for name in ZERO_IS_MISSING:
        if name in frame:
            values = frame[name].to_numpy(dtype=float, na_value=np.nan)
            frame[name] = np.where(values == 0.0, np.nan, values)
    table = Table.from_pandas(frame)
    for name in table.colnames:
        column = table[name]
        if getattr(column, "mask", None) is not None and column.dtype.kind in "fiu":
            # Plain columns keep their units in every format: NaN for a missing float,
            # -1 for a missing id (no Chandra counterpart).
            table[name] = column.filled(np.nan if column.dtype.kind == "f" else -1)
        entry = schema.column(name)
        table[name].unit = column_unit(name)
        table[name].description = entry.description
        if entry.ucd:
            table[name].meta["ucd"] = entry.ucd
    if manifest is None:
        manifest = _load_manifest(parameters)
    bands = [band for band in BANDS if measured_columns(band)[0] in table.colnames]
    table.meta.update(provenance(parameters, manifest, bands))
    return table


def write_table(frame: pd.DataFrame, path) -> Path:
    """Write an intermediate DataFrame as Parquet, atomically."""
    with atomic_path(path) as temporary:
        frame.to_parquet(temporary, index=False)
    return Path(path)


_FITS_COMMENTS = {
    "MBPVERS": "mbphot version that wrote this catalogue",
    "DATE": "UTC date the catalogue was written",
    "DATASRC": "data source of the run",
    "SIMULATE": "T: a simulated field, not real data",
    "PRFSRC": "PRF per band (JSON)",
    "FLAGBITS": "<band>_flag bit values by name (JSON)",
    "PARAMS": "run parameters (JSON)",
}


def _write_fits(table: Table, path) -> None:
    hdu = fits.table_to_hdu(table)
    for index, name in enumerate(table.colnames, start=1):
        entry = schema.column(name)
        hdu.header[f"TCOMM{index}"] = entry.description
        if entry.ucd:
            hdu.header[f"TUCD{index}"] = entry.ucd
    for key, comment in _FITS_COMMENTS.items():
        # A comment on a long (JSON) value would be truncated, with a warning.
        if key in hdu.header and len(str(hdu.header[key])) + len(comment) < 60:
            hdu.header.comments[key] = comment
    hdu.name = "CATALOG"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)


def _write_parquet(table: Table, path) -> None:
    # astropy writes the units and table metadata (its own YAML header); the schema goes
    # into each field's metadata as well, where any Parquet reader sees it.
    table.write(path, format="parquet")
    arrow = pq.read_table(path)
    fields = []
    for arrow_field in arrow.schema:
        entry = schema.column(arrow_field.name)
        metadata = {"unit": entry.unit or "", "description": entry.description, "ucd": entry.ucd}
        fields.append(arrow_field.with_metadata({**(arrow_field.metadata or {}), **metadata}))
    file_metadata = dict(arrow.schema.metadata or {})
    file_metadata[b"mbphot_provenance"] = json.dumps(
        {key: table.meta[key] for key in PROVENANCE_KEYS if key in table.meta}, default=str
    ).encode()
    arrow = arrow.cast(pa.schema(fields, metadata=file_metadata))
    pq.write_table(arrow, path)


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
            if kind == "parquet":
                _write_parquet(table, temporary)
            else:
                _write_fits(table, temporary)
    return paths


def read_catalog(path) -> pd.DataFrame:
    """Read the science catalogue (Parquet or FITS) as a DataFrame."""
    table = Table.read(path)
    for name in table.colnames:
        if table[name].dtype.kind == "S":
            table[name] = np.char.decode(table[name], "utf-8")
    return table.to_pandas()
