"""The PRF's change across an image, measured from the residuals of its bright point sources
(`mbphot.engine.variation`), and what fitting with its variants gives."""

import numpy as np
import pytest

from mbphot.engine import build_prf_table, scene_photometry
from mbphot.engine.epsf import measure_prf, render_sources
from mbphot.engine.scene import disc_tables
from mbphot.engine.variation import measure_variation, profile_indices, source_terms, variation_basis, variation_map
from epsf_fields import TRUE_CORE, file_prf, make_field

SIDE = 400


def turning_core(x, y):
    """The sky's core ellipse turns by 90 degrees across the field (a mosaic whose mix of two
    rolls changes from one side to the other)."""
    return (1.45, 1.05, np.radians(90.0) * x / SIDE)


def fit_and_measure(field):
    """The field fitted with its stars' mean PRF; the variation measured from the residual."""
    stars = np.flatnonzero(field.is_star)
    measured = measure_prf(field.image, 0.0, field.sigma, field.x_true, field.y_true, file_prf(), 1, fluxes=field.flux)
    table = build_prf_table(measured.prf, measured.oversampling)
    everything = np.arange(field.flux.size)
    mean_fit = scene_photometry(field.image, field.x_true, field.y_true, everything, table, 23, 0.0, field.sigma,
                                fit_sky=False, correct_positions=False)
    residual = field.image - render_sources(field.image.shape, field.x_true, field.y_true,
                                            np.nan_to_num(mean_fit.flux), table)
    variation = measure_variation(
        residual, field.sigma, field.x_true, field.y_true, mean_fit.flux, stars, measured.prf, measured.oversampling,
        file_prf(), 1, radius_pix=4.0, cell_pix=20.0, scales_pix=(25.0, 50.0, 100.0),
    )
    return measured, table, mean_fit, variation


def star_figures(field, result):
    stars = np.flatnonzero(field.is_star & (field.x_true > 10) & (field.x_true < SIDE - 10)
                           & (field.y_true > 10) & (field.y_true < SIDE - 10))
    return float(np.median(result.rchisq[stars])), float(np.std(result.flux[stars] / field.flux[stars] - 1.0))


def test_a_turning_prf_is_mapped_and_its_variants_fit_the_stars():
    field = make_field(31, side=SIDE, core_of=turning_core, jitter_arcsec=0.0, offset=(0.0, 0.0))
    measured, table, mean_fit, variation = fit_and_measure(field)
    assert variation is not None
    variant = variation.variant_at(field.x_true, field.y_true)
    on_image = (field.x_true >= 0) & (field.x_true < SIDE) & (field.y_true >= 0) & (field.y_true < SIDE)
    assert (variant[on_image] >= 0).all() and (variant[~on_image] == -1).all()
    assert np.unique(variant).size >= 4
    tables = disc_tables(list(variation.variant_prfs(measured.prf)), measured.oversampling, table)
    everything = np.arange(field.flux.size)
    variant_fit = scene_photometry(field.image, field.x_true, field.y_true, everything, table, 23, 0.0, field.sigma,
                                   fit_sky=False, correct_positions=False, extended=(tables, variant))
    rchisq_mean, scatter_mean = star_figures(field, mean_fit)
    rchisq_variants, scatter_variants = star_figures(field, variant_fit)
    print(f"{variation.coefficients.shape[0]} variants from {variation.n_sources} stars at "
          f"{variation.smoothing_pix:.0f} px (gain {variation.gain:.0f}); stars' median rchisq "
          f"{rchisq_mean:.2f} -> {rchisq_variants:.2f}, flux scatter {scatter_mean:.4f} -> {scatter_variants:.4f}")
    assert rchisq_variants < 0.6 * rchisq_mean
    assert scatter_variants < 0.8 * scatter_mean


def test_a_constant_prf_is_not_mapped():
    field = make_field(32, side=SIDE, jitter_arcsec=0.0, offset=(0.0, 0.0))
    assert fit_and_measure(field)[3] is None


def test_a_local_sky_level_and_slope_under_a_star_are_not_read_as_the_prf():
    """A sky map off by a smooth error (as a GALEX sky-background map can be) leaves a level
    and a slope under each star. With Poisson noise (each pixel's sigma holds the star's own
    counts) a level weighs unevenly across the star and projects onto the basis unless it is
    fitted too: on the realistic full field's deep NUV tile that read as a varying PRF."""
    stars = make_field(34, side=200)
    measured = measure_prf(stars.image, 0.0, stars.sigma, stars.x_true, stars.y_true, file_prf(), 1)
    basis = variation_basis(measured.prf, measured.oversampling, file_prf(), 1)
    rows, cols = np.mgrid[0:60, 0:60]
    x, y, flux = np.array([20.3, 41.6]), np.array([22.7, 38.2]), np.array([400.0, 900.0])
    star = render_sources((60, 60), x, y, flux, build_prf_table(measured.prf, measured.oversampling))
    sigma = np.sqrt(1.0 + star)
    sky_error = 0.7 - 0.03 * cols + 0.02 * rows
    used, fisher, rhs = source_terms(sky_error, sigma, x, y, flux, np.arange(2), basis, measured.oversampling, 4.0)
    assert used.size == 2
    information = np.sqrt(np.einsum("nkk->nk", fisher))
    print("the sky's signal on the basis, in sigma of each coefficient:", np.abs(rhs) / information)
    assert np.abs(rhs).max() < 1e-8 * information.max()


