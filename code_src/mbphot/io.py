"""Small file helpers shared by the modules that write: atomic writes and FITS reading."""

import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from astropy.io import fits
from astropy.table import Table
from astropy.units import UnitsWarning
from astropy.wcs import WCS, FITSFixedWarning

__all__ = ["atomic_path", "write_json", "read_table", "read_header", "read_wcs"]


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    A failed or interrupted write leaves nothing under the final name, so a later run never
    mistakes a half-written file for a finished one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    os.unlink(temporary)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


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
