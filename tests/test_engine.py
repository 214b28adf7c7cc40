"""The forced-photometry engine on synthetic images with known truth."""

import numpy as np
import pytest

from mbphot.engine import FLAGS, PRFTable, build_prf_table, forced_photometry, normalise_prf, scene_photometry
from synthetic import OVERSAMPLING, SIGMA_PIX, gaussian_prf_file, pixel_integrated_gaussian, render

@pytest.fixture(scope="module")
def table():
    return build_prf_table(gaussian_prf_file(), oversampling=OVERSAMPLING, enclosed_fraction=0.9999)


def test_peak_normalised_prf_is_rescaled_to_unit_flux():
    prf = gaussian_prf_file(peak_normalised=True)
    assert prf.max() == pytest.approx(1.0)
    assert normalise_prf(prf, OVERSAMPLING).sum() == pytest.approx(OVERSAMPLING**2)


@pytest.mark.parametrize("offset", [(0.0, 0.0), (0.5, -0.5), (0.23, 0.41), (-0.37, 0.12), (0.49, 0.01)])
def test_subpixel_placement_error_is_below_half_a_percent_of_the_flux(table, offset):
    x, y = 20 + offset[0], 20 + offset[1]
    truth = render((41, 41), x, y, 1.0)
    stamp = table.stamp_at(x, y)
    h = table.half_size
    row, col = int(np.rint(y)), int(np.rint(x))
    window = truth[row - h : row + h + 1, col - h : col + h + 1]
    assert np.abs(stamp - window).sum() < 0.002, "stamp shape follows the true sub-pixel position"
    flux, _, _ = forced_photometry(truth, [x], [y], [0], table, 17, sky=0.0, sigma=1.0)[:3]
    assert flux[0] == pytest.approx(1.0, rel=0.005)


def test_pixel_origin_is_zero_based_with_centres_on_integers(table):
    image = render((41, 41), 20.0, 20.0, 1.0)
    assert np.unravel_index(np.argmax(image), image.shape) == (20, 20)
    centred, _, _ = forced_photometry(image, [20.0], [20.0], [0], table, 17, sky=0.0, sigma=1.0)[:3]
    one_based, _, _ = forced_photometry(image, [21.0], [21.0], [0], table, 17, sky=0.0, sigma=1.0)[:3]
    assert centred[0] == pytest.approx(1.0, rel=0.002)
    assert one_based[0] < 0.8, "a FITS 1-based position would lose flux"


@pytest.fixture(params=[forced_photometry, scene_photometry], ids=["source", "scene"])
def measure(request):
    """Both modes must pass the behaviour tests below."""
    return request.param


def test_isolated_source_recovers_injected_flux(table, measure):
    rng = np.random.default_rng(1)
    noise = 0.01
    image = render((61, 61), 30.3, 29.8, 5.0) + rng.normal(0, noise, (61, 61))
    flux, err, flag = measure(image, [30.3], [29.8], [0], table, 17, sky=0.0, sigma=noise)[:3]
    assert flag[0] == 0
    assert abs(flux[0] - 5.0) < 3 * err[0]
    expected_err = noise / np.sqrt((table.stamp_at(30.3, 29.8) ** 2).sum())
    assert err[0] == pytest.approx(expected_err, rel=0.02)


def test_two_sources_one_fwhm_apart_are_both_recovered(table, measure):
    rng = np.random.default_rng(2)
    fwhm = 2.3548 * SIGMA_PIX
    x = np.array([30.0, 30.0 + fwhm])
    y = np.array([30.2, 30.2])
    true_flux = np.array([4.0, 2.0])
    noise = 0.01
    image = render((61, 61), x, y, true_flux) + rng.normal(0, noise, (61, 61))
    flux, err, flag = measure(image, x, y, [0, 1], table, 17, sky=0.0, sigma=noise)[:3]
    assert np.all(flag == 0)
    assert np.all(np.abs(flux - true_flux) < 3 * err)
    isolated_err = noise / np.sqrt((table.stamp_at(30.0, 30.2) ** 2).sum())
    overlap = np.exp(-(fwhm**2) / (4 * SIGMA_PIX**2))  # correlation of two Gaussians one FWHM apart
    assert np.allclose(err, isolated_err / np.sqrt(1 - overlap**2), rtol=0.01), "blending inflates the error"


