"""What this process may use, and how its helper processes end with it.

`available_cpus` is the number of cores the run may keep busy: ``os.cpu_count()`` is the
machine's, but a pod or container is often given fewer, through a CPU quota (cgroup v2
``cpu.max``, cgroup v1 ``cpu.cfs_quota_us``) or a CPU set (``os.sched_getaffinity``). More
worker processes than that only share the same time slices, with each one's memory.

`exit_with_parent` makes a worker process end when the process that started it dies, even
by ``kill -9``, when nothing is left to shut the workers down.
"""

import ctypes
import math
import os
import signal
import sys
from pathlib import Path

__all__ = ["available_cpus", "exit_with_parent"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
_PR_SET_PDEATHSIG = 1
"""``prctl`` option (linux/prctl.h): the signal sent to this process when its parent dies."""


def _quota_cpus(cgroup_root: Path) -> float | None:
    """The CPU quota in cores (cgroup v2, then v1), or None without one."""
    v2 = cgroup_root / "cpu.max"
    if v2.is_file():
        quota, _, period = v2.read_text().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100_000)
    for folder in ("cpu", "cpu,cpuacct"):
        quota_file, period_file = cgroup_root / folder / "cpu.cfs_quota_us", cgroup_root / folder / "cpu.cfs_period_us"
        if quota_file.is_file() and period_file.is_file():
            quota = int(quota_file.read_text())
            return None if quota < 0 else quota / int(period_file.read_text())
    return None


def available_cpus(cgroup_root=CGROUP_ROOT) -> int:
    """The cores this process may use: its CPU set, capped by the container's CPU quota.

    Parameters
    ----------
    cgroup_root : path-like
        Where the cgroup files are (``/sys/fs/cgroup``; tests pass a folder of fake ones).

    Returns
    -------
    int
        At least 1. A fractional quota is rounded down (1.5 cores: 1 worker), since a second
        worker would only be throttled.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota = _quota_cpus(Path(cgroup_root))
    except (OSError, ValueError):
        quota = None  # unreadable or unexpected cgroup files: no quota we can honour
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    return max(1, cpus)


def exit_with_parent(parent_pid: int) -> None:
    """Make this process die with its parent ``parent_pid``: the initializer of worker processes.

    On Linux the kernel sends SIGKILL to this process when the parent exits (``prctl``
    ``PR_SET_PDEATHSIG``), so that a killed run leaves no worker behind; a worker holds only
    work in progress, which the next run redoes. Elsewhere nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # without prctl the worker keeps the default: it ends when the pool is shut down
    if os.getppid() != parent_pid:
        # The parent died before prctl took effect: nobody would send the signal.
        os._exit(1)
