"""Calibration of each image before its partitions are measured: its PRF, offset, noise scale
and PRF-model error, from a section around the field (`mbphot.calibration.calibrate_section`),
saved beside the image's other derived files."""

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..calibration import calibrate_section
from ..io import atomic_path, read_wcs
from ..manifest import Manifest
from ._background import _BackgroundPlan, _read_section, _sky_and_sigma
from ._images import _cached_header, _derived_file
from ._partitions import _warm_up
from ._prf import read_prf
from ._sizes import size_bins, size_radii_pix

CALIBRATION_VERSION = 39
"""Bumped when the calibration changes, so that images are calibrated afresh."""
CALIBRATION_ARCMIN = 10.0
"""Side of the largest section of an image its calibration is measured on (about 15,000
sources at COSMOS density: several hundred bright enough to measure the PRF's profile). On a
6' section the IRAC PRFs' flux scale scattered by 1-2.5 % between bands, on 10' by 1 %
(`python -m mbphot.bench`, realistic field)."""


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
            np.savez(handle, **calibration.arrays(), band=plan.band.name,
                     section_origin=np.array([task.cols.start, task.rows.start]))
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
