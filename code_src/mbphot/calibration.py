"""What an image tells about itself before it is measured: its PRF, offset and noise.

A PRF file is not the PRF of a given mosaic, catalogue positions are off its light by a common
offset, a resampled mosaic's noise is correlated, and no PRF fits every source exactly. Each
image is therefore calibrated on a section around the field before the photometry:

1. a first fit of every source with the file's PRF models the neighbours of the stars;
2. the effective PRF is measured from isolated stars (`mbphot.engine.epsf.measure_prf`:
   registered, neighbours subtracted, normalised to total flux with the file's wings), with
   the common offset of the light from the catalogue; with too few stars the file's PRF is
   kept and the calibration says why;
3. for a band whose flux calibration counts light out to a wide aperture
   (`Band.calibration_radius_arcsec`: IRAC), the PRF's radial profile out to that radius is
   measured from every bright point source of the section at once (`_refine_profile`,
   `mbphot.engine.wings`), with the sky map corrected for the diffuse light of the wings it
   holds; then the stars' PRF is measured again against that sky, with the corrected PRF as
   its prior, and the profile again. Stars alone cannot measure wings a few per cent of the
   flux spread over a 12" radius; a PRF without them fits every flux several per cent low;
4. how the PRF changes across the section, from the residuals of its bright point sources
   around their fit with the mean PRF (`mbphot.engine.variation`: the mix of rolls of a
   mosaic's frames changes across it); where it measurably does, a few variants of the PRF,
   and a map of which holds where, which every later fit and the photometry use;
5. a fit with that PRF (and its variants), at the offset positions, bright sources moved onto
   their light (at most `POSITION_PRIOR_ARCSEC`; how far the brightest move gives the catalogue's
   position error, the prior of every later move), leaves the residual image; for a mosaic
   resampled from larger pixels (`Band.resampled_noise`: IRAC), its autocovariance gives the factor
   ``noise_scale`` by which the true flux error exceeds the white-noise one
   (`mbphot.engine.calibrate.correlated_noise_scale`: correlated noise, unresolved faint
   sources); GALEX's Poisson noise is independent from pixel to pixel;
6. the scatter of the stars' PRF-fit fluxes about their aperture fluxes gives ``prf_error``,
   the fractional error every PRF-fit flux carries (`mbphot.engine.calibrate.prf_model_error`);
7. for a band with a calibration aperture, the light the fit's model of the bright point
   sources lacks within that aperture, against the ring just outside it as the instrument's
   calibration takes the sky, gives the scale ``flux_fraction`` of the PRF (`_model_flux_fraction`):
   the profile of step 3 is read against sky tiles and a sky map about as large as the
   aperture, which take up part of the outer light, differently in each field.

The engine then fits with the measured PRF at the offset positions and adds both terms to its
errors (`mbphot.engine.solve.total_variance`). Everything here is pure: arrays in, a
`Calibration` out.
"""

import json
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
from scipy import ndimage, signal
from scipy.spatial import cKDTree

from .bands import Band
from .engine.background import box_statistics, grid_to_pixels, smooth_grid, sky_and_rms_maps
from .engine.calibrate import correlated_noise_scale, excess_scatter, prf_model_error
from .engine.epsf import measure_prf, render_sources
from .engine.prf import build_prf_table
from .engine.scene import disc_images, disc_tables, scene_photometry
from .engine.solve import FLAGS, fit_quality_scale
from .engine.variation import PRFVariation, measure_variation, profile_indices
from .engine.wings import fit_radial_correction, flux_image, wing_nodes, with_radial_correction

__all__ = ["Calibration", "DEFAULT_POSITION_SCATTER_ARCSEC", "DEFAULT_PRF_ERROR", "POSITION_PRIOR_ARCSEC", "calibrate_section"]

