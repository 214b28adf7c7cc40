"""Partitioned photometry: any split of the work gives the same catalogue, bit for bit, and a
killed run resumes where it stopped."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mbphot.bands import measured_columns
from mbphot.params import RunParameters
from mbphot.photometry import _partitions as partitions
from mbphot.photometry import measure_field
from mbphot.retrieve import retrieve

BANDS = ["irac1", "nuv"]
SMALL_GRID = {"scene_arcmin": 1.0}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    params = RunParameters(ra=150.05, dec=2.25, radius_arcmin=2.0, seed=11, realism="ideal",
                           data_dir=str(tmp_path_factory.mktemp("d")))
    return retrieve(params)


def _flux_columns(table):
    return {column: table[column].to_numpy() for band in BANDS for column in measured_columns(band)}


def _assert_identical(first, second):
    assert np.array_equal(first["id"].to_numpy(), second["id"].to_numpy())
    for column, values in _flux_columns(first).items():
        assert np.array_equal(values, second[column].to_numpy(), equal_nan=True), column


@pytest.fixture(scope="module")
def reference(manifest):
    table = measure_field(manifest, BANDS, n_workers=1, progress=False, reuse=False, partition_arcmin=1.0, **SMALL_GRID)
    assert table.attrs["partitions"]["total"] >= 9
    return table


def test_partition_size_and_workers_do_not_change_the_results(manifest, reference):
    coarse = measure_field(manifest, BANDS, n_workers=2, progress=False, reuse=False, partition_arcmin=3.0, **SMALL_GRID)
    assert coarse.attrs["partitions"]["total"] < reference.attrs["partitions"]["total"]
    _assert_identical(reference, coarse)


def test_source_mode_partitions_do_not_change_the_results(manifest):
    fine = measure_field(manifest, ["irac2"], n_workers=2, progress=False, reuse=False, mode="source", partition_arcmin=0.7)
    whole = measure_field(manifest, ["irac2"], n_workers=1, progress=False, reuse=False, mode="source", partition_arcmin=10)
    assert whole.attrs["partitions"]["total"] * 4 <= fine.attrs["partitions"]["total"]
    for column in measured_columns("irac2"):
        assert np.array_equal(fine[column].to_numpy(), whole[column].to_numpy(), equal_nan=True)


def test_partitions_must_not_cut_scenes(manifest):
    with pytest.raises(ValueError, match="partition_arcmin=1.5 must be a positive whole multiple of scene_arcmin=1.0"):
        measure_field(manifest, BANDS, partition_arcmin=1.5, scene_arcmin=1.0)


def test_default_scene_cells_are_the_bands_own(manifest):
    with pytest.raises(ValueError, match=r"scene_arcmin=12.0 \(the nuv scene cell\).*try partition_arcmin=12.0"):
        measure_field(manifest, BANDS, partition_arcmin=6.0)
    with pytest.raises(ValueError, match="partition_arcmin=0 must be positive; try partition_arcmin=12.0"):
        measure_field(manifest, BANDS, mode="source", partition_arcmin=0)


def test_a_field_smaller_than_a_cell_is_one_scene(manifest, monkeypatch):
    fitted = []
    fit_group = partitions._fit_group

    def counting(task, plan, *args):
        fitted.append((plan.band.name, plan.entry.tile, args[-1].size))
        return fit_group(task, plan, *args)

    monkeypatch.setattr(partitions, "_fit_group", counting)
    table = measure_field(manifest, BANDS, n_workers=1, progress=False, reuse=False, mode="scene")
    # The 4' field lies in one 6' IRAC cell and one 12' GALEX cell, wherever it is (the grid
    # starts at the field's corner): one scene per band and image tile.
    assert table.attrs["partitions"]["total"] == 1
    images = [(name, tile) for name, tile, _ in fitted]
    assert len(set(images)) == len(images)
    for name in BANDS:
        assert sum(n for band, _, n in fitted if band == name) == len(table)


def test_a_scene_keeps_only_the_pixels_and_sources_its_targets_reach():
    rng = np.random.default_rng(3)
    image = np.ones((200, 200))
    x, y = rng.uniform(-5, 205, 4000), rng.uniform(-5, 205, 4000)
    # The targets fill a circle, as a field's edge crosses its scene's square.
    targets = np.flatnonzero(np.hypot(x - 100, y - 100) < 60)
    margin, half_size = 20, 5
    cut_image, cut_x = partitions._near_targets(image, x, y, targets, margin, half_size)

    assert np.array_equal(cut_x[targets], x[targets])
    rows, cols = np.indices(image.shape)
    pixel_reach = np.full(image.shape, np.inf)
    for t in targets:
        pixel_reach = np.minimum(pixel_reach, np.maximum(abs(cols - np.rint(x[t])), abs(rows - np.rint(y[t]))))
    assert np.array_equal(np.isfinite(cut_image), pixel_reach <= margin)
    assert np.isnan(cut_image[0, 0]) and np.isfinite(cut_image[100, 100])
    target_col, target_row = np.rint(x[targets]), np.rint(y[targets])
    source_reach = np.array([np.min(np.maximum(abs(target_col - a), abs(target_row - b))) for a, b in zip(x, y)])
    assert np.all(np.isfinite(cut_x[source_reach <= margin + half_size]))
    assert np.all(np.isnan(cut_x[source_reach > margin + half_size + 1.0]))
    assert 0 < np.isnan(cut_x).sum() < x.size

    # Targets all over the section: nothing to cut.
    everywhere = np.flatnonzero((x > 0) & (x < 199) & (y > 0) & (y < 199))
    same_image, same_x = partitions._near_targets(image, x, y, everywhere, margin, half_size)
    assert same_image is image and same_x is x


def test_dask_local_cluster_gives_the_same_catalogue(manifest, reference):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=3, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            on_cluster = measure_field(
                manifest, BANDS, progress=False, reuse=False, partition_arcmin=1.0, client=client, **SMALL_GRID
            )
            workers_used = len(client.scheduler_info()["workers"])
    assert workers_used == 3
    assert on_cluster.attrs["partitions"]["measured"] == reference.attrs["partitions"]["total"]
    _assert_identical(reference, on_cluster)


def _finished(run_dir, band):
    return {path.name for path in run_dir.glob(f"{band}/*.parquet") if not path.name.startswith(".")}


def test_killed_run_resumes_and_ends_with_the_same_catalogue(manifest, reference):
    run_dir = next((manifest.directory / "photometry").glob("v*_mbphot_scene_sky-auto_p1_c1"))
    for path in run_dir.rglob("*.parquet"):
        path.unlink()
    script = textwrap.dedent(
        f"""
        from mbphot.manifest import Manifest
        from mbphot.photometry import measure_field
        manifest = Manifest.load({str(manifest.path)!r})
        measure_field(manifest, {BANDS!r}, n_workers=1, progress=False, partition_arcmin=1.0, scene_arcmin=1.0)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    total = reference.attrs["partitions"]["total"]
    deadline = time.monotonic() + 120
    while len(_finished(run_dir, "nuv")) < 3:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {band: _finished(run_dir, band) for band in BANDS}
    assert 3 <= len(finished["nuv"]) < total, "killed part way"
    # A write cut short by the kill can only leave its hidden temporary file, never a result.
    assert len([path for path in run_dir.rglob(".*") if path.is_file()]) <= 1

    resumed = measure_field(manifest, BANDS, n_workers=1, progress=False, partition_arcmin=1.0, **SMALL_GRID)
    done_before = len(finished["nuv"])
    assert resumed.attrs["partitions"]["measured"] == total - done_before, "finished partitions are not redone"
    _assert_identical(reference, resumed)


