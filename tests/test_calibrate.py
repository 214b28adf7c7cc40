"""Flux-error calibration: correlated-noise inflation and the PRF-model error term."""

from dataclasses import replace

import numpy as np
import pytest

from mbphot.bands import BANDS
from mbphot.calibration import DEFAULT_POSITION_SCATTER_ARCSEC, DEFAULT_PRF_ERROR, calibrate_section
from mbphot.engine import build_prf_table, scene_photometry
from mbphot.engine.calibrate import correlated_noise_scale, excess_scatter, noise_inflation, prf_model_error
from mbphot.engine.epsf import measure_prf
from epsf_fields import file_prf, make_field


@pytest.fixture(scope="module")
def stamp():
    return build_prf_table(file_prf(), 1).stamp_at(0.0, 0.0)


def block_replication_factor(stamp, block=2):
    """Exact k for noise made on a grid ``block`` times coarser and replicated: the
    PRF-weighted sum's variance grows by sum over blocks of (sum of P in it)^2 / sum of P^2."""
    size = stamp.shape[0] + block
    padded = np.zeros((size + (-size) % block, size + (-size) % block))
    padded[: stamp.shape[0], : stamp.shape[1]] = stamp
    sums = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block).sum(axis=(1, 3))
    return float(np.sqrt((sums**2).sum() / (stamp**2).sum()))


def test_white_noise_is_not_inflated(stamp):
    noise = np.random.default_rng(1).normal(0.0, 2.0, (400, 400))
    k = noise_inflation(noise, 2.0, stamp, n_samples=4000, rng=np.random.default_rng(2))
    print(f"white noise: k = {k:.3f}")
    assert k == pytest.approx(1.0, abs=0.05)


def test_noise_resampled_from_a_coarser_grid_is_inflated_about_twice(stamp):
    coarse = np.random.default_rng(3).normal(0.0, 2.0, (300, 300))
    noise = np.kron(coarse, np.ones((2, 2)))  # each 2x2 block one value: sigma per pixel still 2
    k = noise_inflation(noise, np.full(noise.shape, 2.0), stamp, n_samples=50000, rng=np.random.default_rng(4))
    expected = block_replication_factor(stamp)
    print(f"2x coarser noise: k = {k:.3f}, exact {expected:.3f}")
    assert k == pytest.approx(2.0, rel=0.1)
    assert k == pytest.approx(expected, rel=0.05)


def test_inflation_ignores_a_few_bright_residuals_and_masked_pixels(stamp):
    rng = np.random.default_rng(5)
    noise = rng.normal(0.0, 1.0, (400, 400))
    spoiled = noise.copy()
    rows, cols = rng.integers(10, 390, 20), rng.integers(10, 390, 20)
    spoiled[rows, cols] += 300.0  # unmasked residuals of bright sources
    k = noise_inflation(spoiled, 1.0, stamp, n_samples=4000, rng=np.random.default_rng(6))
    assert k == pytest.approx(1.0, abs=0.06)
    # Masked: no sampled position may touch them, and NaN pixels are no data.
    mask = np.zeros(noise.shape, dtype=bool)
    mask[rows, cols] = True
    huge = noise.copy()
    huge[rows, cols] = 1e6
    huge[:50, :50] = np.nan
    k_masked = noise_inflation(huge, 1.0, stamp, n_samples=4000, rng=np.random.default_rng(6), mask=mask)
    assert k_masked == pytest.approx(1.0, abs=0.06)
    assert np.isnan(noise_inflation(np.full((10, 10), np.nan), 1.0, stamp, rng=np.random.default_rng(0)))


def varying_core(x, y):
    """The PRF broadens from 1.2 to 1.5 px (sigma along x) across the 400 px field."""
    return (1.2 + 0.3 * x / 400, 1.1 + 0.1 * y / 400, np.radians(30.0))


def true_scatter(field, measured):
    """Spread of noise-free PRF-fit fluxes over true fluxes of the stars used."""
    stars = measured.star_indices
    table = build_prf_table(measured.prf, measured.oversampling)
    flux, _, _ = scene_photometry(field.noise_free, field.x_cat, field.y_cat, stars, table, 23, 0.0, field.sigma)[:3]
    return float(np.std(flux / field.flux[stars]))


def test_prf_model_error_follows_the_prf_variation_across_the_field():
    varying = make_field(seed=2, core_of=varying_core, jitter_arcsec=0.0, offset=(0.0, 0.0))
    # True fluxes model the neighbours (the first pass is exercised in test_epsf.py).
    measured = measure_prf(varying.image, 0.0, varying.sigma, varying.x_cat, varying.y_cat, file_prf(), 1,
                           fluxes=varying.flux)
    epsilon = prf_model_error(varying.image, 0.0, varying.sigma, varying.x_cat, varying.y_cat,
                              measured.prf, measured.oversampling, measured.star_indices, fluxes=varying.flux)
    truth = true_scatter(varying, measured)

    constant = make_field(seed=2, jitter_arcsec=0.0, offset=(0.0, 0.0))
    measured_constant = measure_prf(constant.image, 0.0, constant.sigma, constant.x_cat, constant.y_cat,
                                    file_prf(), 1, fluxes=constant.flux)
    epsilon_constant = prf_model_error(constant.image, 0.0, constant.sigma, constant.x_cat, constant.y_cat,
                                       measured_constant.prf, measured_constant.oversampling,
                                       measured_constant.star_indices, fluxes=constant.flux)
    print(f"PRF varying across the field: epsilon {epsilon:.4f}, true scatter {truth:.4f}; "
          f"constant PRF: epsilon {epsilon_constant:.4f} (true {true_scatter(constant, measured_constant):.4f})")
    assert 0.67 * truth < epsilon < 1.5 * truth
    assert epsilon_constant < 0.005


