"""Archive retrieval against local archives: the real pyvo and astroquery clients, pointed at
servers on 127.0.0.1 through the endpoint configuration (nothing in them is patched).

The servers serve the simulated field of `mbphot.sample` (its IRAC images inside much larger
mosaics), so an archive run must reproduce the sample run's files; faults are injected on the
servers. Each server's structure and its source are described in ``archive_servers.py``.
"""

import json
import logging
import shutil
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import yaml
from astropy.io import fits
from archive_servers import MOSAIC_PIXELS, TAP_ERROR_MESSAGE, UNSAFE_TILE, ArchiveServer
from mbphot.archive import (
    ENDPOINTS_ENV,
    ArchiveEmptyError,
    ArchiveError,
    ArchiveSlowError,
    ArchiveUnreachableError,
    load_endpoints,
    retrieve_archive,
)
from mbphot.archive.cache import UnsafeNameError, safe_name
from mbphot.archive.cutout import cut_to_box
from mbphot.archive.heasarc import XrayCatalogWarning, _outside_ccosmos
from mbphot.archive.irsa import SENTINEL_RULE, clean_sentinels
from mbphot.archive.prf import PUBLISHED_FILES, PUBLISHED_SHA256, PrfFallbackWarning
from mbphot.catalog import read_catalog
from mbphot.io import read_table, read_wcs
from mbphot.manifest import Manifest
from mbphot.params import RunParameters
from mbphot.retrieve import write_tile_choice
from mbphot.sample import SampleSpec, make_sample_field

RA, DEC, RADIUS_ARCMIN = 150.2, 2.4, 1.0


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    """The sample-mode field for the position: what the servers serve and what to compare with."""
    return make_sample_field(SampleSpec(RA, DEC, RADIUS_ARCMIN, seed=11), tmp_path_factory.mktemp("sample") / "field")


@pytest.fixture(scope="module")
def server(sample_dir):
    archive = ArchiveServer(sample_dir).start()
    yield archive
    archive.stop()


@pytest.fixture(autouse=True)
def fresh_server(request):
    if "server" in request.fixturenames:
        request.getfixturevalue("server").reset()


def params_for(tmp_path, bands="all", **kwargs):
    return RunParameters(ra=kwargs.pop("ra", RA), dec=kwargs.pop("dec", DEC), radius_arcmin=RADIUS_ARCMIN,
                         bands=bands, data_source="archive", data_dir=str(tmp_path / "data"), **kwargs)


def leftovers(directory):
    """Temporary (dot-named) files: what an unfinished download would leave behind."""
    return sorted(p.name for p in directory.rglob(".*")) if directory.exists() else []


def assert_section_of(path, sample_path):
    """The section read holds the sample image at an integer offset, and NaN around it."""
    with fits.open(path) as got, fits.open(sample_path) as want:
        x, y = read_wcs(want[0].header).world_to_pixel(read_wcs(got[0].header).pixel_to_world(0, 0))
        col, row = int(round(float(x))), int(round(float(y)))
        assert abs(x - col) < 1e-6 and abs(y - row) < 1e-6
        n_y, n_x = want[0].data.shape
        inside = got[0].data[-row : -row + n_y, -col : -col + n_x]
        assert row <= 0 and col <= 0 and np.array_equal(inside, want[0].data), path.name
        assert np.isnan(got[0].data).sum() == got[0].data.size - want[0].data.size  # only the NaN frame is extra


