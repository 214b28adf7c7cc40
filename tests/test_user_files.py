"""data_source="files": a field of your own files, listed in a YAML files manifest."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from astropy.io import fits
from astropy.table import Table

from mbphot.manifest import Manifest
from mbphot.params import RunParameters
from mbphot.retrieve import load_catalog, retrieve, summary
from mbphot.sample import SampleSpec, make_sample_field, sample_files
from mbphot.user_files import FilesManifestError, load_files_manifest

CENTRE = {"ra": 150.02, "dec": 2.21}
RADIUS_ARCMIN = 1.0


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """A simulated field on disk, as a user's own files would be."""
    spec = SampleSpec(ra_deg=CENTRE["ra"], dec_deg=CENTRE["dec"], radius_arcmin=RADIUS_ARCMIN, seed=5)
    return make_sample_field(spec, tmp_path_factory.mktemp("my_field") / "cosmos")


def manifest_content(field):
    """The files manifest of the simulated field, relative paths, optional entries left out."""
    files = sample_files(field)
    return {
        "catalog": files["catalog"],
        "chandra": files["chandra"],
        "bands": {
            name: {
                "prf": entry["prf"],
                "images": [{key: value for key, value in image.items() if value is not None} for image in entry["images"]],
            }
            for name, entry in files["bands"].items()
        },
    }


def write_manifest(field, content, name="files.yaml"):
    path = field / name
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def files_params(manifest_path, data_dir, **values):
    return RunParameters(**CENTRE, radius_arcmin=RADIUS_ARCMIN, data_source="files",
                         files_manifest=str(manifest_path), data_dir=str(data_dir), **values)


def test_retrieve_files_writes_a_manifest_pointing_at_your_files(field, tmp_path):
    params = files_params(write_manifest(field, manifest_content(field)), tmp_path / "data")
    retrieve(params)
    manifest = Manifest.load(params.manifest_path)
    assert manifest.field["data_source"] == "files" and manifest.truth is None
    assert manifest.resolve(manifest.catalog) == (field / "catalog/cosmos2015.fits").resolve()
    assert manifest.images("nuv")[1].sky == (field / "galex/COSMOS_SIM_02-nd-skybg.fits").resolve()
    assert manifest.images("irac1")[0].tile == "COSMOS_SIM"
    # The tile choice is the same as for the sample field: each source on its nearer GALEX pointing.
    catalog = load_catalog(manifest)
    choice = pd.read_parquet(manifest.resolve(manifest.tile_choice)).set_index("id").loc[catalog["id"]]
    west = catalog["ra"].to_numpy() < CENTRE["ra"] - 0.005
    assert (choice["nuv"].to_numpy()[west] == "COSMOS_SIM_01").all()
    assert len(summary(manifest)) == 8  # 4 IRAC mosaics + 2 GALEX tiles in 2 bands


def test_an_image_given_as_a_bare_path_takes_its_file_name_as_tile(field):
    content = manifest_content(field)
    content["bands"] = {"irac2": {"prf": "prf/PRF_IRAC_ch2.fits", "images": ["irac/irac_ch2_go2_sci.fits"]}}
    spec = load_files_manifest(write_manifest(field, content, "bare.yaml"))
    assert spec.bands["irac2"]["images"] == [
        {"image": str((field / "irac/irac_ch2_go2_sci.fits").resolve()), "unc": None, "sky": None,
         "exposure": None, "tile": "irac_ch2_go2_sci"}
    ]