def test_blank_sky_gives_fluxes_consistent_with_zero(table, measure):
    rng = np.random.default_rng(3)
    noise = 0.02
    x = rng.uniform(10, 90, 200)
    y = rng.uniform(10, 90, 200)
    image = rng.normal(0, noise, (100, 100))
    flux, err, flag = measure(image, x, y, np.arange(200), table, 17, sky=0.0, sigma=noise)[:3]
    pull = flux / err
    assert np.all(flag == 0)
    assert abs(np.mean(pull)) < 0.3
    assert 0.8 < np.std(pull) < 1.25


def test_pull_over_500_noise_realisations(table, measure):
    rng = np.random.default_rng(4)
    noise = 0.05
    x = np.array([25.3, 27.9, 21.4])
    y = np.array([24.6, 26.1, 27.5])
    true_flux = np.array([3.0, 1.5, 0.7])
    clean = render((50, 50), x, y, true_flux)
    pulls = []
    for _ in range(500):
        image = clean + rng.normal(0, noise, clean.shape)
        flux, err, _ = measure(image, x, y, [0, 1, 2], table, 17, sky=0.0, sigma=noise)[:3]
        pulls.append((flux - true_flux) / err)
    pulls = np.array(pulls)
    for k in range(3):
        assert 0.9 < pulls[:, k].std() < 1.1
        assert abs(pulls[:, k].mean()) < 0.15


def test_neighbour_outside_cutout_whose_wings_reach_in_is_modelled(table):
    noise = 0.002
    x = np.array([30.0, 30.0 + 8 + 3])  # cutout half-size 8: neighbour centre 3 px outside
    y = np.array([30.0, 30.0])
    image = render((61, 61), x, y, [1.0, 200.0])
    flux, err, flag = forced_photometry(image, x, y, [0], table, 17, sky=0.0, sigma=noise)[:3]
    assert flux[0] == pytest.approx(1.0, abs=3 * err[0] + 1e-3)


def test_nan_covered_and_off_image_sources_are_flagged_not_crashing(table):
    image = render((40, 40), [10.0, 30.0], [10.0, 30.0], [1.0, 1.0])
    image[25:36, 25:36] = np.nan
    x = np.array([10.0, 30.0, -20.0, np.nan])
    y = np.array([10.0, 30.0, 10.0, 5.0])
    flux, err, flag = forced_photometry(image, x, y, [0, 1, 2, 3], table, 17, sky=0.0, sigma=0.01)[:3]
    assert flag[0] == 0 and np.isfinite(flux[0])
    assert flag[1] & FLAGS["no_data"] and np.isnan(flux[1])
    assert flag[2] & FLAGS["off_image"] and np.isnan(flux[2])
    assert flag[3] & FLAGS["off_image"] and np.isnan(flux[3])


def test_positions_are_forced_not_refitted(table):
    """A source offset from its catalogue position loses flux: the position does not wander."""
    image = render((41, 41), 21.0, 20.0, 1.0)
    flux, _, _ = forced_photometry(image, [20.0], [20.0], [0], table, 17, sky=0.0, sigma=0.01)[:3]
    assert flux[0] < 0.9


@pytest.mark.parametrize("oversampling", [1, OVERSAMPLING])
def test_table_is_the_prf_spline_at_every_phase(oversampling):
    """The table is built by one sparse product per axis; it must be the cubic spline of the
    PRF samples that `scipy.ndimage.map_coordinates` evaluates, edges included: the wing
    kernel of a PRF file no larger than the enclosed radius reaches the file's edge. Split,
    the stamps are the spline less the wings as the engine places them."""
    from scipy import ndimage

    from mbphot.engine.prf import _core_taper, placed_wings, prf_centre

    rng = np.random.default_rng(5)
    shape = (10 * oversampling + 3, 10 * oversampling + 1)
    prf = np.outer(np.hanning(shape[0]), np.hanning(shape[1])) + 0.01 * rng.random(shape)
    core_radius = 2.5
    table = build_prf_table(prf, oversampling=oversampling, n_phase=7, enclosed_fraction=1.0, core_radius=core_radius)
    normalised = normalise_prf(prf, oversampling)
    coefficients = ndimage.spline_filter(normalised, order=3, mode="constant")
    centre_y, centre_x = prf_centre(normalised)

    def spline(rows, cols):
        coords = [centre_y + oversampling * rows, centre_x + oversampling * cols]
        return ndimage.map_coordinates(coefficients, coords, order=3, mode="constant", cval=0.0, prefilter=False)

    grid = np.arange(-table.half_size, table.half_size + 1)
    wings = placed_wings(table.wings, table.phases, table.half_size)
    for i, phase_y in enumerate(table.phases):
        for j, phase_x in enumerate(table.phases):
            rows, cols = np.meshgrid(grid - phase_y, grid - phase_x, indexing="ij")
            # The stamps are stored in single precision (`PRFTable`): rounded once.
            np.testing.assert_allclose(
                table.stamps[i, j], spline(rows, cols) - wings[i, j], rtol=np.finfo(np.float32).eps, atol=1e-12
            )
    wing_half = table.wings.shape[0] // 2
    wing_grid = np.arange(-wing_half, wing_half + 1)
    rows, cols = np.meshgrid(wing_grid, wing_grid, indexing="ij")
    assert wing_half * oversampling >= normalised.shape[1] // 2, "the wings reach the file's edge"
    expected = spline(rows, cols) * (1.0 - _core_taper(np.hypot(rows, cols), core_radius))
    np.testing.assert_allclose(table.wings, expected, rtol=0, atol=1e-12)


