"""Partitions: the bands of one square of sky, measured by one worker task.

The partitions lie on a tangent-plane grid from the field's corner; a task carries the
partition's targets and every catalogue source near enough to be a neighbour (`_halo_arcmin`).
In each band it groups the targets (the band's scene cells, or chunks in source mode), reads
the image section around each group and runs the engine on it.
"""

import functools
import time
from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS
from scipy import ndimage
from scipy.spatial import cKDTree

from ..bands import Band, measured_columns, quality_columns
from ..calibration import POSITION_PRIOR_ARCSEC
from ..engine import build_prf_table, forced_photometry
from ..engine.epsf import render_sources
from ..engine.scene import disc_tables
from ..engine.solve import FLAGS, Measurement
from ..engine.variation import profile_indices
from ..io import read_wcs
from ..params import MODES
from ._background import _SMOOTHING_REACH, _read_section, _sky_and_sigma
from ._executors import peak_rss_gb
from ._images import _cached_header
from ._prf import _calibrated, _variant_tables
from ._sizes import SIZE_PRIOR_SIGMA_BINS, _extended_tables

CHUNK_SIZE = 500
"""Source mode: targets per engine call."""


@dataclass
class _BandJob:
    """One band of a partition: the images, the tile of each target and how to fit."""

    band: Band
    calibrations: list
    split_wings: bool
    plans: list
    target_tiles: np.ndarray
    fit_sky: list


@dataclass
class _PartitionTask:
    """One partition: its targets (with their scene cells, per band) and every catalogue
    source near enough to be a neighbour, by catalogue index and sky position."""

    key: str
    ra: np.ndarray
    dec: np.ndarray
    catalog_index: np.ndarray
    target_positions: np.ndarray
    target_cells: dict
    jobs: list
    engine: str
    mode: str
    size_bin: np.ndarray


def _engine_function(engine: str, mode: str):
    """The fitting function for an engine name and mode; all share one signature."""
    if engine == "tractor":
        from ..engine.tractor import tractor_photometry

        return tractor_photometry
    if mode == "scene":
        from ..engine.scene import scene_photometry

        return scene_photometry
    return forced_photometry


def _groups(task: _PartitionTask, band: Band, members: np.ndarray, x, y):
    """The target groups fitted together: the band's scene cells, or spatially sorted chunks."""
    if task.mode == "scene":
        cells = task.target_cells[band.name][members]
        order = np.argsort(cells, kind="stable")
        starts = np.flatnonzero(np.r_[True, cells[order][1:] != cells[order][:-1]])
        return np.split(members[order], starts[1:])
    positions = task.target_positions[members]
    order = np.lexsort((x[positions], np.floor(y[positions] / 64)))
    return [members[order[i : i + CHUNK_SIZE]] for i in range(0, members.size, CHUNK_SIZE)]