def test_the_basis_spans_a_turned_ellipse_and_holds_no_flux():
    oversampling = 2
    offsets = (np.arange(-20, 21) / oversampling)
    ux, uy = offsets[None, :], offsets[:, None]

    def ellipse(angle):
        from epsf_fields import effective_prf

        return effective_prf(ux, uy, core=(TRUE_CORE[0], TRUE_CORE[1], angle)) / oversampling**0

    mean = 0.5 * (ellipse(0.2) + ellipse(1.4))
    basis = variation_basis(mean, oversampling, file_prf(), 1)
    change = ellipse(0.2) - mean
    design = basis.reshape(basis.shape[0], -1).T
    coefficients, *_ = np.linalg.lstsq(design, change.ravel(), rcond=None)
    left = change.ravel() - design @ coefficients
    assert left @ left < 0.05 * (change.ravel() @ change.ravel())
    assert np.abs(basis.sum(axis=(1, 2))).max() < 1e-3 * mean.sum()


def test_profile_indices_put_points_on_their_variant_and_galaxies_on_their_disc():
    variant = np.array([0, 2, -1, 1])
    size_bin = np.array([-1, 3, -1, -1])
    assert profile_indices(variant, size_bin, 3).tolist() == [0, 6, -1, 1]
    assert profile_indices(variant, None, 3).tolist() == variant.tolist()
    assert profile_indices(-1, size_bin, 0).tolist() == [-1, 3, -1, -1]


def test_cells_far_from_every_source_keep_the_mean_prf():
    # Sources in the first 50 x 50 pixels of a 50 x 5000 section; their first coefficient
    # grows with x (0.05 to 0.15, each measured to 0.01).
    rng = np.random.default_rng(5)
    n, k = 60, 2
    x, y = rng.uniform(0, 50, n), rng.uniform(0, 50, n)
    fisher = np.tile(np.eye(k), (n, 1, 1)) * 1e4
    truth = np.column_stack([0.05 + 0.1 * x / 50, np.zeros(n)])
    rhs = 1e4 * (truth + rng.normal(0, 0.01, (n, k)))
    basis = np.stack([np.eye(9), np.fliplr(np.eye(9))])
    variation = variation_map(x, y, fisher, rhs, (5000, 50), basis, 1, cell_pix=25.0, scales_pix=(10.0, 20.0),
                              exclusion_pix=0.0)
    assert variation is not None
    assert np.allclose(variation.coefficients[variation.cells[-1]], 0.0)
    near = variation.coefficients[variation.cells[0]][:, 0]
    assert near[0] < near[1] and 0.05 < near[0] < 0.15 and 0.05 < near[1] < 0.15


def test_a_calibration_with_variants_is_saved_and_read_back(tmp_path):
    from mbphot.calibration import Calibration
    from mbphot.engine.variation import PRFVariation

    variation = PRFVariation(coefficients=np.array([[0.01, -0.02], [0.03, 0.0]]), basis=np.ones((2, 5, 5)),
                             cells=np.array([[0, 1], [1, 1]]), cell_pix=20.0, smoothing_pix=45.0, gain=120.0,
                             n_sources=300)
    calibration = Calibration(prf=np.full((5, 5), 0.04), oversampling=1, offset_x_pix=0.1, offset_y_pix=-0.2,
                              noise_scale=2.5, prf_error=0.005, n_stars=40, used_file=False, reason="test",
                              aperture_correction=1.04, pixel_error=0.019, variant_pixel_error=0.009,
                              variation=variation)
    np.savez(tmp_path / "calibration.npz", **calibration.arrays())
    with np.load(tmp_path / "calibration.npz") as stored:
        read = Calibration.from_arrays(stored)
    assert read.summary() == calibration.summary() and read.summary()["prf_variants"] == 2
    assert np.array_equal(read.variation.cells, variation.cells)
    assert np.allclose(read.variation.variant_prfs(read.prf), variation.variant_prfs(calibration.prf))
    assert read.variation.variant_at(np.array([5.0, 30.0, -1.0]), np.array([5.0, 5.0, 5.0])).tolist() == [0, 1, -1]
