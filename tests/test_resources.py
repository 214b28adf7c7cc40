"""Worker counts honour the container's CPU limit; workers die with their parent and start in
the engine's environment."""

import os
import subprocess
import sys
import textwrap

import pytest

from mbphot.photometry._executors import _executor
from mbphot.resources import available_cpus
from processes import ended, is_running


@pytest.fixture
def four_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "200000 100000\n"}, 2),  # cgroup v2: 2 cores
    ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 cores: a second worker would be throttled
    ({"cpu.max": "50000 100000\n"}, 1),  # never fewer than one
    ({"cpu.max": "max 100000\n"}, 4),  # no quota: the CPU set
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 4),  # v1, no quota
    ({"cpu.max": "800000 100000\n"}, 4),  # a quota above the CPU set
    ({}, 4),  # no cgroup files
])
def test_worker_count_honours_the_cgroup_quota_and_the_cpu_set(tmp_path, four_cpus, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert available_cpus(tmp_path) == expected


def test_the_cpu_set_counts_not_the_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert available_cpus(tmp_path) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_pool_worker_dies_when_its_parent_is_killed(tmp_path):
    """A parent with a worker pool is killed with SIGKILL; its worker must not outlive it."""
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""\
        import multiprocessing, os, sys, time
        from concurrent.futures import ProcessPoolExecutor
        from mbphot.resources import exit_with_parent

        if __name__ == "__main__":
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=exit_with_parent, initargs=(os.getpid(),))
            print(pool.submit(os.getpid).result(), flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    assert is_running(worker)
    parent.kill()
    parent.wait()
    assert ended([worker]) == [], "the worker outlived its killed parent"


def test_local_workers_start_with_one_blas_thread_numpy_without_huge_pages_and_the_users_settings(monkeypatch):
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1234")
    names = ["OMP_NUM_THREADS", "NUMPY_MADVISE_HUGEPAGE", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
    with _executor(2, None) as run:
        seen = dict(run(os.getenv, names))
    assert seen == {
        "OMP_NUM_THREADS": "1", "NUMPY_MADVISE_HUGEPAGE": "0", "MALLOC_MMAP_THRESHOLD_": str(256 * 1024**2),
        "MALLOC_TRIM_THRESHOLD_": "1234",
    }
    assert "NUMPY_MADVISE_HUGEPAGE" not in os.environ
