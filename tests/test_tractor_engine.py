"""The Tractor engine against the native engine on synthetic images with known truth."""

import numpy as np
import pytest

pytest.importorskip(
    "tractor.lsqr_optimizer",
    reason="The Tractor (github.com/dstndstn/tractor, with astrometry.net's astrometry.util) is not installed",
)

import tractor
from mbphot.engine import FLAGS, build_prf_table, forced_photometry
from mbphot.engine.tractor import tractor_photometry
from synthetic import FWHM_PIX, OVERSAMPLING, pixel_integrated_gaussian, render

CUTOUT = 17
NOISE = 0.01


@pytest.fixture(scope="module")
def table():
    n = 2 * 8 * OVERSAMPLING + 1
    offsets = (np.arange(n) - (n - 1) / 2) / OVERSAMPLING
    prf = np.outer(pixel_integrated_gaussian(offsets), pixel_integrated_gaussian(offsets))
    return build_prf_table(prf / prf.max(), oversampling=OVERSAMPLING, enclosed_fraction=0.9999)


def both_engines(image, x, y, targets, table, sigma=NOISE, fit_sky=False):
    args = (image, x, y, targets, table, CUTOUT)
    return (
        forced_photometry(*args, sky=0.0, sigma=sigma, fit_sky=fit_sky),
        tractor_photometry(*args, sky=0.0, sigma=sigma, fit_sky=fit_sky),
    )


def test_unit_flux_point_source_renders_with_unit_flux_on_integer_pixel_centres(table):
    stamp = table.stamp_at(0.0, 0.0)
    assert stamp.sum() == pytest.approx(1.0, abs=2e-4), "the stamp keeps the PRF's unit normalisation"
    image = tractor.Image(data=np.zeros((41, 41)), invvar=np.ones((41, 41)), psf=tractor.PixelizedPSF(stamp))
    model = tractor.Tractor([image], [tractor.PointSource(tractor.PixPos(20.0, 20.0), tractor.Flux(1.0))])
    rendered = model.getModelImage(0)
    assert rendered.sum() == pytest.approx(1.0, abs=2e-4)
    assert np.unravel_index(np.argmax(rendered), rendered.shape) == (20, 20), "0-based, centres on integers"
    assert np.allclose(rendered, render((41, 41), 20.0, 20.0, 1.0), atol=1e-6)


def test_isolated_source_recovers_its_flux_with_the_native_error(table):
    rng = np.random.default_rng(1)
    image = render((61, 61), 30.3, 29.8, 5.0) + rng.normal(0, NOISE, (61, 61))
    (_, native_err, _), (flux, err, flag) = both_engines(image, [30.3], [29.8], [0], table)
    assert flag[0] == 0
    assert abs(flux[0] - 5.0) < 3 * err[0]
    assert err[0] == pytest.approx(native_err[0], rel=0.05)


@pytest.mark.parametrize("fit_sky", [False, True])
def test_pair_one_fwhm_apart_agrees_with_the_native_engine(table, fit_sky):
    rng = np.random.default_rng(2)
    x = np.array([30.0, 30.0 + FWHM_PIX])
    y = np.array([30.2, 30.2])
    true_flux = np.array([4.0, 2.0])
    sky_offset = 0.05 if fit_sky else 0.0  # left in the image for the fitted sky to absorb
    image = render((61, 61), x, y, true_flux) + sky_offset + rng.normal(0, NOISE, (61, 61))
    (native, native_err, native_flag), (flux, err, flag) = both_engines(image, x, y, [0, 1], table, fit_sky=fit_sky)
    assert np.all(flag == 0) and np.all(native_flag == 0)
    assert np.all(np.abs(flux - native) < 0.01 * true_flux)
    assert np.allclose(err, native_err, rtol=0.05)
    assert np.all(np.abs(flux - true_flux) < 3 * err)


def test_error_of_a_close_blend_includes_the_covariance_with_the_neighbour(table):
    rng = np.random.default_rng(3)
    x = np.array([30.0, 30.0 + 0.3 * FWHM_PIX])
    y = np.array([30.0, 30.0])
    image = render((61, 61), x, y, [4.0, 2.0]) + rng.normal(0, NOISE, (61, 61))
    (_, native_err, _), (_, err, flag) = both_engines(image, x, y, [0, 1], table)
    isolated_err = NOISE / np.sqrt((table.stamp_at(30.0, 30.0) ** 2).sum())
    assert np.all(flag == 0)
    assert np.all(err > 1.5 * isolated_err), "an error with neighbours held fixed would be the isolated one"
    assert np.allclose(err, native_err, rtol=0.05)


