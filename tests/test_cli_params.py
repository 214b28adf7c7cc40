"""``mbphot run``: parameter files, command-line overrides, per-run folders and the latest outputs.

The runs here use small stand-in notebooks (a few seconds each) with the pipeline's names;
the real notebooks run in tests/test_pipeline.py and tests/test_user_files.py.
"""

import json
import subprocess
import sys
import textwrap

import pytest
from astropy.table import Table

from mbphot import cli
from mbphot.archive.config import ENDPOINTS_ENV
from mbphot.cli import main, read_parameter_file
from mbphot.io import file_lock
from mbphot.params import RunParameters

HEADER = textwrap.dedent("""\
    ---
    jupytext:
      text_representation:
        extension: .md
        format_name: myst
    kernelspec:
      display_name: Python 3 (ipykernel)
      language: python
      name: python3
    ---
    """)

PARAMETERS_CELL = "```{code-cell} ipython3\n:tags: [parameters]\n\nra = 150.01\n```\n\n"

WRITE_CATALOG = textwrap.dedent("""\
    ```{code-cell} ipython3
    import pandas as pd
    import mbphot

    params = mbphot.RunParameters.from_namespace(globals())
    frame = pd.DataFrame({"id": [1, 2], "ra": [params.ra, params.ra], "dec": [params.dec, params.dec]})
    mbphot.write_catalog(mbphot.science_catalog(frame, params.as_dict()), params.run_dir)
    ```
    """)

WRITE_FIGURE = textwrap.dedent("""\
    ```{code-cell} ipython3
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mbphot
    from mbphot import plots

    figure = plt.figure()
    plots.save_figure(figure, mbphot.RunParameters.from_namespace(globals()).run_dir / "figures" / "stand_in.png")
    ```
    """)

RAISE = "```{code-cell} ipython3\nraise RuntimeError('photometry broke')\n```\n"
PASS = "```{code-cell} ipython3\nassert True\n```\n"


def write_notebooks(folder, bodies):
    folder.mkdir()
    for name, body in zip(("01_retrieve", "02_photometry", "03_crossmatch", "04_plots"), bodies):
        (folder / f"{name}.md").write_text(HEADER + PARAMETERS_CELL + body)
    return folder


@pytest.fixture
def good_notebooks(tmp_path):
    return write_notebooks(tmp_path / "good", (WRITE_CATALOG, PASS, PASS, WRITE_FIGURE))


@pytest.fixture
def failing_notebooks(tmp_path):
    return write_notebooks(tmp_path / "failing", (WRITE_CATALOG, RAISE, PASS, PASS))


def run(tmp_path, notebooks, *arguments):
    return main(["run", "--no-progress", "--realism", "ideal", "--notebooks", str(notebooks),
                 "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "output"), *arguments])


# ---- the parameter file --------------------------------------------------------------------


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "ra: 150.2\nbands: [irac1, nuv]\nradius_arcmin: '2'\nfiles_manifest: fields/f.yaml\n"),
    (".json", '{"ra": 150.2, "bands": ["irac1", "nuv"], "radius_arcmin": "2", "files_manifest": "fields/f.yaml"}'),
])
def test_parameter_file_yaml_or_json(tmp_path, suffix, text):
    path = tmp_path / f"params{suffix}"
    path.write_text(text)
    values = read_parameter_file(path)
    assert values == {"ra": 150.2, "bands": ["irac1", "nuv"], "radius_arcmin": "2",
                      "files_manifest": str(tmp_path / "fields/f.yaml")}


