"""Quality metrics, honest errors, position corrections and PRF wings of the engine.

Synthetic images with a known PRF (tests/synthetic.py): what each metric and correction must
do is checked against the truth the image was made from.
"""

import numpy as np
import pytest
from scipy.special import erf

from mbphot.engine import FLAGS, build_prf_table, forced_photometry, scene_photometry
from mbphot.engine import scene
from mbphot.engine.scene import extended_profiles
from mbphot.engine.solve import FRACFLUX_LIMIT, RCHISQ_LIMIT, fit_quality_scale
from synthetic import OVERSAMPLING, SIGMA_PIX, gaussian_prf_file, render


@pytest.fixture(scope="module")
def table():
    return build_prf_table(gaussian_prf_file(), oversampling=OVERSAMPLING, enclosed_fraction=0.9999)


@pytest.fixture(params=[forced_photometry, scene_photometry], ids=["source", "scene"])
def measure(request):
    return request.param


def isolated_sources(rng, n_side, flux, noise, shift_pix=0.0, sigma=SIGMA_PIX):
    """A grid of isolated sources 20 pixels apart; the catalogue is off by ``shift_pix`` in a
    random direction for each."""
    side = 20 * n_side + 10
    centres = 15 + 20 * np.arange(n_side, dtype=float)
    x, y = (c.ravel() + rng.uniform(-0.5, 0.5, n_side**2) for c in np.meshgrid(centres, centres))
    image = render((side, side), x, y, np.full(x.size, flux), sigma) + rng.normal(0, noise, (side, side))
    angle = rng.uniform(0, 2 * np.pi, x.size)
    return image, x + shift_pix * np.cos(angle), y + shift_pix * np.sin(angle)


def test_point_sources_have_unit_rchisq_and_no_quality_flags(table, measure):
    rng = np.random.default_rng(20)
    image, x, y = isolated_sources(rng, 6, 2.0, 0.01)
    result = measure(image, x, y, np.arange(x.size), table, 17, sky=0.0, sigma=0.01)
    assert np.all(result.flag == 0)
    assert 0.8 < np.median(result.rchisq) < 1.2
    assert np.all(np.abs(result.fracflux) < 0.01), "isolated: no neighbour light"
    assert np.all(result.fracmasked == 0)


def test_a_resolved_source_is_flagged_poor_fit(table, measure):
    rng = np.random.default_rng(21)
    image, x, y = isolated_sources(rng, 3, 20.0, 0.01, sigma=2.0 * SIGMA_PIX)
    result = measure(image, x, y, np.arange(x.size), table, 17, sky=0.0, sigma=0.01)
    assert np.all(result.rchisq > RCHISQ_LIMIT)
    assert np.all(result.flag & FLAGS["poor_fit"])


def test_an_uncatalogued_neighbours_light_goes_into_the_error_it_causes(table, measure):
    """Each source has an uncatalogued neighbour 1.5-3 px away with up to a fifth of its
    flux: the fit takes part of that light, by far more than the noise. The residual shows
    it (rchisq), and the errors scaled by sqrt(rchisq) cover it."""
    rng = np.random.default_rng(24)
    n_side = 10
    centres = 15 + 20 * np.arange(n_side, dtype=float)
    x, y = (c.ravel() + rng.uniform(-0.5, 0.5, n_side**2) for c in np.meshgrid(centres, centres))
    angle, distance, share = rng.uniform(0, 2 * np.pi, x.size), rng.uniform(1.5, 3.0, x.size), rng.uniform(0, 0.2, x.size)
    side = 20 * n_side + 10
    image = render((side, side), np.r_[x, x + distance * np.cos(angle)], np.r_[y, y + distance * np.sin(angle)],
                   np.r_[np.full(x.size, 5.0), 5.0 * share]) + rng.normal(0, 0.01, (side, side))
    result = measure(image, x, y, np.arange(x.size), table, 17, sky=0.0, sigma=0.01)
    pull = (result.flux - 5.0) / result.flux_err
    noise_only = (result.flux - 5.0) / (result.flux_err / fit_quality_scale(result.rchisq))
    print(f"pull sd {pull.std():.2f}, with the noise's error alone {noise_only.std():.2f}")
    assert noise_only.std() > 3.0
    assert 0.8 < pull.std() < 1.5


def test_a_faint_source_beside_a_bright_one_is_flagged_blended(table, measure):
    rng = np.random.default_rng(22)
    x, y = np.array([30.0, 32.5]), np.array([30.0, 30.4])
    image = render((61, 61), x, y, [100.0, 0.5]) + rng.normal(0, 0.01, (61, 61))
    result = measure(image, x, y, [0, 1], table, 17, sky=0.0, sigma=0.01)
    assert result.fracflux[1] > FRACFLUX_LIMIT and result.flag[1] & FLAGS["blended"]
    assert not result.flag[0] & FLAGS["blended"]
    assert result.fracflux[0] == pytest.approx(0.5 / 100.0 * np.exp(-(2.5**2 + 0.4**2) / (4 * SIGMA_PIX**2)), rel=0.2)


