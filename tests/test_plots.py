"""Tests of mbphot.plots on a seeded synthetic COSMOS-like catalogue."""

import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from mbphot.bands import BANDS, GALEX_BANDS, IRAC_BANDS
from mbphot.plots import (
    InlineFigure,
    flux_comparison,
    flux_pulls,
    flux_validation,
    irac_color_color,
    irac_colors,
    save_figure,
    uv_ir_color,
    uv_ir_colors,
)

SEED = 20151004
N_RANDOM_SOURCES = 500
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Planted sources with hand-computed colours (ids far above the random ones).
INSIDE_WEDGE_ID = 9001      # x = y = log10(4) = 0.602: inside
LEFT_OF_WEDGE_ID = 9002     # x = y = log10(0.5) = -0.301: x < -0.1
ABOVE_WEDGE_ID = 9003       # x = 0.2, y = 1.0 > 0.8 * 0.2 + 0.5
BELOW_WEDGE_ID = 9004       # x = 0.3, y = -0.5 < -0.2
FLAGGED_ID = 9005           # wedge colours, irac3 flag = 2
NAN_FLUX_ID = 9006          # wedge colours, irac4 flux NaN
LOW_SNR_ID = 9007           # irac2 S/N = 2.9
SNR_EXACTLY_3_ID = 9008     # irac1 S/N = 3.0: the cut is strict
ZERO_ERROR_ID = 9009        # irac1 error 0
UV_KNOWN_ID = 9010          # FUV 1, NUV 10, IRAC 3.6 µm 100 microJy

PLANTED_IRAC_FLUXES = {
    INSIDE_WEDGE_ID: (10.0, 20.0, 40.0, 80.0),
    LEFT_OF_WEDGE_ID: (10.0, 10.0, 5.0, 5.0),
    ABOVE_WEDGE_ID: (10.0, 10.0, 10.0 * 10**0.2, 100.0),
    BELOW_WEDGE_ID: (10.0, 10.0, 10.0 * 10**0.3, 10.0 * 10**-0.5),
    FLAGGED_ID: (10.0, 20.0, 40.0, 80.0),
    NAN_FLUX_ID: (10.0, 20.0, 40.0, np.nan),
    LOW_SNR_ID: (10.0, 2.9, 40.0, 80.0),
    SNR_EXACTLY_3_ID: (3.0, 20.0, 40.0, 80.0),
    ZERO_ERROR_ID: (10.0, 20.0, 40.0, 80.0),
    UV_KNOWN_ID: (100.0, 100.0, 100.0, 100.0),
}


def _empty_row(source_id: int) -> dict:
    row = {"id": source_id, "ra": 150.1, "dec": 2.2, "chandra_match": False,
           "hardness_ratio": np.nan}
    for band in BANDS:
        row[f"{band}_flux_ujy"] = np.nan
        row[f"{band}_flux_err_ujy"] = np.nan
        row[f"{band}_flag"] = 0
        row[BANDS[band].catalog_flux_column] = -99.0
    return row


def _planted_rows() -> list[dict]:
    rows = []
    for source_id, fluxes in PLANTED_IRAC_FLUXES.items():
        row = _empty_row(source_id)
        for band, flux in zip(IRAC_BANDS, fluxes):
            row[f"{band}_flux_ujy"] = flux
            row[f"{band}_flux_err_ujy"] = 1.0
        rows.append(row)
    by_id = {row["id"]: row for row in rows}
    by_id[FLAGGED_ID]["irac3_flag"] = 2
    by_id[ZERO_ERROR_ID]["irac1_flux_err_ujy"] = 0.0
    uv_row = by_id[UV_KNOWN_ID]
    uv_row.update({"nuv_flux_ujy": 10.0, "nuv_flux_err_ujy": 0.5,
                   "fuv_flux_ujy": 1.0, "fuv_flux_err_ujy": 0.1,
                   "chandra_match": True, "hardness_ratio": 0.4})
    return rows


