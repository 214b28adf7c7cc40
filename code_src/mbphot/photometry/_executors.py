"""Where the tasks run: in this process, in local worker processes or on a dask cluster, all
behind one ``run(function, tasks)``; with the environment the worker processes start in, the
progress bar, and the peak memory each process reports."""

import multiprocessing
import os
import resource
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from pathlib import Path

from threadpoolctl import threadpool_limits
from tqdm import tqdm as text_tqdm
from tqdm.auto import tqdm

from ..resources import exit_with_parent

PROGRESS_ENV = "MBPHOT_PROGRESS"
"""Set to ``text`` (``mbphot run`` does, for its notebook kernels) to draw progress bars as
plain text on the error stream, which papermill passes on to the terminal."""
_BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_MALLOC_KEEP_BYTES = 256 * 1024**2
_NUMPY_HUGEPAGE_VARIABLE = "NUMPY_MADVISE_HUGEPAGE"


@contextmanager
def _executor(n_workers: int, client):
    """Yield ``run(function, tasks)``, which yields ``(task, result)`` as results arrive."""
    if client is not None:
        from distributed import as_completed as dask_completed

        def run(function, tasks):
            futures = {client.submit(function, task, pure=False): task for task in tasks}
            for future in dask_completed(futures):
                yield futures[future], future.result()

        yield run
    elif n_workers == 1:

        def run(function, tasks):
            for task in tasks:
                yield task, function(task)

        # One BLAS thread, as in the workers, so that any split of the work sums alike.
        with threadpool_limits(limits=1):
            yield run
    else:
        context = multiprocessing.get_context("spawn")
        # Workers die with this process, however it ends (kill -9, a dead kernel).
        with _worker_environment(), ProcessPoolExecutor(
            n_workers, mp_context=context, initializer=exit_with_parent, initargs=(os.getpid(),)
        ) as pool:

            def run(function, tasks):
                futures = {pool.submit(function, task): task for task in tasks}
                for future in as_completed(futures):
                    yield futures[future], future.result()

            yield run


@contextmanager
def _worker_environment():
    """The environment the local worker processes inherit.

    One BLAS thread each, so that processes do not fight over the cores (two workers with two
    BLAS threads each ran five times slower here). And glibc keeps freed memory up to 256 MB
    for reuse instead of returning every large temporary array to the system: the engine
    allocates and frees such arrays for every scene, and the page faults of fresh memory cost
    about 5 % of its time. NumPy does not ask for transparent huge pages for its large
    arrays: where the kernel compacts memory to find them when first touched (``defrag`` set
    to ``madvise``, as here), the bench field's irac1 scenes replayed in a fresh process took
    0.49-0.80 s of engine time instead of 0.47-0.48. Settings the user made are kept.
    """
    names = (*_BLAS_THREAD_VARIABLES, *_MALLOC_VARIABLES, _NUMPY_HUGEPAGE_VARIABLE)
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in _BLAS_THREAD_VARIABLES})
    for name in _MALLOC_VARIABLES:
        os.environ.setdefault(name, str(_MALLOC_KEEP_BYTES))
    os.environ.setdefault(_NUMPY_HUGEPAGE_VARIABLE, "0")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _progress_bar(**options):
    """A progress bar with the time left: a notebook widget, or text for a headless run."""
    if os.environ.get(PROGRESS_ENV) == "text":
        # Each redraw becomes a line once papermill relays it: redraw every 10 s at most.
        return text_tqdm(file=sys.stderr, mininterval=10, **options)
    return tqdm(**options)


def _connect(scheduler):
    """A dask client from a client, a scheduler address, or None for local processes."""
    if scheduler is None or not isinstance(scheduler, str):
        return nullcontext(scheduler)
    from distributed import Client

    return Client(scheduler)


def peak_rss_gb() -> float:
    """Peak resident memory of this process's own address space.

    Linux's VmHWM restarts when a spawned worker executes Python afresh; ``ru_maxrss`` would
    carry over the parent's peak from the moment of the fork.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