def test_changed_files_get_a_new_field_folder(field, tmp_path):
    manifest_path = write_manifest(field, manifest_content(field), "touched.yaml")
    before = files_params(manifest_path, tmp_path).field_tag
    unc = field / "irac/irac_ch1_go2_unc.fits"
    status = unc.stat()
    os.utime(unc, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    try:
        assert files_params(manifest_path, tmp_path).field_tag != before
    finally:
        os.utime(unc, ns=(status.st_atime_ns, status.st_mtime_ns))


def assert_nothing_written(data_dir):
    """No data: the empty lock files of `mbphot.retrieve` (in ``.locks``) may be there."""
    assert not data_dir.exists() or [path for path in data_dir.rglob("*") if ".locks" not in path.parts] == []


def test_a_missing_file_is_named_with_its_key(field, tmp_path):
    content = manifest_content(field)
    content["bands"]["irac3"]["images"][0]["unc"] = "irac/irac_ch3_unc_typo.fits"
    manifest_path = write_manifest(field, content, "missing.yaml")
    with pytest.raises(FilesManifestError) as error:
        files_params(manifest_path, tmp_path / "data")
    message = str(error.value)
    assert "bands.irac3.images[0].unc" in message
    assert str(field.resolve() / "irac/irac_ch3_unc_typo.fits") in message and "not found" in message
    assert f"relative paths are read from {field.resolve()}" in message
    assert_nothing_written(tmp_path / "data")


def test_a_file_gone_after_the_parameters_were_checked_stops_retrieve_before_any_write(field, tmp_path):
    catalog_copy = tmp_path / "catalog.fits"
    shutil.copyfile(field / "catalog/cosmos2015.fits", catalog_copy)
    content = manifest_content(field)
    content["catalog"] = str(catalog_copy)
    params = files_params(write_manifest(field, content, "vanishing.yaml"), tmp_path / "data")
    catalog_copy.unlink()
    with pytest.raises(FilesManifestError, match="catalog: file .*catalog.fits not found"):
        retrieve(params)
    assert_nothing_written(tmp_path / "data")


def test_an_image_without_wcs_is_refused_with_the_fix(field, tmp_path):
    with fits.open(field / "irac/irac_ch1_go2_sci.fits") as hdul:
        header = hdul[0].header.copy()
        data = hdul[0].data
    for key in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CDELT1", "CDELT2"):
        header.remove(key, ignore_missing=True)
    bare = tmp_path / "no_wcs.fits"
    fits.PrimaryHDU(data, header).writeto(bare)
    content = manifest_content(field)
    content["bands"]["irac1"]["images"][0]["image"] = str(bare)
    manifest_path = write_manifest(field, content, "nowcs.yaml")
    with pytest.raises(FilesManifestError) as error:
        files_params(manifest_path, tmp_path / "data")
    message = str(error.value)
    assert "bands.irac1.images[0].image" in message and str(bare) in message
    assert "has no celestial WCS" in message and "add CTYPE1/CTYPE2" in message
    assert_nothing_written(tmp_path / "data")


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda c: c["bands"].update(ks=c["bands"]["irac1"]), r"bands\.ks: unknown band 'ks'; choose from irac1"),
        (lambda c: c.pop("chandra"), "chandra: missing; the cross-match step needs a Chandra catalogue"),
        (lambda c: c.update(catalogue=c.pop("catalog")), "top level: unknown key 'catalogue'.*did you mean 'catalog'"),
        (lambda c: c["bands"]["irac1"]["images"][0].update(uncertainty="x.fits"), r"bands\.irac1\.images\[0\]: unknown key 'uncertainty'"),
        (lambda c: c["bands"]["irac1"]["images"][0].update(unc="galex/COSMOS_SIM_01-nd-skybg.fits"),
         r"bands\.irac1\.images\[0\]\.unc: .* is 185 x 185 pixels but its image .* is 461 x 461; the map must be on the image's pixel grid"),
        (lambda c: c["bands"]["nuv"]["images"][1].update(tile="COSMOS_SIM_01"), "tile name 'COSMOS_SIM_01' is used twice in band nuv"),
        (lambda c: c["bands"]["irac2"]["images"][0].update(image=c["bands"]["irac1"]["images"][0]["image"]),
         "has the same file name as .*rename one of them"),
        (lambda c: c["bands"]["irac1"].update(prf="irac/irac_ch1_go2_sci.fits", images=[]), r"bands\.irac1\.images: expected a non-empty list"),
    ],
)
def test_manifest_mistakes_are_named_with_the_key_and_the_fix(field, tmp_path, change, expected):
    content = manifest_content(field)
    change(content)
    manifest_path = write_manifest(field, content, "mistake.yaml")
    with pytest.raises(FilesManifestError, match=expected):
        files_params(manifest_path, tmp_path / "data")
    assert_nothing_written(tmp_path / "data")


