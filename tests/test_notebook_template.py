"""The notebooks keep the Fornax template: the same ``parameters`` cell first, the template's
sections, a dated runtime with the server's size, an install cell, and the kernel the README
names."""

import ast
import re
from pathlib import Path

import jupytext
import pytest

from mbphot.cli import NOTEBOOKS
from mbphot.params import PARAMETER_NAMES

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
README = FOLDER.parent / "README.md"
HEADINGS = ("## Learning goals", "## Introduction", "## Summary", "## About this notebook", "### References")
ITEMS = ("**Input:**", "**Output:**", "**Authors:**", "**Contact:**", "**Acknowledgements:**")
RUNTIME = re.compile(r"\*\*Runtime:\*\* as of \d{1,2} [A-Z][a-z]+ \d{4}, about \d+ s\b.*?\d+ CPU cores\s+and\s+\d+ GB RAM", re.S)
BIBCODE_LINK = re.compile(r"\[\d{4}[^\]]{15}\]\(https://ui\.adsabs\.harvard\.edu/abs/")


def first_code_cell(name):
    notebook = jupytext.read(FOLDER / f"{name}.md")
    return next(cell for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_first_code_cell_sets_every_parameter_in_order(name):
    cell = first_code_cell(name)
    assert "parameters" in cell.metadata.get("tags", [])
    assigned = [target.id for statement in ast.parse(cell.source).body for target in statement.targets]
    assert tuple(assigned) == PARAMETER_NAMES


def test_the_four_parameters_cells_are_the_same():
    assert len({first_code_cell(name).source for name in NOTEBOOKS}) == 1


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_notebook_has_the_template_sections_and_a_dated_runtime(name):
    text = (FOLDER / f"{name}.md").read_text()
    assert [heading for heading in HEADINGS if f"\n{heading}\n" not in text] == []
    assert [item for item in ITEMS if item not in text] == []
    assert RUNTIME.search(text), "the Runtime line needs a date, a time in seconds and the server's CPUs and RAM"
    assert BIBCODE_LINK.search(text), "the references need ADS bibcodes"


def test_the_first_notebook_offers_an_install_cell():
    sources = [cell.source for cell in jupytext.read(FOLDER / f"{NOTEBOOKS[0]}.md").cells if cell.cell_type == "code"]
    assert any("%pip install" in source for source in sources)


def test_the_notebooks_kernel_is_the_one_the_readme_names():
    kernels = {jupytext.read(FOLDER / f"{name}.md").metadata["kernelspec"]["name"] for name in NOTEBOOKS}
    assert len(kernels) == 1
    assert f"`{kernels.pop()}` kernel" in README.read_text()
