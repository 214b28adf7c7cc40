"""The four notebooks end to end with papermill, and the command line's errors."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from mbphot.bands import BAND_NAMES
from mbphot.engine.tractor import tractor_available
from mbphot.params import RunParameters

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(*arguments, cwd):
    return subprocess.run(
        [sys.executable, "-m", "mbphot", "run", "--no-progress", "--realism", "ideal", *arguments],
        cwd=cwd, capture_output=True, text=True, timeout=900,
    )


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    result = run_cli("--ra", "150.02", "--dec", "2.21", "--radius", "1.5", "--seed", "5",
                     "--data-dir", "data", "--output-dir", "output", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "output"


@pytest.mark.slow
def test_notebooks_run_and_write_every_output(pipeline_run):
    for name in ("01_retrieve", "02_photometry", "03_crossmatch", "04_plots"):
        assert (pipeline_run / "notebooks" / f"{name}.ipynb").is_file()
    for name in ("flux_vs_cosmos2015", "flux_vs_truth", "flux_pulls", "irac_color_color", "uv_ir_color"):
        assert (pipeline_run / "figures" / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.slow
def test_catalog_has_documented_columns_units_and_parameters(pipeline_run):
    for suffix in ("parquet", "fits"):
        table = Table.read(pipeline_run / "catalog" / f"multiband_catalog.{suffix}")
        for band in BAND_NAMES:
            assert table[f"{band}_flux_ujy"].unit == "uJy"
            assert table[f"{band}_flux_err_ujy"].unit == "uJy"
            assert f"{band}_flag" in table.colnames
        assert table["ra"].unit == "deg"
        assert table["xray_flux_05_10_cgs"].unit == "erg / (cm2 s)"
        assert table["chandra_separation_arcsec"].unit == "arcsec"
        if suffix == "parquet":  # FITS has no way to say "dimensionless"
            assert all(table[c].unit is not None for c in table.colnames), "a unit on every column"
        assert table["chandra_match"].sum() >= 3
        matched = np.asarray(table["chandra_match"], dtype=bool)
        hardness = np.asarray(table["hardness_ratio"])[matched]
        assert np.all(np.abs(hardness[np.isfinite(hardness)]) < 1)  # NaN unless both bands detected
    header = fits.getheader(pipeline_run / "catalog" / "multiband_catalog.fits", 1)
    params = header["PARAMS"]
    assert '"radius_arcmin": 1.5' in params and '"seed": 5' in params


@pytest.mark.slow
def test_failing_notebook_is_named_with_its_cell(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    (tmp_path / "endpoints.json").write_text(
        json.dumps({"irsa_tap": f"{closed}/TAP", "mast": closed, "heasarc": closed, "retries": 0})
    )
    result = run_cli("--data-source", "archive", "--endpoints", "endpoints.json", "--data-dir", "d", "--output-dir", "o",
                     cwd=tmp_path)
    assert result.returncode == 1
    assert "notebook 01_retrieve failed in cell" in result.stderr
    assert f"cannot reach IRSA TAP at {closed}/TAP" in result.stderr
    assert "use data_source='sample'" in result.stderr
    assert not (tmp_path / "o" / "notebooks" / "02_photometry.ipynb").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--radius", "-1"], "radius_arcmin must be positive"),
        (["--ra", "10"], "outside the COSMOS field"),
        (["--bands", "irac1,jband"], "unknown band 'jband'"),
    ],
)
def test_bad_parameters_fail_before_any_work(tmp_path, arguments, message):
    result = run_cli(*arguments, "--data-dir", "d", "--output-dir", "o", cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr
    assert not (tmp_path / "d").exists() and not (tmp_path / "o").exists()


def test_tractor_engine_without_tractor_says_how_to_install(tmp_path):
    if tractor_available():
        pytest.skip("The Tractor is installed here")
    result = run_cli("--engine", "tractor", "--data-dir", "d", "--output-dir", "o", cwd=tmp_path)
    assert result.returncode == 1
    assert "github.com/dstndstn/tractor" in result.stderr


def test_parameters_from_papermill_strings_are_checked():
    assert RunParameters(radius_arcmin="2.5").radius_arcmin == 2.5
    with pytest.raises(TypeError, match="radius_arcmin must be a number"):
        RunParameters(radius_arcmin="wide")
    with pytest.raises(ValueError, match="unknown data_source 'vizier'"):
        RunParameters(data_source="vizier")
    for seed in (-1, "abc", 1.5):
        with pytest.raises(ValueError, match="seed must be a whole number >= 0"):
            RunParameters(seed=seed)
