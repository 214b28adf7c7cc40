"""The tutorial's method figure: the cutout fit it draws is the engine's fit, split into parts."""

import numpy as np
import pytest

from mbphot.engine import build_prf_table, forced_photometry
from mbphot.engine.solve import fit_quality_scale
from mbphot.method_figures import crossmatch_figure, field_cutouts, field_images, fit_cutout, method_figure
from synthetic import OVERSAMPLING, gaussian_prf_file, render

CUTOUT = 17
SHAPE = (60, 60)
NOISE = 0.01
SKY = 0.2


@pytest.fixture(scope="module")
def table():
    return build_prf_table(gaussian_prf_file(), oversampling=OVERSAMPLING, enclosed_fraction=0.9999)


def noisy_field(x, y, flux, seed=1):
    rng = np.random.default_rng(seed)
    return render(SHAPE, x, y, flux) + SKY + rng.normal(0.0, NOISE, SHAPE)


def test_isolated_source_leaves_a_residual_of_pure_noise(table):
    x, y, flux = np.array([30.3]), np.array([29.8]), np.array([5.0])
    fit = fit_cutout(noisy_field(x, y, flux), x, y, 0, table, CUTOUT, np.full(SHAPE, SKY), np.full(SHAPE, NOISE))
    assert abs(fit.flux - 5.0) < 3 * fit.flux_err
    residual = fit.residual_sigma
    assert 0.85 < np.sqrt(np.mean(residual**2)) < 1.15
    assert np.abs(residual).max() < 5.0
    assert np.abs(fit.neighbours).max() == 0.0
    assert fit.prf.sum() == pytest.approx(1.0, abs=1e-3)


def test_blended_neighbour_carries_its_own_light_in_the_model(table):
    x, y, flux = np.array([30.0, 32.5, 50.0]), np.array([30.0, 31.0, 50.0]), np.array([2.0, 8.0, 1.0])
    fit = fit_cutout(noisy_field(x, y, flux), x, y, 0, table, CUTOUT, np.full(SHAPE, SKY), np.full(SHAPE, NOISE))
    assert fit.neighbour_flux.size == 1, "the source 20 pixels away does not reach the cutout"
    assert fit.neighbour_flux[0] == pytest.approx(8.0, rel=0.02)
    assert fit.neighbours.sum() > 3 * fit.target.sum()
    assert np.sqrt(np.mean(fit.residual_sigma**2)) < 1.2


def test_target_flux_and_error_are_the_engines(table):
    x, y, flux = np.array([30.2, 33.0, 26.4]), np.array([29.6, 28.1, 33.0]), np.array([3.0, 6.0, 1.5])
    image, sky, sigma = noisy_field(x, y, flux, seed=7), np.full(SHAPE, SKY - 0.003), np.full(SHAPE, NOISE)
    fit = fit_cutout(image, x, y, 0, table, CUTOUT, sky, sigma)
    engine = forced_photometry(image, x, y, np.array([0]), table, CUTOUT, sky, sigma, fit_sky=True)
    assert fit.flux == pytest.approx(engine.flux[0], rel=1e-5)
    # The fit's statistical error: the engine's before it scales a poor fit's by sqrt(rchisq).
    assert fit.flux_err == pytest.approx(engine.flux_err[0] / fit_quality_scale(engine.rchisq[0]), rel=1e-5)
    assert fit.sky_offset == pytest.approx(0.003, abs=3 * NOISE / CUTOUT)


def test_method_figure_has_five_panels_a_source_and_renders_as_png(table):
    x, y, flux = np.array([30.0, 33.0]), np.array([30.0, 31.0]), np.array([2.0, 4.0])
    image = noisy_field(x, y, flux)
    fits = {f"source {i}": fit_cutout(image, x, y, i, table, CUTOUT, np.full(SHAPE, SKY), np.full(SHAPE, NOISE))
            for i in range(2)}
    figure = method_figure(fits, "irac1")
    assert len([ax for ax in figure.axes if ax.images]) == 10
    assert figure._repr_png_().startswith(b"\x89PNG")


@pytest.fixture(scope="module")
def ideal_field(tmp_path_factory):
    from mbphot import RunParameters, retrieve

    work = tmp_path_factory.mktemp("method_field")
    params = RunParameters(radius_arcmin=1.0, bands="irac1,nuv", realism="ideal", seed=3,
                           data_dir=str(work / "data"), output_dir=str(work / "output"))
    return retrieve(params, progress=False)


def test_field_images_show_every_band_on_the_simulated_field(ideal_field):
    figure = field_images(ideal_field, ["irac1", "nuv"])
    assert len([ax for ax in figure.axes if ax.images]) == 2
    assert figure._repr_png_().startswith(b"\x89PNG")


def test_a_bright_source_of_the_ideal_field_is_fitted_to_the_noise(ideal_field):
    from mbphot.bands import get_band
    from mbphot.retrieve import load_catalog, load_truth

    truth = load_truth(ideal_field)
    in_field = truth[truth["id"].isin(load_catalog(ideal_field).query("in_field")["id"])]
    bright = in_field.sort_values("true_irac1_flux_ujy").iloc[-len(in_field) // 4]
    fit = field_cutouts(ideal_field, "irac1", [bright["id"]])[bright["id"]]
    flux_ujy = fit.flux * get_band("irac1").ujy_per_pixel_unit
    error_ujy = fit.flux_err * get_band("irac1").ujy_per_pixel_unit
    assert abs(flux_ujy - bright["true_irac1_flux_ujy"]) < 4 * error_ujy
    assert np.sqrt(np.nanmean(fit.residual_sigma**2)) < 1.5


def test_crossmatch_figure_marks_the_counterpart_and_its_probabilities(ideal_field):
    import pandas as pd

    from mbphot.retrieve import load_catalog, load_chandra, load_truth

    chandra, catalog, truth = load_chandra(ideal_field), load_catalog(ideal_field), load_truth(ideal_field)
    chandra_ids = np.asarray(chandra["SOURCE_NUMBER"])
    counterparts = truth[truth["true_chandra_id"].isin(chandra_ids)]
    assert len(counterparts) > 0, "the field needs an X-ray source with a counterpart"
    first = counterparts.iloc[0]
    name = str(chandra["NAME"][np.flatnonzero(chandra_ids == first["true_chandra_id"])[0]]).strip()
    matches = pd.DataFrame({"id": [first["id"]], "chandra_name": [name], "nway_p_any": [0.93], "nway_p_i": [0.81]})
    figure = crossmatch_figure(ideal_field, "irac1", chandra, matches, catalog, n_panels=len(chandra))
    titles = [ax.get_title() for ax in figure.axes]
    assert f"{name}\np_any 0.93, p_i 0.81" in titles
    assert sum("no confident counterpart" in title for title in titles) == len(titles) - 1
    assert figure._repr_png_().startswith(b"\x89PNG")
