"""Diagnostic figures for the multiband forced-photometry catalogue.

Each figure function takes the science catalogue (one row per source) and returns a
figure built without pyplot, so it works headless (Agg) and in scripts without piling up
pyplot's global figures in long runs. The figures are `InlineFigure` objects: a
`matplotlib.figure.Figure` that IPython displays as a PNG, so a figure that is a cell's last
expression (or is passed to ``IPython.display.display``) shows inline in Jupyter and is
stored as ``image/png`` in notebooks executed headless by papermill.

Text sizes are set for slides: a figure keeps its fonts legible when shown full width on a
16:9 slide. Every figure says which sources it shows (flag, S/N cut) in its title or legend.

Catalogue columns used
----------------------
``id``
    Source identifier.
``<band>_flux_ujy``, ``<band>_flux_err_ujy``, ``<band>_flag``
    Measured flux and 1-sigma error in microJy (NaN where not measured) and quality flag
    (0 = good). A band is used only when all three columns are present.
``BANDS[band].catalog_flux_column``
    COSMOS2015 flux in microJy. Non-finite values and the catalogue's sentinels
    (<= -90, e.g. -99) mean "missing".
``chandra_match``, ``hardness_ratio``
    Chandra counterpart flag and X-ray hardness ratio in [-1, 1] (NaN when unmatched, or
    when one X-ray band has no detection).
``type``
    COSMOS2015 type (1 = star), used to mark stars where present.

A source is *detected* in a band when its flag is 0 and its measured flux / error > 3.
"""

import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.ticker import NullFormatter
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .bands import BANDS, IRAC_BANDS, measured_columns, parse_bands
from .io import atomic_path
from .schema import AB_ZEROPOINT_UJY, flag_names

__all__ = [
    "SNR_MIN",
    "band_label",
    "InlineFigure",
    "flux_comparison",
    "flux_pulls",
    "flux_validation",
    "irac_colors",
    "irac_color_color",
    "uv_ir_colors",
    "uv_ir_color",
    "save_figure",
]

SNR_MIN = 3.0
CATALOG_MISSING_AT_OR_BELOW = -90.0
PULL_CORE_LIMIT = 5.0
PULL_HISTOGRAM_LIMIT = 6.0
SAVE_DPI = 120
DISPLAY_DPI = 100
PANEL_SIZE_INCH = 3.2
SLIDE_PANEL_INCH = 4.3
SLIDE_COLUMNS = 3

# Font sizes in points, for figures about 13 inches wide shown on a slide.
TITLE_SIZE = 16
LABEL_SIZE = 14
TICK_SIZE = 12
TEXT_SIZE = 12

# Lacy et al. (2004), ApJS 154, 166: mid-IR AGN selection in log10(F5.8/F3.6) vs
# log10(F8.0/F4.5).
LACY_X_MIN = -0.1
LACY_Y_MIN = -0.2
LACY_SLOPE = 0.8
LACY_INTERCEPT = 0.5

UV_IR_BANDS = ("fuv", "nuv", "irac1")
HARDNESS_COLORMAP = "RdBu_r"

_ANNOTATION_BOX = {"boxstyle": "round,pad=0.3", "facecolor": "white", "alpha": 0.8, "lw": 0}
GOOD_COLOR = "C0"
FLAGGED_COLOR = "C1"
STAR_TYPE = 1
"""COSMOS2015 ``type`` of a star."""

LACY_CONTAMINATION_NOTE = (
    "The wedge selects AGN candidates, not AGN: star-forming galaxies at z ~ 1-2\n"
    "and faint, noisy sources also scatter into it (Donley et al. 2012)."
)


class InlineFigure(Figure):
    """A `matplotlib.figure.Figure` that IPython and Jupyter display as a PNG.

    Figures made without pyplot have no display hook: Jupyter would show only
    ``<Figure size ... with N Axes>``. This one renders itself with `_repr_png_`, at
    `DISPLAY_DPI`, so it shows inline by hand and under papermill, without pyplot keeping
    a reference to it. A figure just written by `save_figure` and not changed since shows
    the very image that was saved, without drawing it again.
    """

    _saved_png = None

    def _repr_png_(self) -> bytes:
        if self._saved_png is not None and not self.stale:
            return self._saved_png
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=DISPLAY_DPI)
        return buffer.getvalue()


def _new_figure(size) -> InlineFigure:
    return InlineFigure(figsize=size, layout="constrained")


def _finish(fig: Figure) -> Figure:
    """Slide-sized tick labels and axis labels on every axes of ``fig``."""
    for ax in fig.axes:
        ax.tick_params(labelsize=TICK_SIZE)
        ax.xaxis.label.set_size(LABEL_SIZE)
        ax.yaxis.label.set_size(LABEL_SIZE)
        ax.title.set_size(LABEL_SIZE)
    return fig


def _flux_column(band: str) -> str:
    return measured_columns(band)[0]


def _flux_err_column(band: str) -> str:
    return measured_columns(band)[1]


