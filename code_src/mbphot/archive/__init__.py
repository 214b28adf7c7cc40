"""Archive retrieval: the real COSMOS data for a field, as a Fornax or JupyterHub user gets it.

One module per service over one shared download cache and one endpoint configuration:

* `irsa` -- COSMOS2015 from IRSA's TAP service and the IRAC mosaics from IRSA's COSMOS image
  (SIA) service, found in the IVOA registry;
* `mast` -- the deep GALEX tiles from MAST (astroquery);
* `heasarc` -- the Chandra COSMOS Legacy catalogue from HEASARC (TAP), C-COSMOS as a fallback;
* `prf` -- the published PRF of each band, downloaded and checked (the model PRF, loudly, if not);
* `sections` -- the field's box of a remote mosaic read with HTTP range requests;
* `cloud` -- the archives' public S3 copies (IRSA, MAST ``stpubdata``), read anonymously where
  the ``cloud`` setting allows, with HTTP as the fallback;
* `cutout` -- the local cut of an image to the field's box, where a service sent more;
* `cache` -- atomic, checked downloads, retries with backoff, time-outs, clear errors;
* `config` -- the endpoints (``$MBPHOT_ENDPOINTS`` or an argument), defaults the real services.

Importing this package is cheap: pyvo, astroquery, requests and s3fs are imported only when
`retrieve_archive` or an error class is first used, so sample mode and ``mbphot --help`` never
load the archive stack. `retrieve_archive` writes the field's files in the layout and formats of the simulated field,
so every later step reads both the same way.
"""

from .config import ENDPOINTS_ENV, Endpoints, load_endpoints

__all__ = [
    "retrieve_archive",
    "Endpoints",
    "load_endpoints",
    "ENDPOINTS_ENV",
    "ArchiveError",
    "ArchiveEmptyError",
    "ArchiveSlowError",
    "ArchiveUnreachableError",
]

_LAZY = {
    "retrieve_archive": "retrieval",
    "ArchiveError": "cache",
    "ArchiveEmptyError": "cache",
    "ArchiveSlowError": "cache",
    "ArchiveUnreachableError": "cache",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
