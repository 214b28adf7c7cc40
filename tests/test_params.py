"""Every run parameter is checked on construction, with a message naming the parameter, the
value and what is allowed."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from mbphot.bands import BAND_NAMES, BANDS
from mbphot.cli import DEFAULT_NOTEBOOK_DIR as NOTEBOOK_DIR
from mbphot.params import FULL_FIELD_RADIUS_ARCMIN, PARAMETER_NAMES, ParameterError, RunParameters

IMAGE_ARCSEC = 120.6  # 2.01' square: the field circle fits inside for radius_arcmin < 1.0


def write_image(path, ra_deg, dec_deg, pixel_arcsec):
    """A blank image at the band's pixel scale, about `IMAGE_ARCSEC` on a side."""
    pixels = int(round(IMAGE_ARCSEC / pixel_arcsec)) | 1
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cdelt = [-pixel_arcsec / 3600, pixel_arcsec / 3600]
    wcs.wcs.crval = [ra_deg, dec_deg]
    wcs.wcs.crpix = [(pixels + 1) / 2, (pixels + 1) / 2]
    fits.PrimaryHDU(np.ones((pixels, pixels), np.float32), wcs.to_header()).writeto(path)


@pytest.fixture
def files_manifest(tmp_path):
    """A files manifest of two bands whose images are centred on (200.0, -30.0), far from COSMOS.

    RunParameters reads only headers and the field's pixels, so the images are flat and the
    tables minimal.
    """
    for band in ("irac1", "nuv"):
        write_image(tmp_path / f"{band}.fits", 200.0, -30.0, BANDS[band].pixel_scale_arcsec)
    fits.PrimaryHDU(np.ones((5, 5), np.float32)).writeto(tmp_path / "prf.fits")
    Table({"ra": [200.0], "dec": [-30.0], "id": [1]}).write(tmp_path / "catalog.fits")
    Table({"RA": [200.0], "DEC": [-30.0]}).write(tmp_path / "chandra.fits")
    path = tmp_path / "files.yaml"
    path.write_text(yaml.safe_dump({
        "catalog": "catalog.fits",
        "chandra": "chandra.fits",
        "bands": {band: {"prf": "prf.fits", "images": [f"{band}.fits"]} for band in ("irac1", "nuv")},
    }))
    return path


def files_params(files_manifest, **values):
    return RunParameters(**{"ra": 200.0, "dec": -30.0, "radius_arcmin": 0.5, "data_source": "files",
                            "files_manifest": str(files_manifest), **values})


def assert_names(error, parameter, value_text, allowed_text):
    message = str(error.value)
    assert error.value.parameter == parameter
    assert parameter in message and value_text in message and allowed_text in message, message


@pytest.mark.parametrize(
    "values, parameter, value_text, allowed_text",
    [
        ({"radius_arcmin": 0}, "radius_arcmin", "got 0", "must be positive (> 0 arcmin)"),
        ({"radius_arcmin": -1}, "radius_arcmin", "got -1", "must be positive (> 0 arcmin)"),
        ({"radius_arcmin": "-2.5"}, "radius_arcmin", "got -2.5", "must be positive (> 0 arcmin)"),
        ({"radius_arcmin": "wide"}, "radius_arcmin", "'wide' (str)", "must be a number (arcmin)"),
        ({"radius_arcmin": None}, "radius_arcmin", "None (NoneType)", "must be a number (arcmin)"),
        ({"radius_arcmin": True}, "radius_arcmin", "True (bool)", "must be a number (arcmin)"),
        ({"radius_arcmin": [3.0]}, "radius_arcmin", "[3.0] (list)", "must be a number (arcmin)"),
        ({"radius_arcmin": float("nan")}, "radius_arcmin", "nan", "must be a finite number"),
        ({"radius_arcmin": 60}, "radius_arcmin", "radius_arcmin=60", "must be at most 48 arcmin"),
        ({"radius_arcmin": 60, "data_source": "archive"}, "radius_arcmin", "radius_arcmin=60", "beyond the COSMOS field"),
        ({"ra": 10}, "ra", "ra=10", "ra within 149.33..150.89"),
        ({"ra": 150.0, "dec": -5}, "dec", "dec=-5", "dec within 1.43..2.98 deg"),
        ({"ra": "east"}, "ra", "'east' (str)", "must be a number (deg)"),
        ({"dec": None}, "dec", "None (NoneType)", "must be a number (deg)"),
        ({"dec": float("inf")}, "dec", "inf", "must be a finite number"),
        ({"bands": "irac1,jband"}, "bands", "unknown band 'jband'", "'all' or band names from irac1"),
        ({"bands": ["irac1", "jband"]}, "bands", "unknown band 'jband'", "as a list or a comma-separated string"),
        ({"bands": [1]}, "bands", "unknown band 1", "band names from irac1, irac2"),
        ({"bands": None}, "bands", "got None (NoneType)", "'all' or band names"),
        ({"bands": 3}, "bands", "got 3 (int)", "'all' or band names"),
        ({"bands": ""}, "bands", "got '' (no band)", "'all' or band names"),
        ({"bands": []}, "bands", "got [] (no band)", "'all' or band names"),
        ({"data_source": "vizier"}, "data_source", "'vizier'", "choose from sample, archive, files"),
        ({"data_source": None}, "data_source", "None", "choose from sample, archive, files"),
        ({"engine": "photutils"}, "engine", "'photutils'", "choose from mbphot, tractor"),
        ({"mode": "blended"}, "mode", "'blended'", "choose from source, scene"),
        ({"seed": -1}, "seed", "got -1", "must be a whole number >= 0"),
        ({"seed": "abc"}, "seed", "got 'abc'", "must be a whole number >= 0"),
        ({"seed": 1.5}, "seed", "got 1.5", "must be a whole number >= 0"),
        ({"seed": None}, "seed", "got None", "must be a whole number >= 0"),
        ({"realism": "noisy"}, "realism", "'noisy'", "choose from ideal, realistic"),
        ({"realism": None}, "realism", "None", "choose from ideal, realistic"),
        ({"n_workers": -2}, "n_workers", "got -2", "must be a whole number >= 0 (0 = one per CPU the run may use)"),
        ({"n_workers": "two"}, "n_workers", "got 'two'", "must be a whole number >= 0"),
        ({"data_dir": ""}, "data_dir", "got ''", "must be a folder or file path"),
        ({"output_dir": None}, "output_dir", "got None", "must be a folder or file path"),
    ],
)
def test_bad_parameter_is_named_with_its_value_and_what_is_allowed(values, parameter, value_text, allowed_text):
    with pytest.raises(ParameterError) as error:
        RunParameters(**values)
    assert_names(error, parameter, value_text, allowed_text)


