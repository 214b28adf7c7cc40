"""Archive retrieval against local archives: the real pyvo and astroquery clients, pointed at
servers on 127.0.0.1 through the endpoint configuration (nothing in them is patched).

The servers serve the simulated field of `mbphot.sample`, so an archive run must reproduce the
sample run's files exactly; faults are injected on the servers.
"""

import json
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml
from astropy.io import fits
from pyvo.registry import get_RegTAP_service_url

from archive_servers import TAP_ERROR_MESSAGE, ArchiveServer
from mbphot.archive import (
    ENDPOINTS_ENV,
    ArchiveEmptyError,
    ArchiveError,
    ArchiveUnreachableError,
    load_endpoints,
    retrieve_archive,
)
from mbphot.archive.cutout import cut_to_box
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


def test_archive_run_reproduces_the_sample_field(server, sample_dir, tmp_path, monkeypatch):
    endpoints_file = tmp_path / "endpoints.yaml"
    endpoints_file.write_text(yaml.safe_dump(server.endpoints()))
    monkeypatch.setenv(ENDPOINTS_ENV, str(endpoints_file))
    registry_before = get_RegTAP_service_url()
    params = params_for(tmp_path)

    manifest = retrieve_archive(params, progress=False)

    assert get_RegTAP_service_url() == registry_before  # pyvo's registry choice is restored
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
    assert chandra.colnames == expected_chandra.colnames
    assert set(chandra["SOURCE_NUMBER"]) <= set(expected_chandra["SOURCE_NUMBER"]) and len(chandra) >= 3

    for band, entry in manifest.bands.items():
        assert entry["prf_source"].startswith("model PRF")
        assert np.array_equal(fits.getdata(manifest.prf_path(band)), fits.getdata(sample_dir / entry["prf"]))
        tiles = [image.tile for image in manifest.images(band)]
        assert tiles == (["COSMOS"] if band.startswith("irac") else ["COSMOS_SIM_01", "COSMOS_SIM_02"])
        for image in manifest.images(band):
            for path in (image.image, image.unc, image.sky, image.exposure):
                if path is None:
                    continue
                relative = path.relative_to(manifest.directory)
                got, want = fits.open(path), fits.open(sample_dir / relative)
                assert np.array_equal(got[0].data, want[0].data), relative
                pixels = ([0, 17, got[0].data.shape[1] - 1], [0, 40, got[0].data.shape[0] - 1])
                got_world = read_wcs(got[0].header).pixel_to_world(*pixels)
                want_world = read_wcs(want[0].header).pixel_to_world(*pixels)
                assert np.all(got_world.separation(want_world).arcsec < 1e-6), relative
    assert server.hits["irac_download"] == 8 and server.hits["mast_download"] == 12  # no catalogue products, no shallow tile

    write_tile_choice(manifest)  # the steps after retrieval take the archive manifest as they take sample's
    manifest.save()
    assert Manifest.load(params.manifest_path).bands == manifest.bands
    assert leftovers(params.field_dir) == []


def test_http_500_is_retried(server, tmp_path):
    server.inject("irsa_tap", "500")
    server.inject("mast_invoke", "500")
    server.inject("irac_download", "500")
    manifest = retrieve_archive(params_for(tmp_path, bands="irac1,nuv"), progress=False, endpoints=server.endpoints())
    assert server.hits["irsa_tap"] == 2
    assert server.hits["irac_download"] == 3  # sci twice (500, then the file), unc once
    assert manifest.images("irac1")[0].image.is_file()


def test_truncated_downloads_are_retried_and_never_cached(server, sample_dir, tmp_path):
    server.inject("irac_download", "truncate")
    server.inject("mast_download", "cut_fits")
    params = params_for(tmp_path, bands="irac1,nuv")
    manifest = retrieve_archive(params, progress=False, endpoints=server.endpoints())
    assert server.hits["irac_download"] == 3 and server.hits["mast_download"] == 7
    for band in ("irac1", "nuv"):
        for image in manifest.images(band):
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


def test_a_silent_archive_times_out(server, tmp_path):
    server.inject("irsa_tap", "slow", "slow")
    params = params_for(tmp_path, bands="irac1")
    with pytest.raises(ArchiveUnreachableError, match=r"cannot reach IRSA TAP at .*\(no answer within 0.3 s, after 2 attempts"):
        retrieve_archive(params, progress=False, endpoints=server.endpoints(timeout_s=0.3, retries=1))
    assert server.hits["irsa_tap"] == 2


def test_a_field_without_x_ray_sources_is_not_an_error(server, tmp_path):
    server.inject("heasarc_tap", "empty")
    manifest = retrieve_archive(params_for(tmp_path, bands="irac1"), progress=False, endpoints=server.endpoints())
    chandra = read_table(manifest.resolve(manifest.chandra))
    assert len(chandra) == 0 and "ERROR_RADIUS" in chandra.colnames


def test_a_rerun_reuses_the_cache_without_asking_the_archives(server, tmp_path):
    params = params_for(tmp_path, bands="irac1,fuv")
    first = retrieve_archive(params, progress=False, endpoints=server.endpoints())
    stamps = {p: p.stat().st_mtime_ns for p in params.field_dir.rglob("*") if p.is_file()}
    server.reset()
    second = retrieve_archive(params, progress=False, endpoints=server.endpoints())
    assert sum(server.hits.values()) == 0
    assert second.bands == first.bands
    assert {p: p.stat().st_mtime_ns for p in params.field_dir.rglob("*") if p.is_file()} == stamps


def test_a_refused_cutout_falls_back_to_the_whole_file(server, sample_dir, tmp_path):
    server.inject("irac_download", "refuse_cutout")
    manifest = retrieve_archive(params_for(tmp_path, bands="irac2"), progress=False, endpoints=server.endpoints())
    assert server.hits["irac_download"] == 3  # sci: cutout refused, then whole; unc: cutout
    image = manifest.images("irac2")[0]
    assert np.array_equal(fits.getdata(image.image), fits.getdata(sample_dir / "irac/irac_ch2_go2_sci.fits"))


def test_a_configured_prf_file_is_used_and_named(server, sample_dir, tmp_path):
    prf_url = f"{server.url}/prf/PRF_IRAC_ch3.fits"
    manifest = retrieve_archive(params_for(tmp_path, bands="irac3,irac4"), progress=False,
                                endpoints=server.endpoints(prf={"irac3": prf_url}))
    assert manifest.bands["irac3"]["prf_source"] == f"instrument file {prf_url}"
    assert manifest.bands["irac4"]["prf_source"].startswith("model PRF")
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
