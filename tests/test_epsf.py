"""The effective PRF measured from an image's stars, and the image's offset from the catalogue.

The synthetic field (`epsf_fields`) is drawn with a PRF rotated and broadened from the "file"
PRF the code is given, with resolved galaxies among the sources and catalogue positions
scattered by 0.15" around the light plus a common offset of (0.30, -0.20) pixels.
"""

import inspect

import numpy as np
import pytest
from scipy import ndimage

from mbphot.engine import build_prf_table, scene_photometry
from mbphot.engine.calibrate import correlated_noise_scale
from mbphot.engine.epsf import fwhm_pixels, image_offset, measure_prf
from mbphot.engine.prf import normalise_prf, prf_centre
from epsf_fields import PIXEL_ARCSEC, effective_prf, file_prf, make_field, render


@pytest.fixture(scope="module")
def field():
    return make_field(seed=1)


@pytest.fixture(scope="module")
def measured(field):
    return measure_prf(field.image, 0.0, field.sigma, field.x_cat, field.y_cat, file_prf(), 1)


def bright_star_bias(field, prf, oversampling):
    """Median fractional flux error of PRF fits of bright stars at their true positions."""
    side = field.image.shape[0]
    inside = (field.x_true > 3) & (field.x_true < side - 4) & (field.y_true > 3) & (field.y_true < side - 4)
    bright = np.flatnonzero(field.is_star & inside & (field.flux > 2000))
    flux, _, flag = scene_photometry(field.image, field.x_true, field.y_true, bright,
                                     build_prf_table(prf, oversampling), 23, 0.0, field.sigma, fit_sky=True)[:3]
    good = np.isfinite(flux)
    return float(np.median(flux[good] / field.flux[bright][good] - 1)), int(good.sum())


def test_measured_prf_removes_the_flux_bias_of_the_file_prf(field, measured):
    file_bias, n = bright_star_bias(field, file_prf(), 1)
    measured_bias, _ = bright_star_bias(field, measured.prf, measured.oversampling)
    print(f"{measured.reason}\nbright stars ({n}): median flux bias {file_bias:+.4f} with the file PRF, "
          f"{measured_bias:+.4f} with the measured PRF")
    assert not measured.used_file and measured.n_stars >= 50
    assert file_bias < -0.02
    assert abs(measured_bias) < 0.005


def test_measured_prf_fits_the_stars_to_the_noise(measured):
    print(f"median reduced chi2 of the stars: {measured.rchisq_file:.2f} (file), {measured.rchisq_measured:.3f} (measured)")
    assert measured.rchisq_file > 5
    assert measured.rchisq_measured < 1.2


def test_measured_prf_is_close_to_the_true_prf(measured):
    os = measured.oversampling
    n = measured.prf.shape[0]
    offsets = (np.arange(n) - (n - 1) / 2) / os
    truth = effective_prf(offsets[None, :], offsets[:, None])  # the true PRF, unit flux
    file_samples = normalise_prf(file_prf())
    file_offsets = np.arange(file_samples.shape[0]) - (file_samples.shape[0] - 1) / 2
    file_truth = effective_prf(file_offsets[None, :], file_offsets[:, None])
    measured_error = np.abs(measured.prf - truth).max() / truth.max()
    file_error = np.abs(file_samples - file_truth).max() / file_truth.max()
    print(f"largest PRF error over the peak: measured {measured_error:.4f}, file {file_error:.4f}; "
          f"FWHM {measured.fwhm_pix:.3f} px (file {measured.file_fwhm_pix:.3f} px)")
    assert measured_error < 0.02
    assert file_error > 0.05


