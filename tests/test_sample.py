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
