"""Diagnostic figures for the multiband forced-photometry catalogue.

Each figure function takes the science catalogue (one row per source) and returns a
`matplotlib.figure.Figure` built without pyplot, so it works headless (Agg), in scripts
and in Jupyter (make the figure the cell's last expression, or pass it to
``IPython.display.display``) without piling up pyplot's global figures in long runs.

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
    Chandra counterpart flag and X-ray hardness ratio in [-1, 1] (NaN when unmatched).

A source is *detected* in a band when its flag is 0 and its measured flux / error > 3.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .bands import BANDS, IRAC_BANDS, measured_columns, parse_bands
from .io import atomic_path

__all__ = [
    "SNR_MIN",
    "flux_validation",
    "irac_colors",
    "irac_color_color",
    "uv_ir_colors",
    "uv_ir_color",
    "save_figure",
]

SNR_MIN = 3.0
CATALOG_MISSING_AT_OR_BELOW = -90.0
AB_ZEROPOINT_UJY = 23.9
PULL_CORE_LIMIT = 5.0
PULL_HISTOGRAM_LIMIT = 6.0
SAVE_DPI = 120
PANEL_SIZE_INCH = 3.2

# Lacy et al. (2004), ApJS 154, 166: mid-IR AGN selection in log10(F5.8/F3.6) vs
# log10(F8.0/F4.5).
LACY_X_MIN = -0.1
LACY_Y_MIN = -0.2
LACY_SLOPE = 0.8
LACY_INTERCEPT = 0.5

UV_IR_BANDS = ("fuv", "nuv", "irac1")
HARDNESS_COLORMAP = "RdBu_r"

_ANNOTATION_BOX = {"boxstyle": "round,pad=0.3", "facecolor": "white", "alpha": 0.8, "lw": 0}


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


def _band_label(band: str) -> str:
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


def _annotate(ax, lines: list[str]) -> None:
    ax.text(0.04, 0.96, "\n".join(lines), transform=ax.transAxes, va="top", ha="left",
            fontsize="small", bbox=_ANNOTATION_BOX)


def _mark_empty(ax, message: str) -> None:
    # Keep the axes (so the grid layout stays predictable) but say why it is blank.
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center",
            fontsize="small", color="0.3", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _figure_or_missing(catalog, size, title, required):
    """A one-panel figure; when columns are missing, the panel names them."""
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    missing = _missing_columns(catalog, required)
    if missing:
        ax.set_title(f"{title}: not available")
        _mark_empty(ax, "missing columns:\n" + "\n".join(missing))
    return fig, ax, missing


def _plot_flux_comparison(ax, measured: np.ndarray, reference: np.ndarray,
                          reference_label: str, reference_name: str) -> None:
    """Log-log measured vs reference flux with a 1:1 line, N and the median ratio."""
    ax.set_xlabel(f"{reference_label} flux [µJy]")
    ax.set_ylabel("measured flux [µJy]")
    if measured.size == 0:
        _mark_empty(ax, f"no source with S/N > {SNR_MIN:g}, flag 0\n"
                        f"and a positive {reference_name} flux")
        return
    ax.scatter(reference, measured, s=6, alpha=0.5, lw=0, color="C0")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Shared limits so that the 1:1 line is the diagonal and offsets read directly.
    low = min(reference.min(), measured.min()) / 1.5
    high = max(reference.max(), measured.max()) * 1.5
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.axline((low, low), (high, high), color="k", lw=0.8, ls="--", label="1:1")
    ax.legend(loc="lower right", fontsize="small", frameon=False)
    _annotate(ax, [f"N = {measured.size}",
                   f"median measured / {reference_name} = {np.median(measured / reference):.3f}"])


def _plot_pull(ax, pull: np.ndarray) -> None:
    """Pull histogram with a unit Gaussian, the pull spread and its core spread."""
    ax.set_xlabel("pull = (measured − true) / error")
    ax.set_ylabel("probability density")
    if pull.size < 2:
        _mark_empty(ax, "fewer than 2 sources with flag 0,\na measured flux and a true flux")
        return
    bins = np.linspace(-PULL_HISTOGRAM_LIMIT, PULL_HISTOGRAM_LIMIT, 49)
    # Normalise to all sources, not only those inside the plotted range, so outliers
    # show up as missing area under the Gaussian instead of being renormalised away.
    weights = np.full(pull.size, 1.0 / (pull.size * np.diff(bins)[0]))
    ax.hist(pull, bins=bins, weights=weights, histtype="stepfilled", alpha=0.6,
            color="C0", label="sources")
    grid = np.linspace(-PULL_HISTOGRAM_LIMIT, PULL_HISTOGRAM_LIMIT, 400)
    ax.plot(grid, np.exp(-0.5 * grid**2) / np.sqrt(2 * np.pi), color="k", lw=1,
            label="unit Gaussian")
    ax.set_xlim(-PULL_HISTOGRAM_LIMIT, PULL_HISTOGRAM_LIMIT)
    # Headroom above the peak so that the statistics and the legend do not hide the data.
    ax.set_ylim(0, 1.6 * max(ax.get_ylim()[1], 1 / np.sqrt(2 * np.pi)))
    ax.legend(loc="upper right", fontsize="x-small", frameon=False, handlelength=1.2)

    core = pull[np.abs(pull) < PULL_CORE_LIMIT]
    core_std = np.std(core, ddof=1) if core.size > 1 else np.nan
    lines = [f"N = {pull.size}",
             f"mean = {np.mean(pull):.2f}",
             f"σ = {np.std(pull, ddof=1):.2f}",
             f"σ(|pull| < {PULL_CORE_LIMIT:g}) = {core_std:.2f}"]
    outside = int(np.sum(np.abs(pull) > PULL_HISTOGRAM_LIMIT))
    if outside:
        lines.append(f"{outside} beyond ±{PULL_HISTOGRAM_LIMIT:g}")
    _annotate(ax, lines)


def flux_validation(catalog: pd.DataFrame, bands=None, truth: pd.DataFrame | None = None) -> Figure:
    """Compare measured fluxes with COSMOS2015 and, optionally, with simulated true fluxes.

    One column of panels per band. Row 1: measured vs COSMOS2015 flux (log-log, 1:1 line)
    for sources detected in the band (flag 0, S/N > 3) with a finite positive catalogue
    flux, annotated with N and the median measured / catalogue ratio. With ``truth``, row 2
    shows measured vs true flux the same way, and row 3 the pull
    (measured − true) / error with a unit Gaussian, annotated with the pull standard
    deviation over all sources and over |pull| < 5. The pull uses every flag-0 source with
    a measured flux, a positive error and a true flux, without an S/N cut: cutting on the
    measured S/N would keep only upward fluctuations of faint sources and bias the pull.

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
    matplotlib.figure.Figure
        1 row of panels, or 3 rows with ``truth``, times the number of bands shown.
        A panel whose reference column is absent, or with no usable source, says so.

    Raises
    ------
    ValueError
        If a band name is unknown, or no requested band has the columns to plot.
    """
    requested = parse_bands(bands)
    if truth is None:
        table = catalog
    else:
        true_columns = [_true_flux_column(b) for b in requested if _true_flux_column(b) in truth]
        # The explicitly passed truth wins over any true-flux columns already in the catalogue.
        table = catalog.drop(columns=true_columns, errors="ignore").merge(
            truth[["id", *true_columns]], on="id", how="left", validate="many_to_one")

    def has_reference(band: str) -> bool:
        return (BANDS[band].catalog_flux_column in table
                or (truth is not None and _true_flux_column(band) in table))

    shown = [b for b in requested if _has_measurement(table, b) and has_reference(b)]
    if not shown:
        raise ValueError(
            f"none of the bands {', '.join(requested)} has the columns needed: "
            f"<band>_flux_ujy, <band>_flux_err_ujy, <band>_flag and the COSMOS2015 flux "
            f"column{' or true_<band>_flux_ujy in truth' if truth is not None else ''}")

    n_rows = 1 if truth is None else 3
    fig = Figure(figsize=(PANEL_SIZE_INCH * len(shown), PANEL_SIZE_INCH * n_rows),
                 layout="constrained")
    axes = fig.subplots(n_rows, len(shown), squeeze=False)
    for column, band in enumerate(shown):
        axes[0, column].set_title(_band_label(band))
        measured = _as_float(table[_flux_column(band)])
        detected = _detected(table, band)

        catalog_column = BANDS[band].catalog_flux_column
        if catalog_column in table:
            reference = _catalog_flux(table, band)
            with np.errstate(invalid="ignore"):
                selected = detected & (reference > 0)
            _plot_flux_comparison(axes[0, column], measured[selected], reference[selected],
                                  "COSMOS2015", "catalogue")
        else:
            _mark_empty(axes[0, column], f"no COSMOS2015 column\n{catalog_column}")

        if truth is None:
            continue
        true_column = _true_flux_column(band)
        if true_column not in table:
            _mark_empty(axes[1, column], f"no {true_column} in truth")
            _mark_empty(axes[2, column], f"no {true_column} in truth")
            continue
        true_flux = _as_float(table[true_column])
        with np.errstate(invalid="ignore"):
            selected = detected & (true_flux > 0)
        _plot_flux_comparison(axes[1, column], measured[selected], true_flux[selected],
                              "true", "true")
        error = _as_float(table[_flux_err_column(band)])
        usable = (_good_flag(table, band) & _usable_error(table, band)
                  & np.isfinite(measured) & np.isfinite(true_flux))
        _plot_pull(axes[2, column], (measured[usable] - true_flux[usable]) / error[usable])

    # Short lines: a single-band figure is only one panel wide.
    title = f"Measured vs COSMOS2015 flux\n(flag 0, S/N > {SNR_MIN:g})"
    if truth is not None:
        title += "\nrows 2–3: vs simulated true flux"
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


def irac_color_color(catalog: pd.DataFrame) -> Figure:
    """IRAC colour-colour diagram with the Lacy et al. (2004) AGN wedge.

    Plots log10(F8.0/F4.5) against log10(F5.8/F3.6) for the sources of `irac_colors`
    and draws the wedge boundary. Among them, sources detected in GALEX NUV (flag 0,
    S/N > 3) and Chandra matches (``chandra_match``) get their own markers; each overlay
    is drawn only when its columns exist. The legend gives counts; the title says how many
    sources are plotted.

    Parameters
    ----------
    catalog : pandas.DataFrame
        Science catalogue (see the module docstring for the columns).

    Returns
    -------
    matplotlib.figure.Figure
        One panel. If IRAC columns are missing, the panel names them instead of raising,
        so that a notebook run on a subset of bands still completes.
    """
    fig, ax, missing = _figure_or_missing(catalog, (6.6, 5.6), "IRAC colour–colour diagram", _irac_required_columns())
    if missing:
        return fig

    colors = irac_colors(catalog)
    rows = catalog.loc[colors.index]
    x = colors["log_f58_f36"].to_numpy()
    y = colors["log_f80_f45"].to_numpy()

    ax.scatter(x, y, s=8, lw=0, alpha=0.6, color="0.5", zorder=1,
               label=f"S/N > {SNR_MIN:g} in all IRAC bands ({len(colors)})")
    if _has_measurement(rows, "nuv"):
        nuv = _detected(rows, "nuv")
        ax.scatter(x[nuv], y[nuv], s=36, facecolors="none", edgecolors="C0", lw=1, zorder=3,
                   label=f"GALEX NUV S/N > {SNR_MIN:g} ({nuv.sum()})")
    chandra = _chandra_matched(rows)
    if "chandra_match" in rows:
        ax.scatter(x[chandra], y[chandra], s=30, marker="x", color="C3", lw=1.2, zorder=4,
                   label=f"Chandra match ({chandra.sum()})")

    # Keep the whole wedge corner in view even when few sources are plotted.
    ax.set_xlim(_padded_limits(x, (-0.6, 1.0)))
    ax.set_ylim(_padded_limits(y, (-0.6, 1.2)))
    x_right = ax.get_xlim()[1]
    corner_y = LACY_SLOPE * LACY_X_MIN + LACY_INTERCEPT
    ax.plot([x_right, LACY_X_MIN, LACY_X_MIN, x_right],
            [LACY_Y_MIN, LACY_Y_MIN, corner_y, LACY_SLOPE * x_right + LACY_INTERCEPT],
            color="k", lw=1.2, zorder=2,
            label=f"Lacy et al. (2004) wedge ({int(colors['in_lacy_wedge'].sum())} inside)")

    ax.set_xlabel(r"$\log_{10}(F_{5.8\,\mu m} / F_{3.6\,\mu m})$")
    ax.set_ylabel(r"$\log_{10}(F_{8.0\,\mu m} / F_{4.5\,\mu m})$")
    ax.set_title(f"IRAC colour–colour diagram: {len(colors)} sources plotted")
    ax.legend(loc="upper left", fontsize="small")
    return fig


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


def uv_ir_color(catalog: pd.DataFrame) -> Figure:
    """UV-IR colour diagram: NUV − [3.6] against FUV − NUV, X-ray sources by hardness.

    Sources of `uv_ir_colors` are grey; those with ``chandra_match`` are drawn on top,
    coloured by ``hardness_ratio`` on a diverging colour scale fixed to [-1, 1] (matches
    without a finite hardness ratio as open black circles).

    Parameters
    ----------
    catalog : pandas.DataFrame
        Science catalogue (see the module docstring for the columns).

    Returns
    -------
    matplotlib.figure.Figure
        The diagram and its colour bar. If FUV, NUV or IRAC 3.6 µm columns are missing,
        a single panel names them instead of raising.
    """
    fig, ax, missing = _figure_or_missing(catalog, (6.8, 5.4), "UV–IR colour diagram", _uv_ir_required_columns())
    if missing:
        return fig

    colors = uv_ir_colors(catalog)
    rows = catalog.loc[colors.index]
    x = colors["fuv_minus_nuv"].to_numpy()
    y = colors["nuv_minus_irac1"].to_numpy()
    chandra = _chandra_matched(rows)
    hardness = (_as_float(rows["hardness_ratio"]) if "hardness_ratio" in rows
                else np.full(len(rows), np.nan))
    with_hardness = chandra & np.isfinite(hardness)
    without_hardness = chandra & ~np.isfinite(hardness)

    ax.scatter(x, y, s=10, lw=0, alpha=0.6, color="0.6", zorder=1,
               label=f"S/N > {SNR_MIN:g} in FUV, NUV, 3.6 µm ({len(colors)})")
    hardness_scale = ScalarMappable(norm=Normalize(vmin=-1.0, vmax=1.0), cmap=HARDNESS_COLORMAP)
    ax.scatter(x[with_hardness], y[with_hardness], c=hardness[with_hardness],
               cmap=hardness_scale.cmap, norm=hardness_scale.norm, s=36,
               edgecolors="k", lw=0.4, zorder=3)
    if without_hardness.any():
        ax.scatter(x[without_hardness], y[without_hardness], s=36, facecolors="none",
                   edgecolors="k", lw=0.8, zorder=2,
                   label=f"Chandra match, no hardness ratio ({without_hardness.sum()})")
    # A colour bar even without matches keeps the figure layout the same from run to run.
    fig.colorbar(hardness_scale, ax=ax, label="Chandra hardness ratio")

    ax.set_xlabel("FUV − NUV [AB mag]")
    ax.set_ylabel("NUV − [3.6] [AB mag]")
    ax.set_title(f"UV–IR colours: {len(colors)} sources plotted")
    # A neutral proxy marker: the scatter's own legend entry would take the colour of
    # whichever match comes first and suggest a hardness it does not mean.
    handles, _ = ax.get_legend_handles_labels()
    handles.insert(1, Line2D([], [], ls="", marker="o", markersize=6, markerfacecolor="white",
                             markeredgecolor="k", markeredgewidth=0.4,
                             label=f"Chandra match, colour = hardness ({with_hardness.sum()})"))
    ax.legend(handles=handles, loc="best", fontsize="small")
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
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        fig.savefig(stream, format="png", dpi=SAVE_DPI)
    return path