def test_masked_pixels_give_fracmasked(table, measure):
    image = render((61, 61), 30.0, 30.0, 1.0)
    image[:, 31:] = np.nan
    result = measure(image, [30.0], [30.0], [0], table, 17, sky=0.0, sigma=0.01)
    assert result.fracmasked[0] == pytest.approx(0.5 - 0.5 * (erf(0.5 / (np.sqrt(2) * SIGMA_PIX))), abs=0.02)


def test_noise_scale_and_prf_error_add_to_the_uncertainty(table, measure):
    rng = np.random.default_rng(23)
    x, y = np.array([30.0, 34.0]), np.array([30.0, 30.0])
    image = render((61, 61), x, y, [10.0, 20.0]) + rng.normal(0, 0.01, (61, 61))
    plain = measure(image, x, y, [0, 1], table, 17, sky=0.0, sigma=0.01)
    scaled = measure(image, x, y, [0, 1], table, 17, sky=0.0, sigma=0.01, noise_scale=2.0)
    np.testing.assert_allclose(scaled.flux_err, 2 * plain.flux_err, rtol=1e-3)
    with_model = measure(image, x, y, [0, 1], table, 17, sky=0.0, sigma=0.01, prf_error=0.02)
    own = 0.02 * plain.flux
    assert np.all(with_model.flux_err**2 > plain.flux_err**2 + own**2), "neighbours' light adds to it too"
    assert np.all(with_model.flux_err**2 < plain.flux_err**2 + (0.02 * 30.0) ** 2)


def test_flux_is_corrected_for_catalogue_positions_off_the_light(table):
    rng = np.random.default_rng(24)
    shift = 0.3  # pixels, in a random direction for each source: about 0.18" on IRAC's grid
    image, x, y = isolated_sources(rng, 8, 5.0, 0.01, shift_pix=shift)
    targets = np.arange(x.size)
    uncorrected = scene_photometry(image, x, y, targets, table, 17, 0.0, 0.01, correct_positions=False)
    corrected = scene_photometry(image, x, y, targets, table, 17, 0.0, 0.01)
    expected_loss = 1 - np.exp(-(shift**2) / (4 * SIGMA_PIX**2))
    assert np.median(uncorrected.flux) / 5.0 - 1 == pytest.approx(-expected_loss, rel=0.2)
    assert abs(np.median(corrected.flux) / 5.0 - 1) < 0.1 * expected_loss


def test_position_correction_leaves_faint_exact_positions_unbiased(table):
    rng = np.random.default_rng(25)
    image, x, y = isolated_sources(rng, 12, 0.25, 0.01)
    result = scene_photometry(image, x, y, np.arange(x.size), table, 17, 0.0, 0.01)
    pull = (result.flux - 0.25) / result.flux_err
    assert abs(np.mean(pull)) < 3 / np.sqrt(x.size)
    assert 0.85 < np.std(pull) < 1.15


def pixel_integrated(offsets, sigma):
    scale = np.sqrt(2.0) * sigma
    return 0.5 * (erf((offsets + 0.5) / scale) - erf((offsets - 0.5) / scale))


def core_and_halo(shape, x, y, flux, half=45, core_sigma=1.5, halo_sigma=5.0, halo_fraction=0.1):
    """Image of sources whose PRF has a Gaussian core and a broad Gaussian halo, like GALEX."""
    offsets = np.arange(-half, half + 1)
    pad = 2 * half
    image = np.zeros((shape[0] + 2 * pad, shape[1] + 2 * pad))
    for xi, yi, fi in zip(x, y, flux):
        col, row = int(np.rint(xi)), int(np.rint(yi))
        dx, dy = xi - col, yi - row
        stamp = (1 - halo_fraction) * np.outer(pixel_integrated(offsets - dy, core_sigma), pixel_integrated(offsets - dx, core_sigma))
        stamp += halo_fraction * np.outer(pixel_integrated(offsets - dy, halo_sigma), pixel_integrated(offsets - dx, halo_sigma))
        image[row + pad - half : row + pad + half + 1, col + pad - half : col + pad + half + 1] += fi * stamp
    return image[pad:-pad, pad:-pad]


