"""The pipeline on real COSMOS data (../shared/data/cosmos_real; skipped where absent)."""

import numpy as np
import pytest
from astropy.io import fits

from mbphot.bands import BANDS
from mbphot.engine import FLAGS
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


FLUX_BINS_UJY = ((0.5, 2.0), (2.0, 5.0), (5.0, np.inf))


@pytest.mark.parametrize("band", ["nuv", "fuv"])
def test_real_galex_fluxes_agree_with_cosmos2015(real_galex_photometry, band):
    """Unit, pixel-origin, PSF-normalisation and PSF-wing errors would move these ratios from 1.

    COSMOS2015's GALEX fluxes are PSF fits with priors (Zamojski et al. 2007): the median
    ratio must be within 10 %, and within 15 % in each flux bin holding at least 10 sources.
    """
    catalog_flux = real_galex_photometry[BANDS[band].catalog_flux_column].to_numpy()
    measured = real_galex_photometry[f"{band}_flux_ujy"].to_numpy()
    flag = real_galex_photometry[f"{band}_flag"].to_numpy()
    good = (flag == 0) & np.isfinite(measured)
    ratio = measured / catalog_flux
    detected = good & (catalog_flux > 0.5)
    median = np.median(ratio[detected])
    print(f"{band}: {detected.sum()} unflagged sources above 0.5 uJy, median measured/COSMOS2015 {median:.3f}")
    assert detected.sum() >= 20
    assert 0.9 <= median <= 1.1
    for low, high in FLUX_BINS_UJY:
        in_bin = good & (catalog_flux > low) & (catalog_flux <= high)
        if in_bin.sum() < 10:
            print(f"  {low}-{high} uJy: {in_bin.sum()} sources, too few to judge")
            continue
        bin_median = np.median(ratio[in_bin])
        print(f"  {low}-{high} uJy: {in_bin.sum()} sources, median ratio {bin_median:.3f}")
        assert 0.85 <= bin_median <= 1.15, f"{band} {low}-{high} uJy"


@pytest.mark.parametrize("band", ["nuv", "fuv"])
def test_zero_count_pixels_of_real_galex_tiles_are_data(real_galex_photometry, band):
    """The deep FUV tile holds genuine zero-count pixels; only the footprint's outside is no data."""
    flag = real_galex_photometry[f"{band}_flag"].to_numpy()
    assert (flag & FLAGS["no_data"] != 0).mean() < 0.02


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
