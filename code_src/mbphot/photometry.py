"""Run the forced-photometry engine over a field: every band, in sky partitions, in parallel.

The field is cut into square sky partitions on a tangent-plane grid centred on the field. One
task measures one partition in every band: it reads only the image sections it needs (memory
maps), builds their sky and noise maps from small per-image background grids, and runs the
engine. The driver writes each partition's result atomically as soon as it arrives, so a
rerun, or a run resumed after Ctrl-C or a killed process, skips the finished partitions.
Tasks run in this process, in local worker processes (the default) or on a
``dask.distributed`` cluster.

The results do not depend on how the work is split. In scene mode each `SCENE_ARCMIN` cell
of the grid is one scene whatever the partition size; in source mode every target is fitted
on its own; the background grids are measured box by box. So any number of workers and any
partition size give the same catalogue, bit for bit.
"""

import functools
import hashlib
import json
import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage
from threadpoolctl import threadpool_limits
from tqdm import tqdm as text_tqdm
from tqdm.auto import tqdm

from .bands import BANDS, Band, measured_columns, quality_columns, unit_factor
from .calibration import POSITION_PRIOR_ARCSEC, Calibration, calibrate_section
from .engine import PRFTable, build_prf_table, forced_photometry
from .engine.background import box_statistics, grid_to_pixels, smooth_grid, source_mask
from .engine.scene import extended_profiles, size_sensitivity
from .engine.solve import FLAGS, Measurement
from .io import atomic_path, read_header, read_wcs
from .manifest import ImageEntry, Manifest
from .params import ENGINES, MODES, exact_label
from .resources import available_cpus, exit_with_parent
from .retrieve import load_catalog

__all__ = ["PARTITION_ARCMIN", "SCENE_ARCMIN", "band_overview", "load_prf", "measure_field"]

SCENE_ARCMIN = 6.0
"""Side of the sky cells fitted as one scene in scene mode (about 5,000 sources at COSMOS
density)."""
PARTITION_ARCMIN = 6.0
"""Default side of the sky partitions: the unit of work, of parallelism and of resuming."""
RESULTS_VERSION = 8
"""Bumped when the engine's results change, so that partitions measured before are not reused."""
CALIBRATION_VERSION = 11
"""Bumped when the calibration changes, so that images are calibrated afresh."""
SIZE_COLUMN = "flux_radius_arcsec"
"""Catalogue column of each source's half-light radius in a high-resolution image (arcsec);
where present, scene mode fits resolved sources with their PRF-convolved disc."""
HIGH_RESOLUTION_PSF_ARCSEC = 0.06
"""Half-light radius of the PSF of the image the sizes come from (HST/ACS F814W)."""
SIZE_BINS_ARCSEC = np.geomspace(0.1, 1.6, 17)
"""Edges of the bins of intrinsic half-light radius fitted with one disc each (at the bin's
geometric centre, within 9 % of any radius in the bin); smaller sources are points."""
CATALOGUE_SIZE_ERROR_DEX = 0.05
"""Assumed error of a catalogue half-light radius (12 %, as for HST/ACS sizes of galaxies a
few magnitudes above the limit): it enters the flux errors of resolved sources."""
CALIBRATION_ARCMIN = 10.0
"""Side of the largest section of an image its calibration is measured on (about 15,000
sources at COSMOS density: several hundred bright enough to measure the PRF's profile). On a
6' section the IRAC PRFs' flux scale scattered by 1-2.5 % between bands, on 10' by 1 %
(`python -m mbphot.bench`, realistic field)."""
CHUNK_SIZE = 500
"""Source mode: targets per engine call."""
STRIP_BOXES = 16
"""Rows of background boxes measured per background task."""
MAX_MASKED_FRACTION = 0.7
PROGRESS_ENV = "MBPHOT_PROGRESS"
"""Set to ``text`` (``mbphot run`` does, for its notebook kernels) to draw progress bars as
plain text on the error stream, which papermill passes on to the terminal."""
_BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_MALLOC_KEEP_BYTES = 256 * 1024**2
# The Poisson-noise smoothing (Gaussian sigma 1 pixel, truncated at 4 sigma) and the no-data
# test of GALEX zeros (a `_NO_DATA_BOX` square) read this far.
_SMOOTHING_REACH = 4
_NO_DATA_BOX = 5


def read_prf(path, band: Band) -> tuple[np.ndarray, int]:
    """A PRF file's image and its samples per image pixel.

    The sampling comes from the header: ``OVERSAMP`` if present, else the ratio of the band's
    pixel scale to ``PIXSCALE`` (arcsec per PRF sample), else the image grid itself.
    """
    with fits.open(path) as hdul:
        hdu = next(h for h in hdul if h.data is not None and h.data.ndim == 2)
        prf = np.asarray(hdu.data, dtype=np.float64)
        header = hdu.header
    if "OVERSAMP" in header:
        oversampling = int(header["OVERSAMP"])
    elif "PIXSCALE" in header:
        oversampling = max(1, int(round(band.pixel_scale_arcsec / float(header["PIXSCALE"]))))
    else:
        oversampling = 1
    return prf, oversampling


