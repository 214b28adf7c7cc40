"""The archives' cloud copies: IRSA's and MAST's public S3 buckets, read anonymously with s3fs.

On Fornax (in AWS) the same files the archives serve over HTTP are also in public S3 buckets,
closer and faster to read. No credentials are needed: the buckets allow anonymous reads
(s3fs ``anon=True``, as IRSA's "IRSA Cloud Access Introduction" tutorial and astroquery's
``Observations.enable_cloud_dataset`` do).

* IRSA: an image service row may carry a ``cloud_access`` column, JSON such as
  ``{"aws": {"bucket_name": "nasa-irsa-spitzer", "key": "spitzer/...", "region": "us-west-2"}}``
  (IRSA's SIA v2 and its cloud access tutorial); `irsa_location` reads it. The object is then
  read by byte range (`S3Object.read`), like the HTTP range path of `mbphot.archive.sections`.
* MAST: a product's ``dataURI`` becomes its key in the ``stpubdata`` bucket through MAST's
  ``/api/v0.1/path_lookup/`` service, the call ``Observations.get_cloud_uris`` makes
  (astroquery ``mast/utils.py``, ``mast_relative_path``); `mast_locations` makes it with
  mbphot's session, so the endpoint setting and time-out apply.

Whether the cloud is used is the ``cloud`` endpoint setting: ``auto`` (the cloud copy where it
can be read, else HTTP, with a log message), ``cloud`` (the cloud copy or a clear error) or
``http`` (never the cloud). s3fs is an optional dependency (``pip install 'mbphot[cloud]'``),
imported only here and only when a cloud copy is tried; without it ``auto`` reads over HTTP.
"""

import json
import logging
import time
from pathlib import Path

from .cache import ArchiveError, TimeoutSession, call_with_retries
from .config import ENDPOINTS_ENV, Endpoints

__all__ = ["CloudUnavailableError", "S3Object", "irsa_location", "mast_locations", "fall_back_to_http", "MAST_BUCKET"]

logger = logging.getLogger("mbphot.archive.cloud")

MAST_BUCKET = "stpubdata"
"""MAST's public dataset on AWS (astroquery ``mast/cloud.py``: ``pubdata_bucket``)."""
MAST_REGION = "us-east-1"
MAST_PATH_LOOKUP = "/api/v0.1/path_lookup/"
PATH_LOOKUP_CHUNK = 50
"""URIs per path-lookup request (astroquery sends 50 at most: longer URLs get HTTP 414)."""
UNREACHABLE_MEMORY_S = 600.0
"""After no connection could be made to an S3 service, it is not asked again for this long:
off AWS, every further file would otherwise wait ``timeout_s`` and its retries for nothing."""
_unreachable = {}
"""``(s3_endpoint, region)`` to (time.monotonic() of the failure, its message)."""


class CloudUnavailableError(RuntimeError):
    """A cloud copy cannot be read here: no s3fs, no connection, no such object, no permission."""


def _filesystem(endpoints: Endpoints, region: str):
    """An anonymous s3fs filesystem with mbphot's time-out (and ``s3_endpoint``, where set)."""
    try:
        import s3fs
    except ImportError:
        raise CloudUnavailableError("s3fs is not installed (pip install 'mbphot[cloud]')") from None
    client_kwargs = {"region_name": region}
    config_kwargs = {"connect_timeout": endpoints.timeout_s, "read_timeout": endpoints.timeout_s,
                     "retries": {"max_attempts": endpoints.retries + 1}}
    if endpoints.s3_endpoint is not None:
        client_kwargs["endpoint_url"] = endpoints.s3_endpoint
        config_kwargs["s3"] = {"addressing_style": "path"}  # a mirror's address has no bucket host names
    return s3fs.S3FileSystem(anon=True, client_kwargs=client_kwargs, config_kwargs=config_kwargs,
                             skip_instance_cache=True)


