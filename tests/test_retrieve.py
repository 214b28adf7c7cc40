"""Retrieving a field: manifest, tile choice, reuse, and nothing half-written on failure."""

import numpy as np
import pandas as pd
import pytest

from mbphot import sample
from mbphot.manifest import Manifest
from mbphot.params import RunParameters
from mbphot.retrieve import _has_data, footprint_area_deg2, load_catalog, load_chandra, retrieve
from mbphot.crossmatch import sky_area_deg2


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    return RunParameters(ra=150.2, dec=2.4, radius_arcmin=1.0, seed=11, realism="ideal",
                         data_dir=str(tmp_path_factory.mktemp("d")))


@pytest.fixture(scope="module")
def manifest(params):
    return retrieve(params)


def test_manifest_round_trips_and_points_at_real_files(manifest, params):
    loaded = Manifest.load(params.manifest_path)
    assert loaded.field["radius_arcmin"] == 1.0
    for band in loaded.bands:
        assert loaded.prf_path(band).is_file()
        for entry in loaded.images(band):
            assert entry.image.is_file()
    assert loaded.resolve(loaded.catalog).is_file()


def test_each_galex_source_is_measured_on_the_tile_nearer_its_pointing(manifest):
    catalog = load_catalog(manifest)
    choice = pd.read_parquet(manifest.resolve(manifest.tile_choice)).set_index("id").loc[catalog["id"]]
    west = catalog["ra"].to_numpy() < manifest.field["ra"] - 0.005
    east = catalog["ra"].to_numpy() > manifest.field["ra"] + 0.005
    assert (choice["nuv"].to_numpy()[west] == "COSMOS_SIM_01").all()
    assert (choice["nuv"].to_numpy()[east] == "COSMOS_SIM_02").all()
    assert (choice["irac1"] == "COSMOS_SIM").all()


def test_rerun_reuses_the_field(manifest, params):
    image = manifest.images("irac1")[0].image
    stamp = image.stat().st_mtime_ns
    retrieve(params)
    assert image.stat().st_mtime_ns == stamp


def test_chandra_sources_are_cut_to_the_field_and_footprint_is_the_circle(manifest):
    chandra = load_chandra(manifest)
    separation_arcmin = 60 * np.hypot((chandra["RA"] - 150.2) * np.cos(np.radians(2.4)), chandra["DEC"] - 2.4)
    assert np.all(separation_arcmin <= 1.0)
    assert footprint_area_deg2(manifest) == pytest.approx(sky_area_deg2(1.0), rel=0.01)


def test_a_failed_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sample, "_make_galex", broken)
    params = RunParameters(radius_arcmin=0.5, realism="ideal", data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="disk full"):
        retrieve(params)
    assert not params.field_dir.exists()
    assert list(params.field_dir.parent.iterdir()) == []


def test_missing_manifest_says_which_step_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the retrieve step"):
        Manifest.load(tmp_path / "manifest.json")


def test_a_tile_without_data_under_the_source_is_not_chosen(tmp_path):
    """GALEX tiles are zero outside the detector: the nearer pointing loses if it has no data."""
    from astropy.io import fits
    from astropy.wcs import WCS

    from mbphot.retrieve import choose_tiles

    def tile(name, pointing_ra, data_value):
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        wcs.wcs.cdelt = [-1.5 / 3600, 1.5 / 3600]
        wcs.wcs.crval = [150.0, 2.2]
        wcs.wcs.crpix = [51, 51]
        header = wcs.to_header()
        header["RA_CENT"], header["DEC_CENT"] = pointing_ra, 2.2
        path = tmp_path / f"{name}-nd-int.fits"
        fits.PrimaryHDU(np.full((101, 101), data_value, dtype=np.float32), header).writeto(path)
        return path

    near_but_empty = tile("A", 150.01, 0.0)
    far_with_data = tile("B", 150.4, 1e-3)
    choice = choose_tiles(np.array([150.0]), np.array([2.2]), [near_but_empty, far_with_data], "nuv")
    assert choice.tolist() == [1]


def test_single_zero_count_pixels_are_data_but_zero_regions_are_not():
    rng = np.random.default_rng(5)
    image = rng.poisson(0.9, (40, 40)).astype(float)  # an FUV tile at MIS depth: ~40 % zeros
    image[:, 30:] = 0.0  # outside the field of view
    col = np.array([5.0, 12.0, 20.0, 35.0, 45.0])
    row = np.array([5.0, 12.0, 20.0, 20.0, 20.0])
    assert (image[5:25, 5:25] == 0).any()
    np.testing.assert_array_equal(_has_data(image, col, row), [True, True, True, False, False])
    zero_pixels = np.argwhere(image[:, :28] == 0)
    assert _has_data(image, zero_pixels[:, 1].astype(float), zero_pixels[:, 0].astype(float)).all()


def test_a_radius_too_small_to_hold_a_source_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"radius_arcmin=0.001 holds about 0.0005 COSMOS2015 sources on average .*"
                                         r"radius_arcmin must be at least 0.05 arcmin"):
        RunParameters(radius_arcmin=0.001, realism="ideal", data_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_a_field_without_sources_is_an_error_not_an_empty_catalogue(tmp_path):
    params = RunParameters(radius_arcmin=0.5, realism="ideal", data_dir=str(tmp_path))
    # Past the parameters' density check (a field that holds sources on average), an unlucky
    # field can still be empty: retrieve says so.
    params.radius_arcmin = 0.001
    with pytest.raises(ValueError, match=r"no catalogue source lies within radius_arcmin=0.001 of ra=150.01, dec=2.2 "
                                         r"\(\d+ sources around it\); choose a larger radius_arcmin"):
        retrieve(params)
    assert not params.manifest_path.exists()


def test_a_staging_folder_left_by_a_killed_generation_is_removed(tmp_path):
    params = RunParameters(radius_arcmin=0.5, realism="ideal", data_dir=str(tmp_path))
    stale = params.field_dir.parent / f".{params.field_dir.name}.k1ll3d_x"
    (stale / "irac").mkdir(parents=True)
    (stale / "irac" / "half.fits").write_bytes(b"\0" * 2880)
    other = params.field_dir.parent / f".{params.field_dir.name}_other.k1ll3d_x"  # another field's
    other.mkdir()
    retrieve(params)
    assert not stale.exists() and other.exists()
    assert sorted(path.name for path in params.field_dir.parent.iterdir()) == sorted([params.field_dir.name, other.name])