def test_archive_run_reproduces_the_sample_field(server, sample_dir, tmp_path, monkeypatch):
    endpoints_file = tmp_path / "endpoints.yaml"
    endpoints_file.write_text(yaml.safe_dump(server.endpoints()))
    monkeypatch.setenv(ENDPOINTS_ENV, str(endpoints_file))
    params = params_for(tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the Legacy catalogue and every published PRF: nothing to warn about
        manifest = retrieve_archive(params, progress=False)

    assert manifest.directory == params.field_dir
    assert manifest.field == {"ra": RA, "dec": DEC, "radius_arcmin": RADIUS_ARCMIN, "catalog_radius_arcmin": 2.0,
                              "data_source": "archive"}
    assert manifest.truth is None
    catalog, expected = read_table(manifest.resolve(manifest.catalog)), read_table(sample_dir / "catalog/cosmos2015.fits")
    assert catalog.colnames == expected.colnames and len(catalog) == len(expected) > 100
    for name in expected.colnames:
        assert catalog[name].unit == expected[name].unit, name
        assert catalog[name].dtype == expected[name].dtype, name
        assert np.array_equal(np.ma.getmaskarray(catalog[name]), np.ma.getmaskarray(expected[name])), name
        assert np.array_equal(np.ma.filled(catalog[name], 0), np.ma.filled(expected[name], 0), equal_nan=True), name
    chandra, expected_chandra = read_table(manifest.resolve(manifest.chandra)), read_table(sample_dir / "chandra/ccosmoscat.fits")
    assert chandra.meta["XRAYCAT"] == "clscat"  # the Chandra COSMOS Legacy catalogue, not C-COSMOS
    assert chandra.colnames == [c for c in expected_chandra.colnames if c != "SOURCE_NUMBER"]
    assert set(chandra["NAME"]) <= set(expected_chandra["NAME"]) and len(chandra) >= 3
    for name in ("RA", "DEC", "ERROR_RADIUS", "FLUX", "SB_FLUX", "HB_FLUX"):
        assert chandra[name].unit == expected_chandra[name].unit, name

    for band, entry in manifest.bands.items():
        published = PUBLISHED_FILES[band]
        assert entry["prf_source"] == f"published PRF {server.url}/prf/{'irac' if band.startswith('irac') else 'galex'}/{published} (copy named by prf_base)"
        sample_prf = sample_dir / "prf" / published.replace("_faint", "")
        assert np.array_equal(fits.getdata(manifest.prf_path(band)), fits.getdata(sample_prf))
        tiles = [image.tile for image in manifest.images(band)]
        assert tiles == (["COSMOS"] if band.startswith("irac") else ["COSMOS_SIM_01", "COSMOS_SIM_02"])
        for image in manifest.images(band):
            for path in (image.image, image.unc, image.sky, image.exposure):
                if path is None:
                    continue
                relative = path.relative_to(manifest.directory)
                if band.startswith("irac"):
                    assert_section_of(path, sample_dir / relative)
                    continue
                got, want = fits.open(path), fits.open(sample_dir / relative)
                assert np.array_equal(got[0].data, want[0].data), relative
                pixels = ([0, 17, got[0].data.shape[1] - 1], [0, 40, got[0].data.shape[0] - 1])
                got_world = read_wcs(got[0].header).pixel_to_world(*pixels)
                want_world = read_wcs(want[0].header).pixel_to_world(*pixels)
                assert np.all(got_world.separation(want_world).arcsec < 1e-6), relative
    assert server.hits["mast_download"] == 12  # no catalogue products, no shallow tile

    write_tile_choice(manifest)  # the steps after retrieval take the archive manifest as they take sample's
    manifest.save()
    assert Manifest.load(params.manifest_path).bands == manifest.bands
    assert leftovers(params.field_dir) == []


def test_a_2_arcmin_field_reads_under_5_percent_of_each_mosaic_with_range_requests(server, sample_dir, tmp_path):
    params = params_for(tmp_path, bands="irac1")  # radius 1': a field 2' across
    manifest = retrieve_archive(params, progress=False, endpoints=server.endpoints())
    mosaic_bytes = (server.mosaic_dir / "irac_ch1_go2_sci_10.fits").stat().st_size
    assert mosaic_bytes > MOSAIC_PIXELS**2 * 4  # the whole 40' mosaic was there to be downloaded
    per_mosaic = server.bytes_sent["irac_download"] / 2  # sci and unc
    print(f"\n2' field: {per_mosaic / 1e6:.2f} MB of a {mosaic_bytes / 1e6:.1f} MB mosaic "
          f"({100 * per_mosaic / mosaic_bytes:.2f} %) in {server.hits['irac_download'] / 2:.0f} requests per mosaic")
    assert per_mosaic < 0.05 * mosaic_bytes
    assert_section_of(manifest.images("irac1")[0].image, sample_dir / "irac/irac_ch1_go2_sci.fits")
    assert_section_of(manifest.images("irac1")[0].unc, sample_dir / "irac/irac_ch1_go2_unc.fits")


def closed_port_url():
    """An address on 127.0.0.1 where nothing listens: an unreachable service."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def access_of(path):
    """``MBACCESS`` and the HISTORY lines mbphot wrote into a retrieved file's header."""
    header = fits.getheader(path)
    return header.get("MBACCESS"), " ".join(str(line) for line in header.get("HISTORY", []))


def test_on_the_cloud_a_2_arcmin_field_reads_a_small_fraction_of_each_mosaic_from_s3(server, sample_dir, tmp_path):
    server.cloud_copies = True  # the image service names each mosaic's copy in IRSA's bucket
    params = params_for(tmp_path, bands="irac1")  # radius 1': a field 2' across
    manifest = retrieve_archive(params, progress=False, endpoints=server.endpoints(cloud="cloud"))
    mosaic_bytes = (server.mosaic_dir / "irac_ch1_go2_sci_10.fits").stat().st_size
    per_mosaic = server.bytes_sent["s3"] / 2  # sci and unc
    print(f"\n2' field from S3: {per_mosaic / 1e6:.2f} MB of a {mosaic_bytes / 1e6:.1f} MB mosaic "
          f"({100 * per_mosaic / mosaic_bytes:.2f} %) in {server.hits['s3'] / 2:.0f} requests per mosaic")
    assert 0 < per_mosaic < 0.05 * mosaic_bytes
    assert server.hits["irac_download"] == 0  # nothing over HTTP
    image = manifest.images("irac1")[0]
    assert_section_of(image.image, sample_dir / "irac/irac_ch1_go2_sci.fits")
    assert_section_of(image.unc, sample_dir / "irac/irac_ch1_go2_unc.fits")
    access, history = access_of(image.image)
    assert access == "cloud" and "s3://nasa-irsa-spitzer/" in history and "anonymous S3 range reads" in history


def test_galex_files_come_from_mast_s_cloud_copy(server, sample_dir, tmp_path):
    manifest = retrieve_archive(params_for(tmp_path, bands="nuv"), progress=False,
                                endpoints=server.endpoints(cloud="cloud"))
    assert server.hits["mast_path_lookup"] == 1 and server.hits["mast_download"] == 0
    for image in manifest.images("nuv"):
        want = sample_dir / image.image.relative_to(manifest.directory)
        assert np.array_equal(fits.getdata(image.image), fits.getdata(want))
        access, history = access_of(image.image)
        assert access == "cloud" and f"s3://stpubdata/galex/GR6/pipe/01-vsn/50031-{image.tile}/" in history


def test_an_unreachable_cloud_falls_back_to_http_with_a_log_message(server, sample_dir, tmp_path, caplog):
    server.cloud_copies = True
    params = params_for(tmp_path, bands="irac1,nuv")
    with caplog.at_level(logging.INFO, logger="mbphot.archive"):
        manifest = retrieve_archive(params, progress=False,
                                    endpoints=server.endpoints(cloud="auto", s3_endpoint=closed_port_url(), retries=0))
    fallbacks = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "not from the cloud" in r.getMessage()]
    assert len(fallbacks) == 2 + 6  # the IRAC sci and unc mosaics; int, skybg and rrhr of two NUV tiles
    assert all("over HTTP" in message for message in fallbacks)
    # Each bucket's region (IRSA's us-west-2, MAST's us-east-1) is tried once, not once per file.
    tried = [message.split(":")[0] for message in fallbacks if "(cannot find s3://" in message]
    assert tried == ["the IRAC channel 1 sci mosaic", "COSMOS_SIM_01-nd-int.fits"]
    assert all("EndpointConnectionError" in message for message in fallbacks)
    assert sum("could not be reached" in message for message in fallbacks) == len(fallbacks) - 2
    assert server.hits["irac_download"] > 0 and server.hits["mast_download"] == 6 and server.hits["s3"] == 0
    assert_section_of(manifest.images("irac1")[0].image, sample_dir / "irac/irac_ch1_go2_sci.fits")
    for path in (manifest.images("irac1")[0].image, manifest.images("nuv")[0].image):
        access, history = access_of(path)
        assert access == "http" and server.url in history


