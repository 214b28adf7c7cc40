"""`retrieve_archive`: one field's real data from IRSA, MAST and HEASARC, in the sample's layout."""

import logging
from pathlib import Path

from ..bands import GALEX_BANDS, IRAC_BANDS
from ..manifest import Manifest
from ..params import RunParameters
from ..sample import SampleSpec
from .config import load_endpoints
from .heasarc import query_chandra
from .irsa import fetch_irac, query_cosmos2015
from .mast import fetch_galex
from .prf import fetch_prfs

__all__ = ["retrieve_archive"]

logger = logging.getLogger("mbphot.archive")

CATALOG_FILE = "catalog/cosmos2015.fits"
CHANDRA_FILE = "chandra/chandra_cosmos.fits"
BOX_MARGIN_ARCMIN = 0.2
"""Added to the image box side so that a server's rounding to whole pixels never cuts off the
last row or column of the simulated field's box."""


def retrieve_archive(params: RunParameters, progress: bool = True, endpoints=None) -> Manifest:
    """Retrieve a field's real data from IRSA, MAST and HEASARC into ``params.field_dir``.

    The catalogue and the Chandra catalogue reach 1 arcmin beyond the field (neighbours of edge
    sources matter), and the images cover the same box as the simulated field's. Files are
    cached in the field folder: a rerun fetches only what is missing, and a run that fails
    leaves only complete files behind. The manifest is returned, not saved.

    Parameters
    ----------
    params : RunParameters
        Position, radius, bands and folders of the run.
    progress : bool
        Show download progress bars.
    endpoints : dict or Endpoints, optional
        Service addresses and network policy, over ``$MBPHOT_ENDPOINTS`` and the defaults
        (see `mbphot.archive.config`).

    Returns
    -------
    Manifest
        ``field["data_source"] == "archive"``, ``truth`` None, and per band the images, the
        PRF and its ``prf_source``.

    Raises
    ------
    ArchiveUnreachableError
        A service cannot be reached ("cannot reach ... at <url>; use data_source='sample' ...").
    ArchiveEmptyError
        A service has nothing for this position and radius.
    ArchiveError
        Any other failure of a service, with the archive's own message.
    """
    endpoints = load_endpoints(endpoints)
    geometry = SampleSpec(ra_deg=params.ra, dec_deg=params.dec, radius_arcmin=params.radius_arcmin)
    directory = Path(params.field_dir)
    box_side_arcmin = 2 * geometry.image_half_side_arcmin + BOX_MARGIN_ARCMIN

    query_cosmos2015(params.ra, params.dec, geometry.catalog_radius_arcmin, directory / CATALOG_FILE, endpoints)
    query_chandra(params.ra, params.dec, geometry.catalog_radius_arcmin, directory / CHANDRA_FILE, endpoints)
    images = fetch_irac(
        [b for b in params.bands if b in IRAC_BANDS], params.ra, params.dec, box_side_arcmin, directory, endpoints, progress
    )
    images.update(
        fetch_galex(
            [b for b in params.bands if b in GALEX_BANDS], params.ra, params.dec, geometry.catalog_radius_arcmin,
            box_side_arcmin, directory, endpoints, progress,
        )
    )
    prfs = fetch_prfs(params.bands, directory, endpoints, progress)
    return Manifest(
        directory=directory,
        field={
            "ra": params.ra,
            "dec": params.dec,
            "radius_arcmin": params.radius_arcmin,
            "catalog_radius_arcmin": geometry.catalog_radius_arcmin,
            "data_source": "archive",
        },
        catalog=CATALOG_FILE,
        chandra=CHANDRA_FILE,
        truth=None,
        bands={band: {**prfs[band], "images": images[band]} for band in params.bands},
    )
