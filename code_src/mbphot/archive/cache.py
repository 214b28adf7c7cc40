"""The download cache and the network policy every archive client shares.

* `download` writes a file under a temporary name beside its final one and renames it only
  once the body arrived whole (Content-Length) and is a readable FITS file (every HDU read);
  a file already under its final name is reused. So a rerun downloads nothing it has, and an
  interrupted or truncated transfer never counts as done.
* `call_with_retries` runs one request with a bounded number of retries and exponential
  backoff on transient failures (no connection, time-out, HTTP 5xx or 429, a truncated body),
  waiting instead as long as a ``Retry-After`` header asks (RFC 9110, section 10.2.3; capped
  at `MAX_RETRY_AFTER_S`), and turns every failure into an `ArchiveError` that says which
  service failed and what to do; an archive's own error message is passed on verbatim.
  "Unreachable" (no connection could be made: refused, no route, DNS, connect time-out) and
  "slow" (connected, but no answer within ``timeout_s``) are different errors with different
  advice.
"""

import email.utils
import gzip
import logging
import os
import re
import shutil
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import requests
from astropy.io import fits
from tqdm.auto import tqdm

from ..io import atomic_path
from .config import Endpoints

__all__ = [
    "ArchiveError",
    "ArchiveUnreachableError",
    "ArchiveEmptyError",
    "ArchiveSlowError",
    "UnsafeNameError",
    "TimeoutSession",
    "call_with_retries",
    "download",
    "check_fits",
    "is_cached",
    "record_source",
    "safe_name",
]

OFFLINE_HINT = "use data_source='sample' to run offline"
CHUNK_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
MAX_RETRY_AFTER_S = 300.0
"""The longest wait a ``Retry-After`` header can impose before mbphot gives up instead."""
USER_AGENT = "mbphot/0.1 (multiband forced photometry of COSMOS; python-requests)"
logger = logging.getLogger("mbphot.archive")


class ArchiveError(RuntimeError):
    """An archive could not give what the run needs; the message says which and why.

    ``status`` is the HTTP status the archive answered with, where there was one.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ArchiveUnreachableError(ArchiveError):
    """No connection to a service (no network, wrong address, service down)."""


class ArchiveEmptyError(ArchiveError):
    """A service answered, but has nothing for the requested position and radius."""


class ArchiveSlowError(ArchiveError):
    """A service accepted the connection but did not answer within ``timeout_s``."""


class UnsafeNameError(ArchiveError):
    """An archive-supplied name that is not a plain file name (a path separator, ``..``, ...)."""


class IncompleteDownloadError(OSError):
    """A body shorter than its Content-Length, or a file that is not whole FITS; retried."""


class TimeoutSession(requests.Session):
    """A requests session with a default time-out: pyvo sends its requests without one, and a
    silent server would otherwise hang the run for ever."""

    def __init__(self, timeout_s: float):
        super().__init__()
        self.timeout_s = timeout_s
        self.headers["User-Agent"] = USER_AGENT

    def request(self, method, url, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout_s
        return super().request(method, url, **kwargs)


def _http_status(error) -> int | None:
    """The HTTP status behind a requests or pyvo error, if there is one."""
    response = getattr(error, "response", None)
    if response is not None and getattr(response, "status_code", None) is not None:
        return int(response.status_code)
    code = getattr(error, "code", None)
    return int(code) if isinstance(code, int) else None


def _cause(error):
    """pyvo wraps requests' exceptions in DALServiceError and keeps them as ``cause``."""
    return getattr(error, "cause", None) or error