def test_a_forced_cloud_that_cannot_be_read_is_a_clear_error_and_http_never_asks_the_cloud(server, tmp_path):
    server.cloud_copies = True
    endpoints = server.endpoints(cloud="cloud", s3_endpoint=closed_port_url(), retries=0)
    with pytest.raises(ArchiveError, match=r"the cloud copy of the IRAC channel 1 sci mosaic cannot be read "
                                           r"\(cannot find s3://nasa-irsa-spitzer/.*\); set cloud: auto"):
        retrieve_archive(params_for(tmp_path, bands="irac1"), progress=False, endpoints=endpoints)
    assert server.hits["irac_download"] == 0
    server.reset()
    server.cloud_copies = True
    retrieve_archive(params_for(tmp_path / "http", bands="irac1,nuv"), progress=False,
                     endpoints=server.endpoints(cloud="http"))
    assert server.hits["s3"] == 0 and server.hits["mast_path_lookup"] == 0 and server.hits["mast_download"] == 6
    with pytest.raises(ValueError, match="cloud must be one of auto, cloud, http, got 'always'"):
        load_endpoints({"cloud": "always"})


def test_an_archive_supplied_name_with_a_path_in_it_is_refused(server, tmp_path):
    server.unsafe_product_name = True  # MAST names the deep tiles' products "../../escaped-nd-int.fits.gz"
    params = params_for(tmp_path, bands="nuv")
    with pytest.raises(UnsafeNameError, match=r"MAST named a GALEX tile \(productFilename\) '\.\./\.\./escaped', "
                                              r"which is not a plain file name"):
        retrieve_archive(params, progress=False, endpoints=server.endpoints())
    assert not list(tmp_path.rglob("escaped*")) and server.hits["mast_download"] == 0
    for name in ("COSMOS_00", "MISDR1_29079_0383_002", "AISCHV2_153_29114_0002_sv11", "PS_COSMOS_MOS00"):
        assert safe_name(name, service="MAST", what="a tile") == name
    for name in (UNSAFE_TILE, "a/b", "a\\b", "..", ".hidden", "", "tile\x00", "a..b", "/etc/passwd"):
        with pytest.raises(UnsafeNameError):
            safe_name(name, service="MAST", what="a tile")


