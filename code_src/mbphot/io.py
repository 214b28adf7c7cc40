"""Small file helpers shared by the modules that write: atomic writes, locks and FITS reading."""

import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from astropy.io import fits
from astropy.table import Table
from astropy.units import UnitsWarning
from astropy.wcs import WCS, FITSFixedWarning

__all__ = ["atomic_path", "file_lock", "write_json", "read_table", "read_header", "read_wcs"]

FULL_DISK_BYTES = 1 << 20
"""Free space below which a failed write is taken to be for want of space (1 MiB)."""


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    A failed or interrupted write leaves nothing under the final name, so a later run never
    mistakes a half-written file for a finished one. A write that fails for want of space
    raises an `OSError` with ``errno.ENOSPC`` that says "disk full" and names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    os.unlink(temporary)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except OSError as error:
        if _disk_full(error, path.parent):
            raise OSError(
                errno.ENOSPC, f"disk full: cannot write {path} ({error}); free some space on that disk or write elsewhere",
                str(path),
            ) from error
        raise
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@contextmanager
def file_lock(path, waiting_message=None):
    """Hold an exclusive lock on the file ``path`` (created) for the block; wait while another
    process holds it.

    The lock is the operating system's (``flock``), so it goes with its process: a killed
    run never leaves a stale lock behind.

    Parameters
    ----------
    path : path-like
        The lock file.
    waiting_message : str, optional
        Printed to standard error when the lock is held elsewhere, before waiting for it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting_message:
                print(waiting_message, file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _disk_full(error: OSError, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC, or a short write (some writers report
    only "N requested and M written") with the disk nearly full."""
    if error.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(folder).free < FULL_DISK_BYTES
    except OSError:
        return False


def write_json(path, payload) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return Path(path)


def read_table(path) -> Table:
    """Read a FITS table; archives' unit spellings (``DEGREE``, ``ERG/S/CM^2``) only warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnitsWarning)
        return Table.read(path)


def read_wcs(header) -> WCS:
    """The WCS of a header; archives' non-standard keywords only warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def read_header(path, ext=0) -> fits.Header:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return fits.getheader(path, ext)
