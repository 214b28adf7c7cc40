"""The science catalogue's schema: units, descriptions, UCDs, magnitudes and provenance."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.table import Table

from mbphot import schema
from mbphot.archive.irsa import CATALOG_COLUMNS as COSMOS2015_COLUMNS
from mbphot.bands import BANDS
from mbphot.catalog import add_magnitudes, science_catalog, write_catalog
from mbphot.crossmatch import MATCH_COLUMNS
from mbphot.engine.solve import FLAGS
from mbphot.params import RunParameters

DOCS = Path(__file__).resolve().parents[1] / "docs" / "catalog.md"


def merged_frame() -> pd.DataFrame:
    """Three sources as 03_crossmatch merges them: bright, faint (S/N 2), not measured."""
    frame = pd.DataFrame({name: [1.0, 2.0, 3.0] for name in COSMOS2015_COLUMNS})
    frame["id"] = np.array([1, 2, 3], dtype=np.int64)
    frame["type"] = np.array([0, 1, 0], dtype=np.int32)
    frame["id_chandra09"] = np.array([111, -1, -1], dtype=np.int64)
    frame["flux_chandra_2_10"] = [0.0, np.nan, np.nan]
    for band in BANDS:
        frame[f"{band}_flux_ujy"] = [100.0, 2.0, np.nan]
        frame[f"{band}_flux_err_ujy"] = [1.0, 1.0, np.nan]
        frame[f"{band}_flag"] = np.array([0, 4, 2], dtype=np.int32)
        frame[f"{band}_rchisq"] = [1.0, 1.2, np.nan]
        frame[f"{band}_fracflux"] = [0.0, 0.3, np.nan]
        frame[f"{band}_fracmasked"] = [0.0, 0.0, np.nan]
    for name in MATCH_COLUMNS[1:]:
        frame[name] = [1e-15, np.nan, np.nan]
    frame["chandra_name"] = ["CXOC J100000", "", ""]
    frame["xray_flux_2_10_cgs"] = [0.0, np.nan, np.nan]
    frame["hardness_ratio"] = [np.nan, np.nan, np.nan]
    frame["chandra_id"] = pd.array([111, None, None], dtype="Int64")
    frame["chandra_match"] = [True, False, False]
    return frame


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog")
    params = RunParameters(realism="ideal", data_dir=str(out / "data"), output_dir=str(out / "output"))
    table = science_catalog(merged_frame(), params.as_dict())
    return table, write_catalog(table, params.output_dir)


def test_every_column_of_the_catalogue_is_in_the_schema(written):
    table, _ = written
    known = schema.known_columns()
    assert [name for name in table.colnames if name not in known] == []
    for name in table.colnames:
        assert table[name].description == known[name].description


def test_fits_has_units_descriptions_and_ucds(written):
    table, paths = written
    header = fits.getheader(paths["fits"], 1)
    for index, name in enumerate(table.colnames, start=1):
        entry = schema.column(name)
        assert header[f"TTYPE{index}"] == name
        assert header[f"TCOMM{index}"] == entry.description
        assert header.get(f"TUCD{index}", "") == entry.ucd
        if entry.unit:
            assert u.Unit(header[f"TUNIT{index}"], format="fits") == u.Unit(entry.unit)
    assert header["TUNIT1"] == "deg" and header["TUCD1"] == "pos.eq.ra;meta.main"
    assert Table.read(paths["fits"])["irac1_flux_ujy"].unit == "uJy"


def test_parquet_fields_carry_unit_description_and_ucd(written):
    table, paths = written
    arrow_schema = pq.read_schema(paths["parquet"])
    for name in table.colnames:
        metadata = arrow_schema.field(name).metadata
        entry = schema.column(name)
        assert metadata[b"description"].decode() == entry.description
        assert metadata[b"ucd"].decode() == entry.ucd
        assert metadata[b"unit"].decode() == (entry.unit or "")
    assert Table.read(paths["parquet"])["nuv_mag_ab"].unit == "mag"
    provenance = json.loads(arrow_schema.metadata[b"mbphot_provenance"])
    assert provenance["SIMULATE"] is True


def test_provenance_in_both_formats(written):
    import mbphot

    _, paths = written
    header = fits.getheader(paths["fits"], 1)
    assert header["MBPVERS"] == mbphot.__version__
    assert header["SIMULATE"] is True
    assert header["DATASRC"].startswith("sample: simulated")
    assert header["DATE"][:4].isdigit()
    assert json.loads(header["PARAMS"])["data_source"] == "sample"
    parquet_meta = Table.read(paths["parquet"]).meta
    assert parquet_meta["MBPVERS"] == mbphot.__version__


def test_prf_source_per_band_comes_from_the_manifest(tmp_path):
    from mbphot.retrieve import retrieve

    params = RunParameters(radius_arcmin=0.3, bands="irac1,nuv", realism="ideal", data_dir=str(tmp_path / "d"),
                           output_dir=str(tmp_path / "o"))
    retrieve(params)
    frame = merged_frame().drop(columns=[c for c in merged_frame() if c.startswith(("irac2", "irac3", "irac4", "fuv"))])
    table = science_catalog(frame, params.as_dict())
    prf = json.loads(table.meta["PRFSRC"])
    assert set(prf) == {"irac1", "nuv"}  # the bands in the catalogue
    assert all(prf.values())


def test_magnitudes_errors_and_three_sigma_limits():
    frame = add_magnitudes(merged_frame())
    assert frame["irac1_mag_ab"].iloc[0] == pytest.approx(23.9 - 5.0)
    assert frame["irac1_mag_ab_err"].iloc[0] == pytest.approx(2.5 / np.log(10) / 100.0)
    assert np.isnan(frame["irac1_mag_ab_limit"].iloc[0])
    # S/N 2: no magnitude, a limit at max(F, 0) + 3 err = 5 microJy.
    assert np.isnan(frame["irac1_mag_ab"].iloc[1]) and np.isnan(frame["irac1_mag_ab_err"].iloc[1])
    assert frame["irac1_mag_ab_limit"].iloc[1] == pytest.approx(23.9 - 2.5 * np.log10(5.0))
    # Not measured: nothing.
    assert frame.loc[2, ["irac1_mag_ab", "irac1_mag_ab_err", "irac1_mag_ab_limit"]].isna().all()
    columns = list(frame.columns)
    start = columns.index("irac1_flux_ujy")
    assert columns[start:start + 9] == list(schema.band_columns("irac1"))


def test_x_ray_non_detections_are_nan_and_one_chandra_id(written):
    table, _ = written
    assert np.isnan(table["xray_flux_2_10_cgs"][0]) and np.isnan(table["flux_chandra_2_10"][0])
    assert "id_chandra09" not in table.colnames
    assert [name for name in table.colnames if "chandra" in name and name.endswith("id")] == ["chandra_id"]
    assert list(table["chandra_id"]) == [111, -1, -1]


def test_flag_table_documents_every_engine_flag():
    text = DOCS.read_text()
    for name, bit in FLAGS.items():
        assert name in schema.FLAG_DESCRIPTIONS
        assert f"| {bit} | `{name}` |" in text
    assert schema.markdown_flag_table() in text or all(
        line in text for line in schema.markdown_flag_table().splitlines()[2:])


def test_docs_describe_every_catalogue_column():
    text = DOCS.read_text()
    for name in schema.CATALOG_COLUMNS:
        assert f"`{name}`" in text
    for name in schema.band_columns("irac1"):
        assert f"`{name.replace('irac1', '{band}')}`" in text
