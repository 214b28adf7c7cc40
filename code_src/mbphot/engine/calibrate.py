"""Honest flux errors: how much correlated noise and an imperfect PRF add to the white-noise
error a least-squares fit reports.

- `noise_inflation`: a resampled mosaic's pixels are not independent, so a PRF fit's true
  error exceeds the one computed from the per-pixel sigma by a factor k. k is measured
  directly, by fitting the PRF at random positions of a residual image (data - model - sky, or
  the data with the sources masked): k is the robust standard deviation of those fluxes in
  units of their white-noise errors. The engine multiplies its errors by k.
- `prf_model_error`: the PRF used differs from each source's true PRF (variation across the
  field, an imperfect ePSF), which moves a PRF-fit flux by a fraction that does not shrink
  with brightness. It is measured on isolated stars as the scatter of their PRF-fit flux over
  their aperture flux corrected to total, less the statistical part. The engine adds
  (epsilon * flux)^2 to each source's variance.
"""

import numpy as np
from scipy import optimize, signal

from .epsf import (
    _cutouts, _FileProfile, _first_pass, _register, _robust_sigma, _SplineProfile, fwhm_pixels, render_sources,
)
from .prf import build_prf_table

__all__ = ["correlated_noise_scale", "excess_scatter", "noise_inflation", "prf_model_error"]

_PRF_ERROR_EVIDENCE = 4.0
"""`prf_model_error` takes a scatter above its floor only where the stars show it at 2 sigma
(twice the log-likelihood gain): IRAC 5.8 and 8 um stars on a 9' field are 10-25, with
aperture errors of 2-10 %, which a PRF error of 1 % barely changes. Their maximum-likelihood
scatter then reads 0.5-1.6 % from one realisation of the bench's realistic field to the next
(seed 5's IRAC 5.8 um: 1.6 %, a gain of 0.5, and a pull sd of 0.85 at S/N > 10; 0.93 at the
floor)."""


def noise_inflation(
    residual: np.ndarray,
    sigma,
    prf_stamp: np.ndarray,
    *,
    n_samples: int = 4000,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
) -> float:
    """Factor by which the true error of a PRF-fit flux exceeds its white-noise prediction.

    At ``n_samples`` random pixel centres the flux of a source with profile ``prf_stamp`` is
    fitted to ``residual`` by weighted least squares, F = sum(P r / sigma^2) / sum(P^2 /
    sigma^2), whose error for independent pixels is 1 / sqrt(sum(P^2 / sigma^2)). The ratio
    z = F / error has unit spread on white noise; correlated noise widens it. Both sums are
    computed for every pixel at once by FFT correlation.

    Parameters
    ----------
    residual : ndarray
        Image with the sources and sky removed (data - model - sky), NaN where unusable.
    sigma : ndarray or float
        Per-pixel 1-sigma noise the engine uses (the ``unc`` map or its estimate).
    prf_stamp : ndarray
        The PRF on the image pixel grid (odd square stamp, centred), e.g.
        ``build_prf_table(prf, oversampling).stamp_at(0, 0)``.
    n_samples : int
        Number of random positions.
    rng : numpy.random.Generator
        Source of the positions (pass a seeded one for reproducible figures).
    mask : ndarray of bool, optional
        True where pixels must not be used (detected sources, bright residuals). Positions
        whose stamp meets a masked or unusable pixel are not sampled.

    Returns
    -------
    float
        k = 1.4826 * median absolute deviation of z (robust to a few unmasked residuals);
        NaN if no position is usable.
    """
    residual = np.asarray(residual, dtype=np.float64)
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), residual.shape)
    stamp = np.asarray(prf_stamp, dtype=np.float64)
    usable = np.isfinite(residual) & np.isfinite(sigma) & (sigma > 0)
    if mask is not None:
        usable &= ~np.asarray(mask, dtype=bool)
    inverse_variance = np.where(usable, 1.0 / np.where(usable, sigma, 1.0) ** 2, 0.0)
    weighted = np.where(usable, residual, 0.0) * inverse_variance
    flipped = stamp[::-1, ::-1]
    numerator = signal.fftconvolve(weighted, flipped, mode="same")
    information = signal.fftconvolve(inverse_variance, flipped**2, mode="same")
    footprint = (stamp != 0).astype(np.float64)[::-1, ::-1]
    bad = signal.fftconvolve((~usable).astype(np.float64), footprint, mode="same")
    half_y, half_x = stamp.shape[0] // 2, stamp.shape[1] // 2
    inner = np.zeros(residual.shape, dtype=bool)
    inner[half_y : residual.shape[0] - half_y, half_x : residual.shape[1] - half_x] = True
    candidates = np.flatnonzero(inner & (bad < 0.5) & (information > 0))
    if candidates.size == 0:
        return float("nan")
    chosen = rng.choice(candidates, size=min(n_samples, candidates.size), replace=False)
    z = numerator.ravel()[chosen] / np.sqrt(information.ravel()[chosen])
    return float(_robust_sigma(z))


