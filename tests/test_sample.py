"""The simulated COSMOS-like field: deterministic, and in the real products' formats."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from mbphot import sample
from mbphot.bands import BANDS
from mbphot.engine.prf import prf_centre
from mbphot.sample import SampleSpec, make_sample_field, sample_files

SMALL = SampleSpec(ra_deg=150.05, dec_deg=2.25, radius_arcmin=0.8, seed=7)

CATALOG_COLUMNS = [
    "ra", "dec", "id", "ks_flux_aper2", "ks_fluxerr_aper2", "photoz", "type",
    "splash_1_flux", "splash_1_flux_err", "splash_2_flux", "splash_2_flux_err",
    "splash_3_flux", "splash_3_flux_err", "splash_4_flux", "splash_4_flux_err",
    "splash_1_mag", "splash_1_magerr", "flux_galex_nuv", "flux_galex_fuv",
    "mag_galex_nuv", "magerr_galex_nuv", "mag_galex_fuv", "magerr_galex_fuv",
    "flux_chandra_05_2", "flux_chandra_2_10", "flux_chandra_05_10", "id_chandra09",
    "r_mag_auto", "r_magerr_auto", "flux_24", "fluxerr_24",
]


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    return make_sample_field(SMALL, tmp_path_factory.mktemp("sample") / SMALL.tag)


def test_generator_is_deterministic(field, tmp_path):
    again = make_sample_field(SMALL, tmp_path / "again")
    files = sorted(p.relative_to(field) for p in field.rglob("*.fits"))
    assert len(files) == 29  # 8 IRAC, 12 GALEX, 6 PRF files, 3 tables
    for relative in files:
        assert (field / relative).read_bytes() == (again / relative).read_bytes(), relative


def _same_files(one, other, pattern="*.fits"):
    files = sorted(p.relative_to(one) for p in one.rglob(pattern))
    assert files
    return all((one / relative).read_bytes() == (other / relative).read_bytes() for relative in files)


def test_files_do_not_depend_on_strips_or_processes(field, tmp_path, monkeypatch):
    """Strips of a few rows rendered by two worker processes give the very bytes of the
    whole-image, single-process field: the noise is drawn in image and row order."""
    monkeypatch.setattr(sample, "STRIP_PIXELS", 3000)
    again = make_sample_field(SMALL, tmp_path / "strips", n_workers=2)
    assert _same_files(field, again)


def test_sources_beyond_the_galex_field_of_view_are_skipped_exactly(tmp_path, monkeypatch):
    """Sources whose stamps fall only where a GALEX tile has no exposure are not rendered,
    and the tile is the same as with every source rendered."""
    fov_deg = 0.3 * np.sqrt(sample.GALEX_RESPONSE_FALLOFF)  # the tiles' edge through the field centre
    monkeypatch.setattr(sample, "GALEX_FOV_RADIUS_DEG", fov_deg)
    monkeypatch.setattr(sample, "GALEX_EDGE_DEG", 0.3)
    skipping = make_sample_field(SMALL, tmp_path / "skipping", n_workers=1)
    exposure = fits.getdata(skipping / "galex/COSMOS_SIM_01-nd-rrhr.fits")
    assert 0.2 < (exposure == 0).mean() < 0.8
    monkeypatch.setattr(sample, "GALEX_EDGE_DEG", np.inf)
    assert _same_files(skipping, make_sample_field(SMALL, tmp_path / "all", n_workers=1), "galex/*.fits")


def test_row_writer_writes_what_write_fits_writes(tmp_path):
    data = np.random.default_rng(1).normal(size=(37, 23))
    header = WCS(naxis=2).to_header()
    header["BUNIT"] = "MJy/sr"
    sample._write_fits(tmp_path / "whole.fits", data, header)
    with sample._FitsRowWriter(tmp_path / "rows.fits", header, data.shape) as writer:
        for start in range(0, 37, 10):
            writer.write(data[start : start + 10])
    assert (tmp_path / "rows.fits").read_bytes() == (tmp_path / "whole.fits").read_bytes()
    with pytest.raises(RuntimeError, match="fewer rows"):
        with sample._FitsRowWriter(tmp_path / "short.fits", header, data.shape) as writer:
            writer.write(data[:10])


def test_an_interrupted_field_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "_make_chandra_and_catalog", fail)
    with pytest.raises(KeyboardInterrupt):
        make_sample_field(SMALL, tmp_path / "field")
    assert list(tmp_path.iterdir()) == []


def test_another_seed_gives_another_field(field, tmp_path):
    other = make_sample_field(SampleSpec(SMALL.ra_deg, SMALL.dec_deg, SMALL.radius_arcmin, seed=8), tmp_path / "o")
    assert len(Table.read(other / "catalog/cosmos2015.fits")) != len(Table.read(field / "catalog/cosmos2015.fits"))


def test_catalog_has_cosmos2015_columns_and_density(field):
    catalog = Table.read(field / "catalog/cosmos2015.fits")
    assert set(catalog.colnames) == set(CATALOG_COLUMNS)
    assert catalog["splash_1_flux"].unit == "uJy"
    area_arcmin2 = np.pi * SMALL.catalog_radius_arcmin**2
    assert 110 < len(catalog) / area_arcmin2 < 190
    assert set(np.unique(catalog["type"])) <= {0, 1, 2}


def test_images_open_like_the_real_products(field):
    files = sample_files(field)
    for name, entry in files["bands"].items():
        band = BANDS[name]
        for image in entry["images"]:
            with fits.open(field / image["image"]) as hdul:
                header = hdul[0].header
                wcs = WCS(header)
                assert wcs.has_celestial and wcs.wcs.ctype[0] == "RA---TAN"
                assert np.allclose(np.abs(wcs.proj_plane_pixel_scales()[0].to_value("arcsec")), band.pixel_scale_arcsec)
                ra, dec = wcs.wcs_pix2world([[header["NAXIS1"] / 2, header["NAXIS2"] / 2]], 0)[0]
                assert abs(ra - SMALL.ra_deg) < 0.01 and abs(dec - SMALL.dec_deg) < 0.01
                if band.instrument == "IRAC":
                    assert header["BUNIT"] == "MJy/sr"
                else:
                    assert header["EXPTIME"] > 10000 and "RA_CENT" in header
                    assert fits.getdata(field / image["sky"]).shape == hdul[0].data.shape


def test_two_galex_tiles_with_their_own_tangent_points(field):
    files = sample_files(field)
    centres = [fits.getheader(field / img["image"])["CRVAL1"] for img in files["bands"]["nuv"]["images"]]
    assert len(centres) == 2 and abs(centres[0] - centres[1]) > 0.3


def test_prf_files_have_the_documented_shape_and_normalisation(field):
    for channel in "1234":
        header = fits.getheader(field / f"prf/PRF_IRAC_ch{channel}.fits")
        prf = fits.getdata(field / f"prf/PRF_IRAC_ch{channel}.fits")
        assert header["OVERSAMP"] == 5
        assert prf.sum() == pytest.approx(25, rel=1e-4)
        row = prf[int(round(prf_centre(prf)[0]))]
        fwhm_arcsec = (row >= row.max() / 2).sum() / header["OVERSAMP"] * 0.6
        assert BANDS[f"irac{channel}"].fwhm_arcsec == pytest.approx(fwhm_arcsec, abs=0.2)  # 0.12" sampling
        assert 1.6 < fwhm_arcsec < 2.1
    nuv = fits.getdata(field / "prf/PSFnuv.fits")
    assert nuv.max() == pytest.approx(1.0), "GALEX PSFs are peak-normalised like the real files"


def test_truth_links_sources_to_their_chandra_counterparts(field):
    truth = Table.read(field / "catalog/truth.fits")
    assert np.all(truth["true_irac1_flux_ujy"] > 0)
    assert np.all(np.isin(truth["true_chandra_id"][truth["true_chandra_id"] > 0],
                          Table.read(field / "chandra/ccosmoscat.fits")["SOURCE_NUMBER"]))


def test_chandra_catalog_has_heasarc_columns(field):
    chandra = Table.read(field / "chandra/ccosmoscat.fits")
    for column in ["NAME", "RA", "DEC", "ERROR_RADIUS", "FLUX", "SB_FLUX", "HB_FLUX", "HARDNESS_RATIO"]:
        assert column in chandra.colnames
    assert np.all(chandra["ERROR_RADIUS"] > 0)


# ---------------------------------------------------------------------------------------------
# Realism: the ideal field is unchanged, the realistic one has each real-sky effect.

IDEAL_REFERENCE = SampleSpec(ra_deg=150.05, dec_deg=2.25, radius_arcmin=0.6, seed=3)
IDEAL_REFERENCE_SHA256 = "4536b0c065fc49709e60c2cad537f4786f800b6f47cae56d53d3a8fcf78aecbe"
"""sha256 over (relative path, bytes) of every FITS file of ``IDEAL_REFERENCE``, computed with
the simulator as it was before realism existed (commit 9319727)."""

REAL = SampleSpec(ra_deg=150.05, dec_deg=2.25, radius_arcmin=0.8, seed=7, realism="realistic")


def _field_sha256(directory):
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*.fits")):
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_ideal_realism_gives_the_very_files_of_the_simulator_before_realism(tmp_path):
    assert SampleSpec(1.0, 2.0, 3.0, 4) == SampleSpec(1.0, 2.0, 3.0, 4, realism="ideal")
    directory = make_sample_field(IDEAL_REFERENCE, tmp_path / IDEAL_REFERENCE.tag, n_workers=1)
    assert _field_sha256(directory) == IDEAL_REFERENCE_SHA256
    assert (directory / "COMPLETE").read_text() == (
        "mbphot.sample version 2: SampleSpec(ra_deg=150.05, dec_deg=2.25, radius_arcmin=0.6, seed=3)\n"
    ), "ideal fields made before realism existed must not be rebuilt"


def test_realism_is_part_of_the_field_name_and_stamp():
    ideal = SampleSpec()
    realistic = SampleSpec(realism="realistic")
    assert realistic.tag != ideal.tag and realistic.tag.endswith("_realistic")
    assert realistic.stamp != ideal.stamp
    custom = SampleSpec(realism=sample.Realism.realistic().but(confusion=False))
    assert custom.tag not in (ideal.tag, realistic.tag) and custom.realism.name.startswith("custom-")
    with pytest.raises(ValueError, match="realism must be one of"):
        SampleSpec(realism="very")


@pytest.fixture(scope="module")
def real_field(tmp_path_factory):
    return make_sample_field(REAL, tmp_path_factory.mktemp("real") / REAL.tag)


def _twin(tmp_path, monkeypatch=None, noiseless=False, **switches):
    """A field like ``REAL`` with some switches changed, IRAC noise optionally zero."""
    if noiseless:
        monkeypatch.setattr(sample, "IRAC_NOISE_UJY_PER_PIXEL", {b: 0.0 for b in sample.IRAC_NOISE_UJY_PER_PIXEL})
    realism = sample.Realism(**switches) if switches.pop("_from_ideal", False) else REAL.realism.but(**switches)
    spec = SampleSpec(REAL.ra_deg, REAL.dec_deg, REAL.radius_arcmin, REAL.seed, realism=realism)
    return make_sample_field(spec, tmp_path / spec.tag, n_workers=1)


def test_realistic_field_is_deterministic_whatever_the_strips_and_processes(real_field, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "STRIP_PIXELS", 3000)  # strips of one FFT block (256 rows)
    again = make_sample_field(REAL, tmp_path / "again", n_workers=2)
    assert _same_files(real_field, again)


def test_realistic_field_has_the_same_files_and_catalogue_size_column(real_field):
    files = sorted(p.relative_to(real_field) for p in real_field.rglob("*.fits"))
    assert len(files) == 29
    catalog = Table.read(real_field / "catalog/cosmos2015.fits")
    assert set(catalog.colnames) == set(CATALOG_COLUMNS) | {"flux_radius_arcsec"}
    truth = Table.read(real_field / "catalog/truth.fits")
    resolved = truth["true_re_arcsec"] > 0
    assert set(truth["sed_class"][resolved]) <= {"star_forming", "quiescent"}
    galaxies = np.isin(np.char.decode(np.asarray(truth["sed_class"])), ["star_forming", "quiescent"])
    assert 0.4 < resolved.sum() / galaxies.sum() < 0.6
    assert 0.1 <= truth["true_re_arcsec"][resolved].min() and truth["true_re_arcsec"].max() <= 1.0
    # Brighter galaxies are larger; the catalogue size follows the true one.
    bright = resolved & (truth["true_irac1_flux_ujy"] > 10)
    faint = resolved & (truth["true_irac1_flux_ujy"] < 1)
    assert np.median(truth["true_re_arcsec"][bright]) > 1.5 * np.median(truth["true_re_arcsec"][faint])
    assert np.corrcoef(catalog["flux_radius_arcsec"][resolved], truth["true_re_arcsec"][resolved])[0, 1] > 0.9


def test_catalogue_positions_scatter_from_the_light_as_recorded(real_field):
    catalog = Table.read(real_field / "catalog/cosmos2015.fits")
    truth = Table.read(real_field / "catalog/truth.fits")
    assert np.array_equal(catalog["id"], truth["id"])
    cos_dec = np.cos(np.radians(REAL.dec_deg))
    d_ra = (catalog["ra"] - truth["true_ra"]) * 3600 * cos_dec
    d_dec = (catalog["dec"] - truth["true_dec"]) * 3600
    sigma = np.asarray(truth["pos_sigma_arcsec"])
    assert 0.1 <= sigma.min() and sigma.max() <= 0.2
    for delta in (d_ra, d_dec):
        assert np.std(delta / sigma) == pytest.approx(1.0, abs=0.05)
        assert abs(np.mean(delta)) < 0.01
    offsets = sample.image_offsets_from_truth(truth.meta)
    assert len(offsets) == 8  # 4 IRAC channels, 2 GALEX bands x 2 tiles
    assert all(np.hypot(*offset) <= 0.1 for offset in offsets.values())
    assert len({offset for offset in offsets.values()}) == 8


def _autocorrelation(noise, lag=1):
    a = noise - noise.mean()
    return float((a[:, lag:] * a[:, :-lag]).mean() / a.var())


def test_irac_noise_is_correlated_and_unc_holds_the_per_pixel_sigma(real_field, tmp_path, monkeypatch):
    noiseless = _twin(tmp_path, monkeypatch, noiseless=True)
    for channel in "14":
        science = fits.getdata(real_field / f"irac/irac_ch{channel}_go2_sci.fits").astype(float)
        unc = fits.getdata(real_field / f"irac/irac_ch{channel}_go2_unc.fits").astype(float)
        noise = science - fits.getdata(noiseless / f"irac/irac_ch{channel}_go2_sci.fits")
        assert _autocorrelation(noise) > 0.3, "resampled native frames correlate neighbouring pixels"
        assert np.std(noise / unc) == pytest.approx(1.0, abs=0.03)
        # unc follows the pixel-to-pixel variation of the sigma, not only its mean.
        high = unc > np.percentile(unc, 80)
        low = unc < np.percentile(unc, 20)
        assert np.std(noise[high]) / np.std(noise[low]) == pytest.approx(np.mean(unc[high]) / np.mean(unc[low]), rel=0.05)


def _box_sum(image, x, y, half):
    col, row = int(round(x)), int(round(y))
    return float(image[row - half : row + half + 1, col - half : col + half + 1].sum())


def test_sky_prf_differs_from_the_file_and_its_wings_reach_past_the_box(tmp_path, monkeypatch):
    """The brightest star in two noiseless fields: one drawn with the PRF file, one with the sky's."""
    sky = _twin(tmp_path, monkeypatch, noiseless=True, _from_ideal=True, prf_mismatch=True)
    filed = _twin(tmp_path, monkeypatch, noiseless=True, _from_ideal=True, correlated_noise=True)
    truth = Table.read(sky / "catalog/truth.fits")
    star = np.argmax(np.where(np.char.decode(np.asarray(truth["sed_class"])) == "star", truth["true_irac1_flux_ujy"], 0))
    assert truth["true_irac1_flux_ujy"][star] > 50
    wcs = WCS(fits.getheader(sky / "irac/irac_ch1_go2_sci.fits"))
    x, y = wcs.all_world2pix([[truth["true_ra"][star], truth["true_dec"][star]]], 0)[0]
    sky_image = fits.getdata(sky / "irac/irac_ch1_go2_sci.fits").astype(float)
    file_image = fits.getdata(filed / "irac/irac_ch1_go2_sci.fits").astype(float)
    flux = truth["true_irac1_flux_ujy"][star] / BANDS["irac1"].ujy_per_pixel_unit
    inside_box = (_box_sum(sky_image, x, y, 8) - _box_sum(file_image, x, y, 8)) / flux
    assert -0.12 < inside_box < -0.03, "the sky puts 5-7 % of the light outside the file's 17 x 17 box"
    whole = (_box_sum(sky_image, x, y, 20) - _box_sum(file_image, x, y, 20)) / flux
    # The true flux is the IRAC-calibrated one (12.2" aperture less the ring's background);
    # the box's corners beyond 12.2" hold a little more.
    extra = 1.0 / sample._prfs.irac_calibration_fraction("irac1") - 1.0
    assert 0.003 < extra < 0.008
    assert abs(whole - extra) < 0.003, "within 41 x 41 pixels the sky's PRF holds the true flux and its corners"
    # The sky's PRF is broader: a larger second moment within 5 pixels.
    col, row = int(round(x)), int(round(y))
    yy, xx = np.mgrid[-5:6, -5:6]

    def second_moment(image):
        cut = image[row - 5 : row + 6, col - 5 : col + 6] - np.median(image)
        return float((cut * (xx**2 + yy**2)).sum() / cut.sum())

    assert second_moment(sky_image) > 1.05 * second_moment(file_image)