@pytest.mark.parametrize(
    "columns, expected",
    [
        ({"RA": [150.02], "DEC": [2.21], "id": [1]}, "lacks column\\(s\\) ra, dec.*rename RA, DEC to lower case"),
        ({"ra": [150.02, 150.021], "dec": [2.21, 2.21], "id": [1, 1]}, "column id is not unique"),
        ({"ra": [151.5], "dec": [2.21], "id": [1]}, "no source of .* lies within radius_arcmin=1 of ra=150.02"),
    ],
)
def test_catalogue_problems_are_refused_with_the_parameters(field, tmp_path, columns, expected):
    Table(columns).write(tmp_path / "my_catalog.fits")
    content = manifest_content(field)
    content["catalog"] = str(tmp_path / "my_catalog.fits")
    with pytest.raises(FilesManifestError, match=expected):
        files_params(write_manifest(field, content, "catalog.yaml"), tmp_path / "data")
    assert_nothing_written(tmp_path / "data")


def test_chandra_catalogue_without_its_columns_is_refused(field, tmp_path):
    Table({"RA": [150.02], "DEC": [2.21]}).write(tmp_path / "xray.fits")
    content = manifest_content(field)
    content["chandra"] = str(tmp_path / "xray.fits")
    params = files_params(write_manifest(field, content, "xray.yaml"), tmp_path / "data")
    with pytest.raises(FilesManifestError, match="lacks column\\(s\\) NAME, ERROR_RADIUS, FLUX, SB_FLUX, HB_FLUX"):
        retrieve(params)


@pytest.mark.slow
def test_files_mode_runs_end_to_end_and_measures_the_true_fluxes(field, tmp_path):
    manifest_path = write_manifest(field, manifest_content(field), "e2e.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "mbphot", "run", "--no-progress", "--ra", str(CENTRE["ra"]), "--dec", str(CENTRE["dec"]),
         "--radius", str(RADIUS_ARCMIN), "--bands", "irac1,irac2,nuv", "--data-source", "files",
         "--files-manifest", str(manifest_path), "--data-dir", "data", "--output-dir", "output"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = Table.read(tmp_path / "output/catalog/multiband_catalog.parquet")
    parameters = json.loads(table.meta["PARAMS"])
    assert parameters["data_source"] == "files" and parameters["files_manifest"] == str(manifest_path.resolve())
    assert parameters["bands"] == ["irac1", "irac2", "nuv"]
    truth = Table.read(field / "catalog/truth.fits").to_pandas().set_index("id").loc[np.asarray(table["id"])]
    for band in ("irac1", "irac2", "nuv"):
        flux = np.asarray(table[f"{band}_flux_ujy"])
        error = np.asarray(table[f"{band}_flux_err_ujy"])
        bright = (np.asarray(table[f"{band}_flag"]) == 0) & (flux > 20 * error)
        assert bright.sum() >= 10
        ratio = flux[bright] / truth[f"true_{band}_flux_ujy"].to_numpy()[bright]
        assert np.median(ratio) == pytest.approx(1.0, abs=0.02), band
    assert "irac3_flux_ujy" not in table.colnames
    run_dirs = list((tmp_path / "output/runs").iterdir())
    assert [d.name.split("_files-")[0] for d in run_dirs] == ["ra150.0200_dec+2.2100_r1_irac1-irac2-nuv"]
    assert (run_dirs[0] / "COMPLETE").is_file()
    assert [path for path in (tmp_path / "data").iterdir() if path.name != ".locks"] == [tmp_path / "data/files"]