def halo_field(seed, side=160, noise=0.01, n=400):
    """A field of ``n`` sources with `core_and_halo` PRFs, some beyond its edges: the image,
    positions, fluxes and the indices of the sources on it."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(-20, side + 20, n), rng.uniform(-20, side + 20, n)
    flux = 10 ** rng.uniform(-0.5, 1.5, n)
    image = core_and_halo((side, side), x, y, flux) + rng.normal(0, noise, (side, side))
    targets = np.flatnonzero((x > 0) & (x < side - 1) & (y > 0) & (y < side - 1))
    return image, x, y, flux, targets


def test_wings_split_from_the_core_give_the_fluxes_of_the_whole_prf():
    noise = 0.01
    image, x, y, flux, targets = halo_field(26, noise=noise)
    prf = core_and_halo((91, 91), [45.0], [45.0], [1.0])
    whole = build_prf_table(prf, enclosed_fraction=0.9999)
    split = build_prf_table(prf, enclosed_fraction=0.9999, core_radius=8.0)
    assert split.half_size == 8 and split.wings is not None
    assert split.stamp_at(0.0, 0.0).sum() + split.wings.sum() == pytest.approx(whole.stamp_at(0.0, 0.0).sum(), rel=1e-3)
    truth = flux[targets]

    def pulls(prf_table):
        result = scene_photometry(image, x, y, targets, prf_table, 27, 0.0, noise, correct_positions=False)
        good = result.flag == 0
        return result, ((result.flux - truth) / result.flux_err)[good]

    reference, reference_pull = pulls(whole)
    result, pull = pulls(split)
    _, truncated_pull = pulls(build_prf_table(prf, enclosed_fraction=0.9999, max_half_size=8))
    assert np.mean(truncated_pull) > 0.4, "wings cut off leave neighbours' light in every flux"
    assert abs(np.mean(pull)) < 0.15 and 0.85 < np.std(pull) < 1.2
    bright = (result.flag == 0) & (reference.flag == 0) & (truth > 30 * result.flux_err)
    assert abs(np.median(result.flux[bright] / truth[bright]) - 1) < 0.002
    np.testing.assert_allclose(result.flux[bright], reference.flux[bright], rtol=0.01)


def test_the_per_source_engine_refuses_a_split_prf(table):
    split = build_prf_table(core_and_halo((91, 91), [45.0], [45.0], [1.0]), enclosed_fraction=0.999, core_radius=8.0)
    with pytest.raises(ValueError, match="core/wing"):
        forced_photometry(np.zeros((40, 40)), [20.0], [20.0], [0], split, 17, sky=0.0, sigma=1.0)


def test_resolved_sources_are_fitted_with_their_catalogue_size(table):
    rng = np.random.default_rng(27)
    (disc,) = extended_profiles(gaussian_prf_file(), OVERSAMPLING, [1.5], table)
    x = 15 + 20 * np.arange(6, dtype=float) + 0.3
    y = np.full(6, 20.2)
    image = np.zeros((40, 130))
    h = disc.half_size
    for xi, yi in zip(x, y):
        col, row = int(np.rint(xi)), int(np.rint(yi))
        image[row - h : row + h + 1, col - h : col + h + 1] += 50.0 * disc.stamp_at(xi, yi)
    image += rng.normal(0, 0.01, image.shape)
    as_points = scene_photometry(image, x, y, np.arange(6), table, 17, 0.0, 0.01, correct_positions=False)
    as_discs = scene_photometry(image, x, y, np.arange(6), table, 17, 0.0, 0.01, correct_positions=False,
                                extended=([disc], np.zeros(6, dtype=int)))
    assert np.all(as_points.flux < 0.9 * 50.0) and np.all(as_points.flag & FLAGS["poor_fit"])
    np.testing.assert_allclose(as_discs.flux, 50.0, rtol=3e-3)
    assert np.median(as_discs.rchisq) < 1.3 and np.all(as_discs.flag == 0)


def test_the_wings_fixed_point_agrees_with_the_full_least_squares(monkeypatch):
    """The fixed-point steps (each a fit of the cores less the wings of the last fluxes) are
    not the full least squares, which weighs the wing pixels too; they agree to a fraction of
    a sigma, and the conjugate gradients of the full problem take over where the steps stall."""
    noise = 0.01
    image, x, y, _, targets = halo_field(29, noise=noise)
    split = build_prf_table(core_and_halo((91, 91), [45.0], [45.0], [1.0]), enclosed_fraction=0.9999, core_radius=8.0)
    full_problem_products = []
    adjoint = scene._Wings.adjoint

    def counted_adjoint(wings, model):
        full_problem_products.append(1)
        return adjoint(wings, model)

    monkeypatch.setattr(scene._Wings, "adjoint", counted_adjoint)
    fixed_point = scene_photometry(image, x, y, targets, split, 27, 0.0, noise, correct_positions=False)
    assert not full_problem_products, "the fixed point converged without the full problem's products"
    monkeypatch.setattr(scene, "_WING_STEPS", 0)
    full = scene_photometry(image, x, y, targets, split, 27, 0.0, noise, correct_positions=False)
    assert full_problem_products
    good = (fixed_point.flag == 0) & (full.flag == 0)
    assert good.sum() > 100
    difference = np.abs(fixed_point.flux - full.flux)[good] / full.flux_err[good]
    assert difference.max() < 0.2 and np.median(difference) < 0.02