def _fit_group(task, plan, prf, calibration, calibration_path, job_split, fit_sky, x, y, targets):
    """Read the section around ``targets`` (indices into x, y) and run the engine on it."""
    band = plan.band
    header = _cached_header(plan.entry.image)
    ny, nx = header["NAXIS2"], header["NAXIS1"]
    col, row = np.rint(x[targets]), np.rint(y[targets])
    on_image = (col >= 0) & (col < nx) & (row >= 0) & (row < ny)
    if not on_image.any():
        x0, x1, y0, y1 = 0, 1, 0, 1
    else:
        # A scene needs the pixels that constrain its edge sources' neighbours too (a stamp
        # overlap, and in crowded sky tiles one tile more: `Band.scene_margin_tiles`), and its
        # sky tiles aligned on the image grid whatever the region.
        scene = task.mode == "scene"
        margin = band.cutout_size_pixels // 2
        if scene:
            margin += 2 * prf.half_size + band.scene_margin_tiles * band.cutout_size_pixels
        align = band.cutout_size_pixels if scene else 1
        x0 = int(max(0, col[on_image].min() - margin)) // align * align
        x1 = int(min(nx, col[on_image].max() + margin + 1))
        y0 = int(max(0, row[on_image].min() - margin)) // align * align
        y1 = int(min(ny, row[on_image].max() + margin + 1))
    # Read a few pixels more where the image has them, so that smoothing sees what it would
    # see on the whole image.
    py0, px0 = max(0, y0 - _SMOOTHING_REACH), max(0, x0 - _SMOOTHING_REACH)
    py1, px1 = min(ny, y1 + _SMOOTHING_REACH), min(nx, x1 + _SMOOTHING_REACH)
    reading = time.perf_counter()
    maps = _read_section(plan, slice(py0, py1), slice(px0, px1))
    read_s = time.perf_counter() - reading
    padded = maps["image"]
    sky, sigma = _sky_and_sigma(plan, maps, slice(py0, py1), slice(px0, px1))
    inner = (slice(y0 - py0, y1 - py0), slice(x0 - px0, x1 - px0))
    image = padded[inner]
    local_x, local_y = x - x0, y - y0
    # Targets off the whole image stay off the section, whatever the section is.
    local_x[targets[~on_image]] = np.nan
    if task.mode == "scene" and on_image.any():
        image, local_x = _near_targets(image, local_x, local_y, targets[on_image], margin, prf.half_size)
    started = time.process_time()
    options = {}
    if task.engine == "mbphot":
        options["pixel_error"] = calibration.pixel_error
        options["neighbour_error"] = calibration.neighbour_error
    if task.mode == "scene" and task.engine == "mbphot":
        options["max_shift_pix"] = POSITION_PRIOR_ARCSEC / band.pixel_scale_arcsec
        options["position_error_pix"] = calibration.position_scatter_arcsec / band.pixel_scale_arcsec
        variants, variation, origin = _variant_tables(calibration_path, job_split)
        discs = []
        if (task.size_bin >= 0).any():
            discs = _extended_tables(calibration_path, job_split, band.name)
        if variants or discs:
            variant = -1 if variation is None else variation.variant_at(x - origin[0], y - origin[1])
            profile = profile_indices(variant, task.size_bin, len(variants))
            options["extended"] = (variants + discs, profile)
            on_map = (profile >= 0) & (profile < len(variants))
            options["pixel_error"] = np.where(on_map, calibration.variant_pixel_error, calibration.pixel_error)
            if discs:
                options["sizes"] = (len(variants), len(variants) + len(discs), SIZE_PRIOR_SIGMA_BINS)
    result = _engine_function(task.engine, task.mode)(
        image, local_x, local_y, targets, prf, band.cutout_size_pixels,
        sky=sky[inner] + calibration.sky_offset, sigma=sigma[inner], fit_sky=fit_sky,
        noise_scale=calibration.noise_scale, prf_error=calibration.prf_error, **options,
    )
    engine_cpu_s = time.process_time() - started
    in_ujy = result._replace(flux=result.flux * band.ujy_per_pixel_unit, flux_err=result.flux_err * band.ujy_per_pixel_unit)
    return in_ujy, engine_cpu_s, read_s


def _near_targets(image, x, y, targets, margin, half_size):
    """A scene's section and source positions cut to what its targets need: the pixels within
    ``margin`` of a target (the others NaN), the sources whose stamps reach them (the others'
    x NaN).

    The section is the targets' bounding box plus the margin: where the field's edge crosses
    it (a circle in a square), its corners hold pixels and sources no target is coupled to.
    """
    col = np.clip(np.rint(x[targets]).astype(np.intp), 0, image.shape[1] - 1)
    row = np.clip(np.rint(y[targets]).astype(np.intp), 0, image.shape[0] - 1)
    has_target = np.zeros(image.shape, dtype=bool)
    has_target[row, col] = True
    near = ndimage.maximum_filter(has_target, size=2 * margin + 1, mode="constant")
    if near.all():
        return image, x
    finite = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    distance, _ = cKDTree(np.column_stack([col, row])).query(
        np.column_stack([x[finite], y[finite]]), p=np.inf, distance_upper_bound=margin + half_size + 1.0
    )
    x = x.copy()
    x[finite[~np.isfinite(distance)]] = np.nan
    return np.where(near, image, np.nan), x


@functools.cache
def _tiny_fits() -> None:
    yy, xx = np.mgrid[-8:9, -8:9]
    radius2 = xx**2 + yy**2
    table = build_prf_table(np.exp(-radius2 / 2.0), n_phase=3, max_half_size=3)
    split = build_prf_table(np.exp(-radius2 / 2.0) + 0.1 * np.exp(-radius2 / 20.0), n_phase=3, core_radius=4.0)
    x, y = np.array([5.2, 9.7]), np.array([6.1, 8.4])
    for mode in MODES:
        _engine_function("mbphot", mode)(np.zeros((15, 15)), x, y, np.arange(2), table, 5, sky=0.0, sigma=1.0, fit_sky=True)
    _engine_function("mbphot", "scene")(np.zeros((15, 15)), x, y, np.arange(2), split, 5, sky=0.0, sigma=1.0, fit_sky=True)
    # Bright sources, one resolved, as the photometry fits them: the position and size steps
    # and per-source pixel errors load their kernels too, and a resolved profile's table is
    # made as the photometry makes an image's (`disc_tables`).
    wider = disc_tables([np.exp(-radius2 / 4.0)], 1, table)[0]
    bright = render_sources((15, 15), x, y, np.array([1000.0, 800.0]), table)
    _engine_function("mbphot", "scene")(
        bright, x + 0.1, y, np.arange(2), table, 5, sky=0.0, sigma=1.0, fit_sky=True, max_shift_pix=0.5,
        position_error_pix=0.1, extended=([table, wider], np.array([0, -1])), sizes=(0, 2, 0.7),
        pixel_error=np.array([0.01, 0.02]),
    )
    # Sources as crowded as GALEX's: the variances take their LAPACK path (`_local_variances`).
    crowded_x, crowded_y = np.random.default_rng(0).uniform(1.0, 13.0, (2, 90))
    _engine_function("mbphot", "scene")(
        np.zeros((15, 15)), crowded_x, crowded_y, np.arange(90), table, 5, sky=0.0, sigma=1.0, fit_sky=True
    )