def test_measured_prf_is_normalised_centred_and_aperture_corrected(measured):
    os = measured.oversampling
    assert measured.prf.sum() == pytest.approx(os**2, rel=1e-9)
    centre_y, centre_x = prf_centre(measured.prf)
    middle = (measured.prf.shape[0] - 1) / 2
    assert abs(centre_x - middle) / os < 0.01 and abs(centre_y - middle) / os < 0.01
    table = build_prf_table(measured.prf, os)
    sums = [table.stamp_at(px, py).sum() for px in (-0.5, -0.25, 0.0, 0.3) for py in (-0.5, 0.0, 0.2)]
    print(f"stamp sums over phases: {min(sums):.5f} - {max(sums):.5f}")
    assert max(sums) - min(sums) < 0.002, "the flux on the image must not depend on the sub-pixel phase"
    assert 0.99 < min(sums) and max(sums) < 1.001
    # Total over the flux within R, as the true PRF has it (its wings follow the file's shape).
    reach = int(np.ceil(measured.fit_radius_pix))
    grid = np.arange(-reach, reach + 1)
    inside = np.hypot(*np.meshgrid(grid, grid)) <= measured.fit_radius_pix
    true_correction = 1.0 / effective_prf(*np.meshgrid(grid, grid))[inside].sum()
    print(f"aperture correction {measured.aperture_correction:.4f} (true {true_correction:.4f}) "
          f"within R = {measured.fit_radius_pix:.2f} px")
    assert measured.aperture_correction == pytest.approx(true_correction, abs=0.004)


def test_common_offset_is_recovered_and_each_star_registered(field, measured):
    stars = measured.star_indices
    true_shift_x = field.x_true[stars] - field.x_cat[stars]
    true_shift_y = field.y_true[stars] - field.y_cat[stars]
    rms = np.sqrt(np.mean((measured.star_shift_x_pix - true_shift_x) ** 2 + (measured.star_shift_y_pix - true_shift_y) ** 2))
    error_x = (measured.offset_x_pix - field.offset[0]) * PIXEL_ARCSEC
    error_y = (measured.offset_y_pix - field.offset[1]) * PIXEL_ARCSEC
    print(f"offset ({measured.offset_x_pix:+.4f} +- {measured.offset_x_err_pix:.4f}, "
          f"{measured.offset_y_pix:+.4f} +- {measured.offset_y_err_pix:.4f}) px, true {field.offset}; "
          f"per-star registration rms {rms * PIXEL_ARCSEC:.4f}\"")
    assert rms * PIXEL_ARCSEC < 0.02
    assert abs(error_x) < 0.02 and abs(error_y) < 0.02
    assert 0.005 < measured.offset_x_err_pix * PIXEL_ARCSEC < 0.02
    # The median of the stars' own light offsets is what the data can tell: recovered to a
    # small fraction of the registration's scatter (the PRF's centre, its core centroid, moves
    # by a few thousandths of an arcsecond with the sampling of the measured PRF).
    assert abs(measured.offset_x_pix - np.median(true_shift_x)) * PIXEL_ARCSEC < 0.01
    assert abs(measured.offset_y_pix - np.median(true_shift_y)) * PIXEL_ARCSEC < 0.01


def test_wings_that_follow_the_file_show_no_excess(measured):
    """The true wings here have the file's shape and lose < 0.1 % beyond its box."""
    print(f"wing excess {measured.wing_excess:+.4f} +- {measured.wing_excess_err:.4f}")
    assert abs(measured.wing_excess) < max(3 * measured.wing_excess_err, 0.003)
    assert not measured.wings_extended