def test_excess_scatter_is_the_scatter_beyond_the_noise():
    rng = np.random.default_rng(3)
    # Stars of every brightness, with a 2 % PRF error on top of their noise.
    statistical = rng.uniform(0.005, 0.08, 400)
    deviation = rng.normal(0.0, np.hypot(statistical, 0.02))
    assert excess_scatter(deviation, statistical, 0.002) == pytest.approx(0.02, rel=0.2)
    # 21 stars of S/N 15-100 scattering as their noise says (no PRF error): the faint ones'
    # squares fall as they may, and weigh as little as they tell. Counted equally (the mean of
    # deviation^2 - statistical^2), one field in ten read above 0.03.
    estimates = []
    for _ in range(200):
        statistical = rng.uniform(0.01, 0.07, 21)
        deviation = rng.normal(0.0, statistical)
        estimates.append(excess_scatter(deviation - np.median(deviation), statistical, 0.005))
    assert np.median(estimates) == 0.005 and np.percentile(estimates, 90) < 0.02


def test_an_excess_scatter_the_stars_barely_show_is_left_at_the_floor():
    rng = np.random.default_rng(5)
    # IRAC 5.8-8 um on a 9' field: 20 stars with aperture errors of 2-9 % and no PRF error.
    # Most likely, their scatter beyond the noise reads above 1 % in more than a third of fields;
    # asked for 2-sigma evidence, also without the star farthest off, in about one in a hundred.
    plain, evidenced = [], []
    for _ in range(300):
        statistical = rng.uniform(0.02, 0.09, 20)
        deviation = rng.normal(0.0, statistical)
        deviation -= np.median(deviation)
        plain.append(excess_scatter(deviation, statistical, 0.005))
        evidenced.append(excess_scatter(deviation, statistical, 0.005, min_evidence=4.0))
    plain, evidenced = np.array(plain), np.array(evidenced)
    print(f"fields reading above 1 %: {np.mean(plain > 0.01):.2f} most likely, {np.mean(evidenced > 0.01):.3f} with evidence")
    assert np.mean(plain > 0.01) > 0.1
    assert np.mean(evidenced > 0.01) < 0.05
    # A PRF error that outweighs the stars' noise is still found.
    statistical = rng.uniform(0.005, 0.02, 20)
    deviation = rng.normal(0.0, np.hypot(statistical, 0.03))
    assert excess_scatter(deviation, statistical, 0.005, min_evidence=4.0) == pytest.approx(0.03, rel=0.35)
    # One star 5 sigma off (a missed neighbour) among 16 that scatter as their noise says: a
    # PRF error would move them all.
    statistical = np.r_[rng.uniform(0.02, 0.09, 16), 0.005]
    deviation = np.r_[rng.normal(0.0, statistical[:16]), 0.025]
    deviation -= np.median(deviation)
    assert excess_scatter(deviation, statistical, 0.005) > 0.01
    assert excess_scatter(deviation, statistical, 0.005, min_evidence=4.0) == 0.005


def test_prf_model_error_needs_stars():
    field = make_field(seed=4, side=100, n_stars=3, n_galaxies=5, n_faint=10)
    assert np.isnan(prf_model_error(field.image, 0.0, field.sigma, field.x_cat, field.y_cat, file_prf(), 1,
                                    np.arange(3), fluxes=field.flux))


def test_autocovariance_scale_is_one_on_white_noise_and_grows_with_resampling(stamp):
    noise = np.random.default_rng(11).normal(0.0, 2.0, (300, 300))
    assert correlated_noise_scale(noise, 2.0, stamp) == pytest.approx(1.0, abs=0.05)
    coarse = np.kron(np.random.default_rng(12).normal(0.0, 2.0, (150, 150)), np.ones((2, 2)))
    assert correlated_noise_scale(coarse, 2.0, stamp) == pytest.approx(block_replication_factor(stamp), rel=0.05)


def test_autocovariance_scale_ignores_bright_residuals_and_masked_areas(stamp):
    rng = np.random.default_rng(13)
    noise = rng.normal(0.0, 1.0, (300, 300))
    rows, cols = rng.integers(10, 290, 30), rng.integers(10, 290, 30)
    noise[rows, cols] += 300.0
    mask = np.zeros(noise.shape, dtype=bool)
    mask[:100] = True
    noise[:100] += 5.0 * np.sin(np.arange(300) / 3.0)  # structure where masked
    assert correlated_noise_scale(noise, 1.0, stamp, mask=mask) == pytest.approx(1.0, abs=0.06)


