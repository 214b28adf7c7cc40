"""The benchmark script runs and writes a summary in the documented shape (no timing asserted)."""

import json

import numpy as np
import pytest

from mbphot.bench import accuracy, main


def test_accuracy_bins_by_true_signal_to_noise():
    true = np.array([100.0, 100.0, 5.0, 5.0, 0.5])
    error = np.ones(5)
    measured = true + np.array([1.0, -1.0, 0.5, -0.5, 3.0])
    figures = accuracy(measured, true, error, flag=np.array([0, 0, 0, 2, 0]))
    assert figures["snr_gt10"]["n"] == 2 and figures["snr_gt10"]["median_frac_bias"] == 0.0
    assert figures["snr_gt10"]["pull_std"] == 1.0
    assert figures["snr_gt10"]["flagged_frac"] == 0.0 and figures["snr_gt10"]["pull_std_robust"] == pytest.approx(1.4826)
    assert figures["snr_3_10"]["n"] == 1 and figures["snr_3_10"]["flagged_frac"] == 0.5, "flagged sources are counted apart"


def test_bench_writes_summary_json(tmp_path, capsys):
    assert main(["--sizes", "300", "--bands", "irac1,nuv", "--cores", "1", "--realism", "ideal", "--seeds", "2026,7", "--dask-workers", "1,2", "--dask-sources", "300",
                 "--tractor-sources", "100", "--data-dir", str(tmp_path / "d"), "--output-dir", str(tmp_path / "o")]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    run = summary["runs"][0]
    for key in ("n_sources", "mode", "cores", "wall_s", "peak_rss_gb", "source_bands_per_s_per_core"):
        assert key in run
    assert run["realism"] == "ideal"
    for key in ("flagged_frac", "pull_std_robust", "pull_std", "median_frac_bias"):
        assert key in run["bands"]["nuv"]["snr_3_10"]
    assert set(run["bands"]) == {"irac1", "nuv"}
    assert [(r["seed"], r["mode"]) for r in summary["runs"]] == [(2026, "source"), (2026, "scene"), (7, "source"), (7, "scene")]
    assert summary["runs"][2]["n_sources"] != run["n_sources"], "another seed is another realisation of the field"
    assert run["bands"]["irac1"]["snr_gt10"]["n"] > 10
    assert 0.7 < run["bands"]["irac1"]["snr_gt10"]["pull_std"] < 1.3
    assert [entry["workers"] for entry in summary["dask_scaling"]] == [1, 2]
    assert all(entry["n_sources"] == run["n_sources"] and entry["wall_s"] > 0 for entry in summary["dask_scaling"])
    assert "tractor" in summary
    assert (tmp_path / "o" / "speed_accuracy.png").is_file()
    assert "source-bands/s/core" in capsys.readouterr().out
