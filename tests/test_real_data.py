"""The pipeline on real COSMOS data (../shared/data/cosmos_real; skipped where absent)."""

import numpy as np
import pytest
from astropy.io import fits

from mbphot.bands import BANDS
from mbphot.crossmatch import sky_area_deg2
from mbphot.manifest import Manifest
from mbphot.photometry import load_prf, measure_field
from mbphot.retrieve import footprint_area_deg2, write_tile_choice


def real_galex_manifest(real_data_dir, directory) -> Manifest:
    """A manifest over the real GALEX mosaics, PSFs and COSMOS2015 subset, read in place."""
    galex = real_data_dir / "galex"
    manifest = Manifest(
        directory=directory,
        field={"ra": 150.01, "dec": 2.20, "radius_arcmin": 3.0, "data_source": "files"},
        catalog=real_data_dir / "cosmos2015_subset.fits",
        chandra=real_data_dir / "chandra" / "COSMOS_chandra.fits",
        bands={
            "nuv": {"prf": galex / "PSFnuv_faint.fits", "prf_source": "GALEX PSF file",
                    "images": [{"image": galex / "COSMOS_galex_nuv_mosaic_15arcmin.fits", "tile": "COSMOS_01"}]},
            "fuv": {"prf": galex / "PSFfuv.fits", "prf_source": "GALEX PSF file",
                    "images": [{"image": galex / "COSMOS_galex_fuv_mosaic_15arcmin.fits", "tile": "COSMOS_01"}]},
        },
    )
    write_tile_choice(manifest)
    return manifest


@pytest.fixture(scope="module")
def real_galex_photometry(tmp_path_factory, real_data_dir):
    manifest = real_galex_manifest(real_data_dir, tmp_path_factory.mktemp("real_galex"))
    return measure_field(manifest, ["nuv", "fuv"], n_workers=1, progress=False)


@pytest.mark.parametrize("band", ["nuv", "fuv"])
def test_real_galex_fluxes_agree_with_cosmos2015(real_galex_photometry, band):
    """Unit, pixel-origin and PSF-normalisation errors would move this ratio far from 1."""
    catalog_flux = real_galex_photometry[BANDS[band].catalog_flux_column].to_numpy()
    measured = real_galex_photometry[f"{band}_flux_ujy"].to_numpy()
    error = real_galex_photometry[f"{band}_flux_err_ujy"].to_numpy()
    good = (real_galex_photometry[f"{band}_flag"].to_numpy() == 0) & np.isfinite(measured)
    bright = good & (catalog_flux > 0.5) & (measured > 5 * error)
    ratio = measured[bright] / catalog_flux[bright]
    median = np.median(ratio)
    robust_scatter = 1.4826 * np.median(np.abs(ratio - median))
    print(f"{band}: {bright.sum()} bright sources, median measured/COSMOS2015 = {median:.3f}, "
          f"robust scatter = {robust_scatter:.3f}")
    assert bright.sum() >= 20
    assert 0.7 <= median <= 1.4


@pytest.mark.parametrize("name", ["PSFnuv_faint.fits", "PSFfuv.fits"])
def test_peak_normalised_galex_psfs_are_rescaled_to_unit_flux(real_data_dir, name):
    """The published recipe used these peak-normalised PSFs as if they summed to one."""
    table = load_prf(real_data_dir / "galex" / name, BANDS["nuv"])
    total = table.stamp_at(0.0, 0.0).sum()
    assert 0.99 <= total <= 1.002  # the PSF files hold slightly negative pixels far out
    assert fits.getdata(real_data_dir / "galex" / name).sum() > 10, "the file itself is peak-normalised"


@pytest.mark.parametrize("channel", "1234")
def test_real_irac_prfs_are_centred_and_normalised(real_data_dir, channel):
    table = load_prf(real_data_dir / "irac" / f"PRF_IRAC_ch{channel}.fits", BANDS[f"irac{channel}"])
    stamp = table.stamp_at(0.0, 0.0)
    assert 0.98 <= stamp.sum() <= 1.0
    rows, cols = np.indices(stamp.shape) - table.half_size
    core = stamp >= 0.05 * stamp.max()
    assert abs((stamp * cols)[core].sum() / stamp[core].sum()) < 0.05
    assert abs((stamp * rows)[core].sum() / stamp[core].sum()) < 0.05


def test_footprint_area_counts_only_pixels_with_data(real_data_dir, tmp_path):
    manifest = real_galex_manifest(real_data_dir, tmp_path)
    full = footprint_area_deg2(manifest, ["nuv"])
    assert full == pytest.approx(sky_area_deg2(3.0), rel=0.01)
    manifest.field = {**manifest.field, "ra": 150.135}  # the mosaic's east edge cuts the circle in half
    assert footprint_area_deg2(manifest, ["nuv"]) == pytest.approx(sky_area_deg2(3.0) / 2, rel=0.05)