def test_a_server_that_ignores_ranges_stops_the_run_unless_whole_files_are_allowed(server, sample_dir, tmp_path):
    server.inject("irac_download", "no_range")
    params = params_for(tmp_path, bands="irac2")
    with pytest.raises(ArchiveError, match="does not honour HTTP range requests .* set whole_files: true"):
        retrieve_archive(params, progress=False, endpoints=server.endpoints())
    assert server.bytes_sent["irac_download"] < 10 * 2880  # it stopped reading after the header request
    server.reset()
    server.inject("irac_download", "no_range")
    manifest = retrieve_archive(params, progress=False, endpoints=server.endpoints(whole_files=True))
    assert server.bytes_sent["irac_download"] > (server.mosaic_dir / "irac_ch2_go2_sci_10.fits").stat().st_size
    assert_section_of(manifest.images("irac2")[0].image, sample_dir / "irac/irac_ch2_go2_sci.fits")


def test_http_500_is_retried(server, tmp_path):
    server.inject("irsa_tap", "500")
    server.inject("mast_invoke", "500")
    server.inject("irac_download", "500")
    manifest = retrieve_archive(params_for(tmp_path, bands="irac1,nuv"), progress=False, endpoints=server.endpoints())
    assert server.hits["irsa_tap"] == 2
    assert server.hits["mast_invoke"] >= 3
    assert manifest.images("irac1")[0].image.is_file()