def irac_like_field(file, halo_fraction, seed=0, side=300, n_stars=130, n=800):
    """Stars and faint sources drawn with a real IRAC PRF rotated by 40 degrees, broadened,
    and given a broad halo (``halo_fraction`` of the light, Gaussian sigma 6 px) that reaches
    well beyond the file's 17 x 17 box: with 4 %, about 1.2 % of the light falls outside it."""
    from scipy import ndimage

    from mbphot.engine.epsf import render_sources

    oversampling = 5
    fine = ndimage.zoom(np.pad(normalise_prf(file), 14), oversampling, order=3)
    core = ndimage.gaussian_filter(ndimage.rotate(fine, 40, reshape=False, order=3), 0.35 * oversampling)
    offsets = (np.arange(core.shape[0]) - (core.shape[0] - 1) / 2) / oversampling
    halo = np.exp(-0.5 * (offsets[None, :] ** 2 + offsets[:, None] ** 2) / 6.0**2)
    true = (1 - halo_fraction) * normalise_prf(core, oversampling) + halo_fraction * normalise_prf(halo, oversampling)
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(-10, side + 10, n), rng.uniform(-10, side + 10, n)
    flux = np.concatenate([10 ** rng.uniform(np.log10(300), np.log10(15000), n_stars),
                           10 ** rng.uniform(0, 2.2, n - n_stars)])
    image = render_sources((side, side), x, y, flux, build_prf_table(true, oversampling, enclosed_fraction=1.0))
    image += rng.normal(0, 1, image.shape)
    scatter = 0.15 / PIXEL_ARCSEC / np.sqrt(2)
    x_cat, y_cat = x - 0.3 - rng.normal(0, scatter, n), y + 0.2 - rng.normal(0, scatter, n)
    bright = np.flatnonzero((np.arange(n) < n_stars) & (flux > 3000) & (x > 3) & (x < side - 4)
                            & (y > 3) & (y < side - 4))
    return image, x, y, x_cat, y_cat, flux, bright


def test_light_beyond_the_file_box_is_measured_from_the_stars(real_data_dir):
    from astropy.io import fits

    file = fits.getdata(real_data_dir / "irac" / "PRF_IRAC_ch1.fits").astype(np.float64)
    image, x, y, x_cat, y_cat, flux, bright = irac_like_field(file, halo_fraction=0.04)
    result = measure_prf(image, 0.0, 1.0, x_cat, y_cat, file, 1, extend_wings=True, wing_radius_pix=16.0)
    biases = {}
    for name, prf, oversampling in (("file", file, 1), ("measured", result.prf, result.oversampling)):
        fitted, _, _ = scene_photometry(image, x, y, bright, build_prf_table(prf, oversampling), 23, 0.0, 1.0,
                                        fit_sky=True)[:3]
        biases[name] = float(np.median(fitted / flux[bright] - 1))
    print(f"{result.reason}\nwing excess {result.wing_excess:+.4f} +- {result.wing_excess_err:.4f}; "
          f"bright-star flux bias {biases['file']:+.4f} (file), {biases['measured']:+.4f} (measured, wings "
          f"extended); offset ({result.offset_x_pix:+.3f}, {result.offset_y_pix:+.3f}) px, true (0.3, -0.2)")
    assert result.wings_extended and result.wing_excess > 0.005
    assert result.prf.shape[0] > 17 * result.oversampling
    assert biases["file"] < -0.03
    assert abs(biases["measured"]) < 0.005


def test_real_irac_prf_rotated_and_broadened_is_recovered(real_data_dir):
    """Without a halo beyond the box: no wing excess, and the measured PRF alone removes the
    file's bias (its wings must be sampled out to the pixel edges of the file's box)."""
    from astropy.io import fits

    file = fits.getdata(real_data_dir / "irac" / "PRF_IRAC_ch3.fits").astype(np.float64)
    image, x, y, x_cat, y_cat, flux, bright = irac_like_field(file, halo_fraction=0.0, seed=1)
    result = measure_prf(image, 0.0, 1.0, x_cat, y_cat, file, 1, extend_wings=True)
    biases = {}
    for name, prf, oversampling in (("file", file, 1), ("measured", result.prf, result.oversampling)):
        fitted, _, _ = scene_photometry(image, x, y, bright, build_prf_table(prf, oversampling), 23, 0.0, 1.0,
                                        fit_sky=True)[:3]
        biases[name] = float(np.median(fitted / flux[bright] - 1))
    print(f"{result.reason}\nwing excess {result.wing_excess:+.4f} +- {result.wing_excess_err:.4f}; "
          f"bright-star flux bias {biases['file']:+.4f} (file), {biases['measured']:+.4f} (measured)")
    assert not result.wings_extended
    assert biases["file"] < -0.03
    assert abs(biases["measured"]) < 0.005


def test_resolved_galaxies_and_blends_are_not_used_as_stars(field, measured):
    stars = measured.star_indices
    assert np.mean(field.is_star[stars]) >= 0.95
    assert np.all(np.isin(stars, np.arange(field.x_cat.size)))


