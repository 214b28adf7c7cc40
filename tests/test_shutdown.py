"""A killed ``mbphot run`` leaves no process behind, and says how to resume.

These tests start the real CLI on a small simulated field with two photometry workers and
kill it once the workers are running: by SIGTERM (what ``timeout``, Slurm and ``docker stop``
send) and by SIGKILL, which nothing can catch.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from processes import command_line, descendants, ended

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def start_run(tmp_path):
    # Standard error goes to a file: a pipe nobody reads could fill and stall the run.
    return subprocess.Popen(
        [sys.executable, "-m", "mbphot", "run", "--no-progress", "--realism", "ideal", "--radius", "1.5",
         "--bands", "irac1,nuv", "--n-workers", "2",
         "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "output")],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "w"),
    )


def workers_running(process) -> list[int]:
    """Wait until the run's two photometry workers are up; every process of the run then."""
    while process.poll() is None:
        tree = descendants(process.pid)
        if sum("spawn_main" in command_line(pid) for pid in tree) >= 2:
            return tree
        time.sleep(0.05)
    pytest.fail(f"the run ended (exit {process.returncode}) before its workers started")


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_run_leaves_no_process_behind(tmp_path, kill):
    process = start_run(tmp_path)
    tree = workers_running(process)
    assert any("resource_tracker" in command_line(pid) for pid in tree)
    process.send_signal(kill)
    process.wait()
    survivors = ended(tree)
    for pid in survivors:  # leave the machine clean whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], [command_line(pid) for pid in survivors]
    if kill == signal.SIGTERM:
        error = (tmp_path / "stderr.txt").read_text()
        assert process.returncode == 130
        assert "stopped by SIGTERM in notebook 02_photometry" in error and "run the same command again" in error
        # The CLI prints no traceback of its own (a worker still starting up may print the
        # KeyboardInterrupt it got from the kernel's shutdown; that is not the CLI's).
        assert "mbphot/cli.py" not in error and "Interrupted" not in error, error
