"""The executed notebooks hold their figures as PNG images, not as ``<Figure ...>`` text."""

import subprocess
import sys

import nbformat
import pytest

NOTEBOOKS = ("01_retrieve", "02_photometry", "03_crossmatch", "04_plots")
FIGURES_IN_04 = 5
"""Figure cells of 04_plots on the simulated field (which has the truth)."""


def figure_outputs(notebook_path):
    """(PNG outputs, outputs whose only rich form is a ``<...Figure ...>`` text) of a notebook."""
    notebook = nbformat.read(notebook_path, as_version=4)
    png, text_only = 0, []
    for cell in notebook.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            data = output.get("data", {})
            if "image/png" in data:
                png += 1
            elif "Figure size" in str(data.get("text/plain", "")):
                text_only.append(data["text/plain"])
    return png, text_only


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    work = tmp_path_factory.mktemp("figures")
    result = subprocess.run(
        [sys.executable, "-m", "mbphot", "run", "--no-progress", "--radius", "0.75", "--seed", "3", "--realism", "ideal",
         "--data-dir", "data", "--output-dir", "output"],
        cwd=work, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "output" / "notebooks"


@pytest.mark.slow
def test_every_figure_in_the_executed_notebooks_is_a_png(executed):
    for name in NOTEBOOKS:
        png, text_only = figure_outputs(executed / f"{name}.ipynb")
        assert not text_only, f"{name}: figures stored as text only: {text_only}"
    png, _ = figure_outputs(executed / "04_plots.ipynb")
    assert png >= FIGURES_IN_04


@pytest.mark.slow
def test_every_column_of_the_pipeline_catalogue_is_described_by_the_schema(executed):
    from astropy.table import Table

    from mbphot.schema import known_columns

    table = Table.read(executed.parent / "catalog" / "multiband_catalog.parquet")
    assert [name for name in table.colnames if name not in known_columns()] == []
