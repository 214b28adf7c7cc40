"""Run the forced-photometry engine over a field: every band, in sky partitions, in parallel.

The field is cut into square sky partitions on a tangent-plane grid whose lines start at the
field circle's lower-left corner (so a field smaller than a cell is one cell, not four). One
task measures one partition in one band: it reads only the image sections it needs (memory
maps), builds their sky and noise maps from small per-image background grids, and runs the
engine. The driver writes each result atomically as soon as it arrives, so a rerun, or a run
resumed after Ctrl-C or a killed process, skips the finished partitions and bands.
Tasks run in this process, in local worker processes (the default) or on a
``dask.distributed`` cluster.

The results do not depend on how the work is split. In scene mode each cell of the grid, of
the band's `mbphot.bands.Band.scene_arcmin` side, is one scene whatever the partition size;
in source mode every target is fitted on its own; the background grids are measured box by
box. So any number of workers and any partition size give the same catalogue, bit for bit.

The concerns have a module each: `_images` reads image sections, `_prf` the PRFs,
`_background` builds the sky and noise, `_calibrate` calibrates each image, `_sizes` handles
resolved sources, `_partitions` measures one partition and `_executors` runs the tasks.
`measure_field` plans the partitions, runs them and assembles the table.
"""

import numpy as np
import pandas as pd

from ..bands import BANDS, measured_columns, quality_columns
from ..io import atomic_path, read_wcs
from ..manifest import Manifest
from ..params import ENGINES, MODES, exact_label
from ..resources import available_cpus
from ..retrieve import load_catalog
from ._background import _background_grids, _plans
from ._calibrate import _calibrate_image, _calibration_tasks
from ._executors import PROGRESS_ENV, _connect, _executor, _progress_bar, peak_rss_gb
from ._images import _cached_header
from ._partitions import _BandJob, _halo_arcmin, _measure_partition, _PartitionTask, _tangent_plane_arcmin, _warm_up
from ._prf import _calibrated, load_prf, tabulate_prf
from ._sizes import size_bins

__all__ = [
    "PARTITION_ARCMIN",
    "PROGRESS_ENV",
    "band_overview",
    "load_prf",
    "measure_field",
    "peak_rss_gb",
    "tabulate_prf",
]