def test_sky_prf_varies_across_the_field():
    from mbphot.sample import _prfs

    first, second = (_prfs.irac_sky_prf("irac1", roll) for roll in _prfs.IRAC_ROLL_DEG)
    assert np.abs(first - second).max() > 0.05 * first.max(), "two rolls, two PRFs"
    weights = _prfs.roll_weight(np.linspace(-300, 300, 50), np.linspace(-200, 250, 50), (0.3, 1.1))
    assert weights.min() >= 0.1 and weights.max() <= 0.9 and np.ptp(weights) > 0.3


def test_resolved_galaxies_conserve_their_true_flux(tmp_path, monkeypatch):
    discs = _twin(tmp_path, monkeypatch, noiseless=True, _from_ideal=True, resolved_galaxies=True)
    points = _twin(tmp_path, monkeypatch, noiseless=True, _from_ideal=True, correlated_noise=True)
    truth = Table.read(discs / "catalog/truth.fits")
    resolved = truth["true_re_arcsec"] > 0
    for channel in "13":
        difference = (fits.getdata(discs / f"irac/irac_ch{channel}_go2_sci.fits").astype(float)
                      - fits.getdata(points / f"irac/irac_ch{channel}_go2_sci.fits"))
        resolved_flux = truth[f"true_irac{channel}_flux_ujy"][resolved].sum() / BANDS[f"irac{channel}"].ujy_per_pixel_unit
        # Spread out, but no light made or lost (the catalogue's sources lie well inside the image).
        assert np.abs(difference).sum() > 0.05 * resolved_flux
        assert abs(difference.sum()) < 0.005 * resolved_flux


