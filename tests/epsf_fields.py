"""Synthetic IRAC-like fields for the measured-PRF and error-calibration tests.

The sky's PRF is an analytic effective PRF (the pixel value at offset u from a unit source):
an elliptical Gaussian core plus a faint broad Gaussian wing. The "file" PRF given to the code
is the same family sampled on the pixel grid in a 17 x 17 box like the IRAC files, but round
and narrower, as a published PRF differs from a mosaic's (rotated by the roll angle,
broadened). Resolved galaxies are Gaussians too, so their images (PRF convolved with the
galaxy) are exact Gaussians with the covariances added.
"""

from dataclasses import dataclass

import numpy as np

PIXEL_ARCSEC = 0.6
WING_FRACTION = 0.03
WING_SIGMA = 3.0
FILE_CORE = (1.2, 1.2, 0.0)  # sigma_major, sigma_minor (pixels), angle (rad)
TRUE_CORE = (1.35, 1.15, np.radians(30.0))


def core_covariance(sigma_major, sigma_minor, angle):
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return rotation @ np.diag([sigma_major**2, sigma_minor**2]) @ rotation.T


def gaussian(ux, uy, covariance):
    inverse = np.linalg.inv(covariance)
    q = inverse[0, 0] * ux * ux + 2 * inverse[0, 1] * ux * uy + inverse[1, 1] * uy * uy
    return np.exp(-0.5 * q) / (2 * np.pi * np.sqrt(np.linalg.det(covariance)))


def effective_prf(ux, uy, core=TRUE_CORE, extra_variance=0.0):
    """Unit-flux PRF value at offset (ux, uy); ``extra_variance`` (pixels^2) convolves it with a
    round Gaussian (a resolved galaxy, or a locally broader PRF)."""
    covariance = core_covariance(*core) + extra_variance * np.eye(2)
    wing = (WING_SIGMA**2 + extra_variance) * np.eye(2)
    return (1 - WING_FRACTION) * gaussian(ux, uy, covariance) + WING_FRACTION * gaussian(ux, uy, wing)


def file_prf(half_size=8):
    """The 'published' PRF: 17 x 17 samples on the pixel grid, peak-normalised."""
    offsets = np.arange(-half_size, half_size + 1, dtype=np.float64)
    prf = effective_prf(offsets[None, :], offsets[:, None], core=FILE_CORE)
    return prf / prf.max()


def render(shape, x, y, flux, extra_variance=None, core=TRUE_CORE, core_of=None, reach=16):
    """Noise-free image: each source is ``flux`` times the PRF (convolved with a Gaussian of
    ``extra_variance`` px^2 for resolved galaxies) at 0-based position (x, y). ``core_of``
    (a function of x, y returning a core tuple) makes the PRF vary across the field."""
    image = np.zeros(shape)
    extra = np.zeros(len(x)) if extra_variance is None else extra_variance
    for xi, yi, fi, vi in zip(x, y, flux, extra):
        col, row = int(np.rint(xi)), int(np.rint(yi))
        r0, r1 = max(row - reach, 0), min(row + reach + 1, shape[0])
        c0, c1 = max(col - reach, 0), min(col + reach + 1, shape[1])
        if r0 >= r1 or c0 >= c1:
            continue
        rows, cols = np.arange(r0, r1), np.arange(c0, c1)
        this_core = core if core_of is None else core_of(xi, yi)
        stamp = effective_prf(cols[None, :] - xi, rows[:, None] - yi, core=this_core, extra_variance=vi)
        image[r0:r1, c0:c1] += fi * stamp
    return image


@dataclass
class Field:
    image: np.ndarray
    sigma: float
    x_true: np.ndarray
    y_true: np.ndarray
    x_cat: np.ndarray
    y_cat: np.ndarray
    flux: np.ndarray
    is_star: np.ndarray
    offset: tuple
    noise_free: np.ndarray


def make_field(seed, side=400, n_stars=220, n_galaxies=300, n_faint=900, offset=(0.30, -0.20), jitter_arcsec=0.15,
               noise=1.0, core_of=None):
    """Stars (S/N ~ 60-3000), resolved galaxies (sigma 0.5-1.5 px, S/N 10-1000) and faint
    sources (S/N 2-30), also in a margin around the image; catalogue positions scattered by
    ``jitter_arcsec`` (radial rms) and displaced from the light by ``-offset`` pixels, so the
    light is at catalogue + offset + that source's scatter."""
    rng = np.random.default_rng(seed)
    margin = 12
    n = n_stars + n_galaxies + n_faint
    x = rng.uniform(-margin, side + margin, n)
    y = rng.uniform(-margin, side + margin, n)
    white = noise * np.sqrt(4 * np.pi * 1.35 * 1.15)  # PRF-fit error of a point source
    flux = np.concatenate([
        white * 10 ** rng.uniform(np.log10(60), np.log10(3000), n_stars),
        white * 10 ** rng.uniform(1, 3, n_galaxies),
        white * 10 ** rng.uniform(np.log10(2), np.log10(30), n_faint),
    ])
    extra = np.concatenate([np.zeros(n_stars), rng.uniform(0.5, 1.5, n_galaxies) ** 2, np.zeros(n_faint)])
    is_star = np.zeros(n, dtype=bool)
    is_star[:n_stars] = True
    noise_free = render((side, side), x, y, flux, extra, core_of=core_of)
    image = noise_free + rng.normal(0.0, noise, (side, side))
    scatter = jitter_arcsec / PIXEL_ARCSEC / np.sqrt(2)
    x_cat = x - offset[0] - rng.normal(0, scatter, n)
    y_cat = y - offset[1] - rng.normal(0, scatter, n)
    return Field(image, noise, x, y, x_cat, y_cat, flux, is_star, offset, noise_free)
