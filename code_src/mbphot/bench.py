"""Benchmark: speed, memory and accuracy of forced photometry on simulated COSMOS fields.

``python -m mbphot.bench`` simulates fields at COSMOS density holding about 1e3, 1e4 and 1e5
sources and measures all their bands in one run, as the pipeline does. It prints and writes
to ``output/bench/summary.json``:

* per run: the photometry's wall time and source-bands per second per core end to end (worker
  start-up, background grids, image reading, fits and writing, over wall time x cores), the
  time to simulate the field, the time spent reading image sections, and peak resident memory;
* per band: source-bands per CPU second of the workers for that band (reading, sky and noise,
  fits: what one core does; the workers' one-off start-up is counted in the end-to-end figure
  only), the same inside the fitting engine alone, and the accuracy against the truth in
  signal-to-noise bins.

Each field is simulated as ``--realism`` says: ``realistic`` (the default field's effects: PRF
mismatch, real PSF sizes, astrometric noise, resolved galaxies, confusion, correlated noise,
GALEX depth and sky errors; see `mbphot.sample`), ``ideal`` (drawn with the PRF the engine
fits), or both. Accuracy is reported on unflagged sources, with the fraction flagged.

``--seeds`` measures each field in several independent realisations (the simulator's seed).
``--full`` measures a full-COSMOS-size field (48' radius, about 1.1 million sources);
``--dask-workers 1,2,4`` times a 1e5-source field (``--dask-sources``) on local dask clusters of that
many workers.
Where The Tractor imports it is compared with the mbphot engine on a small field.
"""

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .bands import BAND_NAMES, measured_columns, parse_bands
from .engine.tractor import tractor_available
from .io import write_json
from .manifest import Manifest
from .params import FULL_FIELD_RADIUS_ARCMIN, RunParameters
from .photometry import measure_field, peak_rss_gb
from .resources import available_cpus
from .retrieve import load_truth
from .sample import SOURCES_PER_ARCMIN2

__all__ = ["accuracy", "compare_with_tractor", "dask_scaling", "main", "run_size"]

DEFAULT_SIZES = (1_000, 10_000, 100_000)
SNR_BINS = {"snr_gt10": (10.0, np.inf), "snr_3_10": (3.0, 10.0)}
SEED = 2026


def accuracy(measured, true, error, flag=None) -> dict:
    """Accuracy against the truth in bins of true signal-to-noise (true flux over the
    reported error), on the sources without flags.

    Per bin: ``n`` unflagged sources, ``flagged_frac`` the fraction of the bin's sources that
    carry any flag (those with a reported error), ``median_frac_bias`` and
    ``robust_frac_scatter`` of (measured - true) / true, ``pull_std`` the plain standard
    deviation of (measured - true) / error and ``pull_std_robust`` its 1.4826 MAD.
    """
    flag = np.zeros(np.shape(measured), dtype=int) if flag is None else np.asarray(flag)
    result = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = true / error
    for name, (low, high) in SNR_BINS.items():
        in_bin = np.isfinite(snr) & (snr > low) & (snr <= high)
        selected = in_bin & np.isfinite(measured) & (flag == 0)
        fractional = (measured[selected] - true[selected]) / true[selected]
        pull = (measured[selected] - true[selected]) / error[selected]
        any_selected = bool(selected.any())
        median = float(np.median(fractional)) if any_selected else float("nan")
        pull_median = float(np.median(pull)) if any_selected else float("nan")
        result[name] = {
            "n": int(selected.sum()),
            "flagged_frac": float((flag[in_bin] != 0).mean()) if in_bin.any() else float("nan"),
            "median_frac_bias": median,
            "robust_frac_scatter": float(1.4826 * np.median(np.abs(fractional - median))) if any_selected else float("nan"),
            "pull_std": float(np.std(pull)) if any_selected else float("nan"),
            "pull_std_robust": float(1.4826 * np.median(np.abs(pull - pull_median))) if any_selected else float("nan"),
        }
    return result


