"""data_source="files": every file is checked before any work, for wholeness, scale, unit and content."""

import numpy as np
import pytest
from astropy.io import fits

from mbphot.bands import BANDS
from mbphot.user_files import FilesManifestError, unit_factor
from test_user_files import assert_nothing_written, field, files_params, manifest_content, write_manifest  # noqa: F401

IRAC1 = "irac/irac_ch1_go2_sci.fits"


def refused(field, tmp_path, content, name):
    manifest_path = write_manifest(field, content, name)
    with pytest.raises(FilesManifestError) as error:
        files_params(manifest_path, tmp_path / "data")
    assert_nothing_written(tmp_path / "data")
    return str(error.value)


def irac1_copy(field, tmp_path, data=None, **cards):
    """The simulated irac1 image rewritten with changed header cards and/or pixels."""
    with fits.open(field / IRAC1) as hdul:
        header, pixels = hdul[0].header.copy(), hdul[0].data.copy()
    header.update(cards)
    path = tmp_path / "irac1_changed.fits"
    fits.PrimaryHDU(pixels if data is None else data(pixels), header).writeto(path, overwrite=True)
    return path


def with_irac1_image(field, path):
    content = manifest_content(field)
    content["bands"]["irac1"]["images"][0] = {"image": str(path)}
    return content


def test_an_image_at_another_pixel_scale_is_refused_with_the_fix(field, tmp_path):
    with fits.open(field / IRAC1) as hdul:
        wcs_scale = {key: 2 * hdul[0].header[key] for key in ("CDELT1", "CDELT2") if key in hdul[0].header}
    assert wcs_scale, "the simulated image gives its scale in CDELT"
    message = refused(field, tmp_path, with_irac1_image(field, irac1_copy(field, tmp_path, **wcs_scale)), "scale.yaml")
    assert 'bands.irac1.images[0].image' in message and '1.2" x 1.2" pixels' in message
    assert 'irac1 images must have 0.6" pixels' in message and "resample the image" in message


def test_an_image_in_an_unknown_unit_is_refused(field, tmp_path):
    message = refused(field, tmp_path, with_irac1_image(field, irac1_copy(field, tmp_path, BUNIT="DN")), "unit.yaml")
    assert "has BUNIT='DN', which mbphot cannot convert to MJy/sr" in message


def test_an_image_in_microjansky_per_pixel_is_converted_and_measures_the_same(field, tmp_path):
    """The irac1 image and its uncertainty map rewritten in uJy per pixel (x 8.46) give the
    fluxes of the MJy/sr originals; read as MJy/sr they would be 8.46 times too high."""
    from mbphot.photometry import measure_field
    from mbphot.retrieve import retrieve

    per_pixel = BANDS["irac1"].ujy_per_pixel_unit
    content = manifest_content(field)
    entry = content["bands"]["irac1"]["images"][0]
    for key in ("image", "unc"):
        with fits.open(field / entry[key]) as hdul:
            header, pixels = hdul[0].header.copy(), hdul[0].data.astype(np.float64)
        header["BUNIT"] = "uJy"
        path = tmp_path / f"irac1_{key}_ujy.fits"
        fits.PrimaryHDU(pixels * per_pixel, header).writeto(path)
        entry[key] = str(path)
    fluxes = {}
    for name, manifest in (("MJy/sr", manifest_content(field)), ("uJy", content)):
        params = files_params(write_manifest(field, manifest, f"unit_{len(fluxes)}.yaml"), tmp_path / f"data{len(fluxes)}",
                              bands=["irac1"])
        table = measure_field(retrieve(params, progress=False), ["irac1"], n_workers=1, progress=False)
        fluxes[name] = table.set_index("id")["irac1_flux_ujy"]
    usable = fluxes["MJy/sr"].notna()
    assert usable.sum() > 50
    np.testing.assert_allclose(fluxes["uJy"][usable], fluxes["MJy/sr"][usable], rtol=1e-6, atol=1e-9)


def test_the_conversion_factors_follow_the_band_table():
    irac1, nuv = BANDS["irac1"], BANDS["nuv"]
    assert unit_factor("uJy", irac1) == pytest.approx(1 / irac1.ujy_per_pixel_unit)  # 1/8.46
    assert unit_factor("Jy/pixel", nuv) == pytest.approx(1e6 / nuv.ujy_per_pixel_unit)
    assert unit_factor("MJY/SR", irac1) == unit_factor("counts/s", nuv) == 1.0
    assert unit_factor("count/s", irac1) is None


def test_a_fits_file_cut_short_is_refused_before_any_work(field, tmp_path):
    whole = (field / IRAC1).read_bytes()
    cut = tmp_path / "cut.fits"
    cut.write_bytes(whole[: len(whole) // 2])
    message = refused(field, tmp_path, with_irac1_image(field, cut), "cut.yaml")
    assert f"{cut} is cut short: HDU 0 needs" in message and "copy or download the file again" in message


@pytest.mark.parametrize("pixels, expected", [
    (np.zeros, "the PRF sums to 0; give a PRF with a positive sum"),
    (lambda shape: np.full(shape, np.nan), "are NaN or infinite; give a PRF with a finite value in every pixel"),
])
def test_a_prf_without_light_is_refused_naming_band_and_file(field, tmp_path, pixels, expected):
    content = manifest_content(field)
    with fits.open(field / content["bands"]["nuv"]["prf"]) as hdul:
        shape = next(hdu.data.shape for hdu in hdul if hdu.header.get("NAXIS") == 2)
    bad = tmp_path / "bad_prf.fits"
    fits.PrimaryHDU(pixels(shape)).writeto(bad)
    content["bands"]["nuv"]["prf"] = str(bad)
    message = refused(field, tmp_path, content, "prf.yaml")
    assert "bands.nuv.prf" in message and str(bad) in message and expected in message


def test_an_image_without_data_in_the_field_is_refused(field, tmp_path):
    empty = irac1_copy(field, tmp_path, data=lambda pixels: np.full_like(pixels, np.nan))
    message = refused(field, tmp_path, with_irac1_image(field, empty), "empty.yaml")
    assert "bands.irac1.images: no data in the field: every pixel within radius_arcmin=1 of ra=150.02" in message
    assert str(empty) in message and "leave irac1 out of bands" in message