def test_a_partition_write_cut_short_leaves_no_result_under_its_final_name(manifest, reference, monkeypatch):
    """The third partition file is cut off half-way (a kill or a full disk in mid-write).

    Results are written to a temporary name and renamed when whole, so the cut file is never
    taken for a result: a rerun measures that partition again and ends with the reference.
    A writer that wrote straight to the final name would leave the half file there.
    """
    run_dir = next((manifest.directory / "photometry").glob("v*_mbphot_scene_sky-auto_p1_c1"))
    for path in run_dir.rglob("*.parquet"):
        path.unlink()
    write = pd.DataFrame.to_parquet
    written = []

    def cut_short(frame, path, *args, **kwargs):
        write(frame, path, *args, **kwargs)
        written.append(path)
        if len(written) == 3:
            whole = Path(path).read_bytes()
            Path(path).write_bytes(whole[: len(whole) // 2])
            raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", cut_short)
    with pytest.raises(OSError, match="injected"):
        measure_field(manifest, BANDS, n_workers=1, progress=False, partition_arcmin=1.0, **SMALL_GRID)
    monkeypatch.undo()
    assert sum(len(_finished(run_dir, band)) for band in BANDS) == 2, "only the two whole files count as results"

    resumed = measure_field(manifest, BANDS, n_workers=1, progress=False, partition_arcmin=1.0, **SMALL_GRID)
    _assert_identical(reference, resumed)


def test_after_the_warm_up_a_scene_fit_as_the_photometry_makes_it_compiles_nothing_more():
    """The warm-up loads every kernel signature a scene fit uses, whatever arrays it is given
    (maps or scalars, writeable or not), and those of the tables of resolved profiles: a
    signature loaded later is charged to a band."""
    script = textwrap.dedent("""\
        import numpy as np
        from numba.core.registry import CPUDispatcher
        from mbphot.engine import kernels
        from mbphot.engine.prf import build_prf_table
        from mbphot.engine.scene import disc_tables, scene_photometry
        from mbphot.photometry._partitions import _warm_up

        _warm_up()
        dispatchers = [f for f in vars(kernels).values() if isinstance(f, CPUDispatcher)]
        before = [len(f.signatures) for f in dispatchers]
        yy, xx = np.mgrid[-8:9, -8:9]
        table = build_prf_table(np.exp(-(xx**2 + yy**2) / 3.0), n_phase=5, max_half_size=4)
        winged = build_prf_table(np.exp(-(xx**2 + yy**2) / 3.0) + 0.1 * np.exp(-(xx**2 + yy**2) / 30.0), core_radius=4.0)
        for point in (table, winged):
            disc_tables([np.exp(-(xx**2 + yy**2) / 5.0)], 1, point)
        rng = np.random.default_rng(3)
        image = rng.normal(size=(40, 40))
        image.flags.writeable = False
        # A sparse field, and one as crowded as GALEX's (the variances' other path).
        for n in (12, 700):
            x, y = rng.uniform(5, 35, n), rng.uniform(5, 35, n)
            for sky, sigma in ((np.zeros((40, 40)), np.ones((40, 40))), (0.0, 1.0)):
                scene_photometry(image, x, y, np.arange(n), table, 9, sky=sky, sigma=sigma, fit_sky=True)
        print([f.__name__ for f, n in zip(dispatchers, before) if len(f.signatures) != n])
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
