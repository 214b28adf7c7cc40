"""The package as a user gets it: build the wheel, install it into a fresh venv, run a field.

Needs the package index (pip installs the declared dependencies); without it the test skips,
saying so. It takes about 5 minutes on a 2-core machine (3 of them installing the
dependencies), so it runs only when asked: ``MBPHOT_TEST_WHEEL=1 pytest tests/test_wheel.py``.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mbphot.cli import NOTEBOOKS

REPO = Path(__file__).resolve().parents[1]
SOURCE_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE")
WHEEL_TEST_ENV = "MBPHOT_TEST_WHEEL"
pytestmark = pytest.mark.skipif(
    not os.environ.get(WHEEL_TEST_ENV),
    reason=f"builds the wheel and installs it with its dependencies into a fresh venv (about 5 min); "
           f"set {WHEEL_TEST_ENV}=1 to run it",
)
NETWORK_ERRORS = ("Could not find a version", "NewConnectionError", "Temporary failure in name resolution",
                  "No matching distribution", "ConnectionError", "Network is unreachable")


def _run(command, cwd, env, timeout=900):
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _clean_env(venv: Path | None = None) -> dict:
    # No PYTHONPATH: the installed package, not this checkout, must be what runs.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    # Build from a copy, so that the build leaves nothing in the checkout.
    source = work / "source"
    source.mkdir()
    for name in SOURCE_FILES:
        shutil.copy2(REPO / name, source / name)
    for folder in ("code_src", "notebooks"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = _clean_env()
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", work / "dist", source],
                 cwd=work, env=env)
    if built.returncode != 0 and any(error in built.stderr for error in NETWORK_ERRORS):
        pytest.skip(f"cannot reach the package index to build the wheel: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((work / "dist").glob("mbphot-*.whl"))

    venv = work / "venv"
    assert _run([sys.executable, "-m", "venv", venv], cwd=work, env=env).returncode == 0
    pip = _run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel],
               cwd=work, env=env, timeout=1800)
    if pip.returncode != 0 and any(error in pip.stderr for error in NETWORK_ERRORS):
        pytest.skip(f"cannot reach the package index to install the dependencies: {pip.stderr[-300:]}")
    assert pip.returncode == 0, pip.stderr[-3000:]
    return wheel, venv, work


@pytest.mark.slow
def test_wheel_holds_the_notebooks_and_the_licence(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for name in NOTEBOOKS:
        assert f"mbphot/notebooks/{name}.md" in names
    assert any(name.endswith("licenses/LICENSE") for name in names)
    metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: BSD-3-Clause" in text
    for extra in ("dask", "test", "browser"):
        assert f"Provides-Extra: {extra}" in text


@pytest.mark.slow
def test_installed_package_copies_its_notebooks_and_runs_a_field(installed):
    _, venv, work = installed
    env = _clean_env(venv)
    mbphot = venv / "bin" / "mbphot"
    assert _run([mbphot, "--help"], cwd=work, env=env).returncode == 0

    copied = _run([mbphot, "notebooks", work / "my_notebooks"], cwd=work, env=env)
    assert copied.returncode == 0, copied.stderr
    assert sorted(p.stem for p in (work / "my_notebooks").glob("*.md")) == list(NOTEBOOKS)

    run = _run([mbphot, "run", "--no-progress", "--radius", "0.5", "--realism", "ideal", "--data-dir", "data", "--output-dir", "output"],
               cwd=work, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "output" / "catalog" / "multiband_catalog.fits").is_file()
    for name in NOTEBOOKS:
        assert (work / "output" / "notebooks" / f"{name}.ipynb").is_file()
    plots = (work / "output" / "notebooks" / "04_plots.ipynb").read_text()
    assert '"image/png"' in plots