def test_retry_after_is_honoured(server, tmp_path):
    server.inject("irsa_tap", "503_retry")
    retrieve_archive(params_for(tmp_path, bands="nuv"), progress=False, endpoints=server.endpoints(backoff_s=0.01))
    first, second = server.request_times["irsa_tap"]
    assert second - first >= 1.0  # Retry-After: 1, not the 0.01 s backoff


def test_truncated_downloads_are_retried_and_never_cached(server, sample_dir, tmp_path):
    server.inject("irac_download", "truncate", "truncate")
    server.inject("mast_download", "cut_fits")
    params = params_for(tmp_path, bands="irac1,nuv")
    manifest = retrieve_archive(params, progress=False, endpoints=server.endpoints())
    assert server.hits["mast_download"] == 7
    assert_section_of(manifest.images("irac1")[0].image, sample_dir / "irac/irac_ch1_go2_sci.fits")
    for image in manifest.images("nuv"):
        expected = sample_dir / image.image.relative_to(manifest.directory)
        assert np.array_equal(fits.getdata(image.image), fits.getdata(expected))
    assert leftovers(params.field_dir) == []


def test_a_download_truncated_every_time_fails_and_leaves_nothing(server, tmp_path):
    server.inject("irac_download", "truncate", "truncate", "truncate")  # retries=2: three attempts
    params = params_for(tmp_path, bands="irac1")
    with pytest.raises(ArchiveError, match="incomplete file .* after 3 attempts"):
        retrieve_archive(params, progress=False, endpoints=server.endpoints())
    assert not (params.field_dir / "irac").exists() or list((params.field_dir / "irac").iterdir()) == []
    assert leftovers(params.field_dir) == []


def test_empty_results_are_clear_errors(server, tmp_path):
    server.inject("irsa_tap", "empty")
    params = params_for(tmp_path, bands="nuv")
    with pytest.raises(ArchiveEmptyError, match=r"no COSMOS2015 source within 2 arcmin of RA 150.2, Dec 2.4"):
        retrieve_archive(params, progress=False, endpoints=server.endpoints())
    assert not (params.field_dir / "catalog").exists()

    server.inject("mast_invoke", "empty")
    with pytest.raises(ArchiveEmptyError, match=r"no deep GALEX NUV image .* leave nuv out of bands"):
        retrieve_archive(params, progress=False, endpoints=server.endpoints())


def test_a_position_outside_the_survey_says_so(server, tmp_path):
    params = params_for(tmp_path, bands="irac1", ra=150.6, dec=2.7)  # inside COSMOS's box, not the served field
    with pytest.raises(ArchiveEmptyError, match="outside the catalogue's coverage; choose a position inside COSMOS"):
        retrieve_archive(params, progress=False, endpoints=server.endpoints())


def test_the_archives_error_message_is_passed_on_verbatim(server, tmp_path):
    server.inject("irsa_tap", "tap_error")
    with pytest.raises(ArchiveError) as raised:
        retrieve_archive(params_for(tmp_path, bands="irac1"), progress=False, endpoints=server.endpoints())
    assert TAP_ERROR_MESSAGE in str(raised.value)
    assert server.hits["irsa_tap"] == 1  # an error the archive reports is not retried


