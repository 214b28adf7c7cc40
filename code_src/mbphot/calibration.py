"""What an image tells about itself before it is measured: its PRF, offset and noise.

A PRF file is not the PRF of a given mosaic, catalogue positions are off its light by a common
offset, a resampled mosaic's noise is correlated, and no PRF fits every source exactly. Each
image is therefore calibrated on a section around the field before the photometry:

1. a first fit of every source with the file's PRF models the neighbours of the stars;
2. the effective PRF is measured from isolated stars (`mbphot.engine.epsf.measure_prf`:
   registered, neighbours subtracted, normalised to total flux with the file's wings), with
   the common offset of the light from the catalogue; with too few stars the file's PRF is
   kept and the calibration says why;
3. a second fit with that PRF, at the offset positions, leaves the residual image; for a
   mosaic resampled from larger pixels (`Band.resampled_noise`: IRAC), its autocovariance
   gives the factor ``noise_scale`` by which the true flux error exceeds the white-noise one
   (`mbphot.engine.calibrate.correlated_noise_scale`: correlated noise, unresolved faint
   sources); GALEX's Poisson noise is independent from pixel to pixel;
4. the scatter of the stars' PRF-fit fluxes about their aperture fluxes gives ``prf_error``,
   the fractional error every PRF-fit flux carries (`mbphot.engine.calibrate.prf_model_error`).

The engine then fits with the measured PRF at the offset positions and adds both terms to its
errors (`mbphot.engine.solve.total_variance`). Everything here is pure: arrays in, a
`Calibration` out.
"""

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .bands import Band
from .engine.calibrate import correlated_noise_scale, prf_model_error
from .engine.epsf import measure_prf, render_sources
from .engine.prf import build_prf_table
from .engine.scene import scene_photometry
from .engine.solve import FLAGS

__all__ = ["Calibration", "DEFAULT_PRF_ERROR", "calibrate_section"]

DEFAULT_PRF_ERROR = 0.01
"""The PRF-model error assumed where too few stars measure it: a PRF known to about 1 %."""
NOISE_SCALE_RANGE = (0.5, 5.0)
"""Measured noise scales outside this range mean the measurement failed; they are clipped."""
_CLEAN = FLAGS["off_image"] | FLAGS["no_data"] | FLAGS["fit_failed"]
_MIN_STARS = 5
_BRIGHT_MODEL_SIGMA = 0.5
_NOISE_STAMP_HALF_SIZE = 8


@dataclass(frozen=True)
class Calibration:
    """An image's calibration (see the module docstring).

    Attributes
    ----------
    prf : ndarray
        The PRF to fit with, normalised to unit total flux, sampled ``oversampling`` times
        per image pixel.
    oversampling : int
    offset_x_pix, offset_y_pix : float
        Add these to the catalogue's pixel positions to land on the light.
    noise_scale : float
        True over white-noise flux error.
    prf_error : float
        Fractional flux error from the PRF model.
    n_stars : int
        Stars the PRF was measured from (0 when the file's PRF is kept).
    used_file : bool
        The file's PRF is used (too few stars); ``reason`` says why.
    reason : str
    aperture_correction : float
        Total over the stars' measured flux within the fit radius (NaN for the file's PRF).
    """

    prf: np.ndarray
    oversampling: int
    offset_x_pix: float
    offset_y_pix: float
    noise_scale: float
    prf_error: float
    n_stars: int
    used_file: bool
    reason: str
    aperture_correction: float

    def summary(self) -> dict:
        """The scalars, for the catalogue's provenance."""
        return {key: value for key, value in asdict(self).items() if key != "prf"} | {
            "oversampling": int(self.oversampling)
        }


