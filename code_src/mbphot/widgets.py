"""An ipywidgets control panel: choose a selection, press Run, see the results in place.

The panel re-runs retrieval and photometry for the radius, bands, data source and engine
chosen in it, then shows the number of sources, the band overview table and the flux
comparison with COSMOS2015. Nothing runs until Run is pressed, so a notebook that only
displays the panel runs headless (papermill) as fast as before. Work done before is reused:
`mbphot.retrieve` keeps each simulated field and `mbphot.measure_field` each measured band,
so returning to an earlier selection takes a fraction of a second.

Examples
--------
In a notebook, after building ``params``:

>>> from mbphot.widgets import control_panel
>>> panel = control_panel(params)  # doctest: +SKIP
>>> panel  # doctest: +SKIP

Without a browser (as the tests do), set the widgets and call `ControlPanel.run`:

>>> panel.radius_slider.value = 1.5  # doctest: +SKIP
>>> photometry = panel.run()  # doctest: +SKIP
"""

import dataclasses
import html
import io
import time

import ipywidgets as widgets
import pandas as pd

from .bands import BAND_NAMES
from .params import DATA_SOURCES, ENGINES, RunParameters
from .photometry import band_overview, measure_field
from .plots import flux_validation
from .retrieve import retrieve

__all__ = ["ControlPanel", "control_panel"]

RADIUS_MIN_ARCMIN = 0.5
RADIUS_MAX_ARCMIN = 6.0
RADIUS_STEP_ARCMIN = 0.5
FIGURE_DPI = 80
"""Enough for the panel's width; a six-band figure stays under about 200 kB."""
STEPS = ("checking the selection", "retrieving the field", "measuring", "plotting")
USER_ERRORS = (ValueError, TypeError, NotImplementedError)
"""What a bad selection raises (`RunParameters` validation, a data source not yet
available): shown in the panel's status line instead of as a traceback."""