def test_positions_stay_frozen_and_only_fluxes_are_fitted(table, monkeypatch):
    fitted_models = []
    optimize = tractor.Tractor.optimize_forced_photometry

    def recording(model, **kwargs):
        result = optimize(model, **kwargs)
        fitted_models.append(model)
        return result

    monkeypatch.setattr(tractor.Tractor, "optimize_forced_photometry", recording)
    x = np.array([30.3, 33.1, 26.8])
    y = np.array([29.8, 31.4, 28.9])
    image = render((61, 61), x, y, [5.0, 3.0, 1.0]) + np.random.default_rng(4).normal(0, NOISE, (61, 61))
    tractor_photometry(image, x, y, [0], table, CUTOUT, sky=0.0, sigma=NOISE, fit_sky=True)

    (model,) = fitted_models
    origin = np.array([30, 30]) - CUTOUT // 2
    positions = np.array([[source.pos.x, source.pos.y] for source in model.catalog])
    assert np.array_equal(positions, np.column_stack([x, y]) - origin), "target first, then neighbours, unmoved"
    assert all(name.endswith(("brightness.Flux", "sky.sky")) for name in model.getParamNames())
    assert sum(name.endswith("sky.sky") for name in model.getParamNames()) == 1


def test_nan_covered_and_off_image_targets_are_flagged_like_the_native_engine(table):
    image = render((61, 61), [30.3, 10.0], [29.8, 10.0], [5.0, 5.0])
    image[20:40, 20:40] = np.nan
    x, y = [30.3, 10.0, 80.0], [29.8, 10.0, 30.0]
    (native, _, native_flag), (flux, err, flag) = both_engines(image, x, y, [0, 1, 2], table)
    assert np.array_equal(flag, native_flag)
    assert flag[0] & FLAGS["no_data"] and np.isnan(flux[0]) and np.isnan(err[0])
    assert flag[1] == 0 and flux[1] == pytest.approx(native[1], rel=1e-3)
    assert flag[2] & FLAGS["off_image"] and np.isnan(flux[2])


def test_all_zero_inverse_variance_is_flagged_not_fitted(table):
    image = render((61, 61), 30.3, 29.8, 5.0)
    (_, _, native_flag), (flux, err, flag) = both_engines(image, [30.3], [29.8], [0], table, sigma=np.inf)
    assert np.array_equal(flag, native_flag)
    assert flag[0] & FLAGS["no_data"] and np.isnan(flux[0]) and np.isnan(err[0])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_tractor_failure_sets_fit_failed_and_leaves_nan(table):
    # The Tractor works in float32: pixel values beyond its range make its fit fail, while
    # the native engine, in float64, still measures the source.
    image = render((61, 61), [30.3, 10.0], [29.8, 10.0], [5.0, 5.0])
    image[20:40, 20:40] *= 1e39
    x, y = [30.3, 10.0], [29.8, 10.0]
    (native, _, native_flag), (flux, err, flag) = both_engines(image, x, y, [0, 1], table)
    assert native_flag[0] == 0 and np.isfinite(native[0])
    assert flag[0] == FLAGS["fit_failed"] and np.isnan(flux[0]) and np.isnan(err[0])
    assert flag[1] == 0 and np.isfinite(flux[1]), "one failed cutout does not stop the others"


def test_an_exception_inside_the_tractor_is_caught_per_target(table, monkeypatch):
    optimize = tractor.Tractor.optimize_forced_photometry
    calls = []

    def failing_first(model, **kwargs):
        calls.append(model)
        if len(calls) == 1:
            raise AssertionError("simulated Tractor failure")
        return optimize(model, **kwargs)

    monkeypatch.setattr(tractor.Tractor, "optimize_forced_photometry", failing_first)
    image = render((61, 61), [20.0, 40.0], [20.0, 40.0], [5.0, 5.0])
    flux, err, flag = tractor_photometry(image, [20.0, 40.0], [20.0, 40.0], [0, 1], table, CUTOUT, 0.0, NOISE)[:3]
    assert flag[0] == FLAGS["fit_failed"] and np.isnan(flux[0]) and np.isnan(err[0])
    assert flag[1] == 0 and flux[1] == pytest.approx(5.0, rel=1e-3)


@pytest.mark.parametrize("stand_in", [None, "unrelated"])
def test_missing_or_wrong_tractor_gives_an_install_hint(table, monkeypatch, stand_in):
    import sys
    import types

    for name in [name for name in sys.modules if name.startswith("tractor.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tractor", None if stand_in is None else types.ModuleType("tractor"))
    with pytest.raises(ImportError, match="not on PyPI"):
        tractor_photometry(np.zeros((61, 61)), [30.0], [30.0], [0], table, CUTOUT, 0.0, NOISE)