def test_parameter_errors_are_value_and_type_errors():
    with pytest.raises(ValueError):
        RunParameters(radius_arcmin=-1)
    with pytest.raises(TypeError):
        RunParameters(radius_arcmin="wide")


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"radius_arcmin": "3"}, {"radius_arcmin": 3.0}),
        ({"ra": "150.1", "dec": np.float32(2.25)}, {"ra": 150.1, "dec": pytest.approx(2.25)}),
        ({"seed": "7"}, {"seed": 7}),
        ({"seed": 7.0}, {"seed": 7}),
        ({"seed": np.int64(3)}, {"seed": 3}),
        ({"n_workers": "2"}, {"n_workers": 2}),
        ({"n_workers": None}, {"n_workers": 0}),
        ({"bands": "all"}, {"bands": list(BAND_NAMES)}),
        ({"bands": " nuv, IRAC1 "}, {"bands": ["irac1", "nuv"]}),
        ({"bands": ["nuv", "irac1", "nuv"]}, {"bands": ["irac1", "nuv"]}),
        ({"bands": ("NUV", "irac1")}, {"bands": ["irac1", "nuv"]}),
    ],
)
def test_papermill_and_shell_spellings_are_accepted(values, expected):
    params = RunParameters(**values)
    for name, value in expected.items():
        assert getattr(params, name) == value
        assert type(getattr(params, name)) is type(RunParameters().__getattribute__(name))


def test_the_full_cosmos_field_is_the_largest_radius():
    assert RunParameters(radius_arcmin=FULL_FIELD_RADIUS_ARCMIN).radius_arcmin == 48.0
    with pytest.raises(ParameterError, match="must be at most 48 arcmin"):
        RunParameters(radius_arcmin=48.5)


def test_from_namespace_takes_the_parameters_and_ignores_other_names():
    namespace = {"ra": "150.2", "radius_arcmin": 2, "bands": "nuv", "np": np, "In": [], "_": None}
    params = RunParameters.from_namespace(namespace)
    assert (params.ra, params.radius_arcmin, params.bands, params.seed) == (150.2, 2.0, ["nuv"], 42)
    assert set(params.as_dict()) == set(PARAMETER_NAMES)


def test_run_tag_names_every_parameter_that_changes_the_results():
    tag = RunParameters(ra=150.1, dec=2.3, radius_arcmin=1.5, bands="nuv,irac2", seed=9, mode="source").run_tag
    assert tag == "ra150.1000_dec+2.3000_r1.5_irac2-nuv_sample-s9-realistic_mbphot-source"
    assert RunParameters().run_tag == "ra150.0100_dec+2.2000_r3_all_sample-s42-realistic_mbphot-scene"
    assert RunParameters(n_workers=1).run_tag == RunParameters().run_tag
    assert RunParameters(data_source="archive", seed=1).run_tag == RunParameters(data_source="archive", seed=2).run_tag