def _flag_column(band: str) -> str:
    return measured_columns(band)[2]


def _true_flux_column(band: str) -> str:
    return f"true_{band}_flux_ujy"


def _measured_columns(band: str) -> list[str]:
    return list(measured_columns(band))


def _missing_columns(table: pd.DataFrame, columns: list[str]) -> list[str]:
    return [column for column in columns if column not in table.columns]


def _has_measurement(table: pd.DataFrame, band: str) -> bool:
    return not _missing_columns(table, _measured_columns(band))


def _as_float(column: pd.Series) -> np.ndarray:
    # na_value makes nullable (pd.NA) columns usable as plain float arrays.
    return column.to_numpy(dtype=float, na_value=np.nan)


def band_label(band: str) -> str:
    """The band as a figure names it, e.g. ``IRAC 3.6 µm`` or ``GALEX NUV (231 nm)``."""
    spec = BANDS[band]
    if spec.instrument == "IRAC":
        return f"IRAC {spec.wavelength_um:.1f} µm"
    return f"GALEX {band.upper()} ({spec.wavelength_um * 1e3:.0f} nm)"


def _good_flag(table: pd.DataFrame, band: str) -> np.ndarray:
    return table[_flag_column(band)].eq(0).to_numpy(dtype=bool, na_value=False)


def _usable_error(table: pd.DataFrame, band: str) -> np.ndarray:
    error = _as_float(table[_flux_err_column(band)])
    return np.isfinite(error) & (error > 0)


def _detected(table: pd.DataFrame, band: str) -> np.ndarray:
    """Flag 0, finite positive error and measured flux / error > `SNR_MIN`."""
    flux = _as_float(table[_flux_column(band)])
    error = _as_float(table[_flux_err_column(band)])
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = flux / error
    return _good_flag(table, band) & _usable_error(table, band) & (snr > SNR_MIN)


def _catalog_flux(table: pd.DataFrame, band: str) -> np.ndarray:
    """COSMOS2015 flux in microJy with sentinels and non-finite values as NaN."""
    flux = _as_float(table[BANDS[band].catalog_flux_column])
    with np.errstate(invalid="ignore"):
        present = np.isfinite(flux) & (flux > CATALOG_MISSING_AT_OR_BELOW)
    return np.where(present, flux, np.nan)


def _ab_magnitude(flux_ujy: np.ndarray) -> np.ndarray:
    return AB_ZEROPOINT_UJY - 2.5 * np.log10(flux_ujy)


def _annotate(ax, lines: list[str], size=TEXT_SIZE) -> None:
    ax.text(0.04, 0.96, "\n".join(lines), transform=ax.transAxes, va="top", ha="left",
            fontsize=size, bbox=_ANNOTATION_BOX)


def _mark_empty(ax, message: str) -> None:
    # Keep the axes (so the grid layout stays predictable) but say why it is blank.
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center",
            fontsize=TEXT_SIZE, color="0.3", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _figure_or_missing(catalog, size, title, required):
    """A one-panel figure; when columns are missing, the panel names them."""
    fig = _new_figure(size)
    ax = fig.add_subplot()
    missing = _missing_columns(catalog, required)
    if missing:
        ax.set_title(f"{title}: not available")
        _mark_empty(ax, "missing columns:\n" + "\n".join(missing))
    return fig, ax, missing


def _snr(table: pd.DataFrame, band: str) -> np.ndarray:
    flux = _as_float(table[_flux_column(band)])
    error = _as_float(table[_flux_err_column(band)])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(_usable_error(table, band), flux / error, np.nan)


def _flag_values(table: pd.DataFrame, band: str) -> np.ndarray:
    return table[_flag_column(band)].to_numpy(dtype=float, na_value=0).astype(np.int64)


def _flag_bits_label(flags: np.ndarray) -> str:
    """``"bits 4 partial_coverage, 16 blended"``: the flag bits set among ``flags``."""
    combined = int(np.bitwise_or.reduce(flags)) if flags.size else 0
    names = flag_names(combined)
    if not names:
        return "flag ≠ 0"
    from .engine.solve import FLAGS

    return "flag ≠ 0: " + ", ".join(f"{FLAGS[name]} {name}" for name in names)


