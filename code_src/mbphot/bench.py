"""Benchmark: speed, memory and accuracy of forced photometry on simulated COSMOS fields.

``python -m mbphot.bench`` simulates fields at COSMOS density holding about 1e3, 1e4 and 1e5
sources, measures every band, and prints per band and in total the source-bands per second per
core (end to end: image reading, sky and noise maps, worker start-up and the fits; and, as
"engine", per CPU second spent inside the fitting engine alone), the wall time, the peak resident memory and the accuracy against the truth in
signal-to-noise bins. It writes ``output/bench/summary.json`` and a figure beside it.
"""

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .bands import BAND_NAMES, measured_columns, parse_bands
from .engine.tractor import tractor_available
from .io import write_json
from .params import RunParameters
from .photometry import measure_field
from .retrieve import load_truth, retrieve
from .sample import SOURCES_PER_ARCMIN2

__all__ = ["accuracy", "compare_with_tractor", "main", "run_size"]

DEFAULT_SIZES = (1_000, 10_000, 100_000)
SNR_BINS = {"snr_gt10": (10.0, np.inf), "snr_3_10": (3.0, 10.0)}


def _peak_rss_gb() -> float:
    """Peak resident memory of this process so far (it also simulates the fields)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def accuracy(measured, true, error) -> dict:
    """Median fractional bias, robust scatter and pull spread in true-S/N bins."""
    result = {}
    snr = true / error
    for name, (low, high) in SNR_BINS.items():
        selected = np.isfinite(measured) & (snr > low) & (snr <= high)
        fractional = (measured[selected] - true[selected]) / true[selected]
        pull = (measured[selected] - true[selected]) / error[selected]
        median = float(np.median(fractional)) if selected.any() else float("nan")
        result[name] = {
            "n": int(selected.sum()),
            "median_frac_bias": median,
            "robust_frac_scatter": float(1.4826 * np.median(np.abs(fractional - median))) if selected.any() else float("nan"),
            "pull_std": float(np.std(pull)) if selected.any() else float("nan"),
        }
    return result


def run_size(n_sources: int, bands, cores: int, data_dir: Path, mode: str = "source", seed: int = 2026) -> dict:
    """Simulate a field with about ``n_sources`` sources inside it and measure it."""
    radius_arcmin = float(np.sqrt(n_sources / (np.pi * SOURCES_PER_ARCMIN2)))
    params = RunParameters(radius_arcmin=round(radius_arcmin, 3), seed=seed, data_dir=str(data_dir))
    started = time.perf_counter()
    manifest = retrieve(params)
    simulate_s = time.perf_counter() - started
    truth = load_truth(manifest)
    shutil.rmtree(manifest.directory / "derived", ignore_errors=True)
    run = {"n_sources": 0, "mode": mode, "cores": cores, "radius_arcmin": params.radius_arcmin,
           "simulate_s": simulate_s, "bands": {}}
    total_wall = 0.0
    worker_peak_rss_gb = 0.0
    for band in bands:
        started = time.perf_counter()
        photometry = measure_field(manifest, [band], n_workers=cores, progress=False, reuse=False, mode=mode)
        wall = time.perf_counter() - started
        total_wall += wall
        worker_peak_rss_gb = max(worker_peak_rss_gb, photometry.attrs["worker_peak_rss_gb"])
        table = photometry.merge(truth, on="id")
        flux_col, err_col, _ = measured_columns(band)
        run["n_sources"] = len(table)
        run["bands"][band] = {
            "wall_s": wall,
            "source_bands_per_s_per_core": len(table) / wall / cores,
            "engine_source_bands_per_cpu_s": len(table) / photometry.attrs["engine_cpu_s"][band],
            **accuracy(table[flux_col].to_numpy(), table[f"true_{band}_flux_ujy"].to_numpy(), table[err_col].to_numpy()),
        }
    run["wall_s"] = total_wall
    run["source_bands_per_s_per_core"] = run["n_sources"] * len(bands) / total_wall / cores
    run["peak_rss_gb"] = worker_peak_rss_gb
    run["parent_peak_rss_gb"] = _peak_rss_gb()
    return run


def compare_with_tractor(n_sources: int, bands, data_dir: Path, seed: int = 2026) -> dict:
    """The Tractor and the mbphot engine on the same field of about ``n_sources`` sources.

    Both run in this process on the same cutouts, neighbours, sky and noise; the speed-up is
    the ratio of CPU seconds spent inside the two engines.
    """
    radius_arcmin = float(np.sqrt(n_sources / (np.pi * SOURCES_PER_ARCMIN2)))
    manifest = retrieve(RunParameters(radius_arcmin=round(radius_arcmin, 3), seed=seed, data_dir=str(data_dir)))
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
    print(f"\nN = {run['n_sources']} sources (radius {run['radius_arcmin']}'), mode {run['mode']}, "
          f"{run['cores']} cores: wall {run['wall_s']:.1f} s, "
          f"{run['source_bands_per_s_per_core']:.0f} source-bands/s/core, peak RSS of the photometry "
          f"processes {run['peak_rss_gb']:.2f} GB (of the parent, which also simulates, {run['parent_peak_rss_gb']:.2f} GB) "
          f"(simulation {run['simulate_s']:.1f} s)")
    print(f"  {'band':6s} {'sb/s/core':>10s} {'engine':>8s} {'wall s':>7s} | {'S/N>10: n':>9s} {'bias':>8s} {'pull sd':>7s} "
          f"| {'S/N 3-10: n':>11s} {'bias':>8s} {'pull sd':>7s}")
    for band, figures in run["bands"].items():
        high, mid = figures["snr_gt10"], figures["snr_3_10"]
        print(f"  {band:6s} {figures['source_bands_per_s_per_core']:10.0f} "
              f"{figures['engine_source_bands_per_cpu_s']:8.0f} {figures['wall_s']:7.1f} | "
              f"{high['n']:9d} {high['median_frac_bias']:+8.4f} {high['pull_std']:7.3f} | "
              f"{mid['n']:11d} {mid['median_frac_bias']:+8.4f} {mid['pull_std']:7.3f}")


def _figure(runs, path: Path) -> None:
    from matplotlib.figure import Figure

    from .plots import save_figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    speed, pulls = figure.subplots(1, 2)
    for mode, style in (("source", "o-"), ("scene", "s--")):
        mode_runs = [r for r in runs if r["mode"] == mode]
        if not mode_runs:
            continue
        sizes = [r["n_sources"] for r in mode_runs]
        for index, band in enumerate(mode_runs[0]["bands"]):
            speed.plot(sizes, [r["bands"][band]["source_bands_per_s_per_core"] for r in mode_runs], style,
                       color=f"C{index}", label=f"{band} ({mode})")
            pulls.plot(sizes, [r["bands"][band]["snr_gt10"]["pull_std"] for r in mode_runs], style, color=f"C{index}")
    for axis in (speed, pulls):
        axis.set_xscale("log")
        axis.set_xlabel("sources in the field")
    speed.set_yscale("log")
    speed.set_ylabel("source-bands per second per core (end to end)")
    pulls.axhspan(0.9, 1.1, color="0.9")
    pulls.set_ylabel("pull standard deviation (S/N > 10)")
    speed.legend(fontsize="x-small", ncol=2)
    save_figure(figure, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mbphot.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(n) for n in DEFAULT_SIZES),
                        help="comma-separated numbers of sources (default %(default)s)")
    parser.add_argument("--bands", default="all", help=f"subset of {','.join(BAND_NAMES)}")
    parser.add_argument("--modes", default="source,scene", help="photometry modes to compare (default %(default)s)")
    parser.add_argument("--cores", type=int, default=0, help="worker processes (default: all cores)")
    parser.add_argument("--data-dir", default="data/bench", help="where the simulated fields go (reused)")
    parser.add_argument("--output-dir", default="output/bench", help="where summary.json and the figure go")
    parser.add_argument("--tractor-sources", type=int, default=1_000,
                        help="field size for the comparison with The Tractor, where it imports (default %(default)s)")
    args = parser.parse_args(argv)
    cores = args.cores or os.cpu_count() or 1
    bands = parse_bands(args.bands)
    runs = []
    for n_sources in (int(float(n)) for n in args.sizes.split(",")):
        for mode in args.modes.split(","):
            run = run_size(n_sources, bands, cores, Path(args.data_dir), mode=mode)
            _print_run(run)
            runs.append(run)
    summary = {"runs": runs, "tractor": None}
    if tractor_available():
        summary["tractor"] = compare_with_tractor(args.tractor_sources, bands, Path(args.data_dir))
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