def test_candidates_and_saturation_limit_the_stars(field):
    candidates = np.flatnonzero(field.is_star)[::2]
    peaks = field.flux * effective_prf(0.0, 0.0)  # a star's brightest pixel, at most
    level = float(np.percentile(peaks[field.is_star], 80))
    padded = np.pad(field.image, 20, constant_values=-np.inf)
    brightest_pixel = np.array([padded[20 + int(np.rint(y)) - 2 : 20 + int(np.rint(y)) + 3,
                                       20 + int(np.rint(x)) - 2 : 20 + int(np.rint(x)) + 3].max()
                                for x, y in zip(field.x_cat, field.y_cat)])
    result = measure_prf(field.image, 0.0, field.sigma, field.x_cat, field.y_cat, file_prf(), 1,
                         candidates=candidates, saturation_level=level, fluxes=field.flux, min_stars=5)
    print(result.reason)
    assert not result.used_file
    assert np.all(np.isin(result.star_indices, candidates))
    assert np.all(brightest_pixel[result.star_indices] < level)
    assert result.n_stars < np.sum(brightest_pixel[candidates] < level)


def test_too_few_stars_fall_back_to_the_file_prf():
    field = make_field(seed=3, side=120, n_stars=4, n_galaxies=20, n_faint=60)
    result = measure_prf(field.image, 0.0, field.sigma, field.x_cat, field.y_cat, file_prf(), 1, min_stars=8)
    print(result.reason)
    assert result.used_file and result.n_stars == 0
    assert "fewer than 8" in result.reason
    assert result.oversampling == 1
    np.testing.assert_allclose(result.prf, normalise_prf(file_prf()))


def test_image_offset_of_bright_compact_sources(field):
    offset = image_offset(field.image, 0.0, field.sigma, field.x_cat, field.y_cat, file_prf(), 1)
    print(f"image offset ({offset.dx_pix:+.4f} +- {offset.dx_err_pix:.4f}, {offset.dy_pix:+.4f} +- "
          f"{offset.dy_err_pix:.4f}) px from {offset.n_sources} sources, true {field.offset}")
    assert offset.n_sources >= 50
    assert abs(offset.dx_pix - field.offset[0]) * PIXEL_ARCSEC < 0.02
    assert abs(offset.dy_pix - field.offset[1]) * PIXEL_ARCSEC < 0.02


def test_fwhm_of_a_gaussian():
    offsets = np.arange(-20, 21) / 4
    gaussian = np.exp(-0.5 * (offsets[None, :] ** 2 + offsets[:, None] ** 2) / 1.2**2)
    assert fwhm_pixels(gaussian, 4) == pytest.approx(2.3548 * 1.2, rel=0.02)


@pytest.mark.parametrize("function", [measure_prf, image_offset])
def test_options_are_keyword_only(function):
    parameters = list(inspect.signature(function).parameters.values())
    positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional[-1] in ("file_oversampling", "oversampling") and len(positional) == 7


# ---------------------------------------------------------------------------------------------
# Real GALEX NUV mosaic


def detect(image, sky, sigma, psf, threshold=4.0):
    """Local maxima of the PSF-matched S/N map above ``threshold``, refined by a parabola: a
    complete source list, which the COSMOS2015 subset beside the mosaic is not."""
    from scipy import ndimage

    stamp = normalise_prf(psf)
    cy, cx = (int(round(c)) for c in prf_centre(stamp))
    kernel = stamp[cy - 5 : cy + 6, cx - 5 : cx + 6]
    snr = ndimage.correlate((image - sky) / sigma**2, kernel, mode="constant") / np.sqrt(
        ndimage.correlate(1.0 / sigma**2, kernel**2, mode="constant"))
    peaks = (snr == ndimage.maximum_filter(snr, size=3)) & (snr > threshold)
    peaks[[0, -1], :] = peaks[:, [0, -1]] = False
    row, col = np.nonzero(peaks)

    def vertex(low, middle, high):
        curvature = low - 2 * middle + high
        return np.clip(np.where(curvature < 0, 0.5 * (low - high) / np.where(curvature < 0, curvature, -1), 0), -0.5, 0.5)

    x = col + vertex(snr[row, col - 1], snr[row, col], snr[row, col + 1])
    y = row + vertex(snr[row - 1, col], snr[row, col], snr[row + 1, col])
    return x, y


