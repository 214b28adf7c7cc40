"""MAST: the deep GALEX tiles over the field (intensity, sky background, effective exposure).

`astroquery.mast.Observations` finds the GALEX image observations whose footprint reaches the
catalogue circle; observations much shallower than the deepest (all-sky or medium-depth
visits beside the deep COSMOS tiles) are dropped. A tile is identified by the name its
products carry (``<tile>-nd-int.fits.gz``: the GALEX pipeline's file naming, GALEX GR6/7 data
description), not by the observation's ``target_name``, which distinct sub-grid observations
can share; for each tile and band the deepest observation is kept. Of its products only the
``-int``, ``-skybg`` and ``-rrhr`` images are fetched (no catalogues), whole (MAST serves
GALEX images gzipped, which cannot be read by section), unpacked and cut to the field's box.
Where the ``cloud`` setting allows, each file comes from MAST's public S3 bucket
(``stpubdata``, `mbphot.archive.cloud`), else, or where that copy cannot be read, over HTTP
from MAST's download service; the header records which (``MBACCESS`` and a HISTORY line).
Tile names come from MAST and become file names, so each must be a plain file name
(`mbphot.archive.cache.safe_name`).
"""

import json
import logging
import re
import warnings
from pathlib import Path
from urllib.parse import quote

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astroquery.exceptions import NoResultsWarning

from ..bands import BANDS
from ..io import write_json
from .cache import (
    ArchiveEmptyError,
    call_with_retries,
    download,
    is_cached,
    record_source,
    safe_name,
)
from .cloud import CloudUnavailableError, fall_back_to_http, mast_locations
from .config import Endpoints
from .cutout import cut_to_box

__all__ = ["fetch_galex", "mast_observations"]

logger = logging.getLogger("mbphot.archive.mast")

GALEX_FOV_RADIUS_DEG = 0.6
DEPTH_FRACTION = 0.5
"""Tiles with less than this fraction of the deepest tile's exposure are not used."""
PRODUCT_KINDS = {"int": "image", "skybg": "sky", "rrhr": "exposure"}
PORTAL_PATHS = {
    "MAST_REQUEST_URL": "/api/v0/invoke",
    "COLUMNS_CONFIG_URL": "/portal/Mashup/Mashup.asmx/columnsconfig",
    "MAST_DOWNLOAD_URL": "/api/v0.1/Download/file",
    "MAST_BUNDLE_URL": "/api/v0.1/Download/bundle",
}


def mast_observations(endpoints: Endpoints):
    """An `astroquery.mast.ObservationsClass` talking to ``endpoints.mast``.

    astroquery 0.4 copies ``conf.server`` into the portal connection's URLs when the module is
    imported, so changing the setting later does not reach them (astropy/astroquery#493 and
    #3414, where the maintainers advise setting the URLs on the instance). The URLs are
    therefore set from ``conf.server`` on this instance, which leaves the shared
    ``astroquery.mast.Observations`` untouched.
    """
    from astroquery.mast import ObservationsClass, conf

    with conf.set_temp("server", endpoints.mast), conf.set_temp("timeout", int(np.ceil(endpoints.timeout_s))):
        observations = ObservationsClass()
        portal = observations._portal_api_connection
        for attribute, path in PORTAL_PATHS.items():
            setattr(portal, attribute, conf.server + path)
        portal.TIMEOUT = conf.timeout
    return observations


def _quietly(action, **retry):
    """`call_with_retries` without astroquery's "no results" warning: an empty answer gets
    mbphot's own error, which says what to do."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoResultsWarning)
        return call_with_retries(action, **retry)


def _band_observations(observations_table, band: str):
    """Rows of ``band``'s observations deep enough to use (see `DEPTH_FRACTION`)."""
    filters = np.array([str(f).upper() for f in observations_table["filters"]])
    rows = observations_table[np.char.find(filters, band.upper()) >= 0]
    if len(rows) == 0:
        return rows
    exposure = np.ma.filled(np.ma.asarray(rows["t_exptime"], dtype=float), 0.0)
    return rows[exposure >= DEPTH_FRACTION * exposure.max()]


def _product_files(products, code: str, exposures: dict) -> dict:
    """Tile name to ``{"image"|"sky"|"exposure": dataURI}`` for band ``code`` (``nd``/``fd``).

    The tile name is parsed from the product file name; where several observations hold the
    same tile, the deepest (``exposures``: obsid to seconds) wins.
    """
    pattern = re.compile(rf"^(?P<tile>.+)-{code}-(?P<kind>int|skybg|rrhr)\.fits(\.gz)?$", re.IGNORECASE)
    id_column = "obsID" if "obsID" in products.colnames else "parent_obsid"
    by_tile = {}
    for name, uri, obsid in zip(products["productFilename"], products["dataURI"], products[id_column]):
        match = pattern.match(str(name))
        if match:
            safe_name(match["tile"], service="MAST", what="a GALEX tile (productFilename)")
            by_tile.setdefault(match["tile"], {}).setdefault(str(obsid), {})[PRODUCT_KINDS[match["kind"].lower()]] = str(uri)
    tiles = {}
    for tile, observations in by_tile.items():
        usable = {obsid: files for obsid, files in observations.items() if "image" in files}
        if usable:
            deepest = max(usable, key=lambda obsid: exposures.get(obsid, 0.0))
            tiles[tile] = usable[deepest]
    return tiles


