"""The PRF/PSF file of each band: the published one, downloaded, cached and checked.

No archive serves the COSMOS IRAC PRFs or the GALEX PSFs through a query interface. The
published files are fetched from fixed addresses instead:

* IRAC: ``PRF_IRAC_ch<N>.fits``, the IRAC PRFs resampled to the 0.6" COSMOS mosaic grid
  (17 x 17, unit sum) that the Fornax ``multiband_photometry`` notebook uses;
* GALEX: ``PSFnuv_faint.fits`` and ``PSFfuv.fits``, the GALEX team's PSF images (120 x 120 at
  1.5", peak-normalised, 2007; GALEX technical documentation, chapter 5).

Both sets are read from the nasa-fornax/fornax-demo-notebooks repository at a fixed commit
(`PUBLISHED_COMMIT`), so the address never changes what it serves, and each download must
have the SHA-256 recorded here (`PUBLISHED_SHA256`) besides being a 2-D image with a positive
peak near its centre. ``prf_base`` in the endpoints points at another copy (then only the
image checks apply), and ``prf: {band: url}`` names a file for one band.

Where no published file can be reached or passes the checks, the band falls back to the
model PRF of `mbphot.sample`, with a `PrfFallbackWarning` naming the band and a
``prf_source`` that starts with `MODEL_PRF_SOURCE` ("MODEL PRF"), so that the caller (or the
catalogue's reader) can tell and measure the PRF from the images instead.
"""

import hashlib
import logging
import warnings
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np
from astropy.io import fits

from ..bands import BAND_NAMES, BANDS
from ..io import atomic_path
from ..sample import GALEX_PSF_HALF_SIZE, IRAC_PRF_HALF_SIZE, IRAC_PRF_OVERSAMPLING, _airy_prf, _galex_psf, _write_fits
from .cache import ArchiveError, IncompleteDownloadError, download
from .config import Endpoints

__all__ = ["fetch_prfs", "check_prf", "MODEL_PRF_SOURCE", "PUBLISHED_BASE", "PUBLISHED_SHA256", "PrfFallbackWarning"]

logger = logging.getLogger("mbphot.archive.prf")

MODEL_PRF_SOURCE = "MODEL PRF of mbphot.sample"
PUBLISHED_COMMIT = "ecb1d347f15838e0653a7cefd89d39c29077b9b7"
PUBLISHED_BASE = {
    "irac": f"https://raw.githubusercontent.com/nasa-fornax/fornax-demo-notebooks/{PUBLISHED_COMMIT}/forced_photometry/data/IRAC",
    "galex": f"https://raw.githubusercontent.com/nasa-fornax/fornax-demo-notebooks/{PUBLISHED_COMMIT}/forced_photometry/data/Galex",
}
PUBLISHED_FILES = {
    "irac1": "PRF_IRAC_ch1.fits", "irac2": "PRF_IRAC_ch2.fits", "irac3": "PRF_IRAC_ch3.fits",
    "irac4": "PRF_IRAC_ch4.fits", "nuv": "PSFnuv_faint.fits", "fuv": "PSFfuv.fits",
}
PUBLISHED_SHA256 = {
    "PRF_IRAC_ch1.fits": "f50dc5b04b41c8f0fd1f43f73dbb5ed8eaa2852449f87194a010d0fc38d3d3da",
    "PRF_IRAC_ch2.fits": "bf84bca39e5d5c4b08323ed7e37c7ac106d3e90ce5e656337c5f29a512055de1",
    "PRF_IRAC_ch3.fits": "d23d6cf45effcd472b85f04f28ed386375de5a7deae21ae9085f632aaa03e607",
    "PRF_IRAC_ch4.fits": "0bc1fec815a7522b683e7895bc2158505fb39b017a59167e4e374d240a32ad54",
    "PSFnuv_faint.fits": "345e82c468e162bedd481c00ee0b868c61b4456a2acf29d5fa8a5454cb0ec551",
    "PSFfuv.fits": "0746d9e1b03149620aa4364079d32a9160a73bb91bb31020725e3f90aee638ca",
}


class PrfFallbackWarning(UserWarning):
    """A band is measured with the model PRF because no published PRF could be had."""


def _family(band: str) -> str:
    return "irac" if BANDS[band].instrument == "IRAC" else "galex"