def test_resolved_galaxy_tables_hold_the_core_flux_at_every_phase():
    from mbphot.sample import _prfs

    model = _prfs.band_model("irac2", sample.Realism(resolved_galaxies=True, prf_mismatch=True))
    core = model.components[0].stamps.sum(axis=(-2, -1))
    for table in model.galaxies[0]:
        assert np.allclose(table.stamps.sum(axis=(-2, -1)), core[0, 0], rtol=1e-12)
    assert core[0, 0] + model.wing.sum() == pytest.approx(1.0, abs=1e-12)
    assert model.galaxies[0][-1].half_size > model.galaxies[0][0].half_size


def test_confusion_sources_are_in_the_images_but_not_in_the_catalogue(real_field, tmp_path):
    without = _twin(tmp_path, confusion=False)
    truth = Table.read(real_field / "catalog/truth.fits")
    image_area_arcmin2 = (2 * REAL.image_half_side_arcmin) ** 2
    assert 2.5 < truth.meta["NFAINT"] / (sample.SOURCES_PER_ARCMIN2 * image_area_arcmin2) < 3.5
    assert (real_field / "catalog/cosmos2015.fits").read_bytes() == (without / "catalog/cosmos2015.fits").read_bytes()
    extra = (fits.getdata(real_field / "irac/irac_ch1_go2_sci.fits").astype(float)
             - fits.getdata(without / "irac/irac_ch1_go2_sci.fits"))
    extra_ujy = extra.sum() * BANDS["irac1"].ujy_per_pixel_unit
    # About 0.06 uJy each on average at 3.6 um, all of it below the catalogue limit.
    assert 0.03 < extra_ujy / truth.meta["NFAINT"] < 0.12
    assert extra.min() > -1e-6


