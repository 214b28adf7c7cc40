"""The control panel in a real browser: JupyterLab, headless Chromium, Playwright.

The test starts JupyterLab on a free local port with a token, opens the photometry notebook
(converted from MyST with jupytext and given a small field's parameters, as `mbphot run`
does), runs all its cells, presses Run in the panel, moves the radius slider, presses Run
again and checks that the source count and the figure the browser shows have changed.
Screenshots of the panel before and after go to ``output/widgets/``.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jupytext
import nbformat
import pytest
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook
from playwright.sync_api import expect, sync_playwright

from mbphot.params import RunParameters
from mbphot.retrieve import retrieve

REPO_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT_DIR = REPO_ROOT / "output" / "widgets"
NOTEBOOK = "02_photometry"
CHROMIUM = next(
    (path for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if path), None
)
# A closed network refuses Chromium's background connections, many at a time; these flags
# keep it from trying.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SERVER_START_TIMEOUT_S = 90
NOTEBOOK_RUN_TIMEOUT_MS = 120_000
PANEL_RUN_TIMEOUT_MS = 60_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium on PATH (chromium, chromium-browser or google-chrome): "
        "install Debian's 'chromium', as ci/test.sh does",
    ),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def notebook_root(tmp_path_factory):
    """A folder holding the photometry notebook, parameterised for a 1' field whose files
    notebook 01 would have retrieved (retrieved here directly)."""
    work = tmp_path_factory.mktemp("browser")
    params = RunParameters(
        radius_arcmin=1.0, bands="irac1,irac2", n_workers=1, realism="ideal",
        data_dir=str(work / "data"), output_dir=str(work / "output"),
    )
    retrieve(params)
    root = work / "notebooks"
    root.mkdir()
    path = root / f"{NOTEBOOK}.ipynb"
    jupytext.write(jupytext.read(REPO_ROOT / "notebooks" / f"{NOTEBOOK}.md"), path)
    notebook = parameterize_notebook(
        load_notebook_node(str(path)),
        {"radius_arcmin": params.radius_arcmin, "bands": params.bands, "n_workers": params.n_workers,
         "realism": params.realism, "data_dir": params.data_dir, "output_dir": params.output_dir},
    )
    nbformat.write(notebook, path)
    return root


@pytest.fixture(scope="module")
def jupyterlab(notebook_root):
    """JupyterLab serving ``notebook_root``; yields its base URL and token."""
    port, token = free_port(), secrets.token_hex(16)
    state = notebook_root.parent / "jupyter"
    # Private config, data, runtime, settings and workspace folders: nothing from the user's
    # own Jupyter setup leaks in, and nothing is left behind.
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "JUPYTER_CONFIG_DIR": str(state / "config"),
        "JUPYTER_DATA_DIR": str(state / "data"),
        "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(state / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces"),
    }
    log_path = state / "server.log"
    # No toast notifications (JupyterLab asks whether to fetch news), which would cover the panel.
    notification_settings = state / "settings" / "@jupyterlab" / "apputils-extension"
    notification_settings.mkdir(parents=True)
    (notification_settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True})
    )
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [
                sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={notebook_root}", "--LabApp.news_url=None",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                "--LabApp.extension_manager=readonly", "--allow-root",
            ],
            env=environment, stdout=log, stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{base_url}/api/status?token={token}", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start; its log:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield base_url, token
    finally:
        # SIGINT asks twice for confirmation; SIGTERM shuts the kernels down and exits.
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def image_bytes(locator) -> bytes:
    """The bytes of the PNG an ``<img>`` shows (ipywidgets serves it from a blob URL)."""
    values = locator.evaluate("async img => Array.from(new Uint8Array(await (await fetch(img.src)).arrayBuffer()))")
    return bytes(values)


def test_panel_in_jupyterlab_updates_count_and_figure(jupyterlab):
    base_url, token = jupyterlab
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.goto(f"{base_url}/lab/tree/{NOTEBOOK}.ipynb?token={token}")
            # Running cells before the kernel is connected would open a kernel chooser instead.
            kernel_idle = page.get_by_text("Python 3 (ipykernel) | Idle")
            expect(kernel_idle).to_be_visible(timeout=NOTEBOOK_RUN_TIMEOUT_MS)

            page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
            panel = page.locator(".mbphot-panel")
            expect(panel).to_be_visible(timeout=NOTEBOOK_RUN_TIMEOUT_MS)
            expect(kernel_idle).to_be_visible(timeout=NOTEBOOK_RUN_TIMEOUT_MS)
            summary, figure = panel.locator(".mbphot-summary"), panel.locator(".mbphot-figure")
            expect(panel.locator(".mbphot-status")).to_contain_text("press Run")

            run_button = panel.get_by_role("button", name="Run")
            run_button.click()
            expect(summary).to_contain_text("sources within 1′", timeout=PANEL_RUN_TIMEOUT_MS)
            expect(panel.locator(".mbphot-status")).to_have_text("Done.")
            count_before = summary.inner_text()
            figure_before = image_bytes(figure)
            panel.screenshot(path=SCREENSHOT_DIR / "panel_before.png")

            # One arrow-key step on the slider's handle moves it by its step, 0.5 arcmin.
            panel.locator(".widget-slider .noUi-handle").press("ArrowRight")
            expect(panel.locator(".widget-slider .widget-readout")).to_have_text("1.5")
            run_button.click()
            expect(summary).to_contain_text("sources within 1.5′", timeout=PANEL_RUN_TIMEOUT_MS)
            expect(panel.locator(".mbphot-status")).to_have_text("Done.")
            count_after = summary.inner_text()
            figure_after = image_bytes(figure)
            panel.screenshot(path=SCREENSHOT_DIR / "panel_after.png")
        finally:
            browser.close()

    sources_before = int(re.search(r"(\d+) sources", count_before).group(1))
    sources_after = int(re.search(r"(\d+) sources", count_after).group(1))
    assert sources_after > sources_before > 0
    assert figure_before.startswith(PNG_SIGNATURE) and figure_after.startswith(PNG_SIGNATURE)
    assert figure_after != figure_before
    for name in ("panel_before.png", "panel_after.png"):
        assert (SCREENSHOT_DIR / name).read_bytes().startswith(PNG_SIGNATURE)