class S3Object:
    """One object of a public bucket, read by byte range or whole.

    Parameters
    ----------
    bucket, key : str
        Where the object is.
    region : str
        The bucket's AWS region.
    endpoints : Endpoints
        ``timeout_s``, ``retries`` and ``s3_endpoint``.

    Raises
    ------
    CloudUnavailableError
        From every method, for any failure of the cloud (the caller falls back to HTTP).
    """

    via = "anonymous S3 range reads"
    access = "cloud"

    def __init__(self, bucket: str, key: str, region: str, endpoints: Endpoints):
        self.url = f"s3://{bucket}/{key}"
        self._path = f"{bucket}/{key}"
        self._endpoints = endpoints
        self._region = region
        self._fs = None
        self._size = None

    def _call(self, what: str, action):
        service = (self._endpoints.s3_endpoint, self._region)
        where = f" at {self._endpoints.s3_endpoint}" if self._endpoints.s3_endpoint else ""
        failed = _unreachable.get(service)
        if failed is not None and time.monotonic() - failed[0] < UNREACHABLE_MEMORY_S:
            raise CloudUnavailableError(f"S3{where} could not be reached {time.monotonic() - failed[0]:.0f} s ago ({failed[1]})")
        try:
            if self._fs is None:
                self._fs = _filesystem(self._endpoints, self._region)
            return action(self._fs)
        except (CloudUnavailableError, TypeError, AttributeError, NameError):
            raise  # a mistake in the call, not the cloud: falling back to HTTP would hide it
        except Exception as error:  # s3fs and botocore raise many types; each means "not from the cloud"
            from botocore.exceptions import ConnectionError as NoConnection

            message = f"{type(error).__name__}: {error}"
            if isinstance(error, NoConnection):  # not for a missing object or a refusal: those are per file
                _unreachable[service] = (time.monotonic(), message)
            raise CloudUnavailableError(f"cannot {what} {self.url}{where}: {message}") from error

    def size(self) -> int:
        """The object's size in bytes (an S3 ``HEAD``); the first call also shows it is reachable."""
        if self._size is None:
            self._size = int(self._call("find", lambda fs: fs.info(self._path)["size"]))
        return self._size

    def read(self, start: int, stop: int) -> tuple[bytes, int]:
        """Bytes ``start`` to ``stop`` (inclusive; an S3 ``GET`` with ``Range``) and the object's size."""
        total = self.size()
        body = self._call("read", lambda fs: fs.cat_file(self._path, start=start, end=min(stop, total - 1) + 1))
        if len(body) != min(stop, total - 1) - start + 1:
            raise CloudUnavailableError(f"{self.url} sent {len(body)} bytes for range {start}-{stop}")
        return body, total

    def download(self, destination, progress: bool = False) -> None:
        """Write the whole object to ``destination``, checking its size; a progress bar if asked."""
        from fsspec.callbacks import NoOpCallback, TqdmCallback

        total = self.size()
        callback = TqdmCallback(tqdm_kwargs={"unit": "B", "unit_scale": True, "desc": Path(destination).name,
                                             "leave": False}) if progress else NoOpCallback()
        self._call("download", lambda fs: fs.get_file(self._path, str(destination), callback=callback))
        received = Path(destination).stat().st_size
        if received != total:
            raise CloudUnavailableError(f"{self.url}: received {received} of {total} bytes")


def fall_back_to_http(what: str, reason: str, url: str, endpoints: Endpoints, *, listed: bool) -> None:
    """Log why ``what`` is read over HTTP from ``url``, or stop where ``cloud: cloud`` forbids HTTP.

    ``listed`` says whether the archive named a cloud copy: one that cannot be read is logged as
    a WARNING, none at all (the usual case off the cloud) at INFO.

    Raises
    ------
    ArchiveError
        ``cloud`` is ``"cloud"``.
    """
    if endpoints.cloud == "cloud":
        raise ArchiveError(
            f"the cloud copy of {what} cannot be read ({reason}); set cloud: auto in ${ENDPOINTS_ENV} to read it "
            "over HTTP instead"
        )
    (logger.warning if listed else logger.info)("%s: not from the cloud (%s); reading %s over HTTP", what, reason, url)


def irsa_location(record, endpoints: Endpoints) -> S3Object | None:
    """The cloud copy an IRSA image service row names in its ``cloud_access`` column, if any."""
    try:
        text = record["cloud_access"]
    except (KeyError, IndexError):
        return None
    text = text.decode() if isinstance(text, bytes) else str(text)
    if not text.strip() or text.strip() == "--":  # an empty or masked cell: no cloud copy
        return None
    try:
        aws = json.loads(text)["aws"]
        return S3Object(aws["bucket_name"], aws["key"].lstrip("/"), aws.get("region", "us-west-2"), endpoints)
    except (ValueError, KeyError, TypeError, AttributeError):
        logger.warning("IRSA's cloud_access entry %r is not the documented JSON; not using the cloud", text[:200])
        return None


def _bucket_key(path: str) -> str:
    """A path-lookup path as a key in ``stpubdata`` (astroquery ``mast_relative_path``: GALEX
    paths lose their leading ``/mast/``, others their leading slash)."""
    return path[len("/mast/"):] if path.startswith("/mast/galex") else path.lstrip("/")


def mast_locations(uris, endpoints: Endpoints) -> dict:
    """``dataURI`` to its `S3Object` in MAST's public bucket, for the URIs MAST places there.

    Raises
    ------
    CloudUnavailableError
        MAST's path-lookup service cannot be used.
    """
    session = TimeoutSession(endpoints.timeout_s)
    url = f"{endpoints.mast}{MAST_PATH_LOOKUP}"
    located = {}
    uris = list(uris)
    for first in range(0, len(uris), PATH_LOOKUP_CHUNK):
        chunk = uris[first : first + PATH_LOOKUP_CHUNK]

        def lookup():
            response = session.get(url, params={"uri": chunk})
            response.raise_for_status()
            return response.json()

        try:
            answer = call_with_retries(lookup, service="MAST path lookup", url=url, endpoints=endpoints)
        except (ArchiveError, ValueError) as error:
            raise CloudUnavailableError(f"MAST's path lookup at {url} failed: {error}") from error
        for uri in chunk:
            path = (answer.get(uri) or {}).get("path")
            if path:
                located[uri] = S3Object(MAST_BUCKET, _bucket_key(path), MAST_REGION, endpoints)
    return located