@pytest.mark.parametrize("name, text, message", [
    ("p.yaml", "radius: 2\n", "unknown parameter 'radius'; allowed: ra, dec, radius_arcmin"),
    ("p.yaml", "radius: 2\n", "did you mean 'radius_arcmin'?"),
    ("p.json", '{"ra": 150.1, "colour": "red"}', "unknown parameter 'colour'"),
    ("p.json", '{"ra": 150.1,}', "is not valid JSON"),
    ("p.yaml", "ra: [150.1\n", "is not valid YAML"),
    ("p.yaml", "- ra\n- dec\n", "must hold a mapping of parameter names to values, got list"),
    ("p.toml", "ra = 150.1\n", "must end in .yaml, .yml or .json, got '.toml'"),
    ("p.yaml", "ra: 150.1\nbands: irac1\nra: 150.3\n", "parameter 'ra' is given twice; keep one"),
    ("p.json", '{"ra": 150.1, "mode": "scene", "mode": "source"}', "parameter 'mode' is given twice; keep one"),
])
def test_parameter_file_mistakes_fail_before_any_work(tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    assert main(["run", "--params", str(tmp_path / name), "--output-dir", str(tmp_path / "output")]) == 1
    error = capsys.readouterr().err
    assert message in error and str(tmp_path / name) in error
    assert not (tmp_path / "output").exists()


def test_bad_value_in_parameter_file_is_named(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("radius_arcmin: -1\n")
    assert main(["run", "--params", str(tmp_path / "p.yaml"), "--output-dir", str(tmp_path / "output")]) == 1
    assert "radius_arcmin must be positive (> 0 arcmin), got -1" in capsys.readouterr().err
    assert not (tmp_path / "output").exists()


def test_realism_option_is_checked_before_any_work(tmp_path, capsys):
    assert main(["run", "--realism", "noisy", "--output-dir", str(tmp_path / "output")]) == 1
    assert "unknown realism 'noisy'; choose from ideal, realistic" in capsys.readouterr().err
    assert not (tmp_path / "output").exists()
    (tmp_path / "p.yaml").write_text("realism: realistic\n")
    assert read_parameter_file(tmp_path / "p.yaml") == {"realism": "realistic"}


def test_missing_parameter_file(tmp_path, capsys):
    assert main(["run", "--params", str(tmp_path / "none.yaml")]) == 1
    assert f"parameter file {tmp_path / 'none.yaml'} not found" in capsys.readouterr().err


# ---- runs: per-run folders, COMPLETE, the latest outputs -----------------------------------


@pytest.mark.slow
def test_a_run_has_its_own_folder_and_becomes_the_latest(tmp_path, good_notebooks):
    (tmp_path / "p.yaml").write_text("ra: 150.2\nradius_arcmin: 1.0\nbands: irac1,nuv\nseed: 4\nmode: source\n")
    assert run(tmp_path, good_notebooks, "--params", str(tmp_path / "p.yaml"), "--radius", "2", "--seed", "6") == 0

    output = tmp_path / "output"
    tag = "ra150.2000_dec+2.2000_r2_irac1-nuv_sample-s6_mbphot-source"  # --radius and --seed override the file
    run_dir = output / "runs" / tag
    assert [d.name for d in (output / "runs").iterdir()] == [tag]
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert files == ["COMPLETE", "catalog/multiband_catalog.fits", "catalog/multiband_catalog.parquet",
                     "figures/stand_in.png", "notebooks/01_retrieve.ipynb", "notebooks/02_photometry.ipynb",
                     "notebooks/03_crossmatch.ipynb", "notebooks/04_plots.ipynb", "parameters.json"]
    complete = json.loads((run_dir / "COMPLETE").read_text())
    assert complete["run_tag"] == tag
    recorded = json.loads((run_dir / "parameters.json").read_text())
    assert (recorded["radius_arcmin"], recorded["seed"], recorded["ra"], recorded["mode"]) == (2.0, 6, 150.2, "source")
    assert recorded["output_dir"] == str(output) and recorded["bands"] == ["irac1", "nuv"]

    # The fixed places hold copies of this run, and the catalogue records its parameters.
    for relative in files:
        if relative not in ("COMPLETE", "parameters.json"):
            assert (output / relative).read_bytes() == (run_dir / relative).read_bytes(), relative
    assert json.loads((output / "latest_run.json").read_text())["run_tag"] == tag
    meta = json.loads(Table.read(output / "catalog/multiband_catalog.parquet").meta["PARAMS"])
    assert (meta["radius_arcmin"], meta["seed"], meta["bands"]) == (2.0, 6, ["irac1", "nuv"])

    # parameters.json reruns the same run.
    assert run(tmp_path, good_notebooks, "--params", str(run_dir / "parameters.json")) == 0
    assert [d.name for d in (output / "runs").iterdir()] == [tag]


@pytest.mark.slow
def test_a_failed_run_is_not_complete_and_leaves_the_latest_outputs(tmp_path, good_notebooks, failing_notebooks, capsys):
    assert run(tmp_path, good_notebooks, "--radius", "1") == 0
    output = tmp_path / "output"
    latest = {path: path.read_bytes() for path in output.rglob("*") if path.is_file() and "runs" not in path.parts}

    # A rerun with the same parameters, so the same folder, that fails in notebook 02.
    assert run(tmp_path, failing_notebooks, "--radius", "1") == 1
    error = capsys.readouterr().err
    assert "notebook 02_photometry failed in cell" in error and "RuntimeError: photometry broke" in error
    run_dir = output / "runs" / "ra150.0100_dec+2.2000_r1_all_sample-s42_mbphot-scene"
    assert not (run_dir / "COMPLETE").exists()
    assert not (run_dir / "figures").exists(), "the earlier run's files were cleared before the rerun"
    assert (run_dir / "notebooks/02_photometry.ipynb").is_file()
    assert {path: path.read_bytes() for path in latest} == latest

    # A failing run with other parameters does not touch the latest outputs either.
    assert run(tmp_path, failing_notebooks, "--radius", "0.5") == 1
    assert not (output / "runs/ra150.0100_dec+2.2000_r0.5_all_sample-s42_mbphot-scene/COMPLETE").exists()
    assert {path: path.read_bytes() for path in latest} == latest
    assert json.loads((output / "latest_run.json").read_text())["run_tag"].startswith("ra150.0100_dec+2.2000_r1_")


# ---- concurrent runs in the same folders ---------------------------------------------------

WRITE_PHOTOMETRY = textwrap.dedent("""\
    ```{code-cell} ipython3
    import pandas as pd
    import mbphot
    from mbphot.catalog import write_table

    params = mbphot.RunParameters.from_namespace(globals())
    columns = {}
    for band in params.bands:
        flux = 1.0 if params.mode == "scene" else 2.0
        columns.update({f"{band}_flux_ujy": [flux, flux], f"{band}_flux_err_ujy": [0.1, 0.1], f"{band}_flag": [0, 0]})
    write_table(pd.DataFrame({"id": [1, 2], "ra": [params.ra] * 2, "dec": [params.dec] * 2, **columns}),
                params.photometry_path)
    ```
    """)

CATALOG_FROM_PHOTOMETRY = textwrap.dedent("""\
    ```{code-cell} ipython3
    import pandas as pd
    import mbphot

    params = mbphot.RunParameters.from_namespace(globals())
    photometry = pd.read_parquet(params.photometry_path)
    mbphot.write_catalog(mbphot.science_catalog(photometry, params.as_dict()), params.run_dir)
    ```
    """)


def start_run(tmp_path, notebooks, *arguments):
    return subprocess.Popen(
        [sys.executable, "-m", "mbphot", "run", "--no-progress", "--realism", "ideal", "--notebooks", str(notebooks),
         "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "output"), "--radius", "1", *arguments],
        stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.slow
def test_concurrent_runs_in_shared_folders_each_publish_their_own_catalogue(tmp_path):
    notebooks = write_notebooks(tmp_path / "pipeline", (PASS, WRITE_PHOTOMETRY, CATALOG_FROM_PHOTOMETRY, PASS))
    runs = {("irac2",): ("--bands", "irac2", "--mode", "scene"), ("irac1", "nuv"): ("--bands", "irac1,nuv", "--mode", "source")}
    processes = {bands: start_run(tmp_path, notebooks, *arguments) for bands, arguments in runs.items()}
    for process in processes.values():
        error = process.communicate()[1]
        assert process.returncode == 0, error

    output = tmp_path / "output"
    for bands, arguments in runs.items():
        tag = RunParameters(ra=150.01, radius_arcmin=1, bands=",".join(bands), mode=arguments[-1], realism="ideal").run_tag
        catalog = Table.read(output / "runs" / tag / "catalog/multiband_catalog.parquet")
        assert sorted(name.removesuffix("_flux_ujy") for name in catalog.colnames if name.endswith("_flux_ujy")) == list(bands)
        assert set(catalog[f"{bands[0]}_flux_ujy"]) == {1.0 if arguments[-1] == "scene" else 2.0}
    # The latest outputs are one whole run: the catalogue is the run latest_run.json names.
    latest = json.loads((output / "latest_run.json").read_text())["run_tag"]
    meta = json.loads(Table.read(output / "catalog/multiband_catalog.parquet").meta["PARAMS"])
    assert RunParameters(**{**meta, "data_dir": "data", "output_dir": "output"}).run_tag == latest


@pytest.mark.slow
def test_a_second_run_of_the_same_parameters_waits_for_the_first(tmp_path, good_notebooks):
    tag = RunParameters(ra=150.01, radius_arcmin=1, realism="ideal").run_tag
    run_dir = tmp_path / "output" / "runs" / tag
    with file_lock(tmp_path / "output" / ".locks" / tag):  # the first run, still going
        process = start_run(tmp_path, good_notebooks)
        for line in process.stderr:
            if "waiting for another run of the same parameters" in line:
                break
        else:
            pytest.fail(f"the run did not wait; it exited with {process.wait()}")
        assert not run_dir.exists(), "the waiting run must not touch the folder"
    error = process.communicate()[1]
    assert process.returncode == 0, error
    assert (run_dir / "COMPLETE").is_file()


# ---- one error path: a short message, the traceback in the run's log -----------------------


@pytest.mark.parametrize("error, message", [
    (OSError(28, "No space left on device", "/data/x.parquet"), "disk full writing /data/x.parquet"),
    (PermissionError(13, "Permission denied", "/output/runs"), "cannot write /output/runs (Permission denied)"),
    (KeyboardInterrupt(), "stopped by Ctrl-C; run the same command again to resume"),
])
def test_failures_outside_the_notebooks_give_one_short_line(tmp_path, monkeypatch, capsys, error, message):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli, "run_pipeline", fail)
    assert run(tmp_path, "unused") in (1, 130)
    printed = capsys.readouterr().err
    assert message in printed and "Traceback" not in printed and len(printed.splitlines()) == 1


def test_an_unexpected_error_is_named_and_its_traceback_logged(tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(cli, "run_pipeline", fail)
    assert run(tmp_path, "unused") == 1
    printed = capsys.readouterr().err
    log = tmp_path / "output" / "runs" / RunParameters(realism="ideal").run_tag / cli.LOG_NAME
    assert printed == f"mbphot run: unexpected AttributeError: 'NoneType' object has no attribute 'shape'\nthe traceback is in {log}\n"
    assert "Traceback (most recent call last)" in log.read_text()


@pytest.mark.slow
def test_a_dead_kernel_names_the_notebook(tmp_path, capsys):
    dies = write_notebooks(tmp_path / "dies", (PASS, "```{code-cell} ipython3\nimport os\nos._exit(1)\n```\n", PASS, PASS))
    assert run(tmp_path, dies) == 1
    printed = capsys.readouterr().err
    assert printed.startswith("mbphot run: notebook 02_photometry stopped: DeadKernelError")
    assert "run the same command again to resume" in printed and "Traceback" not in printed


# ---- archive endpoints: checked up front, part of the field's and the run's names -------------


@pytest.mark.parametrize("text, message", [
    ('{"mast": "ftp://mirror"}', "endpoint mast='ftp://mirror' must be an http(s) URL"),
    ('{"mastt": "https://mirror.example.org"}', "unknown endpoint setting(s) mastt"),
])
def test_endpoint_file_mistakes_stop_the_run_before_any_notebook(tmp_path, capsys, monkeypatch, text, message):
    monkeypatch.setenv(ENDPOINTS_ENV, "")  # unset, and restored after the test: main() sets it
    (tmp_path / "endpoints.json").write_text(text)
    assert run(tmp_path, "no-such-notebooks", "--data-source", "archive", "--endpoints", str(tmp_path / "endpoints.json")) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "output").exists() and not (tmp_path / "data").exists()


def test_other_endpoints_name_another_archive_field_and_run(tmp_path, monkeypatch):
    monkeypatch.setenv(ENDPOINTS_ENV, "")  # unset, and restored after the test: main() sets it
    real = RunParameters(data_source="archive")
    real_field, real_run = real.field_tag, real.run_tag  # the names follow the endpoints in effect
    assert real_field == "ra150.0100_dec+2.2000_r3" and real_run.endswith("_all_archive_mbphot-scene")
    (tmp_path / "mirror.yaml").write_text("mast: https://mirror.example.org\ntimeout_s: 5\n")
    monkeypatch.setenv(ENDPOINTS_ENV, str(tmp_path / "mirror.yaml"))
    mirror = RunParameters(data_source="archive")
    assert mirror.field_tag.startswith("ra150.0100_dec+2.2000_r3_e") and mirror.field_tag != real_field
    assert mirror.run_tag.endswith("_all_archive_e" + mirror.field_tag[-8:] + "_mbphot-scene")
    (tmp_path / "slow.yaml").write_text("timeout_s: 5\n")  # a timeout does not change the data
    monkeypatch.setenv(ENDPOINTS_ENV, str(tmp_path / "slow.yaml"))
    assert RunParameters(data_source="archive").field_tag == real_field


def test_a_parameter_file_may_name_the_endpoints_file(tmp_path):
    (tmp_path / "p.yaml").write_text("ra: 150.2\nendpoints: mirror.yaml\n")
    assert read_parameter_file(tmp_path / "p.yaml")["endpoints"] == str(tmp_path / "mirror.yaml")