def test_an_unreachable_archive_is_a_clear_error_with_nothing_written(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    params = params_for(tmp_path, bands="irac1")
    endpoints = {"irsa_tap": f"{url}/TAP", "registry": f"{url}/reg", "mast": url, "heasarc": url, "retries": 1, "backoff_s": 0.01}
    expected = f"cannot reach IRSA TAP at {url}/TAP; use data_source='sample' to run offline"
    with pytest.raises(ArchiveUnreachableError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        retrieve_archive(params, progress=False, endpoints=endpoints)
    assert not params.field_dir.exists() or list(params.field_dir.rglob("*")) == []


def test_a_slow_archive_is_told_apart_from_an_unreachable_one(server, tmp_path):
    server.inject("irsa_tap", "slow", "slow")
    params = params_for(tmp_path, bands="irac1")
    with pytest.raises(ArchiveSlowError, match=r"IRSA TAP .* is slow: it accepted the connection but sent nothing for 0.3 s "
                                               r"\(after 2 attempts\)") as raised:
        retrieve_archive(params, progress=False, endpoints=server.endpoints(timeout_s=0.3, retries=1))
    assert not isinstance(raised.value, ArchiveUnreachableError) and "cannot reach" not in str(raised.value)
    assert server.hits["irsa_tap"] == 2


def test_the_legacy_catalogue_falls_back_to_c_cosmos_with_a_warning(server, tmp_path):
    server.inject("heasarc_tap", "no_table")
    with pytest.warns(XrayCatalogWarning, match=r"Legacy catalogue \(clscat.*could not be used.*using C-COSMOS"):
        manifest = retrieve_archive(params_for(tmp_path, bands="irac1"), progress=False, endpoints=server.endpoints())
    chandra = read_table(manifest.resolve(manifest.chandra))
    assert chandra.meta["XRAYCAT"] == "ccosmoscat" and "SOURCE_NUMBER" in chandra.colnames and len(chandra) >= 3
    assert server.hits["heasarc_tap"] == 2  # the error the archive reports is not retried; one query per table
    assert _outside_ccosmos(149.6, 2.7, 2.0) and not _outside_ccosmos(150.12, 2.21, 10.0)


def test_a_field_without_x_ray_sources_is_written_but_warned_about(server, tmp_path):
    server.inject("heasarc_tap", "empty")
    with pytest.warns(XrayCatalogWarning, match="no X-ray source within 2 arcmin .* no Chandra counterparts"):
        manifest = retrieve_archive(params_for(tmp_path, bands="irac1"), progress=False, endpoints=server.endpoints())
    chandra = read_table(manifest.resolve(manifest.chandra))
    assert len(chandra) == 0 and "ERROR_RADIUS" in chandra.colnames


def test_two_galex_observations_sharing_a_target_name_are_both_used(server, sample_dir, tmp_path):
    server.shared_target_name = True  # both deep observations are "COSMOS" in MAST's target_name
    manifest = retrieve_archive(params_for(tmp_path, bands="nuv"), progress=False, endpoints=server.endpoints())
    assert [image.tile for image in manifest.images("nuv")] == ["COSMOS_SIM_01", "COSMOS_SIM_02"]
    for image in manifest.images("nuv"):
        assert np.array_equal(fits.getdata(image.image), fits.getdata(sample_dir / image.image.relative_to(manifest.directory)))


def test_a_wide_cone_goes_through_an_asynchronous_tap_job(server, sample_dir, tmp_path):
    manifest = retrieve_archive(params_for(tmp_path, bands="nuv"), progress=False,
                                endpoints=server.endpoints(async_radius_arcmin=1.5))  # the 2' catalogue cone is "wide"
    assert server.hits["irsa_tap"] == 0 and server.hits["irsa_tap_async"] >= 4  # create, run, poll, result, delete
    assert server.jobs == {}  # the job was deleted
    catalog, expected = read_table(manifest.resolve(manifest.catalog)), read_table(sample_dir / "catalog/cosmos2015.fits")
    assert np.array_equal(catalog["id"], expected["id"])


def test_cosmos2015_sentinels_become_missing_values():
    from astropy.table import Table

    table = Table({
        "splash_1_flux": [12.5, -99.0, -3.2, -99.9], "splash_1_flux_err": [0.5, -99.0, -9.0, 1.0],
        "mag_galex_nuv": [24.1, -99.0, -9.0, 25.0], "photoz": [0.8, -99.0, 1.2, -999.0],
        "type": np.array([0, -9, 2, 1], dtype=np.int32), "id_chandra09": np.array([5, -99, 7, -1], dtype=np.int64),
    })
    replaced = clean_sentinels(table)
    assert np.array_equal(table["splash_1_flux"], [12.5, np.nan, -3.2, np.nan], equal_nan=True)  # a negative flux stays
    assert np.array_equal(table["splash_1_flux_err"], [0.5, np.nan, np.nan, 1.0], equal_nan=True)
    assert np.array_equal(table["mag_galex_nuv"], [24.1, np.nan, np.nan, 25.0], equal_nan=True)
    assert np.array_equal(table["photoz"], [0.8, np.nan, 1.2, np.nan], equal_nan=True)
    assert list(np.ma.getmaskarray(table["type"])) == [False, True, False, False]
    assert list(np.ma.getmaskarray(table["id_chandra09"])) == [False, True, False, True]
    assert replaced == {"splash_1_flux": 2, "splash_1_flux_err": 2, "mag_galex_nuv": 2, "photoz": 2, "type": 1,
                        "id_chandra09": 2}
    assert "-99" in SENTINEL_RULE and "-9" in SENTINEL_RULE


def test_an_unreachable_prf_falls_back_to_the_model_loudly(server, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoints = server.endpoints(prf_base={"irac": f"http://127.0.0.1:{port}/prf", "galex": f"{server.url}/prf/galex"})
    with pytest.warns(PrfFallbackWarning, match=r"band irac3: no published PRF .* MODEL PRF"):
        manifest = retrieve_archive(params_for(tmp_path, bands="irac3,fuv"), progress=False, endpoints=endpoints)
    assert manifest.bands["irac3"]["prf_source"].startswith("MODEL PRF of mbphot.sample (no published PRF could be had from")
    assert manifest.bands["fuv"]["prf_source"].startswith("published PRF")
    assert fits.getheader(manifest.prf_path("irac3"))["OVERSAMP"] == 5


def test_the_pinned_prf_digests_are_those_of_the_project_s_real_files(real_data_dir):
    import hashlib

    for name, digest in PUBLISHED_SHA256.items():
        folder = "irac" if name.startswith("PRF_IRAC") else "galex"
        assert hashlib.sha256((real_data_dir / folder / name).read_bytes()).hexdigest() == digest, name


def test_sample_mode_and_help_do_not_import_the_archive_stack(tmp_path):
    probe = (
        "import sys, contextlib, io\n"
        "import mbphot.cli, mbphot.retrieve\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        mbphot.cli.main(['--help'])\n    except SystemExit:\n        pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'pyvo', 'astroquery', 's3fs', 'botocore'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_a_rerun_reuses_the_cache_without_asking_the_archives(server, tmp_path):
    params = params_for(tmp_path, bands="irac1,fuv")
    first = retrieve_archive(params, progress=False, endpoints=server.endpoints())
    stamps = {p: p.stat().st_mtime_ns for p in params.field_dir.rglob("*") if p.is_file()}
    server.reset()
    second = retrieve_archive(params, progress=False, endpoints=server.endpoints())
    assert sum(server.hits.values()) == 0
    assert second.bands == first.bands
    assert {p: p.stat().st_mtime_ns for p in params.field_dir.rglob("*") if p.is_file()} == stamps


def test_a_configured_prf_file_is_used_and_named(server, sample_dir, tmp_path):
    prf_url = f"{server.url}/prf/irac/PRF_IRAC_ch3.fits"
    manifest = retrieve_archive(params_for(tmp_path, bands="irac3,irac4"), progress=False,
                                endpoints=server.endpoints(prf={"irac3": prf_url}))
    assert manifest.bands["irac3"]["prf_source"] == f"PRF file {prf_url}"
    assert manifest.bands["irac4"]["prf_source"].startswith("published PRF")
    assert np.array_equal(fits.getdata(manifest.prf_path("irac3")), fits.getdata(sample_dir / "prf/PRF_IRAC_ch3.fits"))


def test_a_whole_image_is_cut_to_the_field_box(sample_dir, tmp_path):
    whole = sample_dir / "galex/COSMOS_SIM_01-nd-int.fits"
    path = tmp_path / "tile.fits"
    shutil.copy(whole, path)
    cut_to_box(path, RA + 0.01, DEC - 0.005, 2.0, "GALEX tile COSMOS_SIM_01")
    with fits.open(path) as cut, fits.open(whole) as original:
        assert cut[0].data.shape == (80, 80)  # 2 arcmin at 1.5 arcsec per pixel
        assert cut[0].header["TILENAME"] == "COSMOS_SIM_01" and cut[0].header["RA_CENT"] == original[0].header["RA_CENT"]
        x, y = read_wcs(original[0].header).world_to_pixel(read_wcs(cut[0].header).pixel_to_world(0, 0))
        col, row = int(round(float(x))), int(round(float(y)))
        assert abs(x - col) < 1e-6 and abs(y - row) < 1e-6
        assert np.array_equal(cut[0].data, original[0].data[row : row + 80, col : col + 80])
    for image in (path, shutil.copy(whole, tmp_path / "whole.fits")):  # a box-sized image, a larger one
        with pytest.raises(ArchiveEmptyError, match="GALEX tile COSMOS_SIM_01 does not cover RA 151.0"):
            cut_to_box(image, 151.0, DEC, 2.0, "GALEX tile COSMOS_SIM_01")


def test_endpoint_configuration_file_and_argument(tmp_path, monkeypatch):
    assert load_endpoints().irsa_tap == "https://irsa.ipac.caltech.edu/TAP"
    settings = tmp_path / "mirror.json"
    settings.write_text(json.dumps({"irsa_tap": "https://mirror.example.org/TAP/", "retries": 5}))
    monkeypatch.setenv(ENDPOINTS_ENV, str(settings))
    endpoints = load_endpoints({"retries": 1})
    assert endpoints.irsa_tap == "https://mirror.example.org/TAP"  # the file's, trailing slash dropped
    assert (endpoints.retries, endpoints.mast) == (1, "https://mast.stsci.edu")  # the argument's; a default
    settings.write_text(json.dumps({"irsa_tpa": "https://x"}))
    with pytest.raises(ValueError, match="unknown endpoint setting.*irsa_tpa.*allowed: irsa_tap"):
        load_endpoints()
    monkeypatch.setenv(ENDPOINTS_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError, match=f"unset {ENDPOINTS_ENV}"):
        load_endpoints()


@pytest.mark.slow
def test_mbphot_run_in_archive_mode_with_an_endpoint_override(server, sample_dir, tmp_path):
    endpoints_file = tmp_path / "endpoints.yaml"
    endpoints_file.write_text(yaml.safe_dump(server.endpoints()))
    result = subprocess.run(
        [sys.executable, "-m", "mbphot", "run", "--no-progress", "--data-source", "archive", "--endpoints",
         str(endpoints_file), "--ra", str(RA), "--dec", str(DEC), "--radius", str(RADIUS_ARCMIN),
         "--bands", "irac1,irac2,nuv", "--data-dir", "data", "--output-dir", "output"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert server.hits["irsa_tap"] >= 1 and server.hits["irac_download"] >= 1
    catalog = read_catalog(tmp_path / "output" / "catalog" / "multiband_catalog.parquet")
    truth = read_table(sample_dir / "catalog" / "truth.fits").to_pandas()
    table = catalog.merge(truth, on="id")
    assert len(table) == len(catalog) > 100
    for band in ("irac1", "nuv"):
        bright = (table[f"{band}_flag"] == 0) & (table[f"{band}_flux_ujy"] > 10 * table[f"{band}_flux_err_ujy"])
        ratio = np.median(table.loc[bright, f"{band}_flux_ujy"] / table.loc[bright, f"true_{band}_flux_ujy"])
        assert bright.sum() > 10 and abs(ratio - 1) < 0.02, (band, ratio)