def _warm_up() -> float:
    """Run the engine once on a tiny image when a process starts, so that loading its compiled
    kernels (from numba's cache) is not charged to whichever band the process measures first.
    Returns the CPU seconds it took (0 after the first call)."""
    if _tiny_fits.cache_info().currsize:
        return 0.0
    started = time.process_time()
    _tiny_fits()
    return time.process_time() - started


def _measure_partition(task: _PartitionTask):
    """Worker: measure one partition in each band of the task.

    Returns ``{band: (columns, engine_cpu_s, cpu_s, read_s)}`` over the partition's targets
    (the `Measurement` fields in microJy, by column name; CPU seconds in the engine and in the
    whole task, wall seconds reading images), the CPU seconds of the process's start-up
    (`_warm_up`) and its peak memory in GB.
    """
    startup_cpu_s = _warm_up()
    results = {}
    n_targets = task.target_positions.size
    for job in task.jobs:
        started = time.process_time()
        measured = Measurement(
            *(np.full(n_targets, np.nan) for _ in range(2)), np.full(n_targets, FLAGS["off_image"], dtype=np.int32),
            *(np.full(n_targets, np.nan) for _ in range(3)),
        )
        engine_cpu_s = read_s = 0.0
        for plan, calibration_path, fit_sky in zip(job.plans, job.calibrations, job.fit_sky):
            members = np.flatnonzero(job.target_tiles == plan.entry.tile)
            if members.size == 0:
                continue
            prf, calibration = _calibrated(calibration_path, job.split_wings)
            wcs = read_wcs(_cached_header(plan.entry.image))
            x, y = (np.asarray(v, dtype=np.float64) for v in wcs.wcs_world2pix(task.ra, task.dec, 0))
            x += calibration.offset_x_pix
            y += calibration.offset_y_pix
            for group in _groups(task, job.band, members, x, y):
                positions = task.target_positions[group]
                result, group_engine_cpu_s, group_read_s = _fit_group(
                    task, plan, prf, calibration, calibration_path, job.split_wings, fit_sky, x, y, positions
                )
                for column, values in zip(measured, result):
                    column[group] = values
                engine_cpu_s += group_engine_cpu_s
                read_s += group_read_s
        names = (*measured_columns(job.band.name), *quality_columns(job.band.name))
        columns = dict(zip(names, measured))
        results[job.band.name] = (columns, engine_cpu_s, time.process_time() - started, read_s)
    return results, startup_cpu_s, peak_rss_gb()


def _tangent_plane_arcmin(ra_deg, dec_deg, centre_ra_deg, centre_dec_deg):
    """Gnomonic offsets (arcmin) from the field centre: the partition grid's coordinates."""
    plane = WCS(naxis=2)
    plane.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    plane.wcs.crval = [centre_ra_deg, centre_dec_deg]
    # FITS counts pixels from 1: its reference pixel 1 is the 0-based pixel 0 that
    # wcs_world2pix returns for the centre.
    plane.wcs.crpix = [1.0, 1.0]
    plane.wcs.cdelt = [-1 / 60.0, 1 / 60.0]
    xi, eta = plane.wcs_world2pix(ra_deg, dec_deg, 0)
    return np.asarray(xi), np.asarray(eta)


def _halo_arcmin(bands, prfs) -> float:
    """How far beyond a partition a neighbour can matter in any band: a scene's pixel margin
    plus a stamp, with room for the difference between the grid's and an image's projection."""
    reach_arcsec = max(
        (band.cutout_size_pixels + 2 * prfs[band.name].half_size + band.cutout_size_pixels + prfs[band.name].half_size + 2)
        * band.pixel_scale_arcsec
        for band in bands
    )
    return 1.5 * reach_arcsec / 60.0 + 0.25