DEFAULT_PRF_ERROR = 0.01
"""The PRF-model error assumed where too few stars measure it: a PRF known to about 1 %."""
PRF_ERROR_FLOOR = 0.005
"""The least PRF-model error: a PRF measured from tens of stars is known to about half a per
cent over its core (tests/test_epsf.py), however well its stars fit it."""
POSITION_PRIOR_ARCSEC = 0.4
"""Sources bright enough to measure their own position (`mbphot.engine.scene`) move onto their
light by at most this much: about three times the scatter of COSMOS2015 positions about IRAC
and GALEX light (0.1-0.15"), so a source is not pulled onto a neighbour."""
DEFAULT_POSITION_SCATTER_ARCSEC = 0.1
"""The catalogue's position error per axis assumed where too few bright point sources measure
it (a shallow GALEX image): the low end of the scatter above."""
NOISE_SCALE_RANGE = (0.5, 5.0)
"""Measured noise scales outside this range mean the measurement failed; they are clipped."""
_CLEAN = FLAGS["off_image"] | FLAGS["no_data"] | FLAGS["fit_failed"]
_MIN_STARS = 5
_BRIGHT_MODEL_SIGMA = 0.5
_NOISE_STAMP_HALF_SIZE = 8
_NOISE_SMOOTH_TILES = 2
"""`_noise_scale` takes out the residual's median over boxes of this many sky tiles a side,
smoothed over three boxes."""


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
    flux_fraction : float
        Fraction of a source's calibrated total flux that the PRF model holds: the bright
        point sources' PRF-fit flux over their flux in the instrument's calibration aperture
        (`Band.calibration_radius_arcsec`, sky from the ring outside it; above 1 where the
        model's outer profile holds too much light). The engine's PRF is scaled by it, so
        that fits return total fluxes. 1 where the band has no such aperture, or where too
        few sources measure it.
    pixel_error : float
        How far the PRF model is from point sources pixel by pixel, as a fraction of the
        model: with it the engine's ``rchisq`` of the brighter half of the section's bright
        point sources (S/N > 100), where the model's error outweighs the noise, is 1 at the
        median, so that ``poor_fit`` flags sources fitted worse than they are, not the PRF's
        own variation across the image. Measured with the mean PRF, which fits sources off
        the ``variation`` map.
    variant_pixel_error : float
        The same for the fit with the PRF's variants (`variation`), which fits the sources on
        its map more closely; ``pixel_error`` without variants.
    position_scatter_arcsec : float
        Scatter (per axis) of the catalogue's positions about the light: measured from how
        far the best fit moves the bright point sources (S/N > 50; their positions fitted
        jointly with every flux, `mbphot.engine.scene.scene_photometry`);
        `DEFAULT_POSITION_SCATTER_ARCSEC` where fewer than 20 are that bright. Every later
        fit, and the photometry, takes it as the prior of the positions it moves.
    neighbour_error : float
        Fractional error of the light a neighbour's model puts into a source's profile: the
        PRF's pixel error and, added in quadrature, that of a neighbour's position, whose
        scatter over the PRF's Gaussian-equivalent sigma is about how much of the neighbour's
        light in the profile it moves.
    sky_offset : float
        Median of the section's residual (data - sky - model), in image units: what the sky
        estimate left or took of the sky, with the diffuse light of the sources' far wings.
        The engine adds it to the sky.
    variation : PRFVariation or None
        How the PRF changes across the section (`mbphot.engine.variation`), measured from the
        residuals of its bright point sources after the fit with ``prf``; None where no
        change predicts them better than ``prf`` itself.
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
    flux_fraction: float = 1.0
    sky_offset: float = 0.0
    pixel_error: float = DEFAULT_PRF_ERROR
    variant_pixel_error: float = DEFAULT_PRF_ERROR
    neighbour_error: float = DEFAULT_PRF_ERROR
    position_scatter_arcsec: float = 0.0
    variation: PRFVariation | None = None

    def summary(self) -> dict:
        """The scalars, for the catalogue's provenance: the PRF's variants are counted."""
        scalars = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("prf", "variation")}
        variation = self.variation
        return scalars | {
            "oversampling": int(self.oversampling),
            "prf_variants": 0 if variation is None else int(variation.coefficients.shape[0]),
        }

    def arrays(self) -> dict:
        """Everything, as arrays and a JSON string, for `numpy.savez` (`from_arrays` reads them)."""
        arrays = {"prf": self.prf, "summary": json.dumps(self.summary())}
        if self.variation is not None:
            variation = self.variation
            arrays |= {
                "variation_coefficients": variation.coefficients, "variation_basis": variation.basis,
                "variation_cells": variation.cells,
                "variation_scalars": json.dumps({"cell_pix": variation.cell_pix, "smoothing_pix": variation.smoothing_pix,
                                                 "gain": variation.gain, "n_sources": variation.n_sources}),
            }
        return arrays

    @classmethod
    def from_arrays(cls, stored) -> "Calibration":
        """The calibration `arrays` saved (a mapping such as an open ``.npz``)."""
        known = {f.name for f in fields(cls)}
        scalars = {key: value for key, value in json.loads(str(stored["summary"])).items() if key in known}
        variation = None
        if "variation_cells" in stored:
            variation = PRFVariation(
                coefficients=stored["variation_coefficients"], basis=stored["variation_basis"],
                cells=stored["variation_cells"], **json.loads(str(stored["variation_scalars"])),
            )
        return cls(prf=stored["prf"], variation=variation, **scalars)


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
    galaxies=None,
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
    galaxies : (ndarray of int, ndarray), optional
        Resolved sources: per source of ``x``, the index of its disc size (-1 for a point
        source), and the discs' half-light radii in pixels. Every fit models them as the PRF
        convolved with their disc (`mbphot.engine.scene.extended_profiles`), as the
        photometry does; they do not measure the PRF's profile.
    """
    everything = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    max_shift_pix = POSITION_PRIOR_ARCSEC / band.pixel_scale_arcsec
    original_sky = sky

    size_bin, radii_pix = (None, None) if galaxies is None else (np.asarray(galaxies[0], dtype=np.intp), galaxies[1])
    if size_bin is not None and not (size_bin >= 0).any():
        size_bin = None

    tabulated = {}
    variation = None

    def tables(prf, oversampling):
        """The PRF's table (cores and wings), the tables of its other profiles (its variants
        across the section, then its discs: ``extended`` of `scene_photometry`) and each
        source's index into them, built once per PRF: a fit and the render of its residual
        use the same."""
        if tabulated.get("prf") is not prf or tabulated.get("variation") is not variation:
            table = build_prf_table(
                prf, oversampling, n_phase=_PHASES, enclosed_fraction=band.prf_enclosed_fraction,
                core_radius=band.calibration_core_radius_pixels,
            )
            others, variant = [], np.full(x.size, -1, dtype=np.intp)
            if variation is not None:
                others += disc_tables(list(variation.variant_prfs(prf)), oversampling, table)
                variant = variation.variant_at(x, y)
            if size_bin is not None:
                others += disc_tables(disc_images(prf, oversampling, radii_pix), oversampling, table)
            n_variants = 0 if variation is None else variation.coefficients.shape[0]
            tabulated.update(prf=prf, variation=variation, table=table, others=others,
                             profile=profile_indices(variant, size_bin, n_variants))
        return tabulated["table"], tabulated["others"], tabulated["profile"]

    def fit(prf, oversampling, fit_x, fit_y, correct_positions, sky_level=0.0, move=True, position_error_pix=None) -> _Fit:
        table, others, profile = tables(prf, oversampling)
        options = {"extended": (others, profile)} if others else {}
        result, fitted_x, fitted_y = scene_photometry(
            image, fit_x, fit_y, everything, table, band.cutout_size_pixels, sky + sky_level, sigma, fit_sky=True,
            correct_positions=correct_positions, max_shift_pix=max_shift_pix if correct_positions and move else 0.0,
            position_error_pix=position_error_pix, return_positions=True, **options,
        )
        flux, snr = np.full(x.size, np.nan), np.full(x.size, np.nan)
        clean = result.flag & _CLEAN == 0
        flux[everything] = np.where(clean, result.flux, np.nan)
        # Brightness, not the quality of the fit, picks the bright sources: the S/N of the
        # noise alone (a poor fit's error is scaled by sqrt(rchisq), `finish_measurement`).
        noise_error = result.flux_err / fit_quality_scale(result.rchisq)
        snr[everything] = np.where(clean, result.flux / noise_error, np.nan)
        return _Fit(flux, snr, fitted_x, fitted_y)

    def render(fitted: _Fit, prf, oversampling):
        """The image of a fit's sources as the engine models them: each source's core (its
        profile's) and the PRF's wings of every source."""
        table, others, profile = tables(prf, oversampling)
        known = np.nan_to_num(fitted.flux, nan=0.0)
        model = np.zeros(image.shape)
        for index, core in enumerate([table, *others], start=-1):
            if (profile == index).any():
                model += render_sources(image.shape, fitted.x, fitted.y, np.where(profile == index, known, 0.0), core)
        if table.wings is not None:
            model += signal.fftconvolve(flux_image(image.shape, fitted.x, fitted.y, known), table.wings, mode="same")
        return model

    first = fit(file_prf, file_oversampling, x, y, False)
    candidates = None if stars is None or len(stars) < 2 * _MIN_STARS else np.asarray(stars)
    wing_radius = None if band.calibration_radius_arcsec is None else band.calibration_radius_arcsec / band.pixel_scale_arcsec
    # The stars' tests need their errors' true size before the PRF is known: the noise
    # between the sources barely depends on it.
    first_noise_scale = 1.0
    if band.resampled_noise:
        first_model = render(first, file_prf, file_oversampling)
        file_whole = build_prf_table(file_prf, file_oversampling, enclosed_fraction=band.prf_enclosed_fraction)
        first_noise_scale = _noise_scale(
            _inner(np.asarray(image, dtype=np.float64) - sky - first_model, file_whole, band), sigma, first_model,
            file_whole, band, x, y,
        )

    def stars_prf(prior, prior_oversampling, sky_map, fluxes, extend_wings):
        return measure_prf(
            image, sky_map, sigma, x, y, prior, prior_oversampling, candidates=candidates, fluxes=fluxes,
            wing_radius_pix=wing_radius, extend_wings=extend_wings, file_wings=wing_radius is None,
            min_snr=band.prf_star_min_snr, noise_factor=first_noise_scale,
            max_neighbour_fraction=band.prf_star_max_neighbour_fraction, min_stars=band.prf_min_stars,
        )

    measured = stars_prf(file_prf, file_oversampling, sky, first.flux, wing_radius is not None)
    oversampling = measured.oversampling
    light_x, light_y = x + measured.offset_x_pix, y + measured.offset_y_pix

    def refit(prf, sky_level=0.0, at=None):
        # From the positions a fit moved the bright sources to, they are not moved again.
        if at is None:
            return fit(prf, oversampling, light_x, light_y, True, sky_level)
        return fit(prf, oversampling, at.x, at.y, True, sky_level, move=False)

    point_like = np.ones(x.size, dtype=bool) if size_bin is None else size_bin < 0
    # The catalogue's position error, from how far the best fit moves the bright point sources
    # (their own S/N makes its noise small); then every fit moves sources by what their light
    # tells against that error, as the photometry does.
    first_moved = refit(measured.prf)
    bright_points = np.flatnonzero(point_like & (np.nan_to_num(first_moved.snr) > _SCATTER_MIN_SNR))
    position_scatter_pix = _position_scatter(first_moved.x - light_x, first_moved.y - light_y, bright_points)
    if not np.isfinite(position_scatter_pix):
        position_scatter_pix = DEFAULT_POSITION_SCATTER_ARCSEC / band.pixel_scale_arcsec
    current = fit(measured.prf, oversampling, light_x, light_y, True, position_error_pix=position_scatter_pix)
    prf = measured.prf
    # The stars' PRF, the profile from every source, then the stars' PRF again (against the
    # corrected sky, its neighbours modelled with the corrected profile, which is now its
    # prior) and the profile again. IRAC's profile is measured out to its calibration
    # aperture; a band whose PRF file has the right wings (GALEX's are the instrument's
    # measured PSFs) has its core measured, the correction falling to zero at the core's edge.
    stars_measured = measured
    outer_zero = wing_radius is None
    outer = band.calibration_core_radius_pixels if outer_zero else wing_radius
    if outer is not None and outer > _PROFILE_START * measured.fit_radius_pix:
        nodes = np.r_[0.0, wing_nodes(_PROFILE_START * measured.fit_radius_pix, outer)]
        data = np.asarray(image, dtype=np.float64) - sky
        prf, current, sky_level = _refine_profile(
            data, sigma, prf, oversampling, current, point_like, (nodes, outer_zero), band, refit, render,
            _PROFILE_ROUNDS[0],
        )
        again = stars_prf(prf, oversampling, sky + sky_level, current.flux, False)
        if not again.used_file:
            # Where the first measurement kept the file's PRF (too few stars against the
            # file's shape), its sampling was the file's; the PRF is now the stars'.
            oversampling = again.oversampling
            stars_measured = again if measured.used_file else measured
            prf, current, more = _refine_profile(
                data - sky_level, sigma, again.prf, oversampling, current, point_like, (nodes, outer_zero), band,
                lambda wider, level, at: refit(wider, sky_level + level, at), render, _PROFILE_ROUNDS[1],
            )
            sky_level = sky_level + more
        sky = sky + sky_level
    # How the PRF changes across the section, from the residuals of its bright point
    # sources; the fit with its variants is the one the errors and the quality are read from.
    whole = build_prf_table(prf, oversampling, enclosed_fraction=band.prf_enclosed_fraction)
    data = np.asarray(image, dtype=np.float64) - sky
    full_sigma = np.broadcast_to(sigma, np.shape(image))

    def pixel_error_of(fitted: _Fit, model) -> float:
        """`_pixel_error` of a fit: the PRF's share of a residual grows with brightness until
        it outweighs the noise, so its size is read where it does, on the brighter half of the
        bright points."""
        bright = np.flatnonzero(point_like & (np.nan_to_num(fitted.snr) > _PIXEL_ERROR_MIN_SNR))
        snr = np.nan_to_num(fitted.snr)[bright]
        brightest = bright[snr >= np.median(snr)] if bright.size >= 2 * _MIN_STARS else bright
        return _pixel_error(_inner(data - model, whole, band), model, full_sigma, fitted, brightest, whole,
                            measured.fit_radius_pix)

    # How the PRF changes across the section, from the residuals of its bright point
    # sources; the fit with its variants is the one the errors and the quality are read from.
    # Sources beyond the section are fitted with the mean PRF: its own pixel error is kept.
    model = render(current, prf, oversampling)
    variation = measure_variation(
        data - model, sigma, current.x, current.y, current.flux,
        np.flatnonzero(point_like & (np.nan_to_num(current.snr) > _VARIATION_MIN_SNR)), prf, oversampling, file_prf,
        file_oversampling, radius_pix=measured.fit_radius_pix, cell_pix=_VARIATION_CELL_ARCSEC / band.pixel_scale_arcsec,
        scales_pix=np.asarray(_VARIATION_SCALES_ARCSEC) / band.pixel_scale_arcsec,
    )
    pixel_error = variant_pixel_error = pixel_error_of(current, model)
    if variation is not None:
        current = fit(prf, oversampling, current.x, current.y, True, move=False)
        model = render(current, prf, oversampling)
        variant_pixel_error = pixel_error_of(current, model)
    residual = _inner(data - model, whole, band)
    # The engine's sky is the map plus one number: the calibration's correction to the map, at
    # its median, and what the residual still holds.
    sky_offset = float(np.median(sky - np.broadcast_to(original_sky, np.shape(image))))
    sky_offset += float(np.nanmedian(residual)) if np.isfinite(residual).any() else 0.0
    noise_scale = _noise_scale(residual, sigma, model, whole, band, x, y) if band.resampled_noise else 1.0
    flux_fraction = 1.0
    if wing_radius is not None:
        bright_points = np.flatnonzero(point_like & (np.nan_to_num(current.snr) > _PROFILE_MIN_SNR))
        fraction = _model_flux_fraction(
            np.asarray(image, dtype=np.float64) - model, full_sigma, current.x, current.y, current.flux,
            bright_points, wing_radius, noise_scale,
        )
        flux_fraction = fraction if np.isfinite(fraction) else 1.0
    position_scatter_arcsec = position_scatter_pix * band.pixel_scale_arcsec
    prf_error = float("nan")
    if stars_measured.star_indices.size >= _MIN_STARS:
        prf_error = prf_model_error(
            image, sky, sigma, current.x, current.y, prf, oversampling, stars_measured.star_indices,
            fluxes=current.flux, noise_factor=noise_scale, floor=PRF_ERROR_FLOOR,
        )
    return Calibration(
        prf=prf,
        oversampling=int(oversampling),
        offset_x_pix=float(measured.offset_x_pix),
        offset_y_pix=float(measured.offset_y_pix),
        noise_scale=noise_scale,
        prf_error=float(prf_error) if np.isfinite(prf_error) else DEFAULT_PRF_ERROR,
        n_stars=int(stars_measured.n_stars),
        used_file=bool(stars_measured.used_file),
        reason=stars_measured.reason,
        aperture_correction=float(stars_measured.aperture_correction),
        flux_fraction=float(flux_fraction),
        sky_offset=sky_offset,
        pixel_error=pixel_error,
        variant_pixel_error=variant_pixel_error,
        neighbour_error=float(np.hypot(pixel_error, position_scatter_arcsec / (band.fwhm_arcsec / _FWHM_PER_SIGMA))),
        position_scatter_arcsec=position_scatter_arcsec,
        variation=variation,
    )



def _refine_profile(data, sigma, prf, oversampling, current: "_Fit", point_like, profile, band: Band, refit, render, rounds):
    """The PRF with its radial profile measured from the section's bright sources
    (`mbphot.engine.wings`), the correction to the sky map, and the fit with both, after
    ``rounds`` rounds of ``refit(prf, sky_correction, current)`` (a fit at the
    current fit's positions); ``render(fit, prf, oversampling)`` is the image of a fit's
    sources.

    Only ``point_like`` sources bright enough to have been moved onto their light
    (`_PROFILE_MIN_SNR`) measure the profile: around fainter ones, the residual of a
    catalogue position off the light would read as a broader PRF, and around a resolved
    galaxy fitted as a point its light would. A sky map measured between the sources holds the
    diffuse light of their wings, most where sources are bright: the sky is measured again on
    the residual once the wings are modelled (`mbphot.engine.background.sky_and_rms_maps`),
    or the wings would be measured too weak against it.
    """
    nodes, outer_zero = profile
    level = np.zeros(data.shape)
    margin = int(np.ceil(nodes[-1]))
    for _ in range(rounds):
        known = np.nan_to_num(current.flux, nan=0.0)
        residual = data - level - render(current, prf, oversampling)
        correction, _ = sky_and_rms_maps(residual, box_size=2 * band.cutout_size_pixels)
        if np.isfinite(correction).all():
            level = level + correction
            residual = residual - correction
        bright = np.where(point_like & (np.abs(np.nan_to_num(current.snr)) > _PROFILE_MIN_SNR), known, 0.0)
        values, _ = fit_radial_correction(
            residual, sigma, flux_image(data.shape, current.x, current.y, bright), nodes, 2 * band.cutout_size_pixels,
            margin=margin, outer_zero=outer_zero,
        )
        if not np.isfinite(values).all():
            break
        prf = with_radial_correction(prf, oversampling, nodes, values, outer_zero)
        current = refit(prf, level, current)
    return prf, current, level


def _position_scatter(shift_x, shift_y, sources) -> float:
    """Per-axis scatter (pixels) of the shifts that moved ``sources`` onto their light: the
    median squared shift is 2 ln 2 sigma^2 for Gaussian errors; NaN with fewer than
    `_SCATTER_MIN_SOURCES` sources."""
    squared = (shift_x**2 + shift_y**2)[sources]
    squared = squared[np.isfinite(squared)]
    if squared.size < _SCATTER_MIN_SOURCES:
        return float("nan")
    return float(np.sqrt(np.median(squared) / (2.0 * np.log(2.0))))


def _pixel_error(residual, model, sigma, fitted, sources, table, radius_pix) -> float:
    """`Calibration.pixel_error`: the fraction epsilon of the model that, counted as noise
    with the pixel noise, makes the median over ``sources`` of the profile-weighted reduced
    chi^2 (within ``radius_pix``, as the engine's ``rchisq``) equal to 1; at least
    `PRF_ERROR_FLOOR`, `DEFAULT_PRF_ERROR` with fewer than `_MIN_STARS` sources."""
    half = int(np.ceil(radius_pix))
    offsets = np.arange(-half, half + 1)
    inside = np.hypot(offsets[:, None], offsets[None, :]) <= radius_pix
    terms = []
    for source in sources:
        col, row = int(np.rint(fitted.x[source])), int(np.rint(fitted.y[source]))
        if not (half <= row < residual.shape[0] - half and half <= col < residual.shape[1] - half):
            continue
        window = (slice(row - half, row + half + 1), slice(col - half, col + half + 1))
        profile = table.stamp_at(fitted.x[source], fitted.y[source])
        centre = table.half_size
        profile = profile[centre - half : centre + half + 1, centre - half : centre + half + 1] * inside
        r, m, s = residual[window], model[window], sigma[window]
        if not (np.isfinite(r[inside]).all() and np.isfinite(s[inside]).all()):
            continue
        terms.append((profile[inside] / profile.sum(), r[inside] ** 2, s[inside] ** 2, m[inside] ** 2))
    if len(terms) < _MIN_STARS:
        return DEFAULT_PRF_ERROR

    def median_rchisq(epsilon):
        return np.median([np.sum(p * r2 / (s2 + epsilon**2 * m2)) for p, r2, s2, m2 in terms])

    low, high = 0.0, 1.0
    if median_rchisq(PRF_ERROR_FLOOR) <= 1.0:
        return PRF_ERROR_FLOOR
    if median_rchisq(high) > 1.0:
        return high
    for _ in range(30):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if median_rchisq(middle) > 1.0 else (low, middle)
    return max(high, PRF_ERROR_FLOOR)


class _Fit(NamedTuple):
    """A calibration fit: fluxes and signal-to-noise (NaN where not measured) and the
    positions fitted, of every source of the section."""

    flux: np.ndarray
    snr: np.ndarray
    x: np.ndarray
    y: np.ndarray


_PROFILE_MIN_SNR = 20.0
_VARIATION_MIN_SNR = 30.0
_VARIATION_CELL_ARCSEC = 12.0
_VARIATION_SCALES_ARCSEC = (15.0, 25.0, 40.0, 60.0, 90.0)
"""Gaussian sigmas over which the PRF's variation may be averaged; the data choose (the
change between two rolls' mixes over 5' on the realistic field is best followed at 25")."""
_PIXEL_ERROR_MIN_SNR = 100.0
_SCATTER_MIN_SNR = 50.0
"""The point sources whose moves give the catalogue's position scatter. Above S/N 100 a 10'
GALEX section holds about 60, and on the realistic full field's deep NUV tile they read 0.081"
where those same sources scatter by 0.086" and the S/N 20-100 sources the fit moves by 0.105"
(S/N 3-20: 0.13"; catalogues place faint sources less well); its NUV flux errors were then 12 %
short (pull sd 1.13 at S/N > 10, 1.07 at 3-10). Above S/N 50 there are three times as many, and
their moves read 0.107" there (0.103" true; pull sd 1.08 and 1.04) and 0.107" for IRAC1 (0.108"
true)."""
_SCATTER_MIN_SOURCES = 20
"""Fewer sources than this give a scatter known to worse than 20 %: the default is taken."""
# The profile's first node off the centre, in units of the stars' fit radius.
_PROFILE_START = 0.25
_FWHM_PER_SIGMA = 2.3548
# The calibration's fits tabulate stamps at 1/16-pixel phases (the photometry at 1/32): the
# tables of a PRF and its discs are built at every round.
_PHASES = 17
_PROFILE_ROUNDS = (3, 2)
"""Rounds of `_refine_profile` before and after the stars' PRF is measured again."""


def _inner(residual, table, band: Band):
    """The residual a PRF's reach inside the section's edge (NaN outside), where the section
    allows: sources beyond the edge are fitted but not reported, so not in the model."""
    residual = residual.copy()
    margin = min(table.half_size, (min(residual.shape) - band.cutout_size_pixels) // 2)
    if margin > 0:
        residual[:margin], residual[-margin:], residual[:, :margin], residual[:, -margin:] = np.nan, np.nan, np.nan, np.nan
    return residual


def _noise_scale(residual, sigma, model, table, band: Band, x, y) -> float:
    """`correlated_noise_scale` of a calibration fit's residual, clipped to `NOISE_SCALE_RANGE`,
    on the pixels within the catalogue's footprint (`_beyond_catalogue`; sources at ``x``,
    ``y``) where no source's model is bright."""
    # The fit's sky tiles are not in the model: take out what is smooth on scales well above
    # theirs. (A running median over one tile also took out the noise's own power on that
    # scale, which a PRF fit with its sky tile does feel: on the realistic field's pure noise
    # it read 2.31 and 2.36 for IRAC1 and IRAC3, where fits at random positions, a sky tile
    # fitted with each, scatter 2.47 and 2.56 times their white-noise errors.)
    box = _NOISE_SMOOTH_TILES * band.cutout_size_pixels
    level, _ = box_statistics(residual, box_size=box, with_rms=False)
    rows, cols = np.arange(residual.shape[0]), np.arange(residual.shape[1])
    residual = residual - grid_to_pixels(smooth_grid(level), rows, cols, box)
    # Where sources' light is bright the residual holds the PRF model's errors (`prf_error`);
    # the PRF's core carries nearly all of a flux's information.
    core = min(table.half_size, _NOISE_STAMP_HALF_SIZE)
    centre = slice(table.half_size - core, table.half_size + core + 1)
    stamp = table.stamp_at(0.0, 0.0)[centre, centre]
    mask = (model > _BRIGHT_MODEL_SIGMA * sigma) | _beyond_catalogue(residual.shape, x, y)
    noise_scale = correlated_noise_scale(residual, sigma, stamp, mask=mask)
    return float(np.clip(noise_scale, *NOISE_SCALE_RANGE)) if np.isfinite(noise_scale) else 1.0


def _beyond_catalogue(shape, x, y) -> np.ndarray:
    """Pixels farther from every source at ``x``, ``y`` than twice the sources' median
    distance to their nearest neighbour: outside the catalogue's footprint (the corners of a
    round field's square section, a catalogue's masked areas), whose sources the image holds
    and the fit does not know. On the bench's fields these corners were an eighth of the
    section, and their unmodelled light read as correlated noise: 1.36 on the ideal field's
    white IRAC1 noise, 1.05 without them."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rows, cols = np.rint(y), np.rint(x)
    on = np.isfinite(rows) & np.isfinite(cols) & (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    if on.sum() < 2:
        return np.zeros(shape, dtype=bool)
    positions = np.column_stack([x[on], y[on]])
    nearest = cKDTree(positions).query(positions, k=2)[0][:, 1]
    empty = np.ones(shape, dtype=bool)
    empty[rows[on].astype(np.intp), cols[on].astype(np.intp)] = False
    return ndimage.distance_transform_edt(empty) > 2 * np.median(nearest)


def _model_flux_fraction(residual, sigma, x, y, fluxes, sources, radius_pix, noise_scale) -> float:
    """`Calibration.flux_fraction`: what the PRF model holds of the light the instrument's
    calibration aperture counts, from the residual (image less the model of every source)
    around the bright point ``sources``.

    Around each, the residual's sum within ``radius_pix`` less the median of the ring out to
    `_BACKGROUND_RING` times that radius (the IRAC calibration's aperture and sky annulus:
    the image's own local background, whatever the sky map holds) is the light its model
    lacks, a fraction rho of its fitted flux. Each rho has the noise of the aperture and ring
    (white noise times ``noise_scale``) and a scatter from source to source (neighbours'
    model errors, confusion), weighed as `mbphot.engine.calibrate.excess_scatter` finds it;
    their weighted mean gives the fraction 1 / (1 + rho). Only sources whose aperture flux
    has S/N above `_MIN_APERTURE_SNR` count; NaN with fewer than `_MIN_STARS` of them whose
    aperture and ring lie on data.

    This measures the scale better than the profile fit (`_refine_profile`) can: there the
    sky tiles and sky box, about as large as the aperture, take up part of the sources'
    outer light, up to 1.6 % of the flux, differently in each field (the bench's realistic
    field in three realisations: IRAC1-3 fluxes 1.3-1.7 % low in one of them), where this
    ring compares the aperture with the sky just outside it. The stars alone (5-16 reach an
    aperture S/N of 50 on a 10' IRAC section) measured it to 2-4 %.
    """
    fluxes = np.nan_to_num(np.asarray(fluxes, dtype=np.float64), nan=0.0)
    outer = int(np.ceil(_BACKGROUND_RING * radius_pix))
    offsets = np.arange(-outer, outer + 1)
    ratios, errors = [], []
    for source in sources:
        col, row = int(np.rint(x[source])), int(np.rint(y[source]))
        if not (outer <= row < residual.shape[0] - outer and outer <= col < residual.shape[1] - outer) or fluxes[source] <= 0:
            continue
        window = (slice(row - outer, row + outer + 1), slice(col - outer, col + outer + 1))
        radius = np.hypot(offsets[None, :] - (x[source] - col), offsets[:, None] - (y[source] - row))
        aperture, ring = radius <= radius_pix, (radius > radius_pix) & (radius <= _BACKGROUND_RING * radius_pix)
        values, noise = residual[window], sigma[window]
        if not (np.isfinite(values[aperture]).all() and np.isfinite(noise[aperture]).all()
                and np.isfinite(values[ring]).mean() > 0.9):
            continue
        area, ring_pixels = aperture.sum(), np.isfinite(values[ring]).sum()
        lacking = values[aperture].sum() - np.nanmedian(values[ring]) * area
        # A median of n pixels has pi / 2 times the variance of their mean.
        variance = np.sum(noise[aperture] ** 2) + 0.5 * np.pi * area**2 * np.nanmean(noise[ring] ** 2) / ring_pixels
        ratios.append(lacking / fluxes[source])
        errors.append(noise_scale * np.sqrt(variance) / fluxes[source])
    ratios, errors = np.asarray(ratios), np.asarray(errors)
    # A wide aperture gathers the noise of a thousand pixels and the light of faint
    # neighbours and unseen sources: only sources it measures well.
    measured = errors < 1.0 / _MIN_APERTURE_SNR
    if measured.sum() < _MIN_STARS:
        return float("nan")
    ratios, errors = ratios[measured], errors[measured]
    centre = np.median(ratios)
    scatter = excess_scatter(ratios - centre, errors, 0.0)
    keep = np.abs(ratios - centre) <= _CLIP_SIGMA * np.hypot(errors, scatter)
    weights = 1.0 / (errors[keep] ** 2 + scatter**2)
    lacking = float(np.sum(weights * ratios[keep]) / np.sum(weights))
    return float(np.clip(1.0 / (1.0 + lacking), *_FLUX_FRACTION_RANGE))


_BACKGROUND_RING = 2.0
"""The ring of the IRAC calibration: 10-20 native pixels around a 10-pixel aperture."""
_FLUX_FRACTION_RANGE = (0.8, 1.25)
_MIN_APERTURE_SNR = 50.0
_CLIP_SIGMA = 5.0