def tabulate_prf(prf, oversampling, band: Band, split_wings: bool = False, flux_fraction: float = 1.0) -> PRFTable:
    """Tabulate a PRF for the band's image grid; with ``split_wings`` (scene mode), a PRF
    reaching beyond the band's ``prf_core_radius_pixels`` is split into core stamps and a
    wing kernel. A source of unit total flux puts ``flux_fraction`` on the image (the rest
    lies beyond the PRF's reach; `mbphot.calibration.Calibration.flux_fraction`)."""
    core_radius = band.prf_core_radius_pixels if split_wings else None
    table = build_prf_table(prf, oversampling=oversampling, enclosed_fraction=band.prf_enclosed_fraction, core_radius=core_radius)
    if flux_fraction == 1.0:
        return table
    wings = None if table.wings is None else table.wings * flux_fraction
    return PRFTable(stamps=table.stamps * flux_fraction, phases=table.phases, half_size=table.half_size, wings=wings)


def load_prf(path, band: Band, split_wings: bool = False) -> PRFTable:
    """Read a PRF file and tabulate it for the band's image grid (`read_prf`, `tabulate_prf`)."""
    return tabulate_prf(*read_prf(path, band), band, split_wings)


def _derived_file(cache_dir: Path, source, suffix: str) -> Path:
    """Where something derived from the file ``source`` is cached: named for the file, its
    size and its modification time, so that a changed file is derived afresh."""
    path = Path(source).resolve()
    status = path.stat()
    digest = hashlib.sha1(f"{path}|{status.st_size}|{status.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir / f"{path.name.removesuffix('.gz').removesuffix('.fits')}_{digest}{suffix}"


# Worker processes measure many partitions of the same images: tabulate each image's PRF
# and read each header once.
@functools.lru_cache(maxsize=16)
def _calibrated(path, split_wings: bool) -> tuple[PRFTable, Calibration]:
    """An image's calibration (saved by `_calibrate_image`) and its PRF, tabulated."""
    with np.load(path) as stored:
        calibration = Calibration(prf=stored["prf"], **json.loads(str(stored["summary"])))
        band = BANDS[str(stored["band"])]
    return tabulate_prf(calibration.prf, calibration.oversampling, band, split_wings, calibration.flux_fraction), calibration


@functools.lru_cache(maxsize=16)
def _extended_tables(path, split_wings: bool, band_name: str) -> tuple[list, np.ndarray]:
    """The image's PRF convolved with exponential discs of the `SIZE_BINS_ARCSEC` radii, and
    how much a fitted flux depends on each disc's size (`size_sensitivity`)."""
    table, calibration = _calibrated(path, split_wings)
    band = BANDS[band_name]
    core_radius = band.prf_core_radius_pixels if split_wings else None
    tables = extended_profiles(calibration.prf, calibration.oversampling, size_radii_pix(band), table, core_radius)
    scale = calibration.flux_fraction
    tables = [PRFTable(t.stamps * scale, t.phases, t.half_size, None if t.wings is None else t.wings * scale) for t in tables]
    return tables, size_sensitivity(tables, size_radii_pix(band))


def size_radii_pix(band: Band) -> np.ndarray:
    """The disc half-light radius each bin of `SIZE_BINS_ARCSEC` is fitted with, in ``band``'s
    pixels: the bin's geometric centre."""
    return np.sqrt(SIZE_BINS_ARCSEC[:-1] * SIZE_BINS_ARCSEC[1:]) / band.pixel_scale_arcsec


def size_bins(catalog: pd.DataFrame) -> np.ndarray:
    """Each source's bin of `SIZE_BINS_ARCSEC` by its intrinsic half-light radius, -1 for a
    point source or where the catalogue has no `SIZE_COLUMN`.

    The column is a half-light radius measured at high resolution (HST/ACS-like); the
    intrinsic radius is sqrt(r^2 - r_psf^2), r_psf = `HIGH_RESOLUTION_PSF_ARCSEC`.
    """
    if SIZE_COLUMN not in catalog:
        return np.full(len(catalog), -1, dtype=np.intp)
    measured = catalog[SIZE_COLUMN].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        intrinsic = np.sqrt(np.clip(measured**2 - HIGH_RESOLUTION_PSF_ARCSEC**2, 0.0, None))
        index = np.searchsorted(SIZE_BINS_ARCSEC, intrinsic, side="right") - 1
    resolved = np.isfinite(intrinsic) & (intrinsic >= SIZE_BINS_ARCSEC[0])
    return np.where(resolved, np.minimum(index, SIZE_BINS_ARCSEC.size - 2), -1).astype(np.intp)


@functools.lru_cache(maxsize=64)
def _cached_header(path) -> fits.Header:
    return read_header(path)


def _read_map(path, section) -> np.ndarray:
    """A section of an image as float64, read through a memory map: only its pages are read.

    Slicing the memory-mapped array is much faster than astropy's ``section``, which reads
    row by row; scaled integer images (BSCALE/BZERO), which astropy would scale whole, and
    compressed files still go through ``section``.
    """
    with fits.open(path, memmap=True) as hdul:
        hdu = hdul[0]
        scaled = "BSCALE" in hdu.header or "BZERO" in hdu.header
        if scaled or str(path).endswith(".gz"):
            return np.array(hdu.section[section], dtype=np.float64)
        return np.array(hdu.data[section], dtype=np.float64)


def _read_in_band_unit(path, band: Band, section) -> np.ndarray:
    """A section of a map in the band's image unit: converted from the file's ``BUNIT`` where
    it is another known unit (`mbphot.bands.unit_factor`, e.g. uJy per pixel); as it is when
    ``BUNIT`` is empty, the band's, or unknown (files mode refuses unknown units up front)."""
    values = _read_map(path, section)
    bunit = str(_cached_header(path).get("BUNIT", "")).strip()
    factor = unit_factor(bunit, band) if bunit else None
    if factor is not None and factor != 1.0:
        values *= factor
    return values


def _read_image(path, band: Band, section=(slice(None), slice(None))) -> np.ndarray:
    """An image, or a section of it, as float64 with NaN for no data.

    GALEX intensity maps are exactly zero where the detector saw nothing (outside the field
    of view), but a pixel of a shallow tile can also hold zero counts: only zeros in a
    `_NO_DATA_BOX` square of zeros are no data. (Where the effective-exposure map exists,
    `_read_section` also takes its zeros as no data.) At the Medium Imaging Survey's depth
    about 40 % of FUV sky pixels are zero, and 25 zero neighbours by chance happen once in
    1e10 pixels.
    """
    image = _read_in_band_unit(path, band, section)
    if band.instrument == "GALEX":
        zero = image == 0
        # Outside the image counts as no data, so a section's edge within an image can only
        # err on its outer `_NO_DATA_BOX - 1` pixels, which sections read as padding.
        structure = np.ones((_NO_DATA_BOX, _NO_DATA_BOX), dtype=bool)
        eroded = ndimage.binary_erosion(zero, structure, border_value=1)
        image[ndimage.binary_dilation(eroded, structure) & zero] = np.nan
    return image


def peak_rss_gb() -> float:
    """Peak resident memory of this process's own address space.

    Linux's VmHWM restarts when a spawned worker executes Python afresh; ``ru_maxrss`` would
    carry over the parent's peak from the moment of the fork.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# ---------------------------------------------------------------------------------------------
# Background grids: sky level and pixel noise per box of each image, measured strip by strip.


@dataclass(frozen=True)
class _BackgroundPlan:
    """What an image needs: a sky grid (no archive sky map), a noise grid (no uncertainty or
    exposure map), and where both are cached."""

    entry: ImageEntry
    band: Band
    need_sky: bool
    need_rms: bool
    path: Path

    @property
    def box_size(self) -> int:
        return 2 * self.band.cutout_size_pixels

    @property
    def mask_radius_pixels(self) -> float:
        return 1.5 * self.band.fwhm_arcsec / self.band.pixel_scale_arcsec


@dataclass
class _StripTask:
    plan: _BackgroundPlan
    first_row: int
    stop_row: int
    x: np.ndarray
    y: np.ndarray
    rough: tuple | None = None


def _strip_statistics(task: _StripTask):
    """Worker: box statistics of one strip of rows, with sources (or, given ``rough`` sky and
    noise grids, detected pixels) masked. Returns the grid rows, the masked pixel count and
    the CPU seconds spent."""
    started = time.process_time()
    plan = task.plan
    band = plan.band
    header = _cached_header(plan.entry.image)
    ny, nx = header["NAXIS2"], header["NAXIS1"]
    reach = int(np.ceil(plan.mask_radius_pixels))
    low, high = max(0, task.first_row - reach), min(ny, task.stop_row + reach)
    section = (slice(low, high), slice(None))
    image = _read_image(plan.entry.image, band, section)
    if task.rough is None:
        mask = source_mask(image.shape, task.x, task.y - low, plan.mask_radius_pixels)
    else:
        rough_sky, rough_rms = (grid_to_pixels(g, np.arange(low, high), np.arange(nx), plan.box_size) for g in task.rough)
        detected_row, detected_col = np.nonzero(image > rough_sky + 2.5 * rough_rms)
        mask = source_mask(image.shape, detected_col, detected_row, band.fwhm_arcsec / band.pixel_scale_arcsec)
    inner = slice(task.first_row - low, task.stop_row - low)
    sky_file = None if plan.entry.sky is None else _read_in_band_unit(
        plan.entry.sky, band, (slice(task.first_row, task.stop_row), slice(None))
    )
    median, rms = box_statistics(image[inner], mask[inner], sky_file, plan.box_size, with_rms=plan.need_rms)
    return median, rms, int(mask[inner].sum()), time.process_time() - started


def _rough_strip_statistics(task: _StripTask):
    """Worker: box statistics of one strip with nothing masked (first pass where the
    catalogue covers most pixels)."""
    started = time.process_time()
    plan = task.plan
    image = _read_image(plan.entry.image, plan.band, (slice(task.first_row, task.stop_row), slice(None)))
    return (*box_statistics(image, box_size=plan.box_size), 0, time.process_time() - started)


def _background_grids(plans, positions, run):
    """Measure and cache the sky and noise grids of every image that needs them.

    ``positions[image]`` holds the pixel (x, y) of every catalogue source on that image;
    ``run(function, tasks)`` yields ``(task, result)`` pairs in any order. Returns the CPU
    seconds spent per band.
    """
    cpu_s = {}
    todo = [plan for plan in plans if (plan.need_sky or plan.need_rms) and not plan.path.is_file()]
    if not todo:
        return cpu_s

    def strips(plan, rough=None):
        header = _cached_header(plan.entry.image)
        step = STRIP_BOXES * plan.box_size
        x, y = positions[plan.entry.image]
        reach = np.ceil(plan.mask_radius_pixels) + 1
        for first in range(0, header["NAXIS2"], step):
            stop = min(header["NAXIS2"], first + step)
            near = (y >= first - reach) & (y < stop + reach)
            yield _StripTask(plan, first, stop, x[near], y[near], rough)

    def gather(function, tasks):
        rows = {}
        for task, result in run(function, tasks):
            rows.setdefault(task.plan.path, {})[task.first_row] = result
            cpu_s[task.plan.band.name] = cpu_s.get(task.plan.band.name, 0.0) + result[-1]
        return {path: [rows[path][first] for first in sorted(rows[path])] for path in rows}

    measured = gather(_strip_statistics, [task for plan in todo for task in strips(plan)])
    crowded = []
    for plan in todo:
        header = _cached_header(plan.entry.image)
        masked = sum(result[2] for result in measured[plan.path])
        if masked > MAX_MASKED_FRACTION * header["NAXIS1"] * header["NAXIS2"]:
            crowded.append(plan)
    if crowded:
        # At GALEX resolution the catalogue covers almost every pixel: mask what is detected
        # above a rough, unmasked background instead.
        rough = gather(_rough_strip_statistics, [task for plan in crowded for task in strips(plan)])
        rough_grids = {
            plan.path: tuple(smooth_grid(np.vstack([r[i] for r in rough[plan.path]])) for i in (0, 1)) for plan in crowded
        }
        redone = gather(_strip_statistics, [task for plan in crowded for task in strips(plan, rough_grids[plan.path])])
        measured.update(redone)
    for plan in todo:
        results = measured[plan.path]
        sky_grid = smooth_grid(np.vstack([r[0] for r in results])) if plan.need_sky else np.empty((0, 0))
        rms_grid = smooth_grid(np.vstack([r[1] for r in results])) if plan.need_rms else np.empty((0, 0))
        with atomic_path(plan.path) as temporary:
            with open(temporary, "wb") as handle:
                np.savez(handle, sky=sky_grid, rms=rms_grid, box_size=plan.box_size)
    return cpu_s


@functools.lru_cache(maxsize=64)
def _cached_grids(path):
    with np.load(path) as stored:
        return stored["sky"], stored["rms"], int(stored["box_size"])


def _read_section(plan: _BackgroundPlan, rows: slice, cols: slice) -> dict:
    """The image section and the same section of its sky, uncertainty and exposure maps."""
    entry = plan.entry
    section = (rows, cols)
    maps = {"image": _read_image(entry.image, plan.band, section)}
    for name in ("sky", "unc"):
        path = getattr(entry, name)
        maps[name] = None if path is None else _read_in_band_unit(path, plan.band, section)
    maps["exposure"] = None if entry.exposure is None else _read_map(entry.exposure, section)
    if maps["exposure"] is not None:
        with np.errstate(invalid="ignore"):
            maps["image"][~(maps["exposure"] > 0)] = np.nan
    return maps


def _sky_and_sigma(plan: _BackgroundPlan, maps: dict, rows: slice, cols: slice):
    """Sky and per-pixel noise of an image section (``maps`` from `_read_section`, padded by
    `_SMOOTHING_REACH` where the image allows; ``rows``/``cols`` the padded section)."""
    row_index, col_index = np.arange(rows.start, rows.stop), np.arange(cols.start, cols.stop)
    if plan.need_sky or plan.need_rms:
        sky_grid, rms_grid, box_size = _cached_grids(plan.path)
    image = maps["image"]
    sky = maps["sky"] if maps["sky"] is not None else grid_to_pixels(sky_grid, row_index, col_index, box_size)
    if maps["unc"] is not None:
        sigma = maps["unc"]
    elif maps["exposure"] is not None:
        sigma = _poisson_sigma(image, sky, maps["exposure"])
    else:
        rms = grid_to_pixels(rms_grid, row_index, col_index, box_size)
        if plan.band.instrument == "GALEX":
            exposure_s = float(_cached_header(plan.entry.image).get("EXPTIME", np.inf))
            sigma = np.sqrt(rms**2 + np.clip(image - sky, 0, None) / exposure_s)
        else:
            sigma = rms
    return sky, sigma


def _poisson_sigma(intensity, sky, exposure_s):
    """Poisson noise of a count-rate image: sqrt((sky + source) / effective exposure).

    The source term uses the sky-subtracted image smoothed over about a pixel, so that noise
    in the image itself barely feeds back into its own weights.
    """
    source = ndimage.gaussian_filter(np.nan_to_num(intensity - sky), sigma=1.0, truncate=_SMOOTHING_REACH)
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma = np.sqrt((sky + np.clip(source, 0, None)) / exposure_s)
    return np.where(exposure_s > 0, sigma, np.nan)


# ---------------------------------------------------------------------------------------------
# Calibration: each image's PRF, offset, noise scale and PRF-model error, from a section of it.


@dataclass
class _CalibrationTask:
    """One image to calibrate: the section around the field, every catalogue source's pixel
    position on the image, the catalogue's stars, and where the result goes."""

    plan: _BackgroundPlan
    rows: slice
    cols: slice
    x: np.ndarray
    y: np.ndarray
    stars: np.ndarray
    size_bin: np.ndarray
    prf_path: Path
    path: Path


def _calibrate_image(task: _CalibrationTask):
    """Worker: calibrate one image (`mbphot.calibration.calibrate_section`) and save it.

    Returns the CPU seconds spent."""
    started = time.process_time()
    _warm_up()
    plan = task.plan
    maps = _read_section(plan, task.rows, task.cols)
    sky, sigma = _sky_and_sigma(plan, maps, task.rows, task.cols)
    prf, oversampling = read_prf(task.prf_path, plan.band)
    near = np.flatnonzero(
        (task.x > task.cols.start - 2 * plan.band.cutout_size_pixels) & (task.x < task.cols.stop + 2 * plan.band.cutout_size_pixels)
        & (task.y > task.rows.start - 2 * plan.band.cutout_size_pixels) & (task.y < task.rows.stop + 2 * plan.band.cutout_size_pixels)
    )
    calibration = calibrate_section(
        maps["image"], sky, sigma, task.x[near] - task.cols.start, task.y[near] - task.rows.start, prf, oversampling,
        plan.band, stars=np.flatnonzero(np.isin(near, task.stars)),
        galaxies=(task.size_bin[near], size_radii_pix(plan.band)),
    )
    with atomic_path(task.path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, prf=calibration.prf, summary=json.dumps(calibration.summary()), band=plan.band.name)
    return time.process_time() - started


def _calibration_tasks(manifest: Manifest, plans, catalog: pd.DataFrame, reuse: bool) -> tuple[dict, list]:
    """Where each image's calibration is (by image path), and the tasks of those still to do.

    The section is the field's bounding square on the image, at most `CALIBRATION_ARCMIN`
    on a side around the field's centre; the result is keyed by the image, the PRF file, the
    field and the catalogue.
    """
    ra, dec = catalog["ra"].to_numpy(dtype=np.float64), catalog["dec"].to_numpy(dtype=np.float64)
    stars = np.flatnonzero(catalog["type"].to_numpy() == 1) if "type" in catalog else np.empty(0, dtype=np.intp)
    size_bin = size_bins(catalog)
    field = manifest.field
    key = f"{field['ra']!r}|{field['dec']!r}|{field['radius_arcmin']!r}|{len(catalog)}|v{CALIBRATION_VERSION}"
    paths, tasks = {}, []
    for plan in plans:
        band = plan.band
        prf_path = manifest.prf_path(band.name)
        digest = hashlib.sha1(f"{key}|{_derived_file(Path('.'), prf_path, '')}".encode()).hexdigest()[:8]
        path = _derived_file(manifest.directory / "derived", plan.entry.image, f".{band.name}.{digest}.calibration.npz")
        paths[plan.entry.image] = path
        if reuse and path.is_file():
            continue
        header = _cached_header(plan.entry.image)
        ny, nx = header["NAXIS2"], header["NAXIS1"]
        wcs = read_wcs(header)
        x, y = (np.asarray(v, dtype=np.float64) for v in wcs.wcs_world2pix(ra, dec, 0))
        centre_x, centre_y = (float(v) for v in wcs.wcs_world2pix(field["ra"], field["dec"], 0))
        half = int(min(CALIBRATION_ARCMIN / 2, field["radius_arcmin"] + 0.5) * 60 / band.pixel_scale_arcsec)
        x0, x1 = int(np.clip(centre_x - half, 0, nx)), int(np.clip(centre_x + half + 1, 0, nx))
        y0, y1 = int(np.clip(centre_y - half, 0, ny)), int(np.clip(centre_y + half + 1, 0, ny))
        if x1 - x0 < band.cutout_size_pixels or y1 - y0 < band.cutout_size_pixels:
            x0, x1, y0, y1 = 0, nx, 0, ny
        tasks.append(_CalibrationTask(plan, slice(y0, y1), slice(x0, x1), x, y, stars, size_bin, prf_path, path))
    return paths, tasks


# ---------------------------------------------------------------------------------------------
# Partitions: every band of one square of sky.


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
    """One partition: its targets (with their scene cells) and every catalogue source near
    enough to be a neighbour, by catalogue index and sky position."""

    key: str
    ra: np.ndarray
    dec: np.ndarray
    catalog_index: np.ndarray
    target_positions: np.ndarray
    target_cells: np.ndarray
    jobs: list
    engine: str
    mode: str
    size_bin: np.ndarray


def _engine_function(engine: str, mode: str):
    """The fitting function for an engine name and mode; all share one signature."""
    if engine == "tractor":
        from .engine.tractor import tractor_photometry

        return tractor_photometry
    if mode == "scene":
        from .engine.scene import scene_photometry

        return scene_photometry
    return forced_photometry


def _groups(task: _PartitionTask, members: np.ndarray, x, y):
    """The target groups fitted together: scene cells, or spatially sorted chunks."""
    if task.mode == "scene":
        cells = task.target_cells[members]
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
        # A scene needs the pixels that constrain its edge sources' neighbours too, and its
        # sky tiles aligned on the image grid whatever the region.
        scene = task.mode == "scene"
        margin = band.cutout_size_pixels // 2 + (2 * prf.half_size + band.cutout_size_pixels if scene else 0)
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
    local_x, local_y = x - x0, y - y0
    # Targets off the whole image stay off the section, whatever the section is.
    local_x[targets[~on_image]] = np.nan
    started = time.process_time()
    options = {}
    if task.engine == "mbphot":
        options["pixel_error"] = calibration.pixel_error
        options["neighbour_error"] = calibration.neighbour_error
    if task.mode == "scene" and task.engine == "mbphot":
        options["max_shift_pix"] = POSITION_PRIOR_ARCSEC / band.pixel_scale_arcsec
        options["position_error_pix"] = calibration.position_scatter_arcsec / band.pixel_scale_arcsec
        if (task.size_bin >= 0).any():
            tables, sensitivity = _extended_tables(calibration_path, job_split, band.name)
            options["extended"] = (tables, task.size_bin)
    result = _engine_function(task.engine, task.mode)(
        padded[inner], local_x, local_y, targets, prf, band.cutout_size_pixels,
        sky=sky[inner] + calibration.sky_offset, sigma=sigma[inner], fit_sky=fit_sky,
        noise_scale=calibration.noise_scale, prf_error=calibration.prf_error, **options,
    )
    if "extended" in options:
        result = result._replace(flux_err=_with_size_error(result, sensitivity, task.size_bin[targets]))
    engine_cpu_s = time.process_time() - started
    in_ujy = result._replace(flux=result.flux * band.ujy_per_pixel_unit, flux_err=result.flux_err * band.ujy_per_pixel_unit)
    return in_ujy, engine_cpu_s, read_s


def _with_size_error(result, sensitivity, size_bin) -> np.ndarray:
    """Flux errors of resolved targets with the error their catalogue size gives the fitted
    flux (`CATALOGUE_SIZE_ERROR_DEX`; ``sensitivity`` from `_extended_tables`)."""
    fractional = np.where(size_bin >= 0, CATALOGUE_SIZE_ERROR_DEX * np.log(10.0) * sensitivity[np.maximum(size_bin, 0)], 0.0)
    return np.sqrt(result.flux_err**2 + (fractional * result.flux) ** 2)


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
    """Worker: measure one partition in every band of the task.

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
            for group in _groups(task, members, x, y):
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
    plane.wcs.crpix = [0.0, 0.0]
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


# ---------------------------------------------------------------------------------------------
# Executors: this process, local worker processes, or a dask cluster.


@contextmanager
def _executor(n_workers: int, client):
    """Yield ``run(function, tasks)``, which yields ``(task, result)`` as results arrive."""
    if client is not None:
        from distributed import as_completed as dask_completed

        def run(function, tasks):
            futures = {client.submit(function, task, pure=False): task for task in tasks}
            for future in dask_completed(futures):
                yield futures[future], future.result()

        yield run
    elif n_workers == 1:

        def run(function, tasks):
            for task in tasks:
                yield task, function(task)

        # One BLAS thread, as in the workers, so that any split of the work sums alike.
        with threadpool_limits(limits=1):
            yield run
    else:
        context = multiprocessing.get_context("spawn")
        # Workers die with this process, however it ends (kill -9, a dead kernel).
        with _worker_environment(), ProcessPoolExecutor(
            n_workers, mp_context=context, initializer=exit_with_parent, initargs=(os.getpid(),)
        ) as pool:

            def run(function, tasks):
                futures = {pool.submit(function, task): task for task in tasks}
                for future in as_completed(futures):
                    yield futures[future], future.result()

            yield run


@contextmanager
def _worker_environment():
    """The environment the local worker processes inherit.

    One BLAS thread each, so that processes do not fight over the cores (two workers with two
    BLAS threads each ran five times slower here). And glibc keeps freed memory up to 256 MB
    for reuse instead of returning every large temporary array to the system: the engine
    allocates and frees such arrays for every scene, and the page faults of fresh memory cost
    about 5 % of its time. Settings the user made are kept.
    """
    saved = {name: os.environ.get(name) for name in (*_BLAS_THREAD_VARIABLES, *_MALLOC_VARIABLES)}
    os.environ.update({name: "1" for name in _BLAS_THREAD_VARIABLES})
    for name in _MALLOC_VARIABLES:
        os.environ.setdefault(name, str(_MALLOC_KEEP_BYTES))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _progress_bar(**options):
    """A progress bar with the time left: a notebook widget, or text for a headless run."""
    if os.environ.get(PROGRESS_ENV) == "text":
        # Each redraw becomes a line once papermill relays it: redraw every 10 s at most.
        return text_tqdm(file=sys.stderr, mininterval=10, **options)
    return tqdm(**options)


def _connect(scheduler):
    """A dask client from a client, a scheduler address, or None for local processes."""
    if scheduler is None or not isinstance(scheduler, str):
        return nullcontext(scheduler)
    from distributed import Client

    return Client(scheduler)


# ---------------------------------------------------------------------------------------------


def measure_field(
    manifest: Manifest,
    bands,
    n_workers=None,
    progress=True,
    reuse=True,
    sky="auto",
    engine="mbphot",
    mode="scene",
    partition_arcmin=PARTITION_ARCMIN,
    scene_arcmin=SCENE_ARCMIN,
    client=None,
) -> pd.DataFrame:
    """Forced photometry of every catalogue source inside the field, in each band.

    Parameters
    ----------
    manifest : Manifest
        The retrieved field.
    bands : list of str
        Bands to measure.
    n_workers : int, optional
        Local worker processes (default: one per core this process may use,
        `mbphot.resources.available_cpus`); 1 runs in this process. Ignored when
        ``client`` is given.
    progress : bool
        Show a progress bar over partitions, with the time left.
    reuse : bool
        Reuse partitions measured by an earlier (or interrupted) run on the same field with
        the same sky, engine, mode and partition grid, and the cached background grids.
    sky : {"auto", "map", "fit"}
        ``"map"`` subtracts the sky map (the archive's, else the source-masked background
        map); ``"fit"`` also fits a constant sky in every cutout-sized tile, with the
        fluxes, so that its error enters theirs; ``"auto"`` (default) is ``"fit"``. On the
        simulated IRAC field the source-masked map alone leaves PRF wings of unmasked sources
        in the sky and biases faint fluxes low by about 15 %, which the fitted constant
        removes (see ``tests/test_photometry.py``); the GALEX pipeline's sky maps carry
        large-scale errors of several per cent, which bias faint fluxes the same way.
    engine : {"mbphot", "tractor"}
        The fitting engine; The Tractor must be importable. It fits one cutout at a time,
        so it always runs in source mode.
    mode : {"scene", "source"}
        ``"scene"``: all sources of a ``scene_arcmin`` cell fitted together; ``"source"``:
        each target in its own cutout with its neighbours. Both give the same accuracy
        against the truth (``python -m mbphot.bench``); scene mode is the default because it
        is 6 times faster end to end (1e5 sources in six bands: 35 s against 214 s on 2 cores).
    partition_arcmin : float
        Side of the square sky partitions (in scene mode a whole multiple of
        ``scene_arcmin``). Smaller partitions lose less work to an interruption.
    scene_arcmin : float
        Side of the cells fitted as one scene in scene mode.
    client : distributed.Client or str, optional
        Run the partitions on this dask cluster (a client, or a scheduler address such as
        ``"tcp://10.0.0.5:8786"``); the images must be readable by its workers.

    Returns
    -------
    pandas.DataFrame
        The catalogue rows inside the field with, per band, ``<band>_flux_ujy``,
        ``<band>_flux_err_ujy`` (microJy) and ``<band>_flag`` (see `mbphot.engine.FLAGS`;
        sources that no image covers get the ``off_image`` flag and NaN).
        ``attrs["engine_cpu_s"]``, ``attrs["task_cpu_s"]`` and ``attrs["background_cpu_s"]``
        hold, per band measured in this call, the CPU seconds spent inside the engine, in the
        whole partition tasks (reading, sky and noise, fitting) and in measuring the
        background grids; ``attrs["read_s"]`` the seconds the tasks spent reading image
        sections; ``attrs["startup_cpu_s"]`` the CPU seconds the worker processes took to load
        the engine's compiled kernels; ``attrs["worker_peak_rss_gb"]`` the largest peak
        resident memory of the processes that measured; ``attrs["partitions"]`` the number of
        partitions and how many were reused (for benchmarks).
    """
    if sky not in ("auto", "map", "fit"):
        raise ValueError(f"sky must be 'auto', 'map' or 'fit', got {sky!r}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if engine == "tractor":
        mode = "source"
    ratio = partition_arcmin / scene_arcmin
    if not partition_arcmin > 0 or (mode == "scene" and (abs(ratio - round(ratio)) > 1e-9 or ratio < 1 - 1e-9)):
        raise ValueError(
            f"partition_arcmin={partition_arcmin} must be a positive whole multiple of scene_arcmin={scene_arcmin}, "
            f"so that partitions never cut a scene; try partition_arcmin={scene_arcmin}"
        )
    catalog = load_catalog(manifest)
    size_bin = size_bins(catalog)
    targets = np.flatnonzero(catalog["in_field"].to_numpy())
    ra, dec = catalog["ra"].to_numpy(dtype=np.float64), catalog["dec"].to_numpy(dtype=np.float64)
    bands = [BANDS[name] for name in bands]
    run_dir = (
        manifest.directory / "photometry"
        / f"v{RESULTS_VERSION}_{engine}_{mode}_sky-{sky}_p{exact_label(partition_arcmin, 'g')}"
        f"_c{exact_label(scene_arcmin, 'g')}"
    )

    xi, eta = _tangent_plane_arcmin(ra, dec, manifest.field["ra"], manifest.field["dec"])
    part_col = np.floor(xi[targets] / partition_arcmin).astype(np.int64)
    part_row = np.floor(eta[targets] / partition_arcmin).astype(np.int64)
    cell = (np.floor(eta[targets] / scene_arcmin) * 100_003 + np.floor(xi[targets] / scene_arcmin)).astype(np.int64)
    keys = np.array([f"r{r:+d}_c{c:+d}" for r, c in zip(part_row, part_col)], dtype=str)
    partition_keys, first_target, partition_of_target = np.unique(keys, return_index=True, return_inverse=True)

    def result_path(band, key):
        return run_dir / band.name / f"{key}.parquet"

    pending = {
        key: [band for band in bands if not (reuse and result_path(band, key).is_file())] for key in partition_keys
    }
    pending = {key: todo for key, todo in pending.items() if todo}
    n_workers = n_workers or available_cpus()
    stats = {
        name: {b.name: 0.0 for b in bands}
        for name in ("engine_cpu_s", "task_cpu_s", "background_cpu_s", "calibration_cpu_s", "read_s")
    }
    stats["calibration"] = {}
    stats["rss"] = [0.0]
    stats["startup_cpu_s"] = 0.0

    if pending:
        tile_choice = pd.read_parquet(manifest.resolve(manifest.tile_choice)).set_index("id").loc[catalog["id"]]
        todo_bands = [band for band in bands if any(band in todo for todo in pending.values())]
        plans = {band.name: _plans(manifest, band) for band in todo_bands}
        split_wings = mode == "scene"
        with _connect(client) as dask_client, _executor(n_workers, dask_client) as run:
            positions = {}
            for band in todo_bands:
                for plan in plans[band.name]:
                    if (plan.need_sky or plan.need_rms) and not plan.path.is_file():
                        wcs = read_wcs(_cached_header(plan.entry.image))
                        positions[plan.entry.image] = wcs.wcs_world2pix(ra, dec, 0)
            background_cpu_s = _background_grids([plan for band in todo_bands for plan in plans[band.name]], positions, run)
            stats["background_cpu_s"].update(background_cpu_s)
            calibrations, calibration_tasks = _calibration_tasks(
                manifest, [plan for band in todo_bands for plan in plans[band.name]], catalog, reuse
            )
            for task, cpu_s in run(_calibrate_image, calibration_tasks):
                stats["calibration_cpu_s"][task.plan.band.name] += cpu_s
            tables = {
                band.name: [_calibrated(calibrations[plan.entry.image], split_wings) for plan in plans[band.name]]
                for band in todo_bands
            }
            stats["calibration"].update(
                {name: [dict(tile=plan.entry.tile, **calibration.summary()) for plan, (_, calibration) in zip(plans[name], pairs)]
                 for name, pairs in tables.items()}
            )
            halo = _halo_arcmin(todo_bands, {name: max((t for t, _ in pairs), key=lambda t: t.half_size) for name, pairs in tables.items()})
            tasks = []
            for key, todo in pending.items():
                number = np.searchsorted(partition_keys, key)
                members = np.flatnonzero(partition_of_target == number)
                row, col = part_row[first_target[number]], part_col[first_target[number]]
                near = np.flatnonzero(
                    (xi >= col * partition_arcmin - halo) & (xi < (col + 1) * partition_arcmin + halo)
                    & (eta >= row * partition_arcmin - halo) & (eta < (row + 1) * partition_arcmin + halo)
                )
                jobs = [
                    _BandJob(
                        band, [calibrations[plan.entry.image] for plan in plans[band.name]], split_wings,
                        plans[band.name], tile_choice[band.name].to_numpy()[targets[members]],
                        [sky != "map" for _ in plans[band.name]],
                    )
                    for band in todo
                ]
                tasks.append(
                    _PartitionTask(
                        key, ra[near], dec[near], near, np.searchsorted(near, targets[members]), cell[members],
                        jobs, engine, mode, size_bin[near],
                    )
                )
            bar = _progress_bar(total=len(tasks), desc="forced photometry", unit="partition", disable=not progress)
            with bar:
                for task, (results, startup_cpu_s, worker_peak_gb) in run(_measure_partition, tasks):
                    stats["startup_cpu_s"] += startup_cpu_s
                    ids = catalog["id"].to_numpy()[task.catalog_index[task.target_positions]]
                    for name, (columns, engine_cpu_s, task_cpu_s, read_s) in results.items():
                        frame = pd.DataFrame({"id": ids, **columns})
                        with atomic_path(result_path(BANDS[name], task.key)) as temporary:
                            frame.to_parquet(temporary, index=False)
                        stats["engine_cpu_s"][name] += engine_cpu_s
                        stats["task_cpu_s"][name] += task_cpu_s
                        stats["read_s"][name] += read_s
                    stats["rss"].append(worker_peak_gb)
                    bar.update(1)

    result = catalog.iloc[targets].reset_index(drop=True).drop(columns="in_field")
    for band in bands:
        parts = [pd.read_parquet(result_path(band, key)) for key in partition_keys]
        if parts:
            result = result.merge(pd.concat(parts, ignore_index=True), on="id", how="left")
        else:
            result = result.assign(**dict.fromkeys((*measured_columns(band.name), *quality_columns(band.name)), np.nan))
    for name in ("engine_cpu_s", "task_cpu_s", "background_cpu_s", "calibration_cpu_s", "read_s", "startup_cpu_s", "calibration"):
        result.attrs[name] = stats[name]
    result.attrs["worker_peak_rss_gb"] = max(stats["rss"])
    result.attrs["partitions"] = {"total": len(partition_keys), "measured": len(pending)}
    return result


def _plans(manifest: Manifest, band: Band) -> list:
    """What each image of a band needs for its sky and noise, and where its grids are cached."""
    plans = []
    for entry in manifest.images(band.name):
        grids = _derived_file(manifest.directory / "derived", entry.image, ".background.npz")
        need_rms = entry.unc is None and entry.exposure is None
        plans.append(_BackgroundPlan(entry, band, entry.sky is None, need_rms, grids))
    return plans


def band_overview(photometry: pd.DataFrame, bands) -> pd.DataFrame:
    """Per band: how many sources were measured cleanly (flag 0), flagged and detected, and
    the typical error."""
    rows = []
    for name in bands:
        flux_col, err_col, flag_col = measured_columns(name)
        good = photometry[flag_col] == 0
        snr = photometry[flux_col] / photometry[err_col]
        rows.append(
            {
                "band": name,
                "clean (flag 0)": int(good.sum()),
                "flagged": int((~good).sum()),
                "S/N > 3": int((good & (snr > 3)).sum()),
                "S/N > 10": int((good & (snr > 10)).sum()),
                "median uncertainty (uJy)": float(photometry.loc[good, err_col].median()),
            }
        )
    return pd.DataFrame(rows).set_index("band")