class ControlPanel(widgets.VBox):
    """The control panel widget and the state of its last run.

    Parameters
    ----------
    params : RunParameters
        The starting selection. Radius, bands, data source and engine can be changed in the
        panel; everything else (centre, seed, mode, workers, folders) is taken from here.
    radius_max_arcmin : float
        Upper end of the radius slider (raised to ``params.radius_arcmin`` if that is larger).

    Attributes
    ----------
    radius_slider : ipywidgets.FloatSlider
        Field radius in arcmin.
    band_select : ipywidgets.SelectMultiple
        Bands to measure.
    data_source_dropdown, engine_dropdown : ipywidgets.Dropdown
        Data source and photometry engine.
    run_button : ipywidgets.Button
        Runs `run`.
    progress : ipywidgets.IntProgress
        One step per stage of a run (see `STEPS`); green when done, red on a bad selection.
    status : ipywidgets.HTML
        What the panel is doing, or why the selection cannot run.
    summary : ipywidgets.HTML
        The source count of the last run, its selection and its wall time.
    overview : ipywidgets.HTML
        `mbphot.photometry.band_overview` of the last run as a table.
    figure : ipywidgets.Image
        `mbphot.plots.flux_validation` of the last run as a PNG.
    messages : ipywidgets.Output
        The photometry's own progress bar, and a traceback if a run fails unexpectedly.
    photometry : pandas.DataFrame or None
        The photometry of the last successful run (`mbphot.measure_field`'s table).
    """

    def __init__(self, params: RunParameters, radius_max_arcmin: float = RADIUS_MAX_ARCMIN):
        self.params = params
        self.photometry: pd.DataFrame | None = None
        wide_label = {"description_width": "initial"}
        self.radius_slider = widgets.FloatSlider(
            value=params.radius_arcmin,
            min=RADIUS_MIN_ARCMIN,
            max=max(radius_max_arcmin, params.radius_arcmin),
            step=RADIUS_STEP_ARCMIN,
            description="radius (arcmin)",
            continuous_update=False,
            readout_format=".1f",
            style=wide_label,
        )
        self.band_select = widgets.SelectMultiple(
            options=BAND_NAMES, value=tuple(params.bands), rows=len(BAND_NAMES), description="bands"
        )
        self.data_source_dropdown = widgets.Dropdown(
            options=DATA_SOURCES, value=params.data_source, description="data source", style=wide_label
        )
        self.engine_dropdown = widgets.Dropdown(options=ENGINES, value=params.engine, description="engine")
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.progress = widgets.IntProgress(value=0, min=0, max=len(STEPS), description="progress")
        self.status = widgets.HTML("Choose a selection and press <b>Run</b>.")
        self.summary = widgets.HTML()
        self.overview = widgets.HTML()
        self.figure = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        self.messages = widgets.Output()
        self.run_button.on_click(self._on_click)
        choices = widgets.VBox([self.radius_slider, self.data_source_dropdown, self.engine_dropdown, self.run_button])
        super().__init__(
            [
                widgets.HBox([choices, self.band_select]),
                widgets.HBox([self.progress, self.status]),
                self.summary,
                self.overview,
                self.figure,
                self.messages,
            ]
        )
        # Class names let a browser test find the parts of the panel in the page.
        for widget, name in ((self, "panel"), (self.summary, "summary"), (self.overview, "overview"),
                             (self.figure, "figure"), (self.status, "status")):
            widget.add_class(f"mbphot-{name}")

    def selection(self) -> RunParameters:
        """The run parameters the panel's widgets select.

        Raises
        ------
        ValueError, TypeError
            From `RunParameters` validation, e.g. no band selected or an engine that is not
            installed; the message says what to choose instead.
        """
        return dataclasses.replace(
            self.params,
            radius_arcmin=self.radius_slider.value,
            bands=list(self.band_select.value),
            data_source=self.data_source_dropdown.value,
            engine=self.engine_dropdown.value,
        )

    def run(self) -> pd.DataFrame | None:
        """Retrieve and measure the current selection and show the results in the panel.

        Returns
        -------
        pandas.DataFrame or None
            The photometry (also kept as `photometry`), or None if the selection cannot run;
            the status line then says why and the results of the previous run stay.
        """
        started_s = time.perf_counter()
        self.run_button.disabled = True
        self.progress.bar_style = "info"
        self.messages.clear_output()
        try:
            self._step(0)
            params = self.selection()
            self._step(1)
            manifest = retrieve(params)
            self._step(2)
            with self.messages:
                photometry = measure_field(
                    manifest, params.bands, n_workers=params.n_workers, engine=params.engine, mode=params.mode
                )
            self._step(3)
            note = self._show(params, photometry, started_s)
        except USER_ERRORS as error:
            self.progress.bar_style = "danger"
            self.status.value = f'<span style="color: #b00">{html.escape(str(error))}</span>'
            return None
        finally:
            self.run_button.disabled = False
        self.progress.value = len(STEPS)
        self.progress.bar_style = "success"
        self.status.value = f"Done.{note}"
        self.photometry = photometry
        return photometry

    def _on_click(self, _button) -> None:
        # A button callback's exceptions would otherwise land only in JupyterLab's log
        # console; inside the messages widget they show in the notebook.
        with self.messages:
            self.run()

    def _step(self, index: int) -> None:
        self.progress.value = index
        self.status.value = f"{STEPS[index]}…"

    def _show(self, params: RunParameters, photometry: pd.DataFrame, started_s: float) -> str:
        """Fill in the results of a run started at ``started_s`` (`time.perf_counter`); returns
        a note for the status line."""
        overview = band_overview(photometry, params.bands).reset_index()
        buffer = io.BytesIO()
        try:
            flux_validation(photometry, params.bands).savefig(buffer, format="png", dpi=FIGURE_DPI)
            note = ""
        except ValueError as error:
            # Your own files' catalogue may have no COSMOS2015 flux to compare with.
            note = f" No flux comparison: {html.escape(str(error))}"
        self.summary.value = (
            f"<b>{len(photometry)} sources</b> within {params.radius_arcmin:g}′ of "
            f"RA {params.ra:.4f}°, Dec {params.dec:+.4f}° · bands {', '.join(params.bands)} · "
            f"{params.data_source} data, {params.engine} engine · {time.perf_counter() - started_s:.1f} s"
        )
        # JupyterLab's class for rendered HTML gives the table the look of a DataFrame output;
        # the shrink-wrapped box keeps it at the left edge, under the controls.
        self.overview.value = (
            '<div class="jp-RenderedHTMLCommon" style="display: inline-block; padding-left: 0">'
            f'{overview.to_html(index=False, border=0, float_format="{:.3g}".format)}</div>'
        )
        self.figure.value = buffer.getvalue()
        return note


def control_panel(params: RunParameters, radius_max_arcmin: float = RADIUS_MAX_ARCMIN) -> ControlPanel:
    """A control panel for a notebook: display the returned widget to use it.

    Parameters
    ----------
    params : RunParameters
        The starting selection (see `ControlPanel`).
    radius_max_arcmin : float
        Upper end of the radius slider.

    Returns
    -------
    ControlPanel
        An ``ipywidgets.VBox``; its ``photometry`` holds the last run's table.
    """
    return ControlPanel(params, radius_max_arcmin=radius_max_arcmin)
