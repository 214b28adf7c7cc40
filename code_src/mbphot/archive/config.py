"""Where the archives are: the one place that names every service mbphot's archive mode calls.

The defaults are the real services. A mirror, a test server or a different registry is one
setting away, in one of two ways that combine (the argument wins):

* a YAML or JSON file named by the environment variable ``MBPHOT_ENDPOINTS`` (papermill
  kernels inherit the environment, so a notebook run picks it up too), for example::

      irsa_tap: https://irsa-mirror.example.org/TAP
      mast: https://mast-mirror.example.org
      retries: 5

* the ``endpoints`` argument of `mbphot.archive.retrieve_archive` (a dict or `Endpoints`).
"""

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

__all__ = ["Endpoints", "ENDPOINTS_ENV", "load_endpoints"]

ENDPOINTS_ENV = "MBPHOT_ENDPOINTS"
CLOUD_CHOICES = ("auto", "cloud", "http")


@dataclass(frozen=True)
class Endpoints:
    """Service addresses and the network policy of archive retrieval.

    Attributes
    ----------
    irsa_tap : str
        IRSA's TAP service (COSMOS2015 catalogue, table ``cosmos2015``).
    registry : str or None
        The IVOA RegTAP service pyvo searches for IRSA's COSMOS image (SIA) service. None keeps
        pyvo's own choice (the ``IVOA_REGISTRY`` environment variable, else GAVO's registry).
    mast : str
        MAST's server (portal API and downloads, as ``astroquery.mast.conf.server``).
    heasarc : str
        HEASARC's Xamin VO base URL; its TAP service is ``<heasarc>/tap``.
    prf : dict
        Band name to the URL of a PRF/PSF FITS file that wins over the published files
        `mbphot.archive.prf` downloads by default.
    prf_base : dict
        ``{"irac": url, "galex": url}``: folders holding the published PRFs
        (``PRF_IRAC_ch<N>.fits``; ``PSFnuv_faint.fits``, ``PSFfuv.fits``); the defaults are in
        `mbphot.archive.prf`.
    cloud : str
        Where images come from: ``"auto"`` reads the archives' public cloud copies (S3) where
        they can be read and falls back to HTTP with a log message; ``"cloud"`` uses only the
        cloud copies (a clear error where one cannot be read); ``"http"`` never uses the cloud
        (see `mbphot.archive.cloud`).
    s3_endpoint : str or None
        An S3-compatible service to read the cloud copies from instead of AWS (a mirror, a
        test server); None is AWS.
    whole_files : bool
        Allow downloading a whole IRAC mosaic (about 480 MB each) where the server does not
        honour HTTP range requests. Off by default: the run stops and says so instead.
    async_radius_arcmin : float
        Catalogue cones wider than this go through TAP's asynchronous (UWS) endpoint.
    timeout_s : float
        Seconds to wait for a connection or for the next bytes of a response.
    retries : int
        Further attempts after a transient failure (no connection, HTTP 5xx, a truncated file).
    backoff_s : float
        Wait before the first retry; it doubles at every further retry.
    """

    irsa_tap: str = "https://irsa.ipac.caltech.edu/TAP"
    registry: str | None = None
    mast: str = "https://mast.stsci.edu"
    heasarc: str = "https://heasarc.gsfc.nasa.gov/xamin/vo"
    prf: dict = field(default_factory=dict)
    prf_base: dict = field(default_factory=dict)
    cloud: str = "auto"
    s3_endpoint: str | None = None
    whole_files: bool = False
    async_radius_arcmin: float = 10.0
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 2.0

    def __post_init__(self):
        optional = tuple(name for name in ("registry", "s3_endpoint") if getattr(self, name) is not None)
        for name in ("irsa_tap", "mast", "heasarc") + optional:
            value = getattr(self, name)
            if not isinstance(value, str) or not value.startswith(("http://", "https://")):
                raise ValueError(f"endpoint {name}={value!r} must be an http(s) URL, e.g. 'https://archive.example.org'")
            object.__setattr__(self, name, value.rstrip("/"))
        if not isinstance(self.prf, dict):
            raise ValueError(f"endpoint prf must map band names to URLs, got {self.prf!r}")
        if not isinstance(self.prf_base, dict) or set(self.prf_base) - {"irac", "galex"}:
            raise ValueError(f"endpoint prf_base must map 'irac' and/or 'galex' to folder URLs, got {self.prf_base!r}")
        if self.cloud not in CLOUD_CHOICES:
            raise ValueError(f"cloud must be one of {', '.join(CLOUD_CHOICES)}, got {self.cloud!r}")
        if not isinstance(self.whole_files, bool):
            raise ValueError(f"whole_files must be true or false, got {self.whole_files!r}")
        if not (isinstance(self.async_radius_arcmin, (int, float)) and self.async_radius_arcmin >= 0):
            raise ValueError(f"async_radius_arcmin must be a number >= 0, got {self.async_radius_arcmin!r}")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, got {self.retries!r}")
        if not (isinstance(self.backoff_s, (int, float)) and self.backoff_s >= 0):
            raise ValueError(f"backoff_s must be a number of seconds >= 0, got {self.backoff_s!r}")


_KEYS = tuple(f.name for f in fields(Endpoints))


def _checked(settings, origin: str) -> dict:
    if not isinstance(settings, dict):
        raise ValueError(f"{origin} must hold a mapping of endpoint settings, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(_KEYS))
    if unknown:
        raise ValueError(f"unknown endpoint setting(s) {', '.join(unknown)} in {origin}; allowed: {', '.join(_KEYS)}")
    return settings


def _read_file(path: Path) -> dict:
    origin = f"{path} (named by ${ENDPOINTS_ENV})"
    if not path.is_file():
        raise FileNotFoundError(f"{origin} does not exist; create it or unset {ENDPOINTS_ENV} to use the real archives")
    text = path.read_text()
    try:
        settings = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"cannot parse {origin}: {error}") from None
    return _checked(settings or {}, origin)


def load_endpoints(overrides=None) -> Endpoints:
    """The endpoints of this run: defaults, then ``$MBPHOT_ENDPOINTS``, then ``overrides``.

    Parameters
    ----------
    overrides : dict or Endpoints, optional
        Settings that win over the file's; an `Endpoints` is used as it is.

    Returns
    -------
    Endpoints
    """
    if isinstance(overrides, Endpoints):
        return overrides
    endpoints = Endpoints()
    file_name = os.environ.get(ENDPOINTS_ENV, "").strip()
    if file_name:
        endpoints = replace(endpoints, **_read_file(Path(file_name).expanduser()))
    if overrides:
        endpoints = replace(endpoints, **_checked(dict(overrides), "the endpoints argument"))
    return endpoints