def test_noise_scale_reads_the_noise_inside_the_catalogue_and_not_the_light_beyond(stamp):
    from mbphot.calibration import _noise_scale
    from mbphot.engine.epsf import render_sources

    rng = np.random.default_rng(31)
    side = 400
    noise = np.kron(rng.normal(0.0, 1.0, (side // 2, side // 2)), np.ones((2, 2)))
    table = build_prf_table(file_prf(), 1)
    # A round catalogue in a square section: the corners hold sources the catalogue lacks.
    cat_x, cat_y = rng.uniform(0, side, (2, 8000))
    in_field = np.hypot(cat_x - side / 2, cat_y - side / 2) < 0.4 * side
    far_x, far_y = rng.uniform(0, side, (2, 3000))
    corners = np.hypot(far_x - side / 2, far_y - side / 2) > 0.45 * side
    light = render_sources(noise.shape, far_x[corners], far_y[corners], np.full(corners.sum(), 20.0), table)
    model = np.zeros(noise.shape)
    measured = _noise_scale(noise + light, 1.0, model, table, BANDS["irac1"], cat_x[in_field], cat_y[in_field])
    assert measured == pytest.approx(block_replication_factor(stamp), rel=0.05)
    everywhere_x, everywhere_y = rng.uniform(0, side, (2, 8000))
    unaware = _noise_scale(noise + light, 1.0, model, table, BANDS["irac1"], everywhere_x, everywhere_y)
    assert unaware > 1.1 * measured


def test_calibration_measures_the_prf_offset_and_correlated_noise():
    field = make_field(21, side=300, n_stars=160, n_galaxies=150, n_faint=600)
    coarse = np.random.default_rng(22).normal(0.0, 1.0, (150, 150))
    correlated = field.noise_free + np.kron(coarse, np.ones((2, 2)))  # per-pixel sigma 1, correlated
    band = replace(BANDS["irac1"], prf_core_radius_pixels=None, calibration_core_radius_pixels=None, calibration_radius_arcsec=None)
    result = calibrate_section(correlated, 0.0, np.ones(correlated.shape), field.x_cat, field.y_cat, file_prf(), 1, band,
                               stars=np.flatnonzero(field.is_star))
    print(result.summary())
    assert not result.used_file and result.n_stars >= 20
    assert result.offset_x_pix == pytest.approx(field.offset[0], abs=0.08)  # 0.05": 160 stars in correlated noise
    assert result.offset_y_pix == pytest.approx(field.offset[1], abs=0.08)
    assert result.noise_scale == pytest.approx(block_replication_factor(build_prf_table(result.prf, result.oversampling).stamp_at(0, 0)), rel=0.15)
    assert result.prf_error < 0.02
    assert result.prf.sum() == pytest.approx(result.oversampling**2, rel=1e-6)


def test_calibration_keeps_the_file_prf_without_stars_and_says_why():
    field = make_field(23, side=120, n_stars=2, n_galaxies=10, n_faint=100)
    result = calibrate_section(field.image, 0.0, np.ones(field.image.shape), field.x_cat, field.y_cat, file_prf(), 1,
                               replace(BANDS["irac1"], resampled_noise=False))
    assert result.used_file and "fewer than" in result.reason
    assert result.noise_scale == 1.0 and result.prf_error == DEFAULT_PRF_ERROR


@pytest.mark.parametrize("jitter_arcsec", [0.12, 0.3])
def test_calibration_measures_the_catalogues_position_scatter(jitter_arcsec):
    field = make_field(31, side=300, n_stars=160, n_galaxies=150, n_faint=600, jitter_arcsec=jitter_arcsec)
    band = replace(BANDS["irac1"], prf_core_radius_pixels=None, calibration_core_radius_pixels=None, calibration_radius_arcsec=None, resampled_noise=False)
    result = calibrate_section(field.image, 0.0, np.ones(field.image.shape), field.x_cat, field.y_cat, file_prf(), 1, band,
                               stars=np.flatnonzero(field.is_star))
    per_axis = jitter_arcsec / np.sqrt(2)
    print(f"catalogue scatter {per_axis:.3f}\" per axis: measured {result.position_scatter_arcsec:.3f}\"")
    assert result.position_scatter_arcsec == pytest.approx(per_axis, rel=0.25)


def test_too_few_bright_sources_give_the_default_position_scatter():
    field = make_field(32, side=200, n_stars=8, n_galaxies=0, n_faint=300, jitter_arcsec=0.3)
    band = replace(BANDS["irac1"], prf_core_radius_pixels=None, calibration_core_radius_pixels=None, calibration_radius_arcsec=None, resampled_noise=False)
    result = calibrate_section(field.image, 0.0, np.ones(field.image.shape), field.x_cat, field.y_cat, file_prf(), 1, band)
    assert result.position_scatter_arcsec == pytest.approx(DEFAULT_POSITION_SCATTER_ARCSEC)