def test_nearby_fields_never_share_a_folder_or_a_run():
    near = RunParameters(ra=150.010049, dec=2.20000001, radius_arcmin=3.0000001)
    assert near.field_tag == "ra150.010049_dec+2.20000001_r3.0000001_s42_realistic"
    assert near.field_tag != RunParameters().field_tag and near.run_tag != RunParameters().run_tag
    assert near.run_dir != RunParameters().run_dir


def test_each_run_has_its_own_photometry_table_in_its_run_folder():
    base = RunParameters(bands="irac1,irac2")
    others = [RunParameters(bands="irac2,nuv"), RunParameters(bands="irac1,irac2", mode="source"),
              RunParameters(bands="irac1,irac2", realism="ideal"), RunParameters(bands="irac1,irac2", ra=150.010049)]
    paths = {params.photometry_path for params in (base, *others)}
    assert len(paths) == 5
    assert base.photometry_path == Path("output") / "runs" / base.run_tag / "photometry.parquet"
    assert RunParameters(bands="irac1,irac2", n_workers=1).photometry_path == base.photometry_path


def test_the_notebooks_pass_their_own_run_folder_on():
    """02 writes, 03 reads and writes, 04 reads: all in the run's folder, never the shared field folder."""
    text = {name: (NOTEBOOK_DIR / f"{name}.md").read_text() for name in ("02_photometry", "03_crossmatch", "04_plots")}
    assert "write_table(photometry, params.photometry_path)" in text["02_photometry"]
    assert "pd.read_parquet(params.photometry_path)" in text["03_crossmatch"]
    assert "write_catalog(catalog, params.run_dir)" in text["03_crossmatch"]
    assert 'read_catalog(params.run_dir / "catalog"' in text["04_plots"]
    assert not any("output_dir" in line for body in text.values() for line in body.splitlines()
                   if not line.startswith("output_dir = "))


def test_realism_defaults_to_realistic_and_names_its_own_field_and_run():
    assert RunParameters().realism == "realistic"
    realistic = RunParameters()
    assert realistic.field_tag == "ra150.0100_dec+2.2000_r3_s42_realistic"
    assert realistic.run_tag == "ra150.0100_dec+2.2000_r3_all_sample-s42-realistic_mbphot-scene"
    ideal = RunParameters(realism="ideal")
    assert ideal.field_tag == "ra150.0100_dec+2.2000_r3_s42"  # ideal fields keep their folder
    assert ideal.run_tag == "ra150.0100_dec+2.2000_r3_all_sample-s42_mbphot-scene"
    assert RunParameters(data_source="archive", realism="realistic").run_tag == RunParameters(data_source="archive").run_tag


# ---- data_source="files": the files manifest and the images' footprint --------------------


def test_files_mode_needs_a_files_manifest():
    with pytest.raises(ParameterError) as error:
        RunParameters(data_source="files")
    assert_names(error, "files_manifest", "got None", "must be the path of your YAML files manifest")


def test_files_manifest_must_exist(tmp_path):
    with pytest.raises(ParameterError) as error:
        RunParameters(data_source="files", files_manifest=str(tmp_path / "nowhere.yaml"))
    assert_names(error, "files_manifest", "nowhere.yaml", "must be an existing YAML file")


def test_files_mode_works_outside_cosmos_and_all_means_the_manifests_bands(files_manifest):
    params = files_params(files_manifest)
    assert params.bands == ["irac1", "nuv"]
    assert params.files_manifest == str(files_manifest.resolve())
    assert params.run_tag.startswith("ra200.0000_dec-30.0000_r0.5_irac1-nuv_files-")


def test_files_manifest_is_ignored_by_other_data_sources(files_manifest):
    assert RunParameters(files_manifest=str(files_manifest)).field_tag == RunParameters().field_tag


@pytest.mark.parametrize(
    "values, parameter, value_text, allowed_text",
    [
        ({"radius_arcmin": 2.0}, "radius_arcmin", "radius_arcmin=2", "must be at most about 1.0"),
        ({"ra": 200.5}, "ra", "ra=200.5", "outside the irac1 images"),
        ({"dec": 95}, "dec", "dec=95", "dec within -90..90 deg"),
        ({"bands": "irac1,fuv"}, "bands", "fuv", "bands must be 'all' or among irac1, nuv"),
    ],
)
def test_files_mode_checks_the_field_against_the_images(files_manifest, values, parameter, value_text, allowed_text):
    with pytest.raises(ParameterError) as error:
        files_params(files_manifest, **values)
    assert_names(error, parameter, value_text, allowed_text)
