"""The PRF's radial profile measured from every source of an image (`mbphot.engine.wings`), and
the calibration that uses it on a crowded field whose PRF has wings the file lacks."""

import numpy as np
import pytest

from mbphot.bands import BANDS
from mbphot.calibration import _model_flux_fraction, calibrate_section
from mbphot.engine.background import sky_and_rms_maps, source_mask
from mbphot.engine.epsf import render_sources
from mbphot.engine.prf import build_prf_table
from mbphot.engine.scene import scene_photometry
from mbphot.engine.wings import fit_radial_correction, flux_image, wing_nodes, with_radial_correction
from mbphot.photometry import tabulate_prf

OVERSAMPLING = 4
HALO_FRACTION = 0.08
HALO_REACH_PIX = 20.0


def _offsets(half_pix):
    offsets = np.arange(-half_pix * OVERSAMPLING, half_pix * OVERSAMPLING + 1) / OVERSAMPLING
    return np.hypot(offsets[None, :], offsets[:, None])


def _core(radius, sigma):
    return np.exp(-0.5 * (radius / sigma) ** 2) / (2 * np.pi * sigma**2)


def _sky_prf(core_sigma=1.3):
    """An IRAC-like PRF: Gaussian core and an r^-3 halo holding `HALO_FRACTION` of the light
    out to `HALO_REACH_PIX`, oversampled, unit flux."""
    radius = _offsets(22)
    halo = np.where(radius <= HALO_REACH_PIX, (1 + (radius / 4.0) ** 2) ** -1.5, 0.0)
    core = _core(radius, core_sigma)
    prf = (1 - HALO_FRACTION) * core / core.sum() + HALO_FRACTION * halo / halo.sum()
    return prf * OVERSAMPLING**2


def _file_prf():
    """The 'published' PRF: a narrower core, no halo, a 17 x 17 box on the pixel grid."""
    offsets = np.arange(-8, 9, dtype=np.float64)
    prf = _core(np.hypot(offsets[None, :], offsets[:, None]), 1.2)
    return prf / prf.max()


def _crowded_field(rng, size=420, n_faint=2500, noise=0.003):
    table = build_prf_table(_sky_prf(), OVERSAMPLING, enclosed_fraction=1.0)
    grid = np.arange(25, size - 20, 45, dtype=np.float64)
    star_x, star_y = (g.ravel() + rng.uniform(-0.5, 0.5, g.size) for g in np.meshgrid(grid, grid))
    x = np.concatenate([star_x, rng.uniform(0, size - 1, n_faint)])
    y = np.concatenate([star_y, rng.uniform(0, size - 1, n_faint)])
    flux = np.concatenate([rng.uniform(5, 40, star_x.size), 0.04 * (1 + rng.pareto(1.2, n_faint))])
    image = render_sources((size, size), x, y, flux, table) + 0.01 + rng.normal(0, noise, (size, size))
    return image, x, y, flux, star_x.size, noise


def test_radial_correction_recovers_a_profile_added_to_every_source():
    """Sources drawn with the PRF plus a radial profile, fitted with the PRF alone: the fitted
    correction, applied, gives back the PRF they were drawn with."""
    rng = np.random.default_rng(3)
    # The added light is renormalised away from the core: the fitted profile starts at the centre.
    nodes = np.r_[0.0, wing_nodes(1.0, 20.0, n_nodes=6)]
    wider_prf = with_radial_correction(_sky_prf(), OVERSAMPLING, nodes[1:], np.array([2e-4, 1e-4, 5e-5, 2e-5, 1e-5, 5e-6]))
    prf = build_prf_table(_sky_prf(), OVERSAMPLING, enclosed_fraction=1.0)
    wider = build_prf_table(wider_prf, OVERSAMPLING, enclosed_fraction=1.0)
    shape = (300, 300)
    x, y = rng.uniform(0, 299, 400), rng.uniform(0, 299, 400)
    flux = rng.uniform(1, 50, 400)
    residual = render_sources(shape, x, y, flux, wider) - render_sources(shape, x, y, flux, prf)
    values, errors = fit_radial_correction(residual + rng.normal(0, 1e-4, shape), 1e-4, flux_image(shape, x, y, flux),
                                           nodes, tile_size=34, margin=21)
    assert np.all(np.isfinite(errors))
    recovered = with_radial_correction(_sky_prf(), OVERSAMPLING, nodes, values)
    light_moved = np.abs(wider_prf - _pad_like(_sky_prf(), wider_prf)).sum()
    assert np.abs(recovered - wider_prf).sum() < 0.1 * light_moved


def _pad_like(prf, like):
    pad = (like.shape[0] - prf.shape[0]) // 2
    return np.pad(prf, pad) if pad > 0 else prf


