"""Forced photometry over a small simulated field, checked against the known truth."""

import numpy as np
import pytest

from mbphot.bands import BAND_NAMES
from mbphot.engine import FLAGS
from mbphot.params import RunParameters
from mbphot.photometry import band_overview, measure_field
from mbphot.retrieve import load_truth, retrieve


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    params = RunParameters(ra=150.10, dec=2.30, radius_arcmin=1.2, seed=3, realism="ideal",
                           data_dir=str(tmp_path_factory.mktemp("d")))
    manifest = retrieve(params)
    photometry = measure_field(manifest, list(BAND_NAMES), n_workers=2, progress=False, mode="source")
    return manifest, photometry.merge(load_truth(manifest), on="id")


@pytest.mark.parametrize("band", BAND_NAMES)
def test_fluxes_are_unbiased_and_uncertainties_honest(field, band):
    _, table = field
    flux = table[f"{band}_flux_ujy"]
    error = table[f"{band}_flux_err_ujy"]
    true = table[f"true_{band}_flux_ujy"]
    flag = table[f"{band}_flag"]
    assert (flag & ~(FLAGS["blended"] | FLAGS["poor_fit"]) == 0).all(), "every source measured"
    assert 0 <= table[f"{band}_rchisq"].min() and table[f"{band}_rchisq"].median() < 1.5
    pull = (flux - true) / error
    bright = true / error > 10
    median_bias = np.median((flux[bright] - true[bright]) / true[bright])
    flagged = (flag[bright] != 0).mean()
    print(f"{band}: {bright.sum()} sources S/N>10, median bias {median_bias:+.4f}, pull std {pull.std():.3f}, "
          f"{flagged:.1%} of them flagged; {(flag != 0).mean():.1%} of all")
    assert flagged < 0.05
    assert bright.sum() >= 20
    assert abs(median_bias) < 0.02
    assert 0.85 < pull.std() < 1.15
    assert abs(np.median(pull)) < 0.15


def test_rerun_reuses_finished_partitions(field):
    manifest, table = field
    files = sorted((manifest.directory / "photometry").glob("v*_mbphot_source_sky-auto_*/irac1/*.parquet"))
    assert files, "each partition's result is a file of its own"
    stamps = [path.stat().st_mtime_ns for path in files]
    again = measure_field(manifest, ["irac1"], n_workers=1, progress=False, mode="source")
    assert again.attrs["partitions"]["measured"] == 0
    assert [path.stat().st_mtime_ns for path in files] == stamps
    assert np.array_equal(again["irac1_flux_ujy"].to_numpy(), table["irac1_flux_ujy"].to_numpy())


def test_one_process_and_two_give_identical_fluxes(field):
    manifest, table = field
    single = measure_field(manifest, ["nuv"], n_workers=1, progress=False, reuse=False, mode="source")
    for column in ("nuv_flux_ujy", "nuv_flux_err_ujy", "nuv_flag"):
        assert np.array_equal(single[column].to_numpy(), table[column].to_numpy(), equal_nan=True)


def test_band_overview_counts(field):
    _, table = field
    overview = band_overview(table, ["irac1", "fuv"])
    assert overview.loc["irac1", "clean (flag 0)"] == (table["irac1_flag"] == 0).sum() > 0.8 * len(table)
    assert overview.loc["irac1", "S/N > 3"] > overview.loc["fuv", "S/N > 3"]


def test_source_masked_background_bias_is_taken_out(field):
    """On IRAC (no archive sky map) the source-masked background includes the light of
    unmasked PRF wings and biased faint fluxes low by about half a sigma; the calibration's
    sky offset (the median residual of a fit of the whole section) takes it out, and the
    default fitted sky tiles take out what varies across the image."""
    manifest, _ = field
    truth = load_truth(manifest)
    bias = {}
    for sky in ("map", "auto"):
        table = measure_field(manifest, ["irac1"], n_workers=1, progress=False, sky=sky, mode="source").merge(
            truth, on="id"
        )
        faint = (table["true_irac1_flux_ujy"] / table["irac1_flux_err_ujy"]).between(3, 10)
        bias[sky] = np.median((table["irac1_flux_ujy"] - table["true_irac1_flux_ujy"])[faint] / table["irac1_flux_err_ujy"][faint])
    print(f"median (measured - true)/error for S/N 3-10: sky map only {bias['map']:+.2f}, fitted sky {bias['auto']:+.2f}")
    assert abs(bias["map"]) < 0.2
    assert abs(bias["auto"]) < 0.15