PARTITION_ARCMIN = 12.0
"""Default side of the sky partitions: the unit of work, of parallelism and of resuming (a
whole multiple of every band's scene cell)."""
RESULTS_VERSION = 33
"""Bumped when the engine's results change, so that partitions measured before are not reused."""


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
    scene_arcmin=None,
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
        ``"scene"``: all sources of a scene cell fitted together; ``"source"``:
        each target in its own cutout with its neighbours. Both give the same accuracy
        against the truth (``python -m mbphot.bench``); scene mode is the default because it
        is 6 times faster end to end (1e5 sources in six bands: 35 s against 214 s on 2 cores).
    partition_arcmin : float
        Side of the square sky partitions (in scene mode a whole multiple of each band's
        scene cell). Smaller partitions lose less work to an interruption.
    scene_arcmin : float, optional
        Side of the cells fitted as one scene in scene mode, in every band. Default: each
        band's own (`mbphot.bands.Band.scene_arcmin`: 6' IRAC, 12' GALEX).
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
        sections; ``attrs["startup_cpu_s"]`` the CPU seconds this process and the workers took
        to compile or load the engine's kernels; ``attrs["worker_peak_rss_gb"]`` the largest
        peak resident memory of the processes that measured; ``attrs["partitions"]`` the
        number of partitions and how many were reused (for benchmarks).
    """
    if sky not in ("auto", "map", "fit"):
        raise ValueError(f"sky must be 'auto', 'map' or 'fit', got {sky!r}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if engine == "tractor":
        mode = "source"
    bands = [BANDS[name] for name in bands]
    scene_cells = {band.name: band.scene_arcmin if scene_arcmin is None else scene_arcmin for band in bands}
    largest_cell = max(scene_cells.values(), default=PARTITION_ARCMIN)
    if not partition_arcmin > 0:
        raise ValueError(f"partition_arcmin={partition_arcmin} must be positive; try partition_arcmin={largest_cell}")
    for name, cell_arcmin in scene_cells.items():
        ratio = partition_arcmin / cell_arcmin
        if mode == "scene" and (abs(ratio - round(ratio)) > 1e-9 or ratio < 1 - 1e-9):
            raise ValueError(
                f"partition_arcmin={partition_arcmin} must be a positive whole multiple of scene_arcmin={cell_arcmin} "
                f"(the {name} scene cell), so that partitions never cut a scene; try partition_arcmin={largest_cell}"
            )
    catalog = load_catalog(manifest)
    size_bin = size_bins(catalog)
    targets = np.flatnonzero(catalog["in_field"].to_numpy())
    ra, dec = catalog["ra"].to_numpy(dtype=np.float64), catalog["dec"].to_numpy(dtype=np.float64)
    cell_label = "band" if scene_arcmin is None else exact_label(scene_arcmin, "g")
    run_dir = (
        manifest.directory / "photometry"
        / f"v{RESULTS_VERSION}_{engine}_{mode}_sky-{sky}_p{exact_label(partition_arcmin, 'g')}_c{cell_label}"
    )

    # The grid starts at the field circle's lower-left corner: a field that fits in one cell
    # is one scene, with one margin of neighbours around it rather than four.
    xi, eta = (
        offset + manifest.field["radius_arcmin"]
        for offset in _tangent_plane_arcmin(ra, dec, manifest.field["ra"], manifest.field["dec"])
    )
    part_col = np.floor(xi[targets] / partition_arcmin).astype(np.int64)
    part_row = np.floor(eta[targets] / partition_arcmin).astype(np.int64)
    cells = {
        name: (np.floor(eta[targets] / cell_arcmin) * 100_003 + np.floor(xi[targets] / cell_arcmin)).astype(np.int64)
        for name, cell_arcmin in scene_cells.items()
    }
    # Partitions found by integer grid square, their keys formatted once each (a string per
    # source took seconds on a million).
    row0, col0 = part_row.min(initial=0), part_col.min(initial=0)
    square = (part_row - row0) * (part_col.max(initial=0) - col0 + 1) + part_col - col0
    _, first_in_square, square_of_target = np.unique(square, return_index=True, return_inverse=True)
    square_row, square_col = part_row[first_in_square], part_col[first_in_square]
    square_keys = np.array([f"r{r:+d}_c{c:+d}" for r, c in zip(square_row, square_col)], dtype=str)
    by_key = np.argsort(square_keys)
    partition_keys, partition_row, partition_col = square_keys[by_key], square_row[by_key], square_col[by_key]
    partition_of_target = np.argsort(by_key)[square_of_target.ravel()]

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
        # Compile (or load) the engine's kernels here, before any worker starts, so that the
        # workers only read numba's cache. Numba writes a cache index before its data file: a
        # worker reading in between, while another compiles, can load a data file that another
        # numba version left (an LLVM bitcode error, seen when two environments shared a tree).
        stats["startup_cpu_s"] += _warm_up()
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
            # Each partition's targets and neighbours by sorted look-ups, not a pass over the
            # whole catalogue per partition (a million sources: 100 s before any fit began).
            target_tiles = {band.name: tile_choice[band.name].to_numpy()[targets] for band in todo_bands}
            by_partition = np.argsort(partition_of_target, kind="stable")
            partition_starts = np.searchsorted(partition_of_target[by_partition], np.arange(partition_keys.size + 1))
            by_xi = np.argsort(xi, kind="stable")
            sorted_xi = xi[by_xi]
            tasks = []
            for key, todo in pending.items():
                number = np.searchsorted(partition_keys, key)
                members = by_partition[partition_starts[number] : partition_starts[number + 1]]
                row, col = partition_row[number], partition_col[number]
                start, stop = np.searchsorted(sorted_xi, [col * partition_arcmin - halo, (col + 1) * partition_arcmin + halo])
                strip = by_xi[start:stop]
                inside = (eta[strip] >= row * partition_arcmin - halo) & (eta[strip] < (row + 1) * partition_arcmin + halo)
                near = np.sort(strip[inside])
                # The partition's bands share these arrays (in this process; each task is sent alone).
                shared = ra[near], dec[near], near, np.searchsorted(near, targets[members])
                near_size_bin = size_bin[near]
                # One task per band: a field of one partition still keeps every worker busy.
                for band in todo:
                    job = _BandJob(
                        band, [calibrations[plan.entry.image] for plan in plans[band.name]], split_wings,
                        plans[band.name], target_tiles[band.name][members], [sky != "map" for _ in plans[band.name]],
                    )
                    tasks.append(
                        _PartitionTask(
                            key, *shared, {band.name: cells[band.name][members]}, [job], engine, mode, near_size_bin
                        )
                    )
            catalog_ids = catalog["id"].to_numpy()
            bar = _progress_bar(total=len(tasks), desc="forced photometry", unit="partition-band", disable=not progress)
            with bar:
                for task, (results, startup_cpu_s, worker_peak_gb) in run(_measure_partition, tasks):
                    stats["startup_cpu_s"] += startup_cpu_s
                    ids = catalog_ids[task.catalog_index[task.target_positions]]
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