def test_confusion_keeps_only_the_sources_the_detection_image_misses():
    from mbphot.sample import _sources

    flux36_ujy = np.array([0.10, 0.05, 0.05, 0.10, 0.50, 0.05])
    flux_nuv_ujy = np.array([0.05, 0.20, 0.05, 2.00, 0.10, 5.00])
    # Red or flat sources below the limit at 3.6 um stay; a blue one stays while its light at
    # 1 um (0.05 uJy lifted 1.9 times) is below the limit; one 20 or 100 times brighter in NUV
    # is seen at 1 um (0.4 uJy), one above the limit at 3.6 um (a star the counts made 5 times
    # brighter) is seen anyway.
    assert _sources.undetected(flux36_ujy, flux_nuv_ujy).tolist() == [True, True, True, False, False, False]


def test_galex_mis_tile_has_zero_counts_inside_and_no_exposure_outside_its_footprint(real_field):
    for band in ("nd", "fd"):
        intensity = fits.getdata(real_field / f"galex/COSMOS_SIM_02-{band}-int.fits")
        exposure = fits.getdata(real_field / f"galex/COSMOS_SIM_02-{band}-rrhr.fits")
        assert fits.getheader(real_field / f"galex/COSMOS_SIM_02-{band}-int.fits")["EXPTIME"] == 1500
        inside, outside = exposure > 0, exposure == 0
        assert 0.2 < outside.mean() < 0.8, "the footprint's edge crosses the field"
        assert np.all(intensity[outside] == 0)
        assert (intensity[inside] == 0).mean() > (0.5 if band == "fd" else 0.001), "genuine zero-count pixels at MIS depth"
        deep = fits.getdata(real_field / f"galex/COSMOS_SIM_01-{band}-int.fits")
        assert fits.getheader(real_field / f"galex/COSMOS_SIM_01-{band}-int.fits")["EXPTIME"] == 40000
        assert (deep == 0).mean() < (intensity[inside] == 0).mean()