def _field_parameters(
    n_sources: int, data_dir: Path, realism: str, radius_arcmin: float | None = None, seed: int = SEED
) -> RunParameters:
    if radius_arcmin is None:
        radius_arcmin = round(float(np.sqrt(n_sources / (np.pi * SOURCES_PER_ARCMIN2))), 3)
    return RunParameters(radius_arcmin=radius_arcmin, seed=seed, data_dir=str(data_dir), realism=realism)


def _simulate(params: RunParameters) -> tuple[Manifest, float, float]:
    """Simulate (or reuse) a field in a child process, so that this process's memory is the
    photometry's alone. Returns the manifest, the seconds it took and the largest peak memory
    (GB) of any child process so far."""
    started = time.perf_counter()
    script = (
        "from mbphot.params import RunParameters; from mbphot.retrieve import retrieve; "
        f"retrieve(RunParameters(radius_arcmin={params.radius_arcmin!r}, seed={params.seed}, "
        f"data_dir={params.data_dir!r}, realism={params.realism!r}), progress=False)"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    simulate_s = time.perf_counter() - started
    children_peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    return Manifest.load(params.manifest_path), simulate_s, children_peak_gb


def run_size(
    n_sources: int, bands, cores: int, data_dir: Path, mode: str = "scene", radius_arcmin=None, realism: str = "realistic",
    seed: int = SEED,
) -> dict:
    """Simulate a field with about ``n_sources`` sources inside it (the realisation ``seed``)
    and measure all ``bands``."""
    params = _field_parameters(n_sources, data_dir, realism, radius_arcmin, seed)
    manifest, simulate_s, simulate_peak_gb = _simulate(params)
    started = time.perf_counter()
    photometry = measure_field(
        manifest, bands, n_workers=cores, progress=False, reuse=False, mode="scene" if mode == "full" else mode
    )
    wall_s = time.perf_counter() - started
    table = photometry.merge(load_truth(manifest), on="id")
    n = len(table)
    worker_peak_gb = photometry.attrs["worker_peak_rss_gb"]
    parent_peak_gb = peak_rss_gb()
    run = {
        "n_sources": n,
        "mode": mode,
        "realism": realism,
        "seed": seed,
        "cores": cores,
        "radius_arcmin": params.radius_arcmin,
        "simulate_s": simulate_s,
        "simulate_peak_rss_gb": simulate_peak_gb,
        "wall_s": wall_s,
        "read_s": sum(photometry.attrs["read_s"].values()),
        "worker_startup_cpu_s": photometry.attrs["startup_cpu_s"],
        "source_bands_per_s_per_core": n * len(bands) / wall_s / cores,
        "peak_rss_gb": max(worker_peak_gb, parent_peak_gb),
        "peak_rss_all_processes_gb": parent_peak_gb + cores * worker_peak_gb,
        "bands": {},
    }
    for band in bands:
        flux_col, err_col, flag_col = measured_columns(band)
        worker_cpu_s = photometry.attrs["task_cpu_s"][band] + photometry.attrs["background_cpu_s"][band]
        run["bands"][band] = {
            "source_bands_per_s_per_core": n / worker_cpu_s,
            "engine_source_bands_per_cpu_s": n / photometry.attrs["engine_cpu_s"][band],
            "worker_cpu_s": worker_cpu_s,
            "read_s": photometry.attrs["read_s"][band],
            **accuracy(
                table[flux_col].to_numpy(), table[f"true_{band}_flux_ujy"].to_numpy(), table[err_col].to_numpy(),
                table[flag_col].to_numpy(),
            ),
        }
    return run


def dask_scaling(
    n_sources: int, bands, worker_counts, data_dir: Path, realism: str = "realistic", seed: int = SEED
) -> list:
    """Photometry wall time of one field on local dask clusters of each number of workers."""
    from distributed import Client, LocalCluster

    manifest, _, _ = _simulate(_field_parameters(n_sources, data_dir, realism, seed=seed))
    results = []
    for n_workers in worker_counts:
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            with Client(cluster) as client:
                started = time.perf_counter()
                photometry = measure_field(manifest, bands, progress=False, reuse=False, client=client)
                wall_s = time.perf_counter() - started
        results.append({"n_sources": len(photometry), "workers": n_workers, "wall_s": wall_s})
        print(f"dask, {n_workers} worker(s): {len(photometry)} sources x {len(bands)} bands in {wall_s:.1f} s", flush=True)
    return results


def compare_with_tractor(
    n_sources: int, bands, data_dir: Path, realism: str = "realistic", seed: int = SEED
) -> dict:
    """The Tractor and the mbphot engine on the same field of about ``n_sources`` sources.

    Both run in this process, in source mode, on the same cutouts, neighbours, sky and noise;
    the speed-up is the ratio of CPU seconds spent inside the two engines.
    """
    manifest, _, _ = _simulate(_field_parameters(n_sources, data_dir, realism, seed=seed))
    native = measure_field(manifest, bands, n_workers=1, progress=False, reuse=False, mode="source")
    tractor = measure_field(manifest, bands, n_workers=1, progress=False, reuse=False, engine="tractor")
    ratios, n_source_bands = [], 0
    for band in bands:
        flux_col, err_col, flag_col = measured_columns(band)
        good = (native[flag_col] == 0) & (tractor[flag_col] == 0)
        n_source_bands += int(good.sum())
        bright = good & (native[flux_col] > 10 * native[err_col])
        ratios.append((tractor[flux_col] / native[flux_col])[bright].to_numpy())
    return {
        "n_source_bands": n_source_bands,
        "speedup": sum(tractor.attrs["engine_cpu_s"].values()) / sum(native.attrs["engine_cpu_s"].values()),
        "median_flux_ratio": float(np.median(np.concatenate(ratios))),
    }


def _print_run(run: dict) -> None:
    print(f"\nN = {run['n_sources']} sources (radius {run['radius_arcmin']}', {run['realism']} field, "
          f"seed {run['seed']}), mode {run['mode']}, {run['cores']} cores: "
          f"photometry wall {run['wall_s']:.1f} s, {run['source_bands_per_s_per_core']:.0f} source-bands/s/core end to "
          f"end; reading image sections {run['read_s']:.1f} s; simulation {run['simulate_s']:.1f} s; peak RSS "
          f"{run['peak_rss_gb']:.2f} GB per process, {run['peak_rss_all_processes_gb']:.2f} GB all photometry "
          f"processes; simulation {run['simulate_peak_rss_gb']:.2f} GB")
    columns = f"{'n':>6s} {'flagged':>7s} {'bias':>8s} {'pull sd':>7s} {'robust':>6s}"
    print(f"  {'band':6s} {'sb/s/core':>10s} {'engine':>8s} | S/N > 10 (unflagged): {columns} | S/N 3-10: {columns}")
    for band, figures in run["bands"].items():
        cells = [
            f"{b['n']:6d} {b['flagged_frac']:7.1%} {b['median_frac_bias']:+8.4f} {b['pull_std']:7.3f} {b['pull_std_robust']:6.3f}"
            for b in (figures["snr_gt10"], figures["snr_3_10"])
        ]
        print(f"  {band:6s} {figures['source_bands_per_s_per_core']:10.0f} {figures['engine_source_bands_per_cpu_s']:8.0f} | "
              f"{'':22s}{cells[0]} | {'':10s}{cells[1]}")


def _figure(runs, path: Path) -> None:
    from matplotlib.figure import Figure

    from .plots import save_figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    speed, pulls = figure.subplots(1, 2)
    # One realisation's runs (the first seed's): the figure follows the field's size.
    runs = [r for r in runs if r["seed"] == runs[0]["seed"]]
    for (mode, realism), style in (
        (("source", "realistic"), "o-"), (("scene", "realistic"), "s--"), (("full", "realistic"), "D:"),
        (("source", "ideal"), "o:"), (("scene", "ideal"), "s:"), (("full", "ideal"), "D:"),
    ):
        mode_runs = [r for r in runs if r["mode"] == mode and r["realism"] == realism]
        if not mode_runs:
            continue
        sizes = [r["n_sources"] for r in mode_runs]
        for index, band in enumerate(mode_runs[0]["bands"]):
            speed.plot(sizes, [r["bands"][band]["source_bands_per_s_per_core"] for r in mode_runs], style,
                       color=f"C{index}", label=f"{band} ({mode}, {realism})")
            pulls.plot(sizes, [r["bands"][band]["snr_gt10"]["pull_std"] for r in mode_runs], style, color=f"C{index}")
    for axis in (speed, pulls):
        axis.set_xscale("log")
        axis.set_xlabel("sources in the field")
    speed.set_yscale("log")
    speed.set_ylabel("source-bands per worker CPU second")
    pulls.axhspan(0.9, 1.1, color="0.9")
    pulls.set_ylabel("pull standard deviation (S/N > 10)")
    speed.legend(fontsize="x-small", ncol=2)
    save_figure(figure, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mbphot.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(n) for n in DEFAULT_SIZES),
                        help="comma-separated numbers of sources, or 'none' (default %(default)s)")
    parser.add_argument("--bands", default="all", help=f"subset of {','.join(BAND_NAMES)}")
    parser.add_argument("--modes", default="source,scene", help="photometry modes to compare (default %(default)s)")
    parser.add_argument("--realism", default="realistic,ideal",
                        help="simulated fields to measure: realistic, ideal or both (default %(default)s); the "
                             "full field, dask and Tractor runs use the first")
    parser.add_argument("--seeds", default=str(SEED),
                        help="comma-separated seeds: independent realisations of each field (default %(default)s); "
                             "the full field, dask and Tractor runs use the first")
    parser.add_argument("--full", action="store_true",
                        help=f"also measure a full-COSMOS-size field ({FULL_FIELD_RADIUS_ARCMIN:g}' radius, scene mode)")
    parser.add_argument("--dask-workers", default="",
                        help="comma-separated numbers of local dask workers to time one field with, e.g. 1,2,4")
    parser.add_argument("--dask-sources", type=int, default=100_000,
                        help="sources in the field timed on dask (default %(default)s)")
    parser.add_argument("--cores", type=int, default=0, help="worker processes (default: all cores)")
    parser.add_argument("--data-dir", default="data/bench", help="where the simulated fields go (reused)")
    parser.add_argument("--output-dir", default="output/bench", help="where summary.json and the figure go")
    parser.add_argument("--tractor-sources", type=int, default=1_000,
                        help="field size for the comparison with The Tractor, where it imports (default %(default)s)")
    args = parser.parse_args(argv)
    cores = args.cores or available_cpus()
    bands = parse_bands(args.bands)
    data_dir = Path(args.data_dir)
    runs = []
    sizes = [] if args.sizes == "none" else [int(float(n)) for n in args.sizes.split(",")]
    realisms = args.realism.split(",")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    for realism in realisms:
        for seed in seeds:
            for n_sources in sizes:
                for mode in args.modes.split(","):
                    runs.append(run_size(n_sources, bands, cores, data_dir, mode=mode, realism=realism, seed=seed))
                    _print_run(runs[-1])
    if args.full:
        runs.append(run_size(0, bands, cores, data_dir, mode="full", radius_arcmin=FULL_FIELD_RADIUS_ARCMIN,
                             realism=realisms[0], seed=seeds[0]))
        _print_run(runs[-1])
    summary = {"runs": runs, "tractor": None}
    if args.dask_workers:
        summary["dask_scaling"] = dask_scaling(
            args.dask_sources, bands, [int(n) for n in args.dask_workers.split(",")], data_dir, realisms[0], seeds[0]
        )
    if tractor_available():
        summary["tractor"] = compare_with_tractor(args.tractor_sources, bands, data_dir, realisms[0], seeds[0])
        print(f"\nThe Tractor on the same {summary['tractor']['n_source_bands']} source-bands: mbphot is "
              f"{summary['tractor']['speedup']:.0f}x faster; median flux ratio Tractor/mbphot (S/N > 10) "
              f"{summary['tractor']['median_flux_ratio']:.4f}")
    else:
        print("\nThe Tractor is not importable here: no comparison with it")
    output_dir = Path(args.output_dir)
    write_json(output_dir / "summary.json", summary)
    _figure(runs, output_dir / "speed_accuracy.png")
    print(f"\nwrote {output_dir / 'summary.json'} and {output_dir / 'speed_accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
