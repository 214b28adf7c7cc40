"""The control panel driven from Python: set the widgets, run, check what the panel shows."""

import html
import re
import time

import pytest

from mbphot.engine.tractor import tractor_available
from mbphot.manifest import Manifest
from mbphot.params import RunParameters
from mbphot.photometry import band_overview
from mbphot.retrieve import load_catalog
from mbphot.widgets import STEPS, ControlPanel, control_panel

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    """A small field in a folder shared by this module's tests, so each field is made once."""
    return RunParameters(
        radius_arcmin=1.0, bands="irac1,irac2", n_workers=1, realism="ideal", data_dir=str(tmp_path_factory.mktemp("data"))
    )


def shown_count(panel: ControlPanel) -> int:
    return int(re.search(r"<b>(\d+) sources</b>", panel.summary.value).group(1))


def test_panel_starts_from_the_parameters_and_runs_nothing(params):
    panel = control_panel(params)
    assert isinstance(panel, ControlPanel)
    assert panel.radius_slider.value == 1.0
    assert panel.band_select.value == ("irac1", "irac2")
    assert panel.data_source_dropdown.value == "sample"
    assert panel.engine_dropdown.value == "mbphot"
    assert panel.summary.value == "" and panel.figure.value == b"" and panel.photometry is None
    assert "press <b>Run</b>" in panel.status.value


def test_selection_changes_only_what_the_panel_offers(params):
    panel = control_panel(params)
    panel.radius_slider.value = 2.5
    panel.band_select.value = ("irac2", "nuv")
    selection = panel.selection()
    assert selection.radius_arcmin == 2.5 and selection.bands == ["irac2", "nuv"]
    assert (selection.ra, selection.dec, selection.seed, selection.mode, selection.data_dir) == (
        params.ra, params.dec, params.seed, params.mode, params.data_dir
    )
    assert params.radius_arcmin == 1.0, "the notebook's parameters are left alone"


def test_run_shows_count_table_and_figure_and_the_slider_changes_them(params):
    panel = control_panel(params)
    photometry = panel.run()
    manifest = Manifest.load(params.manifest_path)
    assert shown_count(panel) == len(photometry) == load_catalog(manifest)["in_field"].sum()
    assert panel.photometry is photometry
    overview = band_overview(photometry, ["irac1", "irac2"])
    for band in ("irac1", "irac2"):
        assert f"<td>{band}</td>" in panel.overview.value
        assert f"<td>{overview.loc[band, 'S/N > 10']}</td>" in panel.overview.value
    assert "nuv" not in panel.overview.value
    assert bytes(panel.figure.value).startswith(PNG_SIGNATURE)
    assert panel.progress.value == len(STEPS) and panel.progress.bar_style == "success"
    count_before, figure_before = shown_count(panel), bytes(panel.figure.value)

    panel.radius_slider.value = 1.5
    wider = panel.run()
    # The area grows by 2.25; a 1.5' simulated field is a new random draw, so allow scatter.
    assert 1.8 < shown_count(panel) / count_before < 2.7
    assert shown_count(panel) == len(wider)
    assert "within 1.5′" in panel.summary.value
    assert bytes(panel.figure.value).startswith(PNG_SIGNATURE) and bytes(panel.figure.value) != figure_before


def test_clicking_run_runs_and_a_second_click_reuses_the_work(params):
    panel = control_panel(params)
    panel.band_select.value = ("irac1",)
    started_s = time.perf_counter()
    panel.run_button.click()
    first_s = time.perf_counter() - started_s
    assert shown_count(panel) > 0 and "bands irac1 ·" in panel.summary.value
    first_table = panel.photometry

    started_s = time.perf_counter()
    panel.run_button.click()
    second_s = time.perf_counter() - started_s
    # The field and the band's fluxes come from disk: no simulation, no fitting.
    assert second_s < 2.0, f"second click took {second_s:.1f} s (first {first_s:.1f} s)"
    assert panel.photometry is not first_table
    assert panel.photometry.equals(first_table)
    assert not panel.run_button.disabled


@pytest.mark.parametrize(
    "change, parameter",
    [
        ({"band_select": ()}, "bands"),
        ({"data_source_dropdown": "files"}, "files_manifest"),  # the notebook's parameters name no files
    ],
)
def test_a_bad_selection_says_why_and_keeps_the_last_results(params, change, parameter):
    panel = control_panel(params)
    panel.run()
    summary, figure = panel.summary.value, bytes(panel.figure.value)
    for name, value in change.items():
        getattr(panel, name).value = value
    with pytest.raises(ValueError, match=parameter) as expected:
        panel.selection()
    assert panel.run() is None
    assert html.escape(str(expected.value)) in panel.status.value
    assert panel.progress.bar_style == "danger"
    assert (panel.summary.value, bytes(panel.figure.value)) == (summary, figure)
    assert not panel.run_button.disabled


def test_tractor_without_tractor_says_how_to_install(params):
    if tractor_available():
        pytest.skip("The Tractor is installed here")
    panel = control_panel(params)
    panel.engine_dropdown.value = "tractor"
    assert panel.run() is None
    assert "github.com/dstndstn/tractor" in panel.status.value