def test_galex_sky_map_carries_a_smooth_error(real_field, tmp_path):
    true_sky_field = _twin(tmp_path, sky_error=False)
    for stem in ("COSMOS_SIM_01-nd", "COSMOS_SIM_02-fd"):
        ratio = (fits.getdata(real_field / f"galex/{stem}-skybg.fits").astype(float)
                 / fits.getdata(true_sky_field / f"galex/{stem}-skybg.fits"))
        error = ratio - 1
        assert 0.01 < np.std(error) < 0.08, "a few per cent"
        assert np.abs(error).max() < 0.15
        # Smooth: from one pixel to the next the error changes far less than across the field.
        assert np.abs(np.diff(error, axis=1)).max() < 0.05 * np.ptp(error)


def test_galex_psf_file_is_real_sized_and_the_sky_psf_as_extended_as_the_real_ones(real_field):
    from mbphot.engine.prf import _enclosed_radius, normalise_prf
    from mbphot.sample import _prfs

    for band, radius_999 in (("nuv", 36), ("fuv", 47)):
        psf_file = fits.getdata(real_field / f"prf/PSF{band}.fits")
        assert psf_file.shape == (120, 120) and psf_file.max() == pytest.approx(1.0)
        assert np.unravel_index(np.argmax(psf_file), psf_file.shape) == (59, 59)
        sky = _prfs.galex_sky_psf(band)[::5, ::5]
        centre = sky.shape[0] // 2
        assert _enclosed_radius(normalise_prf(sky), (centre, centre), 0.999) == pytest.approx(radius_999, abs=2)
        # The file's core is a little broader than the sky's.
        file_norm = psf_file / psf_file.sum()
        assert file_norm.max() < sky.max() / sky.sum()


