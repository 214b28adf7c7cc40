"""Archive mode against the real IRSA, MAST, HEASARC and the PRF host, for a 1' field.

Run with ``pytest -m live`` (on Fornax, or any machine with internet access); a default
``pytest`` run deselects these tests (``addopts`` in ``pyproject.toml``), and without network
they skip, naming the host they could not reach. They check what the loopback stand-ins in
``archive_servers.py`` can only assume: the real tables' columns, the real mosaics' pixels,
WCS and units, that the published PRFs are the pinned files, and that MAST's public S3 copy of
the GALEX tiles (read anonymously, with the ``cloud`` extra) holds the pixels MAST serves over
HTTP.
"""

import socket

import numpy as np
import pytest
from astropy.io import fits

from mbphot.archive import Endpoints, retrieve_archive
from mbphot.archive.irsa import CATALOG_COLUMNS, find_cosmos_image_service
from mbphot.io import read_table, read_wcs
from mbphot.params import RunParameters

pytestmark = pytest.mark.live

RA, DEC, RADIUS_ARCMIN = 150.01, 2.20, 1.0
HOSTS = ("irsa.ipac.caltech.edu", "mast.stsci.edu", "heasarc.gsfc.nasa.gov", "raw.githubusercontent.com", "reg.g-vo.org")


@pytest.fixture(scope="module")
def online(request):
    """Skip unless ``-m live`` was asked for and every host answers on port 443."""
    expression = request.config.getoption("-m") or ""
    if "live" not in expression or "not live" in expression:
        pytest.skip("live archive tests run only with pytest -m live")
    for host in HOSTS:
        try:
            socket.create_connection((host, 443), timeout=5).close()
        except OSError as error:
            pytest.skip(f"no network: cannot connect to {host}:443 ({error})")


@pytest.fixture(scope="module")
def live_field(online, tmp_path_factory):
    params = RunParameters(ra=RA, dec=DEC, radius_arcmin=RADIUS_ARCMIN, bands="all", data_source="archive",
                           data_dir=str(tmp_path_factory.mktemp("live") / "data"))
    return retrieve_archive(params, progress=False, endpoints=Endpoints(timeout_s=120.0))


def test_the_registry_finds_irsa_s_cosmos_image_service(online):
    service = find_cosmos_image_service(Endpoints())
    assert "irsa" in service.baseurl


def test_the_real_catalogue_has_the_columns_and_units(live_field):
    catalog = read_table(live_field.resolve(live_field.catalog))
    assert list(catalog.colnames) == list(CATALOG_COLUMNS) and len(catalog) > 100  # ~150 per arcmin^2 within 2'
    assert np.all(np.isfinite(catalog["ra"])) and len(np.unique(catalog["id"])) == len(catalog)
    assert np.nanmin(catalog["splash_1_flux"]) > -90  # sentinels became NaN
    assert str(catalog["splash_1_flux"].unit) == "uJy"


def test_the_real_irac_sections_have_pixels_wcs_and_units(live_field):
    for band in ("irac1", "irac2", "irac3", "irac4"):
        image = live_field.images(band)[0]
        for path in (image.image, image.unc):
            with fits.open(path) as hdul:
                data, header = hdul[0].data, hdul[0].header
                wcs = read_wcs(header).celestial
                scale = np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600
                assert abs(scale - 0.6) < 0.01, (band, scale)
                assert 400 < data.shape[0] < 600 and np.isfinite(data).mean() > 0.9, (band, data.shape)
                assert path.stat().st_size < 5e6  # a box, never a 480 MB mosaic
                assert "MJY" in str(header.get("BUNIT", "MJy/sr")).upper()


def test_the_real_galex_tiles_cover_the_field(live_field):
    for band in ("nuv", "fuv"):
        images = live_field.images(band)
        assert images and len({image.tile for image in images}) == len(images)
        with fits.open(images[0].image) as hdul:
            scale = np.sqrt(abs(np.linalg.det(read_wcs(hdul[0].header).celestial.pixel_scale_matrix))) * 3600
            assert abs(scale - 1.5) < 0.01 and np.isfinite(hdul[0].data).mean() > 0.9


def test_the_x_ray_catalogue_is_the_chandra_cosmos_legacy_one(live_field):
    chandra = read_table(live_field.resolve(live_field.chandra))
    assert chandra.meta["XRAYCAT"] == "clscat"
    for name in ("NAME", "RA", "DEC", "ERROR_RADIUS", "FLUX", "SB_FLUX", "HB_FLUX"):
        assert name in chandra.colnames
    assert len(chandra) >= 1 and np.all((chandra["ERROR_RADIUS"] > 0) & (chandra["ERROR_RADIUS"] < 20))


def test_the_published_prfs_were_used(live_field):
    for band, entry in live_field.bands.items():
        assert entry["prf_source"].startswith("published PRF"), (band, entry["prf_source"])


def test_mast_s_cloud_copy_gives_the_same_galex_pixels_as_http(live_field, tmp_path):
    pytest.importorskip("s3fs", reason="the cloud copies need the 'cloud' extra (s3fs)")
    try:
        socket.create_connection(("stpubdata.s3.amazonaws.com", 443), timeout=5).close()
    except OSError as error:
        pytest.skip(f"cannot connect to MAST's bucket stpubdata.s3.amazonaws.com:443 ({error})")
    params = RunParameters(ra=RA, dec=DEC, radius_arcmin=RADIUS_ARCMIN, bands="nuv", data_source="archive",
                           data_dir=str(tmp_path / "data"))
    cloud = retrieve_archive(params, progress=False, endpoints=Endpoints(timeout_s=120.0, cloud="cloud"))
    assert [image.tile for image in cloud.images("nuv")] == [image.tile for image in live_field.images("nuv")]
    for from_cloud, over_http in zip(cloud.images("nuv"), live_field.images("nuv")):
        header = fits.getheader(from_cloud.image)
        assert header["MBACCESS"] == "cloud" and "s3://stpubdata/galex/" in str(header["HISTORY"])
        assert np.array_equal(fits.getdata(from_cloud.image), fits.getdata(over_http.image), equal_nan=True)