def check_prf(path, expected_sha256: str | None = None) -> None:
    """Raise `IncompleteDownloadError` unless ``path`` is a usable PRF image.

    A usable PRF is a 2-D finite image whose maximum is positive and lies within the central
    third of each axis; with ``expected_sha256`` the file's bytes must also have that digest.
    """
    path = Path(path)
    if expected_sha256 is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected_sha256:
            raise IncompleteDownloadError(f"{path.name} has SHA-256 {digest}, not the published file's {expected_sha256}")
    data = fits.getdata(path)
    if data is None or np.ndim(data) != 2 or not np.all(np.isfinite(data)):
        raise IncompleteDownloadError(f"{path.name} is not a finite 2-D PRF image")
    peak = np.unravel_index(np.argmax(data), data.shape)
    if data[peak] <= 0 or any(not (n / 3 <= p <= 2 * n / 3) for p, n in zip(peak, data.shape)):
        raise IncompleteDownloadError(f"{path.name}: the PRF's peak is not positive or not near the centre")


def _model_prf_path(band: str) -> str:
    if BANDS[band].instrument == "IRAC":
        return f"prf/model_PRF_IRAC_ch{band[-1]}.fits"
    return f"prf/model_PSF{band}.fits"


def _write_model_prf(band: str, path: Path) -> None:
    """The simulator's PRF of ``band`` with the simulator's header, written atomically."""
    spec = BANDS[band]
    header = fits.Header()
    if spec.instrument == "IRAC":
        data = _airy_prf(spec, IRAC_PRF_OVERSAMPLING, IRAC_PRF_HALF_SIZE)
        header["OVERSAMP"] = (IRAC_PRF_OVERSAMPLING, "PRF samples per mosaic pixel")
        header["PIXSCALE"] = (spec.pixel_scale_arcsec / IRAC_PRF_OVERSAMPLING, "[arcsec] PRF sample spacing")
        header["COMMENT"] = "Model PRF: Airy (0.85 m) x 1.22\" pixel x jitter x 0.6\" pixel"
    else:
        data = _galex_psf(spec, 1, GALEX_PSF_HALF_SIZE)
        data = data / data.max()
        header["COMMENT"] = "Model GALEX PSF on the 1.5\" grid, peak-normalised like the GALEX files"
    with atomic_path(path) as temporary:
        _write_fits(temporary, data, header)


def _source_url(band: str, endpoints: Endpoints) -> tuple[str, str | None]:
    """The URL of ``band``'s PRF and the SHA-256 it must have (None: image checks only)."""
    if endpoints.prf.get(band):
        return endpoints.prf[band], None
    name = PUBLISHED_FILES[band]
    family = _family(band)
    if family in endpoints.prf_base:
        return f"{endpoints.prf_base[family].rstrip('/')}/{name}", None
    return f"{PUBLISHED_BASE[family]}/{name}", PUBLISHED_SHA256[name]


def fetch_prfs(bands, directory, endpoints: Endpoints, progress: bool = False) -> dict:
    """Put the PRF file of every band in ``prf/`` and say where each came from.

    Returns
    -------
    dict
        Band name to ``{"prf": relative path, "prf_source": str}``; ``prf_source`` is
        ``"published PRF <url> (sha256 ...)"``, ``"PRF file <url>"`` for a configured one, or
        starts with `MODEL_PRF_SOURCE` for the fallback (with a `PrfFallbackWarning`).
    """
    unknown = sorted(set(endpoints.prf) - set(BAND_NAMES))
    if unknown:
        raise ValueError(f"endpoint prf names unknown band(s) {', '.join(unknown)}; choose from {', '.join(BAND_NAMES)}")
    directory = Path(directory)
    found = {}
    for band in bands:
        url, sha256 = _source_url(band, endpoints)
        relative = f"prf/{band}_{PurePosixPath(urlparse(url).path).name}"
        try:
            download(url, directory / relative, service="the PRF file server", endpoints=endpoints, progress=progress,
                     finish=lambda temporary, s=sha256: check_prf(temporary, s))
            check_prf(directory / relative, sha256)  # a cached file too
        except (ArchiveError, IncompleteDownloadError) as error:
            (directory / relative).unlink(missing_ok=True)
            relative = _model_prf_path(band)
            if not (directory / relative).is_file():
                _write_model_prf(band, directory / relative)
            reason = str(error)
            warnings.warn(
                f"band {band}: no published PRF could be had from {url} ({reason}); band {band} is measured with the "
                "MODEL PRF of mbphot.sample, which is not the instrument's: measure the PRF from the images, or name a "
                f"file with prf: {{{band}: <url>}} in the endpoints",
                PrfFallbackWarning, stacklevel=2,
            )
            found[band] = {"prf": relative, "prf_source": f"{MODEL_PRF_SOURCE} (no published PRF could be had from {url}: {reason})"}
            continue
        if sha256 is not None:
            source = f"published PRF {url} (sha256 {sha256[:12]})"
        elif endpoints.prf.get(band):
            source = f"PRF file {url}"
        else:
            source = f"published PRF {url} (copy named by prf_base)"
        found[band] = {"prf": relative, "prf_source": source}
    return found