@pytest.mark.parametrize("band", ["irac1", "nuv"])
def test_scene_mode_agrees_with_per_source_mode(field, band):
    manifest, table = field
    scene = measure_field(manifest, [band], n_workers=1, progress=False, mode="scene").merge(
        load_truth(manifest), on="id"
    )
    flux_col, err_col = f"{band}_flux_ujy", f"{band}_flux_err_ujy"
    pull = (scene[flux_col] - scene[f"true_{band}_flux_ujy"]) / scene[err_col]
    difference = (scene[flux_col] - table[flux_col]) / table[err_col]
    print(f"{band} scene: pull std {pull.std():.3f}, median |scene - source| {difference.abs().median():.3f} sigma")
    coverage = FLAGS["off_image"] | FLAGS["no_data"] | FLAGS["partial_coverage"] | FLAGS["fit_failed"]
    assert (scene[f"{band}_flag"] & coverage == table[f"{band}_flag"] & coverage).all()
    assert 0.85 < pull.std() < 1.15
    assert difference.abs().median() < 0.3


def test_unknown_engine_or_mode_is_refused(field):
    manifest, _ = field
    with pytest.raises(ValueError, match="unknown engine 'foo'"):
        measure_field(manifest, ["irac1"], engine="foo")
    with pytest.raises(ValueError, match="unknown mode 'Scene'"):
        measure_field(manifest, ["irac1"], mode="Scene")


def test_galex_source_noise_is_read_from_the_smoothed_image():
    """A GALEX pixel's own count in its variance weighs its low counts up and its high ones
    down: 360 sources of 500-5,000 counts on 2 sky counts per pixel come out about 2 % low
    with the raw pixels' Poisson variance, unbiased with the smoothed image's
    (`_source_variance`), whose errors match the scatter."""
    from mbphot.engine import build_prf_table
    from mbphot.engine.scene import scene_photometry
    from mbphot.photometry._background import _poisson_sigma
    from synthetic import gaussian_prf_file, render

    rng = np.random.default_rng(3)
    side = 400
    grid_x, grid_y = np.meshgrid(np.arange(15.0, side - 10, 20.0), np.arange(15.0, side - 10, 20.0))
    x = grid_x.ravel() + rng.uniform(-0.5, 0.5, grid_x.size)
    y = grid_y.ravel() + rng.uniform(-0.5, 0.5, grid_x.size)
    exposure_s, sky_rate = 1000.0, 0.002
    flux_rate = rng.uniform(0.5, 5.0, x.size)
    image = rng.poisson((render((side, side), x, y, flux_rate) + sky_rate) * exposure_s) / exposure_s
    table = build_prf_table(gaussian_prf_file(), 5)
    raw = np.sqrt((sky_rate + np.clip(image - sky_rate, 0, None)) / exposure_s)
    results = {}
    for name, sigma in (("smoothed", _poisson_sigma(image, sky_rate, np.full(image.shape, exposure_s))), ("raw", raw)):
        flux, error = scene_photometry(image, x, y, np.arange(x.size), table, 17, sky=sky_rate, sigma=sigma,
                                       correct_positions=False)[:2]
        results[name] = (np.median(flux / flux_rate - 1), np.std((flux - flux_rate) / error))
    print({name: f"bias {100 * bias:+.2f} %, pull sd {pull:.3f}" for name, (bias, pull) in results.items()})
    assert abs(results["smoothed"][0]) < 0.005
    assert 0.9 < results["smoothed"][1] < 1.12
    assert results["raw"][0] < -0.01