def test_prf_wider_than_the_cutout_keeps_its_normalisation():
    """Cropping the PRF to the cutout and renormalising would inflate fluxes; we fit the
    part of the unit-flux PRF that falls in the cutout."""
    sigma_wide = 3.0
    offsets = np.arange(-60, 61) / OVERSAMPLING
    profile = pixel_integrated_gaussian(offsets, sigma_wide)
    wide = build_prf_table(np.outer(profile, profile), OVERSAMPLING, enclosed_fraction=0.9999)
    assert 2 * wide.half_size + 1 > 9, "the PRF is wider than the cutout"
    image = render((61, 61), 30.0, 30.0, 2.0, sigma=sigma_wide)
    flux, _, _ = forced_photometry(image, [30.0], [30.0], [0], wide, 9, sky=0.0, sigma=0.01)[:3]
    assert flux[0] == pytest.approx(2.0, rel=1e-3)


def test_error_is_the_targets_own_not_the_last_sources():
    """Each target reports its own variance: a faint isolated target next to a bright
    blended pair keeps a small error."""
    table = build_prf_table(gaussian_prf_file(), OVERSAMPLING, enclosed_fraction=0.9999)
    x = np.array([20.0, 40.0, 41.0])
    y = np.array([30.0, 30.0, 30.0])
    image = render((61, 61), x, y, [1.0, 5.0, 5.0])
    _, err, _ = forced_photometry(image, x, y, [0, 1, 2], table, 17, sky=0.0, sigma=0.01)[:3]
    isolated = 0.01 / np.sqrt((table.stamp_at(20.0, 30.0) ** 2).sum())
    assert err[0] == pytest.approx(isolated, rel=0.01)
    assert err[1] > 1.5 * err[0] and err[2] > 1.5 * err[0]


def test_fitted_sky_absorbs_a_wrong_sky_estimate(table):
    rng = np.random.default_rng(5)
    image = render((61, 61), [30.2, 33.0], [29.7, 31.0], [2.0, 1.0]) + 0.05 + rng.normal(0, 0.01, (61, 61))
    biased, _, _ = forced_photometry(image, [30.2, 33.0], [29.7, 31.0], [0], table, 17, sky=0.0, sigma=0.01)[:3]
    fitted, err, _ = forced_photometry(image, [30.2, 33.0], [29.7, 31.0], [0], table, 17, sky=0.0, sigma=0.01, fit_sky=True)[:3]
    assert biased[0] > 2.5
    assert abs(fitted[0] - 2.0) < 3 * err[0]


def test_tables_are_contiguous():
    rng = np.random.default_rng(2)
    phases = np.linspace(-0.5, 0.5, 33)
    large = rng.random((33, 33, 21, 21)).astype(np.float32)
    table = PRFTable(large, phases, 10)
    assert table.stamps is large
    # Every table in one layout and one of two types, those the kernels are compiled for
    # when a process starts.
    strided = PRFTable(large[:, :, 2:19, 2:19], phases, 8).stamps
    assert strided.flags.c_contiguous and np.array_equal(strided, large[:, :, 2:19, 2:19])
    double = large.astype(np.float64)
    assert PRFTable(double, phases, 10).stamps is double
    assert PRFTable(large.astype(np.float16), phases, 10).stamps.dtype == np.float64
    assert build_prf_table(np.ones((5, 5)), n_phase=3).stamps.dtype == np.float32