def test_calibration_measures_the_wings_the_file_lacks_and_fits_total_fluxes():
    """A crowded IRAC-like field, its PRF broader than the file's with a halo out to 12" that
    the file lacks, and the sky map measured between the sources as the pipeline does: the
    calibrated PRF gives total fluxes within 1 %; the file's PRF misses several per cent."""
    rng = np.random.default_rng(11)
    band = BANDS["irac1"]
    image, x, y, flux, n_stars, noise = _crowded_field(rng)
    mask = source_mask(image.shape, x, y, 1.5 * band.fwhm_arcsec / band.pixel_scale_arcsec)
    sky, _ = sky_and_rms_maps(image, mask, box_size=2 * band.cutout_size_pixels)
    calibration = calibrate_section(image, sky, noise, x, y, _file_prf(), 1, band, stars=np.arange(n_stars))
    assert not calibration.used_file

    def median_ratio(table, offset=(0.0, 0.0), sky_offset=0.0):
        result = scene_photometry(
            image, x + offset[0], y + offset[1], np.arange(x.size), table, band.cutout_size_pixels,
            sky + sky_offset, noise, fit_sky=True,
        )
        bright = result.flux / result.flux_err > 10
        return float(np.median(result.flux[bright] / flux[bright]))

    calibrated = tabulate_prf(calibration.prf, calibration.oversampling, band, True, calibration.flux_fraction)
    ratio = median_ratio(calibrated, (calibration.offset_x_pix, calibration.offset_y_pix), calibration.sky_offset)
    file_ratio = median_ratio(tabulate_prf(_file_prf(), 1, band, True))
    print(f"median flux / truth at S/N > 10: calibrated {ratio:.4f}, file's PRF {file_ratio:.4f}")
    assert abs(ratio - 1) < 0.01
    assert file_ratio < 0.96


@pytest.mark.parametrize("lacking", [0.01, 0.0, -0.008])
def test_flux_fraction_is_the_light_the_model_lacks_in_the_calibration_aperture(lacking):
    """Residuals (image less model) around bright sources that hold a given fraction of their
    flux between 6 and 20 px, on a sloping sky, with noise, confusion-like faint blobs and a
    few sources beside an unmodelled bright neighbour: the flux fraction is 1 / (1 + that
    fraction) within 0.15 %, whatever the slope and the outliers."""
    rng = np.random.default_rng(5)
    band = BANDS["irac1"]
    radius_pix = band.calibration_radius_arcsec / band.pixel_scale_arcsec
    shape, noise = (700, 700), 0.01
    x, y = rng.uniform(45, 655, 300), rng.uniform(45, 655, 300)
    flux = 5.0 * (1 + rng.pareto(1.0, x.size))
    ring = np.where((_offsets(22) > 6) & (_offsets(22) <= 20), 1.0, 0.0)
    ring_table = build_prf_table(ring * OVERSAMPLING**2 / ring.sum(), OVERSAMPLING, enclosed_fraction=1.0)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    residual = render_sources(shape, x, y, lacking * flux, ring_table) + 0.02 + 1e-4 * cols - 5e-5 * rows
    residual += rng.normal(0, noise, shape)
    blobs = build_prf_table(_sky_prf(2.0), OVERSAMPLING, enclosed_fraction=1.0)
    residual += render_sources(shape, rng.uniform(0, 699, 3000), rng.uniform(0, 699, 3000), rng.exponential(0.05, 3000), blobs)
    neighbours = np.argsort(flux)[-40:-35]
    residual += render_sources(shape, x[neighbours] + 9.0, y[neighbours], 0.3 * flux[neighbours], blobs)
    fraction = _model_flux_fraction(residual, np.full(shape, noise), x, y, flux, np.arange(x.size), radius_pix, 1.0)
    print(f"lacking {lacking:+.3f}: flux fraction {fraction:.4f}, expected {1 / (1 + lacking):.4f}")
    assert fraction == pytest.approx(1 / (1 + lacking), abs=0.0015)
    assert np.isnan(_model_flux_fraction(residual, np.full(shape, noise), x, y, flux, np.arange(4), radius_pix, 1.0))


def test_calibration_whose_first_stars_are_too_few_keeps_the_stars_sampling(monkeypatch):
    """Where the first star measurement keeps the file's PRF (too few stars against the
    file's shape) and the second, against the corrected profile, measures it, the calibration
    holds the stars' PRF at the stars' sampling, not the file's: its FWHM is the sky's, and
    it says it was measured from stars."""
    import mbphot.calibration as calibration_module
    from mbphot.engine.epsf import fwhm_pixels

    rng = np.random.default_rng(11)
    band = BANDS["irac1"]
    image, x, y, flux, n_stars, noise = _crowded_field(rng)
    mask = source_mask(image.shape, x, y, 1.5 * band.fwhm_arcsec / band.pixel_scale_arcsec)
    sky, _ = sky_and_rms_maps(image, mask, box_size=2 * band.cutout_size_pixels)
    measure_prf, calls = calibration_module.measure_prf, []

    def first_too_few(*args, **kwargs):
        calls.append(kwargs["min_stars"])
        if len(calls) == 1:
            kwargs["min_stars"] = 10 * n_stars
        return measure_prf(*args, **kwargs)

    monkeypatch.setattr(calibration_module, "measure_prf", first_too_few)
    calibration = calibrate_section(image, sky, noise, x, y, _file_prf(), 1, band, stars=np.arange(n_stars))
    assert len(calls) == 2
    assert calibration.oversampling > 1 and not calibration.used_file and calibration.n_stars >= band.prf_min_stars
    sky_fwhm = fwhm_pixels(_sky_prf(), OVERSAMPLING)
    assert fwhm_pixels(calibration.prf, calibration.oversampling) == pytest.approx(sky_fwhm, rel=0.05)