def calibrate_section(
    image: np.ndarray,
    sky,
    sigma,
    x: np.ndarray,
    y: np.ndarray,
    file_prf: np.ndarray,
    file_oversampling: int,
    band: Band,
    *,
    stars=None,
) -> Calibration:
    """Calibrate one image from a section of it (see the module docstring).

    Parameters
    ----------
    image, sky, sigma : ndarray
        The section, its sky and per-pixel noise (NaN where unusable).
    x, y : ndarray
        0-based pixel positions, on the section, of every catalogue source near it.
    file_prf : ndarray
        The band's PRF file (any normalisation), ``file_oversampling`` samples per pixel.
    band : Band
        The band (cutout size, PRF radius and core).
    stars : array of int, optional
        Indices of the catalogue's stars, preferred as PRF stars.
    """
    everything = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def fit(prf, oversampling, fit_x, fit_y):
        table = build_prf_table(
            prf, oversampling, enclosed_fraction=band.prf_enclosed_fraction, core_radius=band.prf_core_radius_pixels
        )
        result = scene_photometry(
            image, fit_x, fit_y, everything, table, band.cutout_size_pixels, sky, sigma, fit_sky=True,
            correct_positions=False,
        )
        flux = np.full(x.size, np.nan)
        flux[everything] = np.where(result.flag & _CLEAN == 0, result.flux, np.nan)
        return flux

    first = fit(file_prf, file_oversampling, x, y)
    candidates = None if stars is None or len(stars) < 2 * _MIN_STARS else np.asarray(stars)
    wing_radius = None if band.calibration_radius_arcsec is None else band.calibration_radius_arcsec / band.pixel_scale_arcsec
    measured = measure_prf(
        image, sky, sigma, x, y, file_prf, file_oversampling, candidates=candidates, fluxes=first,
        wing_radius_pix=wing_radius, extend_wings=wing_radius is not None,
    )
    light_x, light_y = x + measured.offset_x_pix, y + measured.offset_y_pix
    second = fit(measured.prf, measured.oversampling, light_x, light_y)
    noise_scale = 1.0
    if band.resampled_noise:
        whole = build_prf_table(measured.prf, measured.oversampling, enclosed_fraction=band.prf_enclosed_fraction)
        model = render_sources(image.shape, light_x, light_y, np.nan_to_num(second, nan=0.0), whole)
        noise_scale = _noise_scale(np.asarray(image, dtype=np.float64) - sky - model, sigma, model, whole, band)
    prf_error = float("nan")
    if measured.star_indices.size >= _MIN_STARS:
        prf_error = prf_model_error(
            image, sky, sigma, light_x, light_y, measured.prf, measured.oversampling, measured.star_indices,
            fluxes=second, noise_factor=noise_scale,
        )
    return Calibration(
        prf=measured.prf,
        oversampling=int(measured.oversampling),
        offset_x_pix=float(measured.offset_x_pix),
        offset_y_pix=float(measured.offset_y_pix),
        noise_scale=noise_scale,
        prf_error=float(prf_error) if np.isfinite(prf_error) else DEFAULT_PRF_ERROR,
        n_stars=int(measured.n_stars),
        used_file=bool(measured.used_file),
        reason=measured.reason,
        aperture_correction=float(measured.aperture_correction),
    )



def _noise_scale(residual, sigma, model, table, band: Band) -> float:
    """`correlated_noise_scale` of a calibration fit's residual, clipped to `NOISE_SCALE_RANGE`."""
    # The fit's sky tiles are not in the model: take out what is smooth on their scale.
    residual = residual - ndimage.median_filter(np.nan_to_num(residual), size=band.cutout_size_pixels, mode="nearest")
    # Sources beyond the section's edge are fitted but not reported, so not in the model:
    # keep the residual a PRF's reach inside the edge, where the section allows.
    margin = min(table.half_size, (min(residual.shape) - band.cutout_size_pixels) // 2)
    if margin > 0:
        residual[:margin], residual[-margin:], residual[:, :margin], residual[:, -margin:] = np.nan, np.nan, np.nan, np.nan
    # Where sources' light is bright the residual holds the PRF model's errors (`prf_error`);
    # the PRF's core carries nearly all of a flux's information.
    core = min(table.half_size, _NOISE_STAMP_HALF_SIZE)
    centre = slice(table.half_size - core, table.half_size + core + 1)
    stamp = table.stamp_at(0.0, 0.0)[centre, centre]
    noise_scale = correlated_noise_scale(residual, sigma, stamp, mask=model > _BRIGHT_MODEL_SIGMA * sigma)
    return float(np.clip(noise_scale, *NOISE_SCALE_RANGE)) if np.isfinite(noise_scale) else 1.0