def _is_transient(error) -> bool:
    cause = _cause(error)
    if isinstance(cause, (requests.ConnectionError, requests.Timeout, IncompleteDownloadError)):
        return True
    if isinstance(cause, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        return True
    status = _http_status(error)
    return status is not None and (status >= 500 or status == 429)


def retry_after_s(error) -> float | None:
    """Seconds the server asked to wait (``Retry-After``: delay-seconds or an HTTP date)."""
    # Not ``a or b``: a requests Response is falsy when its status is an error.
    response = getattr(_cause(error), "response", None)
    if response is None:
        response = getattr(error, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _translate(error, service: str, url: str, attempts: int, endpoints: Endpoints) -> Exception | None:
    """An `ArchiveError` for ``error``, or None for errors that are not about the archive."""
    from astroquery.exceptions import RemoteServiceError
    from pyvo.dal import DALQueryError, DALServiceError

    after = f"after {attempts} attempt{'s' if attempts > 1 else ''}"
    cause = _cause(error)
    if isinstance(cause, requests.ConnectTimeout):  # a subclass of both ConnectionError and Timeout
        return ArchiveUnreachableError(
            f"cannot reach {service} at {url}; {OFFLINE_HINT} (no connection within {endpoints.timeout_s:g} s, {after})"
        )
    stalled = isinstance(cause, requests.ConnectionError) and "read timed out" in str(cause).lower()
    if isinstance(cause, requests.ConnectionError) and not stalled:
        return ArchiveUnreachableError(f"cannot reach {service} at {url}; {OFFLINE_HINT} (no connection {after})")
    if isinstance(cause, requests.Timeout) or stalled:  # requests reports a stall mid-body as ConnectionError
        return ArchiveSlowError(
            f"{service} at {url} is slow: it accepted the connection but sent nothing for {endpoints.timeout_s:g} s "
            f"({after}); the archive is up but busy: try again later or raise timeout_s in $MBPHOT_ENDPOINTS"
        )
    if isinstance(cause, (IncompleteDownloadError, requests.exceptions.ChunkedEncodingError)):
        return ArchiveError(f"{service} sent an incomplete file from {url} {after}: {cause}")
    if isinstance(error, DALQueryError):
        # The archive's own words (for TAP, the QUERY_STATUS ERROR text), unchanged.
        return ArchiveError(f"{service} at {url} reported an error: {error}")
    status = _http_status(error)
    if status is not None:
        response = getattr(error, "response", None)
        body = (getattr(response, "text", "") or "").strip()[:500]
        detail = f": {body}" if body else (f": {error}" if isinstance(error, DALServiceError) else "")
        return ArchiveError(f"{service} answered HTTP {status} for {url} {after}{detail}", status=status)
    if isinstance(error, DALServiceError):
        return ArchiveError(f"{service} at {url} failed {after}: {error}")
    if isinstance(error, RemoteServiceError):  # astroquery's carrier of the archive's message
        return ArchiveError(f"{service} at {url} reported an error: {error}")
    return None


def call_with_retries(action, *, service: str, url: str, endpoints: Endpoints):
    """Run ``action()``; retry transient failures, translate every archive failure.

    Parameters
    ----------
    action : callable
        One request (or one download) with no arguments; its result is returned.
    service : str
        Human name of the service for messages (``"IRSA TAP"``).
    url : str
        The address called, for messages.
    endpoints : Endpoints
        ``retries`` and ``backoff_s`` (the wait doubles at every retry).

    Raises
    ------
    ArchiveError
        `ArchiveUnreachableError` when no connection could be made.
    """
    for attempt in range(endpoints.retries + 1):
        try:
            return action()
        except Exception as error:
            asked = retry_after_s(error)
            if _is_transient(error) and attempt < endpoints.retries and (asked is None or asked <= MAX_RETRY_AFTER_S):
                wait = asked if asked is not None else endpoints.backoff_s * 2**attempt
                logger.info("%s at %s failed (%s); retrying in %.1f s", service, url, error, wait)
                time.sleep(wait)
                continue
            translated = _translate(error, service, url, attempt + 1, endpoints)
            if translated is None:
                raise
            raise translated from error


def check_fits(path) -> int:
    """Open a FITS file and read every HDU; raise `IncompleteDownloadError` if it is not whole.

    Returns
    -------
    int
        Number of HDUs.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # Memory-mapped, so a whole mosaic of several GB is checked without being loaded.
            with fits.open(path, memmap=True, checksum=True) as hdul:
                hdul.readall()
                for hdu in hdul:
                    _ = hdu.data  # reading the data is what finds a cut file
                n_hdu = len(hdul)
        except (OSError, ValueError, TypeError, EOFError) as error:
            raise IncompleteDownloadError(f"{Path(path).name} is not a readable FITS file ({error})") from None
    for warning in caught:
        message = str(warning.message)
        if "truncated" in message.lower() or "checksum" in message.lower() or "datasum" in message.lower():
            raise IncompleteDownloadError(f"{Path(path).name}: {message}")
    return n_hdu


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
"""A plain file name: no separator, no leading dot (no ``..``, no hidden file that could be
taken for the cache's temporary files), no space or control character."""


def safe_name(name: str, *, service: str, what: str) -> str:
    """``name`` unchanged if an archive-supplied name is a plain file name; else `UnsafeNameError`.

    Archives name the files mbphot writes (a GALEX tile from MAST's ``productFilename``); a
    name with ``/``, ``\\`` or ``..`` would put a file outside the field folder.
    """
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        raise UnsafeNameError(
            f"{service} named {what} {name!r}, which is not a plain file name (only letters, digits and . _ + -, "
            "no path separator, no '..', no leading dot); refusing to write it into the data folder"
        )
    return name


def record_source(path, url: str, access: str) -> None:
    """Note in the primary header where the file came from (``MBACCESS``: http or cloud; HISTORY: the URL).

    A ``CHECKSUM`` the file carries is recomputed, so the cache's check still holds.
    """
    with fits.open(path, mode="update") as hdul:
        header = hdul[0].header
        header["MBACCESS"] = (access, "mbphot: read over http or from the cloud")
        header["HISTORY"] = f"mbphot: from {url}"
        if "CHECKSUM" in header:
            hdul[0].add_checksum()


def is_cached(path) -> bool:
    """Whether a complete file is already at ``path``; a damaged one (disk, manual edit) is
    removed so that it is fetched again."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        check_fits(path)
        return True
    except IncompleteDownloadError:
        path.unlink()
        return False


def _stream(session, url: str, destination: Path, progress: bool, label: str) -> None:
    with session.get(url, stream=True) as response:
        response.raise_for_status()
        expected = response.headers.get("Content-Length")
        # With a Content-Encoding, requests hands out decoded bytes that cannot match the length.
        expected = int(expected) if expected and not response.headers.get("Content-Encoding") else None
        received = 0
        with open(destination, "wb") as out, tqdm(
            total=expected, unit="B", unit_scale=True, desc=label, disable=not progress, leave=False
        ) as bar:
            for chunk in response.iter_content(CHUNK_BYTES):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received != expected:
        raise IncompleteDownloadError(f"received {received} of {expected} bytes")


def _unpack(raw: Path, destination: Path) -> None:
    """Archives serve some files gzipped (GALEX ``.fits.gz``); the cache keeps plain FITS."""
    with open(raw, "rb") as handle:
        compressed = handle.read(2) == GZIP_MAGIC
    if not compressed:
        os.replace(raw, destination)
        return
    try:
        with gzip.open(raw, "rb") as source, open(destination, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK_BYTES)
    except (OSError, EOFError) as error:
        raise IncompleteDownloadError(f"the gzip stream is cut ({error})") from None


def download(url: str, path, *, service: str, endpoints: Endpoints, session=None, progress: bool = False, finish=None,
             fetch=None) -> Path:
    """Fetch a FITS file into the cache, or reuse it.

    Parameters
    ----------
    url : str
        What to fetch (gzipped FITS is unpacked).
    path : path-like
        Final place in the field folder. A readable FITS file already there is reused.
    service : str
        Human name of the service for messages.
    endpoints : Endpoints
        Time-out, retries and backoff.
    session : requests.Session, optional
        Defaults to a `TimeoutSession`.
    progress : bool
        Show a progress bar.
    finish : callable, optional
        ``finish(temporary_path)`` may rewrite the downloaded file (for example cut it to the
        field) before it is checked and moved into place.
    fetch : callable, optional
        ``fetch(raw_path)`` writes the file's bytes to ``raw_path`` (a cloud copy); by default
        ``url`` is fetched over HTTP.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    if is_cached(path):
        return path
    session = session or TimeoutSession(endpoints.timeout_s)

    def attempt():
        with atomic_path(path) as temporary:
            raw = temporary.with_name(temporary.name + ".raw")
            try:
                if fetch is None:
                    _stream(session, url, raw, progress, path.name)
                else:
                    fetch(raw)
                _unpack(raw, temporary)
            finally:
                raw.unlink(missing_ok=True)
            check_fits(temporary)  # before ``finish``, which would choke on a cut file
            if finish is not None:
                finish(temporary)
                check_fits(temporary)

    call_with_retries(attempt, service=service, url=url, endpoints=endpoints)
    return path