def _fetch_product(uri, path, cloud, no_cloud: str, endpoints: Endpoints, progress: bool, cut) -> None:
    """One GALEX file: from its cloud copy where allowed and readable, else over HTTP; then cut.

    ``cloud`` is the product's `mbphot.archive.cloud.S3Object` or None, and ``no_cloud`` says
    why there is none.
    """
    if is_cached(path):
        return
    http_url = f"{endpoints.mast}{PORTAL_PATHS['MAST_DOWNLOAD_URL']}?uri={quote(uri, safe=':/')}"
    if endpoints.cloud != "http":
        if cloud is not None:
            try:
                download(cloud.url, path, service="MAST's cloud copy", endpoints=endpoints, progress=progress,
                         fetch=lambda raw: cloud.download(raw, progress=progress),
                         finish=lambda temporary: (cut(temporary), record_source(temporary, cloud.url, "cloud")))
                logger.info("%s: from the cloud copy %s", path.name, cloud.url)
                return
            except CloudUnavailableError as error:
                no_cloud = str(error)
        fall_back_to_http(path.name, no_cloud, http_url, endpoints, listed=cloud is not None)
    download(http_url, path, service="MAST download", endpoints=endpoints, progress=progress,
             finish=lambda temporary: (cut(temporary), record_source(temporary, http_url, "http")))


def fetch_galex(bands, ra_deg, dec_deg, catalog_radius_arcmin, side_arcmin, directory, endpoints: Endpoints,
                progress: bool = False) -> dict:
    """The deep GALEX tiles of ``bands`` reaching the catalogue circle, cut to the field's box.

    The tiles chosen for a band are recorded in ``galex/<band>_tiles.json`` once all their
    files are in place, so a rerun reuses them without asking MAST again.

    Parameters
    ----------
    bands : list of str
        ``nuv`` and/or ``fuv``.
    ra_deg, dec_deg : float
        Field centre (deg).
    catalog_radius_arcmin : float
        Radius of the catalogue circle the tiles must reach.
    side_arcmin : float
        Side of the box kept of each tile.
    directory : Path
        The field folder.

    Returns
    -------
    dict
        Band name to its list of image entries (manifest format, paths relative to the folder).

    Raises
    ------
    ArchiveEmptyError
        MAST has no deep GALEX image of a band over the field.
    """
    directory = Path(directory)
    entries, needed = {}, []
    for band in bands:
        record = directory / f"galex/{band}_tiles.json"
        if record.is_file():
            listed = json.loads(record.read_text())
            if all((directory / e[k]).is_file() for e in listed for k in ("image", "sky", "exposure") if e.get(k)):
                entries[band] = listed
                continue
        needed.append(band)
    if not needed:
        return entries

    observations = mast_observations(endpoints)
    centre = SkyCoord(ra_deg * u.deg, dec_deg * u.deg)
    found = _quietly(
        lambda: observations.query_criteria(
            coordinates=centre, radius=catalog_radius_arcmin * u.arcmin, obs_collection="GALEX", dataproduct_type="image"
        ),
        service="MAST",
        url=endpoints.mast,
        endpoints=endpoints,
    )
    if len(found):
        # MAST matches footprints; the tile centre check guards against a sloppy footprint.
        pointing = SkyCoord(np.asarray(found["s_ra"], dtype=float) * u.deg, np.asarray(found["s_dec"], dtype=float) * u.deg)
        found = found[pointing.separation(centre).deg <= GALEX_FOV_RADIUS_DEG + catalog_radius_arcmin / 60.0]
    for band in needed:
        rows = _band_observations(found, band) if len(found) else []
        tiles = {}
        if len(rows):
            exposures = {str(o): float(t) for o, t in zip(rows["obsid"], np.ma.filled(np.ma.asarray(rows["t_exptime"], float), 0))}
            products = _quietly(
                lambda: observations.get_product_list(list(exposures)), service="MAST", url=endpoints.mast, endpoints=endpoints
            )
            tiles = _product_files(products, BANDS[band].galex_code, exposures) if len(products) else {}
        if not tiles:
            raise ArchiveEmptyError(
                f"MAST ({endpoints.mast}) has no deep GALEX {band.upper()} image within {catalog_radius_arcmin:g} arcmin "
                f"of RA {ra_deg}, Dec {dec_deg}; choose a position inside COSMOS or leave {band} out of bands"
            )
        cloud, no_cloud = {}, "cloud: http is set"
        if endpoints.cloud != "http":
            try:
                cloud = mast_locations([uri for uris in tiles.values() for uri in uris.values()], endpoints)
                no_cloud = "MAST places no cloud copy of it"
            except CloudUnavailableError as error:
                no_cloud = str(error)
        band_entries = []
        for tile, uris in sorted(tiles.items()):
            entry = {"image": None, "unc": None, "sky": None, "exposure": None, "tile": tile}
            for kind, uri in uris.items():
                suffix = {"image": "int", "sky": "skybg", "exposure": "rrhr"}[kind]
                relative = f"galex/{tile}-{BANDS[band].galex_code}-{suffix}.fits"
                _fetch_product(uri, directory / relative, cloud.get(uri), no_cloud, endpoints, progress,
                               lambda temporary, t=tile: cut_to_box(temporary, ra_deg, dec_deg, side_arcmin, f"GALEX tile {t}"))
                entry[kind] = relative
            band_entries.append(entry)
        write_json(directory / f"galex/{band}_tiles.json", band_entries)
        entries[band] = band_entries
    return {band: entries[band] for band in bands}