def make_catalog(seed: int = SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return a synthetic science catalogue and its truth table.

    Galaxies have IRAC spectra falling with wavelength and AGN rising power laws (inside
    the Lacy wedge); measured fluxes scatter around the truth by their errors; a few
    percent of each band are flagged or NaN; COSMOS2015 fluxes carry -99 and NaN gaps.
    """
    rng = np.random.default_rng(seed)
    n = N_RANDOM_SOURCES
    is_agn = rng.random(n) < 0.15
    ir_slope = np.where(is_agn, rng.uniform(0.8, 2.0, n), rng.uniform(-1.5, -0.6, n))
    f36 = 10 ** rng.uniform(0.0, 2.5, n)
    true_flux = {band: f36 * (BANDS[band].wavelength_um / 3.6) ** ir_slope for band in IRAC_BANDS}
    true_flux["nuv"] = f36 * 10 ** (-0.4 * rng.uniform(0.5, 6.0, n))
    true_flux["fuv"] = true_flux["nuv"] * 10 ** (-0.4 * rng.uniform(-0.2, 2.5, n))
    error_floor = {"irac1": 0.3, "irac2": 0.3, "irac3": 2.0, "irac4": 2.0, "nuv": 0.1, "fuv": 0.1}

    columns = {"id": np.arange(1, n + 1), "ra": 150.1 + rng.uniform(-0.6, 0.6, n),
               "dec": 2.2 + rng.uniform(-0.6, 0.6, n)}
    for band in BANDS:
        error = np.hypot(0.03 * true_flux[band], error_floor[band])
        measured = true_flux[band] + rng.normal(0.0, error)
        not_measured = rng.random(n) < 0.03
        measured[not_measured] = np.nan
        error[not_measured] = np.nan
        flag = np.where(rng.random(n) < 0.05, rng.choice([1, 2, 4], n), 0)
        catalogue = true_flux[band] * (1 + rng.normal(0.0, 0.05, n))
        catalogue[rng.random(n) < 0.05] = -99.0
        catalogue[rng.random(n) < 0.02] = np.nan
        columns[f"{band}_flux_ujy"] = measured
        columns[f"{band}_flux_err_ujy"] = error
        columns[f"{band}_flag"] = flag
        columns[BANDS[band].catalog_flux_column] = catalogue
    chandra = rng.random(n) < np.where(is_agn, 0.6, 0.03)
    hardness = np.where(chandra, rng.uniform(-1.0, 1.0, n), np.nan)
    hardness[np.flatnonzero(chandra)[:2]] = np.nan
    columns["chandra_match"] = chandra
    columns["hardness_ratio"] = hardness

    catalog = pd.concat([pd.DataFrame(columns), pd.DataFrame(_planted_rows())], ignore_index=True)
    truth = pd.DataFrame({"id": np.arange(1, n + 1)}
                         | {f"true_{band}_flux_ujy": true_flux[band] for band in BANDS})
    return catalog, truth


@pytest.fixture(scope="module")
def catalog() -> pd.DataFrame:
    return make_catalog()[0]


@pytest.fixture(scope="module")
def truth() -> pd.DataFrame:
    return make_catalog()[1]


@pytest.fixture(autouse=True)
def no_pyplot_figures_left():
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before, "plot functions must not open pyplot figures"


def _detected_by_hand(table: pd.DataFrame, band: str) -> pd.Series:
    flux = table[f"{band}_flux_ujy"]
    error = table[f"{band}_flux_err_ujy"]
    return (table[f"{band}_flag"] == 0) & (error > 0) & (flux / error > 3)


def _drop_band(table: pd.DataFrame, band: str) -> pd.DataFrame:
    return table.drop(columns=[f"{band}_flux_ujy", f"{band}_flux_err_ujy", f"{band}_flag"])


def _panel_text(ax) -> str:
    return "\n".join(text.get_text() for text in ax.texts)


def _annotated_number(ax, label: str) -> float:
    match = re.search(rf"{re.escape(label)} = (-?[0-9.]+)", _panel_text(ax))
    assert match, f"no '{label} = ...' in panel text {_panel_text(ax)!r}"
    return float(match.group(1))


# --- irac_colors / irac_color_color ---------------------------------------------------

def test_irac_colors_selects_exactly_the_sources_detected_in_all_four_bands(catalog):
    expected = np.logical_and.reduce([_detected_by_hand(catalog, b) for b in IRAC_BANDS])
    colors = irac_colors(catalog)
    assert sorted(colors["id"]) == sorted(catalog.loc[expected, "id"])
    # The cuts must actually bite on the random sources, or this test proves nothing.
    random_rows = catalog["id"] < 9000
    assert 0 < expected[random_rows].sum() < random_rows.sum()
    flagged = np.logical_or.reduce([catalog[f"{b}_flag"] != 0 for b in IRAC_BANDS])
    nan_flux = np.logical_or.reduce([catalog[f"{b}_flux_ujy"].isna() for b in IRAC_BANDS])
    assert (flagged & random_rows).any() and (nan_flux & random_rows).any()
    assert not set(colors["id"]) & set(catalog.loc[flagged | nan_flux, "id"])


def test_irac_colors_values_for_a_known_row(catalog):
    colors = irac_colors(catalog).set_index("id")
    assert colors.loc[INSIDE_WEDGE_ID, "log_f58_f36"] == pytest.approx(np.log10(4.0))
    assert colors.loc[INSIDE_WEDGE_ID, "log_f80_f45"] == pytest.approx(np.log10(4.0))
    assert colors.loc[ABOVE_WEDGE_ID, "log_f58_f36"] == pytest.approx(0.2)
    assert colors.loc[ABOVE_WEDGE_ID, "log_f80_f45"] == pytest.approx(1.0)


def test_irac_colors_keeps_the_catalogue_index(catalog):
    colors = irac_colors(catalog)
    assert list(catalog.loc[colors.index, "id"]) == list(colors["id"])
    assert list(colors.columns) == ["id", "log_f58_f36", "log_f80_f45", "in_lacy_wedge"]


@pytest.mark.parametrize(
    ("source_id", "inside"),
    [(INSIDE_WEDGE_ID, True), (LEFT_OF_WEDGE_ID, False), (ABOVE_WEDGE_ID, False),
     (BELOW_WEDGE_ID, False)],
)
def test_in_lacy_wedge_for_placed_points(catalog, source_id, inside):
    colors = irac_colors(catalog).set_index("id")
    assert bool(colors.loc[source_id, "in_lacy_wedge"]) is inside


def test_agn_like_sources_fall_in_the_wedge(catalog):
    colors = irac_colors(catalog)
    random_sources = colors[colors["id"] < 9000]
    rising = random_sources["log_f58_f36"] > 0.1
    assert random_sources.loc[rising, "in_lacy_wedge"].mean() > 0.9
    assert random_sources["in_lacy_wedge"].sum() >= 20


@pytest.mark.parametrize("source_id", [FLAGGED_ID, NAN_FLUX_ID, LOW_SNR_ID, SNR_EXACTLY_3_ID,
                                       ZERO_ERROR_ID])
def test_irac_colors_excludes_flagged_nan_and_low_snr_rows(catalog, source_id):
    assert source_id not in set(irac_colors(catalog)["id"])


def test_irac_color_color_reports_what_it_plots(catalog):
    colors = irac_colors(catalog)
    fig = irac_color_color(catalog)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert f"{len(colors)} sources plotted" in ax.get_title()
    rows = catalog.loc[colors.index]
    n_nuv = int(_detected_by_hand(rows, "nuv").sum())
    n_chandra = int(rows["chandra_match"].sum())
    n_wedge = int(colors["in_lacy_wedge"].sum())
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert any("NUV" in label and f"({n_nuv})" in label for label in legend)
    assert any("Chandra" in label and f"({n_chandra})" in label for label in legend)
    assert any("Lacy" in label and f"({n_wedge} inside, " in label for label in legend)
    assert n_nuv > 0 and n_chandra > 0


def test_irac_color_color_without_an_irac_band_explains_instead_of_raising(catalog):
    partial = _drop_band(catalog, "irac4")
    with pytest.raises(ValueError, match="irac4_flux_ujy"):
        irac_colors(partial)
    fig = irac_color_color(partial)
    assert "not available" in fig.axes[0].get_title()
    assert "irac4_flux_ujy" in _panel_text(fig.axes[0])


def test_irac_color_color_without_galex_or_chandra_columns(catalog):
    bare = catalog.drop(columns=["chandra_match", "hardness_ratio"])
    for band in GALEX_BANDS:
        bare = _drop_band(bare, band)
    legend = [t.get_text() for t in irac_color_color(bare).axes[0].get_legend().get_texts()]
    assert not any("NUV" in label or "Chandra" in label for label in legend)


# --- flux_validation ----------------------------------------------------------------

def test_flux_validation_has_one_panel_per_band(catalog):
    fig = flux_validation(catalog)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == len(BANDS)


def test_flux_validation_with_truth_adds_two_rows(catalog, truth):
    assert len(flux_validation(catalog, truth=truth).axes) == 3 * len(BANDS)


def test_flux_validation_band_selection(catalog, truth):
    assert len(flux_validation(catalog, bands=["irac1", "nuv"]).axes) == 2
    assert len(flux_validation(catalog, bands="irac2,fuv", truth=truth).axes) == 6


def test_flux_validation_skips_bands_absent_from_the_table(catalog, truth):
    partial = _drop_band(_drop_band(catalog, "irac3"), "fuv")
    fig = flux_validation(partial)
    assert len(fig.axes) == len(BANDS) - 2
    assert [ax.get_title() for ax in fig.axes[:4]] == [
        "IRAC 3.6 µm", "IRAC 4.5 µm", "IRAC 8.0 µm", "GALEX NUV (227 nm)"]
    no_cosmos_column = catalog.drop(columns=[BANDS["irac2"].catalog_flux_column])
    assert len(flux_validation(no_cosmos_column).axes) == len(BANDS) - 1
    # With truth the band still has something to compare with.
    assert len(flux_validation(no_cosmos_column, truth=truth).axes) == 3 * len(BANDS)


def test_flux_validation_counts_only_good_sources(catalog):
    cosmos = catalog[BANDS["irac1"].catalog_flux_column]
    expected = int((_detected_by_hand(catalog, "irac1") & (cosmos > 0)).sum())
    fig = flux_validation(catalog, bands=["irac1"])
    assert _annotated_number(fig.axes[0], "N") == expected
    assert ((cosmos == -99) & _detected_by_hand(catalog, "irac1")).any()
    assert _annotated_number(fig.axes[0], "median measured / catalogue") == pytest.approx(1.0, abs=0.03)


def test_flux_validation_pulls_are_unit_gaussian_for_the_simulation(catalog, truth):
    fig = flux_validation(catalog, bands=["irac1"], truth=truth)
    pull_panel = fig.axes[2]
    assert 0.85 < _annotated_number(pull_panel, "σ") < 1.15
    assert 0.85 < _annotated_number(pull_panel, "σ(|pull| < 5)") < 1.15


def test_flux_validation_rejects_unknown_or_unplottable_bands(catalog):
    with pytest.raises(ValueError, match="unknown band"):
        flux_validation(catalog, bands=["irac9"])
    with pytest.raises(ValueError, match="columns needed"):
        flux_validation(_drop_band(catalog, "nuv"), bands=["nuv"])


# --- uv_ir_colors / uv_ir_color -----------------------------------------------------

def test_uv_ir_colors_magnitudes_for_a_known_row(catalog):
    colors = uv_ir_colors(catalog).set_index("id")
    known = colors.loc[UV_KNOWN_ID]
    assert known["fuv_mag_ab"] == pytest.approx(23.9)
    assert known["nuv_mag_ab"] == pytest.approx(21.4)
    assert known["irac1_mag_ab"] == pytest.approx(18.9)
    assert known["fuv_minus_nuv"] == pytest.approx(2.5)
    assert known["nuv_minus_irac1"] == pytest.approx(2.5)


def test_uv_ir_colors_selects_exactly_the_sources_detected_in_fuv_nuv_and_irac1(catalog):
    expected = np.logical_and.reduce([_detected_by_hand(catalog, b) for b in ("fuv", "nuv", "irac1")])
    assert sorted(uv_ir_colors(catalog)["id"]) == sorted(catalog.loc[expected, "id"])
    assert 0 < expected.sum() < len(catalog)


def test_uv_ir_color_has_a_hardness_colour_bar(catalog):
    colors = uv_ir_colors(catalog)
    fig = uv_ir_color(catalog)
    assert len(fig.axes) == 2
    ax, colorbar_ax = fig.axes
    assert f"{len(colors)} sources plotted" in ax.get_title()
    assert colorbar_ax.get_ylabel().startswith("Chandra hardness ratio")
    assert colorbar_ax.get_ylim() == pytest.approx((-1.0, 1.0))


def test_uv_ir_color_without_fuv_explains_instead_of_raising(catalog):
    partial = _drop_band(catalog, "fuv")
    with pytest.raises(ValueError, match="fuv_flux_ujy"):
        uv_ir_colors(partial)
    assert "not available" in uv_ir_color(partial).axes[0].get_title()


# --- save_figure --------------------------------------------------------------------

def test_save_figure_writes_a_png_atomically(catalog, tmp_path):
    path = tmp_path / "nested" / "folder" / "irac_cc.png"
    returned = save_figure(irac_color_color(catalog), path)
    assert returned == path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in path.parent.iterdir()] == ["irac_cc.png"]
    save_figure(uv_ir_color(catalog), str(path))
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in path.parent.iterdir()] == ["irac_cc.png"]


def test_save_figure_failure_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "figure.png"
    path.write_bytes(b"previous")
    fig = Figure()

    def failing_savefig(stream, **kwargs):
        stream.write(b"half a png")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", failing_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]


def test_save_figure_refuses_other_formats(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        save_figure(Figure(), tmp_path / "figure.pdf")


# --- inline display and slide figures -------------------------------------------------

def test_figures_display_as_png_in_ipython(catalog, truth):
    from IPython.core.formatters import DisplayFormatter

    for fig in (flux_validation(catalog, bands="irac1"), flux_comparison(catalog), flux_pulls(catalog, truth),
                irac_color_color(catalog), uv_ir_color(catalog)):
        assert isinstance(fig, InlineFigure)
        data, _ = DisplayFormatter().format(fig)
        assert data["image/png"][:8] == PNG_SIGNATURE


def test_flux_comparison_draws_flagged_sources_apart_and_names_their_bits(catalog):
    fig = flux_comparison(catalog, bands="irac1")
    ax = fig.axes[0]
    flux, error = catalog["irac1_flux_ujy"], catalog["irac1_flux_err_ujy"]
    cosmos = catalog[BANDS["irac1"].catalog_flux_column]
    shown = (error > 0) & (flux / error > 3) & (cosmos > 0)
    good = int((shown & (catalog["irac1_flag"] == 0)).sum())
    flagged = catalog.loc[shown & (catalog["irac1_flag"] != 0), "irac1_flag"]
    assert _annotated_number(ax, "N") == good
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert f"flag 0 ({good})" in legend
    bits = sorted({bit for value in flagged for bit in (1, 2, 4) if value & bit})
    flagged_label = next(label for label in legend if label.startswith("flag ≠ 0"))
    assert flagged_label.endswith(f"({len(flagged)})")
    for bit in bits:
        assert f"{bit} " in flagged_label
    assert "S/N > 3" in fig.get_suptitle()


def test_flux_comparison_is_slide_sized_with_legible_text(catalog, truth):
    fig = flux_comparison(catalog, truth=truth)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == len(BANDS)
    width, height = fig.get_size_inches()
    assert width <= 14 and height <= 10
    for ax in fig.axes:
        if ax.get_visible():
            assert ax.xaxis.label.get_size() >= 12
            assert all(label.get_size() >= 11 for label in ax.get_xticklabels())


def test_flux_pulls_states_and_uses_every_source_with_a_true_flux(catalog, truth):
    fig = flux_pulls(catalog, truth, bands="irac1")
    table = catalog.merge(truth, on="id", how="left")
    flux, error = table["irac1_flux_ujy"], table["irac1_flux_err_ujy"]
    usable = (error > 0) & flux.notna() & (table["true_irac1_flux_ujy"] > 0) & (table["irac1_flag"] == 0)
    assert _annotated_number(fig.axes[0], "N") == int(usable.sum())
    assert "no S/N cut" in fig.get_suptitle() and "flag 0" in fig.get_suptitle()


def test_flux_pulls_count_the_flagged_sources_under_the_statistics_with_no_legend_over_them(catalog, truth):
    fig = flux_pulls(catalog, truth, bands="irac1")
    table = catalog.merge(truth, on="id", how="left")
    flux, error = table["irac1_flux_ujy"], table["irac1_flux_err_ujy"]
    usable = (error > 0) & flux.notna() & (table["true_irac1_flux_ujy"] > 0)
    flagged = int((usable & (table["irac1_flag"] != 0)).sum())
    assert flagged > 0
    ax = fig.axes[0]
    assert ax.get_legend() is None
    assert _panel_text(ax).splitlines()[-1].startswith("flag ≠ 0")
    assert _panel_text(ax).endswith(f"({flagged})")
    assert "unit Gaussian" in fig.get_suptitle()


def test_uv_ir_axes_follow_bouquin_2015(catalog):
    ax = uv_ir_color(catalog).axes[0]
    assert ax.get_xlabel().startswith("NUV − [3.6]")
    assert ax.get_ylabel().startswith("FUV − NUV")


def test_uv_ir_colour_scale_is_not_filled_by_non_detections(catalog):
    # A match detected in one X-ray band only has no hardness ratio (NaN, not +-1).
    one_band = catalog.assign(hardness_ratio=catalog["hardness_ratio"].where(catalog["id"] != UV_KNOWN_ID))
    fig = uv_ir_color(one_band)
    ax = fig.axes[0]
    coloured = [c for c in ax.collections if c.get_array() is not None and len(c.get_array())]
    values = np.concatenate([np.asarray(c.get_array()) for c in coloured]) if coloured else np.empty(0)
    assert np.all(np.isfinite(values))
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert any("no HR" in label for label in legend)


def test_irac_color_color_marks_stars_and_notes_the_contamination(catalog):
    typed = catalog.assign(type=np.where(catalog["id"] % 7 == 0, 1, 0))
    fig = irac_color_color(typed)
    colors = irac_colors(typed)
    n_stars = int((typed.loc[colors.index, "type"] == 1).sum())
    legend = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert f"COSMOS2015 stars ({n_stars})" in legend
    assert any("Donley" in text.get_text() for text in fig.texts)


def test_a_saved_figure_displays_the_saved_image_until_it_changes(catalog, tmp_path):
    fig = irac_color_color(catalog)
    path = save_figure(fig, tmp_path / "irac.png")
    assert fig._repr_png_() == path.read_bytes()
    fig.axes[0].set_title("changed")
    redrawn = fig._repr_png_()
    assert redrawn[:8] == PNG_SIGNATURE and redrawn != path.read_bytes()
