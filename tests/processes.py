"""Helpers for tests that kill processes: a process tree, and waiting for processes to end."""

import os
import time

GONE = (FileNotFoundError, ProcessLookupError)
"""What reading ``/proc/<pid>`` raises when the process ends meanwhile."""
ENDED_WITHIN_S = 60.0
"""How long a killed run's processes may take to end before the test reports the survivors
(a generous bound: they end within about a second; the test never measures the time)."""


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (dead, waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except GONE:
        return False
    return state not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except GONE:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as handle:
                    children = [int(child) for child in handle.read().split()]
            except GONE:
                continue
            found += children
            queue += children
    return found


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except GONE:
        return ""


def ended(pids) -> list[int]:
    """Wait for ``pids`` to end; the ones still running after `ENDED_WITHIN_S` (none if all ended)."""
    deadline = time.monotonic() + ENDED_WITHIN_S
    while True:
        alive = [pid for pid in pids if is_running(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)