def enclosed_energy(prf, oversampling, radii):
    n = prf.shape[0]
    offsets = (np.arange(n) - (n - 1) / 2) / oversampling
    radius = np.hypot(offsets[None, :], offsets[:, None])
    total = prf.sum()
    return [prf[radius <= r].sum() / total for r in radii]


def test_real_galex_nuv_psf_measured_from_the_mosaic(real_data_dir):
    from astropy.io import fits

    from mbphot.engine.background import sky_and_rms_maps

    with fits.open(real_data_dir / "galex" / "COSMOS_galex_nuv_mosaic_15arcmin.fits") as hdul:
        image = hdul[0].data.astype(np.float64)
        exposure_s = float(hdul[0].header["EXPTIME"])
    psf = fits.getdata(real_data_dir / "galex" / "PSFnuv_faint.fits")
    image = image[50:550, 50:550]
    sky, rms = sky_and_rms_maps(image, box_size=32)
    sigma = np.sqrt(rms**2 + np.clip(image - sky, 0, None) / exposure_s)
    x, y = detect(image, sky, sigma, psf)
    result = measure_prf(image, sky, sigma, x, y, psf, 1)
    file_samples = normalise_prf(psf)
    radii = [1, 2, 3, 4, 6, 8, 12, 20, 40]  # pixels of 1.5"
    ee_measured = enclosed_energy(result.prf, result.oversampling, radii)
    # The file's samples about its core centroid, as the engine centres it.
    cy, cx = prf_centre(file_samples)
    rows, cols = np.indices(file_samples.shape)
    radius = np.hypot(rows - cy, cols - cx)
    ee_file = [file_samples[radius <= r].sum() / file_samples.sum() for r in radii]
    print(f"\n{result.reason}\n{len(x)} detections; FWHM {result.fwhm_pix * 1.5:.2f}\" measured, "
          f"{result.file_fwhm_pix * 1.5:.2f}\" file; offset ({result.offset_x_pix:+.3f} +- "
          f"{result.offset_x_err_pix:.3f}, {result.offset_y_pix:+.3f} +- {result.offset_y_err_pix:.3f}) px; "
          f"aperture correction {result.aperture_correction:.3f} at R = {result.fit_radius_pix:.1f} px; "
          f"stars' reduced chi2 {result.rchisq_file:.2f} (file) -> {result.rchisq_measured:.2f} (measured)")
    print("radius/px  " + " ".join(f"{r:6d}" for r in radii))
    print("EE measured " + " ".join(f"{e:6.3f}" for e in ee_measured))
    print("EE file     " + " ".join(f"{e:6.3f}" for e in ee_file))
    assert not result.used_file and result.n_stars >= 10
    assert result.prf.sum() / result.oversampling**2 == pytest.approx(1.0, rel=1e-9)
    centre_y, centre_x = prf_centre(result.prf)
    middle = (result.prf.shape[0] - 1) / 2
    assert abs(centre_x - middle) / result.oversampling < 0.1
    assert abs(centre_y - middle) / result.oversampling < 0.1
    assert result.fwhm_pix == pytest.approx(result.file_fwhm_pix, rel=0.3)
    assert result.rchisq_measured < result.rchisq_file


# ---------------------------------------------------------------------------------------------
# A crowded field: catalogued neighbours a few pixels from every star