def prf_model_error(
    image: np.ndarray,
    sky,
    sigma,
    x: np.ndarray,
    y: np.ndarray,
    prf: np.ndarray,
    oversampling: int,
    stars,
    *,
    fluxes=None,
    radius_pix: float | None = None,
    noise_factor: float = 1.0,
    register: bool = False,
    floor: float = 0.002,
) -> float:
    """Fractional flux error epsilon that PRF fits carry because the PRF is not the sources'.

    For each star (isolated point sources, e.g. `MeasuredPRF.star_indices`), with its
    neighbours' modelled light subtracted, the PRF-fit flux F (with a local constant, on the
    pixels within ``radius_pix``) is compared with the aperture flux A over the same pixels
    less that constant, divided by the PRF's own fraction there (A is the total flux whatever
    the shape inside the aperture, as long as the light beyond it follows the PRF). Then

    the deviations d = (F - A) / A (less their median) are compared with their statistical
    errors s, those of the linear combination F - A of pixels with independent errors
    ``sigma``, times ``noise_factor`` (from `noise_inflation`): epsilon is the scatter that,
    added in quadrature to each star's s, makes the deviations most likely
    (`excess_scatter`; stars beyond 5 robust sigmas left out), floored at ``floor``, and
    ``floor`` unless the stars show it at 2 sigma, also without the one farthest off
    (`_PRF_ERROR_EVIDENCE`). A
    common bias of F / A is not counted (the PRF's normalisation is the aperture
    correction's job); its scatter from star to star is.

    Parameters
    ----------
    image, sky, sigma : ndarray or float
        As for `measure_prf`.
    x, y : ndarray
        0-based positions of every source on the image where the engine places them
        (catalogue positions plus the image's offset).
    prf : ndarray
        The PRF the engine fits with (e.g. `MeasuredPRF.prf`), any normalisation.
    oversampling : int
        Its samples per image pixel.
    stars : array of int
        Indices into ``x``/``y`` of isolated point sources; at least 5 are needed.
    fluxes : ndarray, optional
        Fluxes of every source to model the neighbours; default a `scene_photometry` fit with
        ``prf`` and a fitted sky.
    radius_pix : float, optional
        Radius of the fit and the aperture; default twice the PRF's FWHM, at least 3 pixels.
    noise_factor : float
        Correlated-noise inflation of the statistical errors.
    register : bool
        Fit each star's position too. False (default) measures the PRF fit at the given
        positions, as the engine does, so catalogue position errors count in epsilon; True
        isolates the PRF shape error.
    floor : float
        Smallest epsilon returned.

    Returns
    -------
    float
        epsilon; NaN with fewer than 5 usable stars.
    """
    image = np.asarray(image, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    profile = _FileProfile(prf, oversampling)
    table = build_prf_table(prf, oversampling)
    radius = radius_pix if radius_pix is not None else max(2.0 * fwhm_pixels(profile.samples, oversampling), 3.0)
    radius = min(radius, profile.half_extent - 1)
    if fluxes is None:
        fluxes = _first_pass(image, sky, sigma, x, y, table, radius)
    fluxes = np.asarray(fluxes, dtype=np.float64)
    stars = np.asarray(stars, dtype=np.intp)
    neighbour_model = render_sources(image.shape, x, y, np.nan_to_num(fluxes, nan=0.0), table)
    cutouts = _cutouts(image, sky, sigma, x, y, stars, radius, neighbour_model, fluxes, table)
    spline = _SplineProfile.from_function(profile, 4, radius + 2)
    fit = _register(cutouts, spline, fluxes[cutouts.index], fit_shift=register, fit_background=False)
    good = np.isfinite(fit["flux"]) & np.isfinite(fit["ap"]) & (fit["ap"] > 0)
    if good.sum() < 5:
        return float("nan")
    deviation = (fit["flux"][good] - fit["ap"][good]) / fit["ap"][good]
    deviation -= np.median(deviation)
    statistical = noise_factor * fit["ap_err"][good] / fit["ap"][good]
    return excess_scatter(deviation, statistical, floor, min_evidence=_PRF_ERROR_EVIDENCE)


def excess_scatter(deviation, statistical, floor, clip=5.0, min_evidence=0.0):
    """The scatter epsilon that, added in quadrature to each star's ``statistical`` error,
    makes the ``deviation`` most likely (Gaussian), at least ``floor``; ``floor`` where it
    raises twice the log-likelihood over ``floor``'s by no more than ``min_evidence``, with
    all the stars or without the one farthest off for its error.

    Every star whose PRF error outweighs its noise counts equally: the measured PRF is pulled
    toward the brightest stars (they weigh most in its fit), so weighting by S/N would see
    the PRF error of those stars rather than of a typical source. Stars whose noise
    outweighs the PRF error tell little about it and weigh less: the mean of deviation^2 -
    statistical^2, which counted them equally, read 0.028 on the realistic field's IRAC3
    (seed 7), whose 21 stars scatter about as their noise says (S/N 15-25; the mean's own
    error about 0.03), and the flux errors came out 1.2 times their scatter (pull sd 0.83; 1.03
    with this). Not a robust spread, because the engine's plain pull spread is what must
    come out right and a PRF varying across the field gives a flat-topped, long-tailed
    distribution that a median absolute deviation underestimates; only stars beyond ``clip``
    robust sigmas (a missed neighbour, a cosmic ray) are left out.
    """
    keep = np.abs(deviation - np.median(deviation)) <= clip * _robust_sigma(deviation)
    deviation, statistical = deviation[keep], statistical[keep]
    epsilon, gain = _most_likely_scatter(deviation, statistical, floor)
    if gain <= min_evidence:
        return float(floor)
    if min_evidence > 0 and deviation.size > 1:
        # The evidence must not rest on one star: a missed neighbour or a blend puts one star
        # off, a PRF error all of them. (Seed 17's IRAC3 and IRAC4 on the realistic field:
        # one star each, 4 and 3 sigma off, made errors of 1.4 % and 3.8 %.)
        single = np.argmax(np.abs(deviation) / np.maximum(statistical, np.finfo(float).tiny))
        others = np.arange(deviation.size) != single
        if _most_likely_scatter(deviation[others], statistical[others], floor)[1] <= min_evidence:
            return float(floor)
    return float(epsilon)


def _most_likely_scatter(deviation, statistical, floor):
    """`excess_scatter`'s most likely scatter (at least ``floor``) and how much it raises twice
    the log-likelihood over ``floor``'s."""
    squared, variance = deviation**2, statistical**2

    def cost(epsilon):
        total = variance + epsilon**2
        return float(np.sum(squared / total + np.log(total)))

    largest = float(np.sqrt(squared.max())) if squared.size else 0.0
    if largest <= floor:
        return float(floor), 0.0
    best = optimize.minimize_scalar(cost, bounds=(floor, largest), method="bounded", options={"xatol": 1e-5})
    return float(best.x), cost(floor) - cost(best.x)


def correlated_noise_scale(
    residual: np.ndarray, sigma, prf_stamp: np.ndarray, *, clip: float = 4.0, mask: np.ndarray | None = None
) -> float:
    """Factor by which a PRF fit's true flux error exceeds its white-noise error, from the
    residual's autocovariance.

    With chi = residual / sigma, the flux of a PRF P fitted to pure noise has the variance
    sum over lags L of cov_chi(L) A_P(L) / A_P(0), A_P the PRF's autocorrelation, in units of
    its white-noise variance; the factor is its square root. The autocovariance is measured
    over the pixels with |chi| < ``clip`` (and their neighbours within the PRF), so a few
    bright residuals of imperfectly modelled sources weigh little, unlike in
    `noise_inflation`, whose random positions cannot avoid them at COSMOS density. Noise that
    is white gives 1; a mosaic resampled from pixels twice as large about 2.

    Parameters
    ----------
    residual : ndarray
        Data less model and sky, NaN where unusable.
    sigma : ndarray or float
        Per-pixel noise the engine uses.
    prf_stamp : ndarray
        The PRF on the image grid (odd square, centred).
    clip : float
        Pixels with |chi| at or above this are left out.
    mask : ndarray of bool, optional
        True for pixels to leave out too (e.g. where sources' modelled light is bright, and
        the residual holds the PRF model's errors rather than noise).

    Returns
    -------
    float
        The factor; NaN without usable pixels.
    """
    residual = np.asarray(residual, dtype=np.float64)
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), residual.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        chi = residual / sigma
    usable = np.isfinite(chi) & (np.abs(chi) < clip)
    if mask is not None:
        usable &= ~np.asarray(mask, dtype=bool)
    if not usable.any():
        return float("nan")
    chi = np.where(usable, chi, 0.0)
    chi -= np.where(usable, chi[usable].mean(), 0.0)
    stamp = np.asarray(prf_stamp, dtype=np.float64)
    half_y, half_x = stamp.shape[0] // 2, stamp.shape[1] // 2
    pairs = signal.fftconvolve(usable.astype(np.float64), usable[::-1, ::-1].astype(np.float64), mode="full")
    products = signal.fftconvolve(chi, chi[::-1, ::-1], mode="full")
    centre_y, centre_x = residual.shape[0] - 1, residual.shape[1] - 1
    window = (slice(centre_y - 2 * half_y, centre_y + 2 * half_y + 1), slice(centre_x - 2 * half_x, centre_x + 2 * half_x + 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        covariance = np.where(pairs[window] > 0.5, products[window] / pairs[window], 0.0)
    autocorrelation = signal.fftconvolve(stamp, stamp[::-1, ::-1], mode="full")
    variance = float((covariance * autocorrelation).sum() / autocorrelation[2 * half_y, 2 * half_x])
    return float(np.sqrt(variance)) if variance > 0 else float("nan")
