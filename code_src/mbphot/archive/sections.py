"""Read the field's box of a remote FITS mosaic by byte ranges, not the whole file.

A COSMOS IRAC mosaic is one uncompressed 2-D image of about 480 MB; a field needs a box of a
few arcminutes, well under 1 % of it. FITS stores an image row by row after a header of
2880-byte blocks (FITS Standard 4.0, sections 3.3 and 3.3.2), so the bytes of the box are one
contiguous run per image row. `read_section`

1. reads the header with ``Range: bytes=0-...`` requests (RFC 9110, section 14) until the
   ``END`` card, and checks that the server answered ``206 Partial Content``: a server that
   ignores ``Range`` would send the whole file, so the read stops there and says so;
2. finds the box's pixels from the header's WCS;
3. asks for each row's run of bytes (runs closer than `MERGE_GAP_BYTES` are merged), a few
   requests at a time, each checked against its ``Content-Range`` and length;
4. writes the box as a FITS image with the original header, its size and reference pixel
   moved to the box.

This is what ``astropy.io.fits.open(url, use_fsspec=True)`` with ``.section`` does (astropy's
"Obtaining subsets from cloud-hosted FITS files"), without fsspec's read-ahead blocks, which
for a box in a wide mosaic would fetch whole rows, and with mbphot's time-outs, retries and
progress bar. The bytes come from a source with a ``read(start, stop)`` method: `HttpRanges`
(HTTP range requests) or `mbphot.archive.cloud.S3Object` (S3 ``GET`` with ``Range``, the
same protocol), so the cloud copy and the HTTP copy are read the same way.
"""

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from tqdm.auto import tqdm

from ..io import atomic_path, read_wcs
from .cache import ArchiveEmptyError, IncompleteDownloadError, TimeoutSession, call_with_retries, check_fits
from .config import Endpoints

__all__ = ["RangeNotSupportedError", "HttpRanges", "read_section", "MERGE_GAP_BYTES"]

BLOCK = 2880
HEADER_CHUNK_BLOCKS = 8
MERGE_GAP_BYTES = 4096
"""Row runs separated by fewer bytes are fetched in one request (a request costs more than
a few kB of bandwidth; whole rows of a wide mosaic cost far more)."""
PARALLEL_REQUESTS = 8
BYTES_PER_PIXEL = {8: 1, 16: 2, 32: 4, 64: 8, -32: 4, -64: 8}
DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


class RangeNotSupportedError(RuntimeError):
    """The server answered a range request with the whole file (HTTP 200, not 206)."""


def _get_range(session, url: str, start: int, stop: int) -> tuple[bytes, int | None]:
    """Bytes ``start`` to ``stop`` (inclusive) of ``url`` and the file's total size."""
    with session.get(url, headers={"Range": f"bytes={start}-{stop}"}, stream=True) as response:
        response.raise_for_status()
        if response.status_code != 206:
            raise RangeNotSupportedError(f"{url} answered HTTP {response.status_code} to a range request")
        body = b"".join(response.iter_content(1 << 16))  # requests' errors for cut or stalled bodies
        content_range = response.headers.get("Content-Range", "")
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
    if match is None or int(match[1]) != start or int(match[2]) > stop:
        raise IncompleteDownloadError(f"asked for bytes {start}-{stop}, got Content-Range {content_range!r}")
    total = int(match[3]) if match[3] != "*" else None
    last = int(match[2])
    if last < stop and (total is None or last != total - 1):  # a shorter range only at the end of the file
        raise IncompleteDownloadError(f"asked for bytes {start}-{stop}, got Content-Range {content_range!r}")
    if len(body) != last - start + 1:
        raise IncompleteDownloadError(f"received {len(body)} of {last - start + 1} bytes of range {start}-{last}")
    return body, total