def test_the_detection_image_separates_sources_only_where_each_has_a_peak():
    from mbphot.sample._sources import detection_primaries

    def entries(separation_arcsec, ratio, re_arcsec=0.0):
        ra = np.array([150.0, 150.0 + separation_arcsec / 3600.0])
        return detection_primaries(ra, np.array([2.0, 2.0]), np.array([10.0, 10.0 * ratio]), np.full(2, re_arcsec))

    # Equal Gaussians show two peaks beyond two sigma: 0.68" at 0.8" seeing.
    assert list(entries(0.6, 1.0)) == [0, 0]
    assert list(entries(0.8, 1.0)) == [0, 1]
    # A faint source needs more room in a bright one's light; sizes blur the image further.
    assert list(entries(1.0, 0.01)) == [0, 0]
    assert list(entries(1.8, 0.01)) == [0, 1]
    assert list(entries(0.8, 1.0, re_arcsec=0.5)) == [0, 0]
    # A source that is part of another's entry takes no parts itself.
    ra = 150.0 + np.array([0.0, 0.6, 1.2]) / 3600.0
    assert list(detection_primaries(ra, np.full(3, 2.0), np.array([10.0, 5.0, 1.0]), np.zeros(3))) == [0, 0, 2]


def test_blended_catalogue_entries_hold_their_parts_flux_and_the_images_do_not_change(real_field, tmp_path):
    separate = _twin(tmp_path, detection_blending=False)
    truth = Table.read(real_field / "catalog/truth.fits").to_pandas().set_index("id")
    every = Table.read(separate / "catalog/truth.fits").to_pandas().set_index("id")
    assert set(truth.index) < set(every.index)
    assert 0.03 < 1 - len(truth) / len(every) < 0.15
    gained = truth["true_irac1_flux_ujy"] - every.loc[truth.index, "true_irac1_flux_ujy"]
    assert gained.min() > -1e-9
    # The parts' light moved into their entries (parts of entries at the catalogue's edge aside).
    parts = every.drop(truth.index)["true_irac1_flux_ujy"].sum()
    assert gained.sum() == pytest.approx(parts, rel=0.1)
    for name in ("irac/irac_ch1_go2_sci.fits", "galex/COSMOS_SIM_01-nd-int.fits"):
        assert (real_field / name).read_bytes() == (separate / name).read_bytes()


