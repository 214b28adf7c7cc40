"""Synthetic images with an exactly known PRF, shared by the engine tests."""

import numpy as np
from scipy.special import erf

SIGMA_PIX = 1.2  # Gaussian sigma in pixels: FWHM 2.8 px, like IRAC on the 0.6" grid
FWHM_PIX = 2.3548 * SIGMA_PIX
OVERSAMPLING = 5


def pixel_integrated_gaussian(offsets, sigma=SIGMA_PIX):
    """Fraction of a unit Gaussian's flux in a unit pixel centred at each offset."""
    scale = np.sqrt(2.0) * sigma
    return 0.5 * (erf((offsets + 0.5) / scale) - erf((offsets - 0.5) / scale))


def gaussian_prf_file(half_size=8, oversampling=OVERSAMPLING, peak_normalised=True):
    """An oversampled PRF image like a PRF file, peak-normalised to mimic GALEX files."""
    n = 2 * half_size * oversampling + 1
    offsets = (np.arange(n) - (n - 1) / 2) / oversampling
    prf = np.outer(pixel_integrated_gaussian(offsets), pixel_integrated_gaussian(offsets))
    return prf / prf.max() if peak_normalised else prf


def render(shape, x, y, flux, sigma=SIGMA_PIX):
    """Noise-free image of point sources at 0-based (x, y) with the Gaussian PRF."""
    rows = np.arange(shape[0])
    cols = np.arange(shape[1])
    image = np.zeros(shape)
    for xi, yi, fi in zip(np.atleast_1d(x), np.atleast_1d(y), np.atleast_1d(flux)):
        image += fi * np.outer(pixel_integrated_gaussian(rows - yi, sigma), pixel_integrated_gaussian(cols - xi, sigma))
    return image