def test_a_crowded_fields_stars_give_the_sky_prf_not_the_files():
    """At GALEX's COSMOS density every star has catalogued neighbours a few pixels out, whose
    light there rivals the star's own. Fitted first with a file PRF broader than the sky's,
    they come out too faint and leave light on the stars' profiles, which the PRF measured
    from them keeps, near the file's: their fluxes are fitted again with each new PRF."""
    rng = np.random.default_rng(4)
    side, spacing, noise = 420, 35, 1.0
    sky_core, file_core = (1.4, 1.4, 0.0), (1.6, 1.6, 0.0)
    grid = np.arange(spacing, side - spacing + 1, spacing, dtype=np.float64)
    star_x, star_y = (values.ravel() + rng.uniform(-0.5, 0.5, grid.size**2) for values in np.meshgrid(grid, grid))
    star_flux = rng.uniform(300.0, 1000.0, star_x.size)  # S/N 60-200
    # Per star: one neighbour 3.5-6 px out with a fifth to a third of its flux, and eight
    # faint ones (3-10 %) 2-7 px out.
    x, y, flux = [star_x], [star_y], [star_flux]
    for count, distances, fractions in ((1, (3.5, 6.0), (0.2, 0.33)), (8, (2.0, 7.0), (0.03, 0.1))):
        distance = rng.uniform(*distances, (star_x.size, count))
        angle = rng.uniform(0, 2 * np.pi, (star_x.size, count))
        x.append((star_x[:, None] + distance * np.cos(angle)).ravel())
        y.append((star_y[:, None] + distance * np.sin(angle)).ravel())
        flux.append((star_flux[:, None] * rng.uniform(*fractions, (star_x.size, count))).ravel())
    x, y, flux = np.concatenate(x), np.concatenate(y), np.concatenate(flux)
    image = render((side, side), x, y, flux, core=sky_core) + rng.normal(0.0, noise, (side, side))
    offsets = np.arange(-8, 9, dtype=np.float64)
    file_samples = effective_prf(offsets[None, :], offsets[:, None], core=file_core)
    measured = measure_prf(image, 0.0, noise, x, y, file_samples, 1, candidates=np.arange(star_x.size),
                           max_neighbour_fraction=0.5)

    # What each PRF gives isolated sources of the sky's PRF, noise-free, at random phases.
    test_x, test_y = (values.ravel() + rng.uniform(-0.5, 0.5, 100) for values in np.meshgrid(
        np.arange(20.0, 220.0, 20.0), np.arange(20.0, 220.0, 20.0)))
    test_image = render((240, 240), test_x, test_y, np.full(test_x.size, 1000.0), core=sky_core)
    ratios = {}
    for name, prf, oversampling in (("file", file_samples, 1), ("measured", measured.prf, measured.oversampling)):
        fitted = scene_photometry(test_image, test_x, test_y, np.arange(test_x.size),
                                  build_prf_table(prf, oversampling), 23, 0.0, 1.0)[0]
        ratios[name] = float(np.median(fitted / 1000.0))
    print(f"{measured.reason}; isolated sources' fitted / true flux: file PRF {ratios['file']:.4f}, "
          f"measured PRF {ratios['measured']:.4f}")
    assert measured.n_stars >= 50
    assert ratios["file"] > 1.05
    # Without the neighbours' refit, 1.089: the measured PRF stays near the file's.
    assert abs(ratios["measured"] - 1) < 0.008


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_few_faint_stars_correct_the_prior_only_as_far_as_they_measure_it(seed):
    """Twelve stars at S/N 50-100 (IRAC 8 um's on a 9' field), drawn with a PRF 2 % narrower
    than the prior: with penalties relative to their own weight only, the measured PRF holds
    their noise; held to ``prior_error`` (default) of the peak, it is nearer the truth."""
    rng = np.random.default_rng(seed)
    side, noise = 300, 1.0
    grid_x, grid_y = np.meshgrid(np.arange(40.0, 261.0, 60.0), np.arange(40.0, 261.0, 75.0))
    x = grid_x.ravel()[:12] + rng.uniform(-0.5, 0.5, 12)
    y = grid_y.ravel()[:12] + rng.uniform(-0.5, 0.5, 12)
    flux = noise * np.sqrt(4 * np.pi * 1.35 * 1.15) * rng.uniform(50.0, 100.0, 12)
    image = render((side, side), x, y, flux) + rng.normal(0.0, noise, (side, side))
    offsets = np.arange(-8, 9, dtype=np.float64)
    prior_core = (1.35 * 1.02, 1.15 * 1.02, np.pi / 6)
    prior = effective_prf(offsets[None, :], offsets[:, None], core=prior_core)
    errors = {}
    for name, options in (("held", {}), ("relative", {"prior_error": None})):
        measured = measure_prf(image, 0.0, noise, x, y, prior, 1, **options)
        assert not measured.used_file
        n = measured.prf.shape[0]
        samples = (np.arange(n) - (n - 1) / 2) / measured.oversampling
        truth = effective_prf(samples[None, :], samples[:, None])
        core = np.hypot(samples[None, :], samples[:, None]) <= 4
        errors[name] = np.sqrt(np.mean((measured.prf - truth)[core] ** 2)) / truth.max()
    print(f"rms PRF error over the peak within 4 px: {errors['held']:.4f} held to the prior, "
          f"{errors['relative']:.4f} with relative penalties only")
    assert errors["held"] < 0.01
    assert errors["held"] < 0.7 * errors["relative"]