@pytest.mark.parametrize("pixel_arcsec, fwhm_arcsec", [(0.6, 1.7), (1.5, 5.0)])
def test_a_disc_between_two_tabulated_radii_is_drawn_as_both_within_a_few_thousandths(pixel_arcsec, fwhm_arcsec):
    """`_sources.galaxy_sizes` draws sizes between the tabulated radii, and `_render.render_rows`
    draws such a disc as the two tables about it weighted linearly in log radius: on IRAC- and
    GALEX-like pixels and PSFs, within 0.34 % of the peak of the exact disc, whose profile fits
    it with 99.66-99.98 % of its flux."""
    import galsim

    from mbphot.sample import _prfs

    core = galsim.Gaussian(fwhm=fwhm_arcsec)
    radii = _prfs.GALAXY_RE_BINS_ARCSEC
    for below in (2, 5, 7):
        for towards_next in (0.25, 0.5):
            between = 10 ** ((1 - towards_next) * np.log10(radii[below]) + towards_next * np.log10(radii[below + 1]))
            tables = [_prfs.galaxy_table(core, 5, pixel_arcsec, r, 8, 1.0) for r in (radii[below], radii[below + 1], between)]
            centre, half = tables[0].n_phase // 2, max(t.half_size for t in tables)
            low, high, exact = (np.pad(t.stamps[centre, centre], half - t.half_size) for t in tables)
            drawn = (1 - towards_next) * low + towards_next * high
            assert np.abs(drawn - exact).max() < 0.004 * exact.max()
            assert 0.996 < np.sum(drawn * exact) / np.sum(exact**2) < 1.001


def test_galaxy_sizes_are_continuous_and_their_tables_bracket_them():
    from mbphot.sample import _prfs, _sources

    spec = SampleSpec(ra_deg=150.1, dec_deg=2.2, radius_arcmin=2.0, seed=3, realism="realistic")
    flux36 = 10 ** np.random.default_rng(0).uniform(-1, 2, 5000)
    size_bin, towards_next, re = _sources.galaxy_sizes(spec, np.full(flux36.size, "star_forming"), flux36)
    resolved = size_bin >= 0
    radii = np.asarray(_prfs.GALAXY_RE_BINS_ARCSEC)
    assert np.unique(np.round(re[resolved], 4)).size > 100 * radii.size
    logs = np.log10(re[resolved])
    expected = np.log10(radii[size_bin[resolved]]) + towards_next[resolved] * np.diff(np.log10(radii))[size_bin[resolved]]
    np.testing.assert_allclose(logs, expected, atol=1e-9)
    assert np.all((towards_next >= 0) & (towards_next <= 1)) and np.all(re[~resolved] == 0)