def _plot_flux_comparison(ax, measured: np.ndarray, reference: np.ndarray,
                          reference_label: str, reference_name: str,
                          flagged_measured: np.ndarray | None = None,
                          flagged_reference: np.ndarray | None = None,
                          flagged_label: str = "flag ≠ 0") -> None:
    """Log-log measured vs reference flux with a 1:1 line, N and the median ratio.

    ``measured``/``reference`` are the flag-0 sources; ``flagged_*`` (optional) the flagged
    ones, drawn as orange triangles and left out of N and the median.
    """
    ax.set_xlabel(f"{reference_label} flux [µJy]")
    ax.set_ylabel("measured flux [µJy]")
    flagged_measured = np.empty(0) if flagged_measured is None else flagged_measured
    flagged_reference = np.empty(0) if flagged_reference is None else flagged_reference
    if measured.size == 0 and flagged_measured.size == 0:
        _mark_empty(ax, f"no source with S/N > {SNR_MIN:g}\n"
                        f"and a positive {reference_name} flux")
        return
    ax.scatter(reference, measured, s=10, alpha=0.5, lw=0, color=GOOD_COLOR,
               label=f"flag 0 ({measured.size})")
    if flagged_measured.size:
        ax.scatter(flagged_reference, flagged_measured, s=22, marker="^", alpha=0.8, lw=0,
                   color=FLAGGED_COLOR, label=f"{flagged_label} ({flagged_measured.size})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        # Unlabelled minor ticks: measuring their (hidden) labels made drawing several
        # times slower, and decade labels are what the eye reads.
        axis.set_minor_formatter(NullFormatter())
    # Shared limits so that the 1:1 line is the diagonal and offsets read directly.
    both = np.concatenate([reference, measured, flagged_reference, flagged_measured])
    low, high = both.min() / 1.5, both.max() * 1.5
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.axline((low, low), (high, high), color="k", lw=0.8, ls="--", label="1:1")
    ax.legend(loc="lower right", fontsize=TEXT_SIZE - 2, frameon=False)
    ratio = np.median(measured / reference) if measured.size else np.nan
    _annotate(ax, [f"N = {measured.size}", f"median measured / {reference_name} = {ratio:.3f}"],
              size=TEXT_SIZE - 1)


def _plot_pull(ax, pull: np.ndarray, flagged_pull: np.ndarray | None = None,
               flagged_label: str = "flag ≠ 0") -> None:
    """Pull histogram with a unit Gaussian, the pull spread and its core spread.

    ``pull`` holds the flag-0 sources (filled histogram, statistics); ``flagged_pull``
    (optional) the flagged ones, drawn as an orange outline normalised to their own number
    and counted, with their flag bits, under the statistics. There is no legend: beside the
    statistics it would hide them in a slide-sized panel, so the figure's title says what
    each line is.
    """
    ax.set_xlabel("pull = (measured − true) / error")
    ax.set_ylabel("probability density")
    if pull.size < 2:
        _mark_empty(ax, "fewer than 2 sources with flag 0,\na measured flux and a true flux")
        return
    bins = np.linspace(-PULL_HISTOGRAM_LIMIT, PULL_HISTOGRAM_LIMIT, 49)
    # Normalise to all sources, not only those inside the plotted range, so outliers
    # show up as missing area under the Gaussian instead of being renormalised away.
    weights = np.full(pull.size, 1.0 / (pull.size * np.diff(bins)[0]))
    ax.hist(pull, bins=bins, weights=weights, histtype="stepfilled", alpha=0.6, color=GOOD_COLOR)
    if flagged_pull is not None and flagged_pull.size >= 2:
        flagged_weights = np.full(flagged_pull.size, 1.0 / (flagged_pull.size * np.diff(bins)[0]))
        ax.hist(flagged_pull, bins=bins, weights=flagged_weights, histtype="step", lw=1.5, color=FLAGGED_COLOR)
    grid = np.linspace(-PULL_HISTOGRAM_LIMIT, PULL_HISTOGRAM_LIMIT, 400)
    ax.plot(grid, np.exp(-0.5 * grid**2) / np.sqrt(2 * np.pi), color="k", lw=1)
    ax.set_xlim(-PULL_HISTOGRAM_LIMIT, PULL_HISTOGRAM_LIMIT)
    # Headroom above the peak so that the statistics do not hide the data.
    ax.set_ylim(0, 1.9 * max(ax.get_ylim()[1], 1 / np.sqrt(2 * np.pi)))

    core = pull[np.abs(pull) < PULL_CORE_LIMIT]
    core_std = np.std(core, ddof=1) if core.size > 1 else np.nan
    lines = [f"N = {pull.size}",
             f"mean = {np.mean(pull):.2f}",
             f"σ = {np.std(pull, ddof=1):.2f}",
             f"σ(|pull| < {PULL_CORE_LIMIT:g}) = {core_std:.2f}"]
    outside = int(np.sum(np.abs(pull) > PULL_HISTOGRAM_LIMIT))
    if outside:
        lines.append(f"{outside} beyond ±{PULL_HISTOGRAM_LIMIT:g}")
    if flagged_pull is not None and flagged_pull.size:
        lines.append(f"{flagged_label} ({flagged_pull.size})")
    _annotate(ax, lines, size=TEXT_SIZE - 2)


def _with_truth(catalog: pd.DataFrame, truth: pd.DataFrame | None, bands: list[str]) -> pd.DataFrame:
    if truth is None:
        return catalog
    true_columns = [_true_flux_column(b) for b in bands if _true_flux_column(b) in truth]
    # The explicitly passed truth wins over any true-flux columns already in the catalogue.
    return catalog.drop(columns=true_columns, errors="ignore").merge(
        truth[["id", *true_columns]], on="id", how="left", validate="many_to_one")


def _comparison_panel(ax, table: pd.DataFrame, band: str, reference: str) -> None:
    """One band of measured against COSMOS2015 (``reference="catalog"``) or true flux.

    Sources with S/N > `SNR_MIN` and a positive reference flux: flag 0 in blue (counted),
    flag != 0 in orange, the legend naming the flag bits among them.
    """
    if reference == "catalog":
        column, label, name = BANDS[band].catalog_flux_column, "COSMOS2015", "catalogue"
    else:
        column, label, name = _true_flux_column(band), "true", "true"
    if column not in table:
        _mark_empty(ax, f"no {label} column\n{column}")
        return
    reference_flux = _catalog_flux(table, band) if reference == "catalog" else _as_float(table[column])
    measured = _as_float(table[_flux_column(band)])
    with np.errstate(invalid="ignore"):
        shown = (_snr(table, band) > SNR_MIN) & (reference_flux > 0)
    good = shown & _good_flag(table, band)
    flagged = shown & ~_good_flag(table, band)
    _plot_flux_comparison(ax, measured[good], reference_flux[good], label, name,
                          measured[flagged], reference_flux[flagged],
                          _flag_bits_label(_flag_values(table, band)[flagged]))


def _pull_panel(ax, table: pd.DataFrame, band: str) -> None:
    """Pulls of every source with a measured flux, a positive error and a true flux > 0.

    No S/N cut: cutting on the measured S/N would keep only upward fluctuations of faint
    sources and bias the pull. Flag 0 filled (statistics), flag != 0 as an outline.
    """
    column = _true_flux_column(band)
    if column not in table:
        _mark_empty(ax, f"no {column} in truth")
        return
    measured = _as_float(table[_flux_column(band)])
    true_flux = _as_float(table[column])
    error = _as_float(table[_flux_err_column(band)])
    with np.errstate(invalid="ignore"):
        usable = _usable_error(table, band) & np.isfinite(measured) & (true_flux > 0)
    good = usable & _good_flag(table, band)
    flagged = usable & ~_good_flag(table, band)
    _plot_pull(ax, (measured[good] - true_flux[good]) / error[good],
               (measured[flagged] - true_flux[flagged]) / error[flagged],
               _flag_bits_label(_flag_values(table, band)[flagged]))


def _shown_bands(table, requested, has_reference, truth_named: bool) -> list[str]:
    shown = [b for b in requested if _has_measurement(table, b) and has_reference(b)]
    if not shown:
        raise ValueError(
            f"none of the bands {', '.join(requested)} has the columns needed: "
            f"<band>_flux_ujy, <band>_flux_err_ujy, <band>_flag and the COSMOS2015 flux "
            f"column{' or true_<band>_flux_ujy in truth' if truth_named else ''}")
    return shown


def _band_grid(n_panels: int):
    columns = min(SLIDE_COLUMNS, n_panels)
    rows = int(np.ceil(n_panels / columns))
    fig = _new_figure((SLIDE_PANEL_INCH * columns, SLIDE_PANEL_INCH * rows + 0.9))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


PULL_SELECTION = "flag 0 and flag ≠ 0 apart, every S/N (a cut on the measured S/N would bias the pull)"


def flux_comparison(catalog: pd.DataFrame, bands=None, truth: pd.DataFrame | None = None) -> Figure:
    """Measured flux against COSMOS2015 or true flux, one slide-sized panel per band.

    Each panel shows the sources with S/N > 3 and a positive reference flux: flag 0 as blue
    dots (counted in N and the median measured / reference ratio) and flagged sources
    (flag != 0) as orange triangles, whose legend names the flag bits set among them.

    Parameters
    ----------
    catalog : pandas.DataFrame
        Science catalogue (see the module docstring for the columns).
    bands : list of str or str, optional
        Bands to show; ``None`` or ``"all"`` for every band with the columns needed.
    truth : pandas.DataFrame, optional
        Simulated truth (``id``, ``true_<band>_flux_ujy``): compare with the true fluxes
        instead of COSMOS2015.

    Returns
    -------
    InlineFigure
        Up to three panels per row.

    Raises
    ------
    ValueError
        If a band name is unknown, or no requested band has the columns to plot.
    """
    requested = parse_bands(bands)
    table = _with_truth(catalog, truth, requested)
    reference = "catalog" if truth is None else "truth"

    def has_reference(band: str) -> bool:
        column = BANDS[band].catalog_flux_column if truth is None else _true_flux_column(band)
        return column in table

    shown = _shown_bands(table, requested, has_reference, truth is not None)
    fig, axes = _band_grid(len(shown))
    for ax, band in zip(axes, shown):
        ax.set_title(band_label(band))
        _comparison_panel(ax, table, band, reference)
    what = "COSMOS2015" if truth is None else "simulated true"
    fig.suptitle(f"Measured vs {what} flux: sources with S/N > {SNR_MIN:g} and {what} flux > 0\n"
                 f"blue: flag 0 (counted in N and the median); orange: flagged", fontsize=TITLE_SIZE)
    return _finish(fig)


def flux_pulls(catalog: pd.DataFrame, truth: pd.DataFrame, bands=None) -> Figure:
    """Pull distributions (measured − true) / error against a unit Gaussian, per band.

    Each panel uses every source with a measured flux, a positive error and a true flux > 0,
    with no S/N cut (cutting on the measured S/N would keep only upward fluctuations of faint
    sources and bias the pull). Flag-0 sources are the filled histogram and give the
    statistics (N, mean, σ, σ over |pull| < 5); flagged sources are an orange outline
    normalised to their own number, its legend naming their flag bits.

    Parameters
    ----------
    catalog : pandas.DataFrame
        Science catalogue.
    truth : pandas.DataFrame
        Simulated truth with ``id`` and ``true_<band>_flux_ujy`` columns.
    bands : list of str or str, optional
        Bands to show.

    Returns
    -------
    InlineFigure
        Up to three panels per row.
    """
    requested = parse_bands(bands)
    table = _with_truth(catalog, truth, requested)
    shown = _shown_bands(table, requested, lambda band: _true_flux_column(band) in table, True)
    fig, axes = _band_grid(len(shown))
    for ax, band in zip(axes, shown):
        ax.set_title(band_label(band))
        _pull_panel(ax, table, band)
    fig.suptitle("Pull = (measured − true) / error: every source with a true flux > 0, no S/N cut\n"
                 "filled: flag 0 (statistics); orange outline: flagged; line: unit Gaussian", fontsize=TITLE_SIZE)
    return _finish(fig)


def flux_validation(catalog: pd.DataFrame, bands=None, truth: pd.DataFrame | None = None) -> Figure:
    """Compare measured fluxes with COSMOS2015 and, optionally, with simulated true fluxes.

    A compact overview (the control panel shows it); for slides use `flux_comparison` and
    `flux_pulls`, which show the same panels larger. One column of panels per band. Row 1:
    measured vs COSMOS2015 flux (log-log, 1:1 line) for sources with S/N > 3 and a finite
    positive catalogue flux, flag 0 in blue (counted in N and the median measured /
    catalogue ratio), flagged sources as orange triangles. With ``truth``, row 2 shows
    measured vs true flux the same way, and row 3 the pull (measured − true) / error with a
    unit Gaussian for every source with a true flux, without an S/N cut (cutting on the
    measured S/N would keep only upward fluctuations of faint sources and bias the pull):
    flag 0 filled, with the pull standard deviation over all of them and over |pull| < 5;
    flagged sources as an outline.

    Parameters
    ----------
    catalog : pandas.DataFrame
        Science catalogue (see the module docstring for the columns).
    bands : list of str or str, optional
        Bands to show (names or a comma-separated string; ``None`` or ``"all"`` for every
        band). Bands lacking their measured columns, or lacking both a COSMOS2015 column
        and (with ``truth``) a true-flux column, are skipped.
    truth : pandas.DataFrame, optional
        Simulated truth with ``id`` (unique) and ``true_<band>_flux_ujy`` columns in
        microJy, matched to ``catalog`` on ``id``.

    Returns
    -------
    InlineFigure
        1 row of panels, or 3 rows with ``truth``, times the number of bands shown.
        A panel whose reference column is absent, or with no usable source, says so.

    Raises
    ------
    ValueError
        If a band name is unknown, or no requested band has the columns to plot.
    """
    requested = parse_bands(bands)
    table = _with_truth(catalog, truth, requested)

    def has_reference(band: str) -> bool:
        return (BANDS[band].catalog_flux_column in table
                or (truth is not None and _true_flux_column(band) in table))

    shown = _shown_bands(table, requested, has_reference, truth is not None)
    n_rows = 1 if truth is None else 3
    fig = _new_figure((PANEL_SIZE_INCH * len(shown), PANEL_SIZE_INCH * n_rows + 0.6))
    axes = fig.subplots(n_rows, len(shown), squeeze=False)
    for column, band in enumerate(shown):
        axes[0, column].set_title(band_label(band))
        _comparison_panel(axes[0, column], table, band, "catalog")
        if truth is None:
            continue
        _comparison_panel(axes[1, column], table, band, "truth")
        _pull_panel(axes[2, column], table, band)
    for ax in axes.ravel():
        for text in ax.texts:
            text.set_fontsize("small")
        if ax.get_legend() is not None:
            for text in ax.get_legend().get_texts():
                text.set_fontsize("x-small")
    # Short lines: a single-band figure is only one panel wide.
    title = f"Measured vs COSMOS2015 flux\n(S/N > {SNR_MIN:g}; flag 0 blue,\nflagged orange)"
    if truth is not None:
        title += "\nrow 2: vs true flux (same cut)\nrow 3: pulls, every S/N\n(line: unit Gaussian)"
    fig.suptitle(title, fontsize="medium")
    return fig


def _in_lacy_wedge(log_f58_f36: np.ndarray, log_f80_f45: np.ndarray) -> np.ndarray:
    return ((log_f58_f36 > LACY_X_MIN) & (log_f80_f45 > LACY_Y_MIN)
            & (log_f80_f45 <= LACY_SLOPE * log_f58_f36 + LACY_INTERCEPT))


def _irac_required_columns() -> list[str]:
    return ["id", *(c for band in IRAC_BANDS for c in _measured_columns(band))]


def irac_colors(catalog: pd.DataFrame) -> pd.DataFrame:
    """IRAC colours of the sources shown in `irac_color_color`.

    Parameters
    ----------
    catalog : pandas.DataFrame
        Science catalogue with ``id`` and the measured columns of irac1..irac4.

    Returns
    -------
    pandas.DataFrame
        One row per source detected (flag 0, S/N > 3) in all four IRAC bands, keeping the
        catalogue's index, with columns ``id``, ``log_f58_f36`` = log10(F5.8/F3.6),
        ``log_f80_f45`` = log10(F8.0/F4.5) and ``in_lacy_wedge`` (bool, Lacy et al. 2004:
        x > -0.1, y > -0.2, y <= 0.8 x + 0.5).

    Raises
    ------
    ValueError
        If any needed column is absent.
    """
    missing = _missing_columns(catalog, _irac_required_columns())
    if missing:
        raise ValueError(f"IRAC colours need the columns {', '.join(missing)}")
    selected = np.logical_and.reduce([_detected(catalog, band) for band in IRAC_BANDS])
    rows = catalog.loc[selected]
    flux = {band: _as_float(rows[_flux_column(band)]) for band in IRAC_BANDS}
    log_f58_f36 = np.log10(flux["irac3"] / flux["irac1"])
    log_f80_f45 = np.log10(flux["irac4"] / flux["irac2"])
    return pd.DataFrame(
        {
            "id": rows["id"].to_numpy(),
            "log_f58_f36": log_f58_f36,
            "log_f80_f45": log_f80_f45,
            "in_lacy_wedge": _in_lacy_wedge(log_f58_f36, log_f80_f45),
        },
        index=rows.index,
    )


def _padded_limits(values: np.ndarray, must_include: tuple[float, float],
                   pad: float = 0.1) -> tuple[float, float]:
    low, high = must_include
    if values.size:
        low, high = min(low, values.min()), max(high, values.max())
    return low - pad, high + pad


def _chandra_matched(rows: pd.DataFrame) -> np.ndarray:
    if "chandra_match" not in rows:
        return np.zeros(len(rows), dtype=bool)
    # eq(True) treats NaN or None (unmatched rows after a join) as not matched.
    return rows["chandra_match"].eq(True).to_numpy(dtype=bool, na_value=False)


def _stars(rows: pd.DataFrame) -> np.ndarray:
    """COSMOS2015 stars (``type == 1``); none where the catalogue has no ``type``."""
    if "type" not in rows:
        return np.zeros(len(rows), dtype=bool)
    return rows["type"].eq(STAR_TYPE).to_numpy(dtype=bool, na_value=False)


def irac_color_color(catalog: pd.DataFrame) -> Figure:
    """IRAC colour-colour diagram with the Lacy et al. (2004) AGN wedge.

    Plots log10(F8.0/F4.5) against log10(F5.8/F3.6) for the sources of `irac_colors`
    (flag 0 and S/N > 3 in all four IRAC bands) and draws the wedge boundary. Among them,
    COSMOS2015 stars (``type == 1``), sources detected in GALEX NUV (flag 0, S/N > 3) and
    Chandra matches (``chandra_match``) get their own markers; each overlay is drawn only
    when its columns exist. The legend gives counts; the title says how many sources are
    plotted, and a note under the axes says what the wedge's contamination is.

    Parameters
    ----------
    catalog : pandas.DataFrame
        Science catalogue (see the module docstring for the columns).

    Returns
    -------
    InlineFigure
        One panel. If IRAC columns are missing, the panel names them instead of raising,
        so that a notebook run on a subset of bands still completes.
    """
    fig, ax, missing = _figure_or_missing(catalog, (9.0, 7.6), "IRAC colour–colour diagram", _irac_required_columns())
    if missing:
        return _finish(fig)

    colors = irac_colors(catalog)
    rows = catalog.loc[colors.index]
    x = colors["log_f58_f36"].to_numpy()
    y = colors["log_f80_f45"].to_numpy()
    stars = _stars(rows)

    ax.scatter(x[~stars], y[~stars], s=12, lw=0, alpha=0.6, color="0.5", zorder=1,
               label=f"flag 0, S/N > {SNR_MIN:g} in all IRAC bands ({len(colors)})")
    if "type" in rows:
        ax.scatter(x[stars], y[stars], s=70, marker="*", color="goldenrod", edgecolors="k", lw=0.3, zorder=3,
                   label=f"COSMOS2015 stars ({stars.sum()})")
    if _has_measurement(rows, "nuv"):
        nuv = _detected(rows, "nuv")
        ax.scatter(x[nuv], y[nuv], s=50, facecolors="none", edgecolors="C0", lw=1.2, zorder=3,
                   label=f"GALEX NUV flag 0, S/N > {SNR_MIN:g} ({nuv.sum()})")
    chandra = _chandra_matched(rows)
    if "chandra_match" in rows:
        ax.scatter(x[chandra], y[chandra], s=45, marker="x", color="C3", lw=1.6, zorder=4,
                   label=f"Chandra match ({chandra.sum()})")

    # Keep the whole wedge corner in view even when few sources are plotted.
    ax.set_xlim(_padded_limits(x, (-0.6, 1.0)))
    ax.set_ylim(_padded_limits(y, (-0.6, 1.2)))
    x_right = ax.get_xlim()[1]
    corner_y = LACY_SLOPE * LACY_X_MIN + LACY_INTERCEPT
    n_wedge = int(colors["in_lacy_wedge"].sum())
    share = f", {100 * n_wedge / len(colors):.0f} %" if len(colors) else ""
    ax.plot([x_right, LACY_X_MIN, LACY_X_MIN, x_right],
            [LACY_Y_MIN, LACY_Y_MIN, corner_y, LACY_SLOPE * x_right + LACY_INTERCEPT],
            color="k", lw=1.5, zorder=2,
            label=f"Lacy et al. (2004) wedge ({n_wedge} inside{share})")

    ax.set_xlabel(r"$\log_{10}(F_{5.8\,\mu m} / F_{3.6\,\mu m})$")
    ax.set_ylabel(r"$\log_{10}(F_{8.0\,\mu m} / F_{4.5\,\mu m})$")
    ax.set_title(f"IRAC colour–colour diagram: {len(colors)} sources plotted", fontsize=TITLE_SIZE)
    ax.legend(loc="upper left", fontsize=TEXT_SIZE - 1)
    fig.text(0.5, 0.0, LACY_CONTAMINATION_NOTE, ha="center", va="bottom", fontsize=TEXT_SIZE - 1,
             style="italic", color="0.25")
    fig.get_layout_engine().set(rect=(0, 0.07, 1, 0.93))
    return _finish(fig)


def _uv_ir_required_columns() -> list[str]:
    return ["id", *(c for band in UV_IR_BANDS for c in _measured_columns(band))]


def uv_ir_colors(catalog: pd.DataFrame) -> pd.DataFrame:
    """AB magnitudes and UV/IR colours of the sources shown in `uv_ir_color`.

    Parameters
    ----------
    catalog : pandas.DataFrame
        Science catalogue with ``id`` and the measured columns of fuv, nuv and irac1.

    Returns
    -------
    pandas.DataFrame
        One row per source detected (flag 0, S/N > 3) in FUV, NUV and IRAC 3.6 µm,
        keeping the catalogue's index, with columns ``id``, ``fuv_mag_ab``, ``nuv_mag_ab``,
        ``irac1_mag_ab`` (m = 23.9 − 2.5 log10(F / µJy)), ``fuv_minus_nuv`` and
        ``nuv_minus_irac1``.

    Raises
    ------
    ValueError
        If any needed column is absent.
    """
    missing = _missing_columns(catalog, _uv_ir_required_columns())
    if missing:
        raise ValueError(f"UV-IR colours need the columns {', '.join(missing)}")
    selected = np.logical_and.reduce([_detected(catalog, band) for band in UV_IR_BANDS])
    rows = catalog.loc[selected]
    magnitude = {band: _ab_magnitude(_as_float(rows[_flux_column(band)])) for band in UV_IR_BANDS}
    return pd.DataFrame(
        {
            "id": rows["id"].to_numpy(),
            "fuv_mag_ab": magnitude["fuv"],
            "nuv_mag_ab": magnitude["nuv"],
            "irac1_mag_ab": magnitude["irac1"],
            "fuv_minus_nuv": magnitude["fuv"] - magnitude["nuv"],
            "nuv_minus_irac1": magnitude["nuv"] - magnitude["irac1"],
        },
        index=rows.index,
    )


KDE_MIN_SOURCES = 20
"""Fewer sources than this get no density contours in `uv_ir_color`."""


def uv_ir_color(catalog: pd.DataFrame) -> Figure:
    """UV-IR colour diagram: FUV − NUV against NUV − [3.6], X-ray sources by hardness.

    The axes follow Bouquin et al. (2015, ApJ 800, L19), as the Fornax/IRSA multiband
    photometry tutorial does: NUV − [3.6] across, FUV − NUV up. Star-forming galaxies form a
    tight blue sequence at small NUV − [3.6]; galaxies whose star formation has stopped lie
    to the right. The sources of `uv_ir_colors` (flag 0, S/N > 3 in FUV, NUV and 3.6 µm)
    are grey points with their density as filled contours (seaborn's kernel density
    estimate, from `KDE_MIN_SOURCES` sources on); those with ``chandra_match`` are drawn on
    top, coloured by ``hardness_ratio`` on a diverging scale fixed to [-1, 1]. Matches
    without a finite hardness ratio (one X-ray band undetected) are open black circles, so
    non-detections never push the colour scale to its ends.

    Parameters
    ----------
    catalog : pandas.DataFrame
        Science catalogue (see the module docstring for the columns).

    Returns
    -------
    InlineFigure
        The diagram and its colour bar. If FUV, NUV or IRAC 3.6 µm columns are missing,
        a single panel names them instead of raising.
    """
    fig, ax, missing = _figure_or_missing(catalog, (9.0, 7.0), "UV–IR colour diagram", _uv_ir_required_columns())
    if missing:
        return _finish(fig)

    colors = uv_ir_colors(catalog)
    rows = catalog.loc[colors.index]
    x = colors["nuv_minus_irac1"].to_numpy()
    y = colors["fuv_minus_nuv"].to_numpy()
    chandra = _chandra_matched(rows)
    hardness = (_as_float(rows["hardness_ratio"]) if "hardness_ratio" in rows
                else np.full(len(rows), np.nan))
    with_hardness = chandra & np.isfinite(hardness)
    without_hardness = chandra & ~np.isfinite(hardness)

    if len(colors) >= KDE_MIN_SOURCES and np.ptp(x) > 0 and np.ptp(y) > 0:
        import seaborn as sns

        sns.kdeplot(x=x, y=y, ax=ax, fill=True, levels=8, thresh=0.05, cmap="Greys", alpha=0.6, zorder=0)
    ax.scatter(x, y, s=12, lw=0, alpha=0.7, color="0.35", zorder=1,
               label=f"flag 0, S/N > {SNR_MIN:g} in FUV, NUV, 3.6 µm ({len(colors)})")
    hardness_scale = ScalarMappable(norm=Normalize(vmin=-1.0, vmax=1.0), cmap=HARDNESS_COLORMAP)
    ax.scatter(x[with_hardness], y[with_hardness], c=hardness[with_hardness],
               cmap=hardness_scale.cmap, norm=hardness_scale.norm, s=70,
               edgecolors="k", lw=0.6, zorder=3)
    if without_hardness.any():
        ax.scatter(x[without_hardness], y[without_hardness], s=70, facecolors="none",
                   edgecolors="k", lw=1.0, zorder=2,
                   label=f"Chandra match, one X-ray band undetected: no HR ({without_hardness.sum()})")
    # A colour bar even without matches keeps the figure layout the same from run to run.
    colorbar = fig.colorbar(hardness_scale, ax=ax)
    colorbar.set_label("Chandra hardness ratio (H − S)/(H + S)", fontsize=LABEL_SIZE)
    colorbar.ax.tick_params(labelsize=TICK_SIZE)

    ax.set_xlabel("NUV − [3.6] [AB mag]")
    ax.set_ylabel("FUV − NUV [AB mag]")
    ax.set_title(f"UV–IR colours (Bouquin et al. 2015): {len(colors)} sources plotted", fontsize=TITLE_SIZE)
    # A neutral proxy marker: the scatter's own legend entry would take the colour of
    # whichever match comes first and suggest a hardness it does not mean.
    handles, _ = ax.get_legend_handles_labels()
    handles.insert(1, Line2D([], [], ls="", marker="o", markersize=8, markerfacecolor="white",
                             markeredgecolor="k", markeredgewidth=0.6,
                             label=f"Chandra match, colour = hardness ({with_hardness.sum()})"))
    ax.legend(handles=handles, loc="best", fontsize=TEXT_SIZE - 1)
    _finish(fig)
    colorbar.ax.yaxis.label.set_size(LABEL_SIZE)
    return fig


def save_figure(fig: Figure, path) -> Path:
    """Write ``fig`` as a PNG (120 dpi) so that ``path`` is never seen half-written.

    The image goes to a temporary file in the destination folder that replaces ``path``
    only once complete (`mbphot.io.atomic_path`). Parent folders are created. On failure
    ``path`` is left as it was.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        Figure to save.
    path : str or os.PathLike
        Destination; must end in ``.png``.

    Returns
    -------
    pathlib.Path
        ``path`` as a `Path`.

    Raises
    ------
    ValueError
        If ``path`` does not end in ``.png``.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG files; give a path ending in .png, not {path}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=SAVE_DPI)
    with atomic_path(path) as temporary:
        temporary.write_bytes(buffer.getvalue())
    if isinstance(fig, InlineFigure):
        # savefig leaves the figure stale (it restores its dpi); any change from here on
        # makes it stale again, and the display draws it afresh.
        fig._saved_png = buffer.getvalue()
        fig.stale = False
    return path