@pytest.mark.parametrize("seed", [1, 3, 4])
def test_stars_in_correlated_noise_are_judged_with_its_true_errors(seed):
    """Fourteen stars at S/N 50-100 and four resolved galaxies (sigma 2.4 px against the
    PRF's 1.4) in noise correlated between pixels, as a resampled mosaic's. Judged against
    the file's PRF (4 % narrower and turned) with the white-noise errors of their apertures,
    up to all of the stars fail the compactness test and the file's PRF is used; with the
    noise's factor (about 2.8 here) 9-12 pass, the galaxies still do not, and the PRF
    measured from them is nearer the sky's width (2 % narrower, the file's 3.6 %; the prior
    holds the rest, `test_few_faint_stars_correct_the_prior_only_as_far_as_they_measure_it`)."""
    rng = np.random.default_rng(seed)
    side, n_stars, n_galaxies = 300, 14, 4
    grid_x, grid_y = np.meshgrid(np.arange(40.0, 261.0, 44.0), np.arange(40.0, 261.0, 55.0))
    n = n_stars + n_galaxies
    x = grid_x.ravel()[:n] + rng.uniform(-0.5, 0.5, n)
    y = grid_y.ravel()[:n] + rng.uniform(-0.5, 0.5, n)
    flux = np.sqrt(4 * np.pi * 1.35 * 1.15) * rng.uniform(50.0, 100.0, n)
    extra = np.r_[np.zeros(n_stars), np.full(n_galaxies, 4.0)][rng.permutation(n)]
    noise = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (side + 20, side + 20)), 1.0)[10:-10, 10:-10]
    noise /= noise.std()
    image = render((side, side), x, y, flux, extra) + noise
    offsets = np.arange(-8, 9, dtype=np.float64)
    prior_core = (1.35 / 1.04, 1.15 / 1.04, np.pi / 6 + 0.5)
    prior = effective_prf(offsets[None, :], offsets[:, None], core=prior_core)
    factor = correlated_noise_scale(noise, np.ones_like(noise), effective_prf(offsets[None, :], offsets[:, None]))
    assert 2.5 < factor < 3.0
    white = measure_prf(image, 0.0, 1.0, x, y, prior, 1)
    honest = measure_prf(image, 0.0, 1.0, x, y, prior, 1, noise_factor=factor)
    samples = (np.arange(honest.prf.shape[0]) - (honest.prf.shape[0] - 1) / 2) / honest.oversampling
    true_fwhm = fwhm_pixels(effective_prf(samples[None, :], samples[:, None]), honest.oversampling)
    width = fwhm_pixels(honest.prf, honest.oversampling) / true_fwhm
    file_width = fwhm_pixels(effective_prf(samples[None, :], samples[:, None], core=prior_core), honest.oversampling) / true_fwhm
    print(f"stars used: {white.n_stars} with white errors ({white.reason}), {honest.n_stars} with the "
          f"factor {factor:.2f}; FWHM over the truth's {width:.3f}, the file's {file_width:.3f}")
    assert not honest.used_file
    assert honest.n_stars >= 8
    assert not (extra[honest.star_indices] > 0).any()
    assert abs(width - 1) < 0.7 * abs(file_width - 1)