def _read_header(source) -> tuple[fits.Header, int, int | None, int]:
    """The primary header, the byte offset of the data, the file size, and bytes received."""
    raw, received, total = b"", 0, None
    while True:
        start = len(raw)
        chunk, total = source.read(start, start + HEADER_CHUNK_BLOCKS * BLOCK - 1)
        if start == 0 and chunk[:2] == b"\x1f\x8b":
            raise RangeNotSupportedError(f"{source.url} is gzip-compressed: its pixels cannot be read by section")
        raw += chunk
        received += len(chunk)
        for offset in range(0, len(raw), 80):
            if raw[offset : offset + 8] == b"END     ":
                data_offset = (offset // BLOCK + 1) * BLOCK
                return fits.Header.fromstring(raw[: offset + 80].decode("ascii")), data_offset, total, received
        if len(raw) > 400 * BLOCK or (total is not None and len(raw) >= total):
            raise IncompleteDownloadError(f"no END card in the first {len(raw)} bytes of {source.url}: not a FITS file")


class HttpRanges:
    """A remote file read with HTTP range requests, with retries; one session per thread.

    Parameters
    ----------
    url : str
        The file.
    service : str
        Name of the service, for messages.
    endpoints : Endpoints
        Time-out, retries and backoff.
    """

    via = "HTTP range requests"
    access = "http"

    def __init__(self, url: str, *, service: str, endpoints: Endpoints):
        self.url = url
        self._service = service
        self._endpoints = endpoints
        self._local = threading.local()

    def read(self, start: int, stop: int) -> tuple[bytes, int | None]:
        """Bytes ``start`` to ``stop`` (inclusive) and the file's total size."""
        if not hasattr(self._local, "session"):
            self._local.session = TimeoutSession(self._endpoints.timeout_s)
        return call_with_retries(lambda: _get_range(self._local.session, self.url, start, stop),
                                 service=self._service, url=self.url, endpoints=self._endpoints)


def _pixel_box(header, ra_deg, dec_deg, side_arcmin, what) -> tuple[int, int, int, int]:
    """``(x0, x1, y0, y1)``, 0-based, end exclusive, of the square box clipped to the image."""
    wcs = read_wcs(header).celestial
    scale_arcmin = np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 60.0
    side = int(np.ceil(side_arcmin / scale_arcmin))
    x, y = wcs.world_to_pixel(SkyCoord(ra_deg * u.deg, dec_deg * u.deg))
    x0 = int(np.round(float(x) - (side - 1) / 2.0))
    y0 = int(np.round(float(y) - (side - 1) / 2.0))
    n_x, n_y = header["NAXIS1"], header["NAXIS2"]
    box = (max(x0, 0), min(x0 + side, n_x), max(y0, 0), min(y0 + side, n_y))
    if box[0] >= box[1] or box[2] >= box[3]:
        raise ArchiveEmptyError(
            f"{what} does not cover RA {ra_deg}, Dec {dec_deg}: the position is outside this survey's images"
        )
    return box


def _runs(data_offset: int, n_x: int, box, bytes_per_pixel: int) -> list[tuple[int, int, int, int]]:
    """Byte runs ``(start, stop inclusive, first row, n rows)`` covering the box's rows."""
    x0, x1, y0, y1 = box
    width = (x1 - x0) * bytes_per_pixel
    row_bytes = n_x * bytes_per_pixel
    runs, gap = [], row_bytes - width
    rows_per_run = (y1 - y0) if gap < MERGE_GAP_BYTES else 1
    for first in range(y0, y1, rows_per_run):
        n_rows = min(rows_per_run, y1 - first)
        start = data_offset + first * row_bytes + x0 * bytes_per_pixel
        stop = start + (n_rows - 1) * row_bytes + width - 1
        runs.append((start, stop, first, n_rows))
    return runs


def read_section(source, path, ra_deg: float, dec_deg: float, side_arcmin: float, *, what: str,
                 progress: bool = False) -> int:
    """Write the square box of side ``side_arcmin`` around (ra, dec) of the remote image to ``path``.

    Parameters
    ----------
    source : HttpRanges or mbphot.archive.cloud.S3Object
        An uncompressed FITS file whose primary HDU is a 2-D image with a celestial WCS; it
        has ``url``, ``via`` (how it is read, for the header's HISTORY) and
        ``read(start, stop) -> (bytes, total size)``; its ``access`` (``"http"`` or
        ``"cloud"``) goes into the header as ``MBACCESS``.
    path : path-like
        Where the box goes (written atomically, then checked).
    what : str
        Names the image, for messages.

    Returns
    -------
    int
        Bytes received (header and pixels).

    Raises
    ------
    RangeNotSupportedError
        The server does not honour range requests (raised at once, not retried).
    ArchiveEmptyError
        The image does not overlap the box.
    """
    path = Path(path)
    url = source.url
    header, data_offset, total, received = _read_header(source)
    if header.get("NAXIS") != 2 or header.get("BITPIX") not in BYTES_PER_PIXEL:
        raise IncompleteDownloadError(f"{what} at {url} is not a 2-D FITS image (NAXIS={header.get('NAXIS')})")
    bytes_per_pixel = BYTES_PER_PIXEL[header["BITPIX"]]
    n_x, n_y = header["NAXIS1"], header["NAXIS2"]
    if total is not None and total < data_offset + n_x * n_y * bytes_per_pixel:
        raise IncompleteDownloadError(f"{url} holds {total} bytes, fewer than its header describes")
    x0, x1, y0, y1 = box = _pixel_box(header, ra_deg, dec_deg, side_arcmin, what)
    runs = _runs(data_offset, n_x, box, bytes_per_pixel)
    pixels = np.empty((y1 - y0, x1 - x0), dtype=DTYPES[header["BITPIX"]])
    row_bytes = n_x * bytes_per_pixel
    with tqdm(total=sum(stop - start + 1 for start, stop, _, _ in runs), unit="B", unit_scale=True,
              desc=f"{path.name} (of {(total or 0) / 1e6:.0f} MB)", disable=not progress, leave=False) as bar, \
            ThreadPoolExecutor(PARALLEL_REQUESTS) as pool:
        futures = [(pool.submit(lambda a, b: source.read(a, b)[0], start, stop), first, n_rows)
                   for start, stop, first, n_rows in runs]
        for future, first, n_rows in futures:
            body = future.result()
            received += len(body)
            bar.update(len(body))
            padded = body + b"\0" * ((n_rows * row_bytes) - len(body))
            rows = np.frombuffer(padded, dtype=pixels.dtype).reshape(n_rows, n_x)
            pixels[first - y0 : first - y0 + n_rows] = rows[:, : x1 - x0]
    header = header.copy()
    for key in ("CHECKSUM", "DATASUM"):
        header.remove(key, ignore_missing=True)
    header["NAXIS1"], header["NAXIS2"] = x1 - x0, y1 - y0
    for axis, offset in (("1", x0), ("2", y0)):
        if f"CRPIX{axis}" in header:
            header[f"CRPIX{axis}"] = header[f"CRPIX{axis}"] - offset
    header["MBACCESS"] = (source.access, "mbphot: pixels read over http or from the cloud")
    header["HISTORY"] = f"mbphot: pixels [{y0}:{y1}, {x0}:{x1}] of {url} ({source.via})"
    with atomic_path(path) as temporary:
        fits.PrimaryHDU(data=pixels, header=header, do_not_scale_image_data=True).writeto(temporary)
        check_fits(temporary)
    return received
