"""MAST: the deep GALEX tiles over the field (intensity, sky background, effective exposure).

`astroquery.mast.Observations` finds the GALEX image observations whose footprint reaches the
catalogue circle; for each tile and band the deepest one is kept, and tiles much shallower
than the deepest (all-sky or medium-depth visits beside the deep COSMOS tiles) are dropped.
Of their products only the ``-int``, ``-skybg`` and ``-rrhr`` images are fetched (no
catalogues), whole (MAST does not cut GALEX files), unpacked and cut to the field's box.
"""

import json
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
from .cache import ArchiveEmptyError, call_with_retries, download
from .config import Endpoints
from .cutout import cut_to_box

__all__ = ["fetch_galex", "mast_observations"]

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


def _deepest_tiles(observations_table, band: str) -> list:
    """Observation ids of the deepest observation of each tile in ``band``, shallow tiles dropped."""
    filters = np.array([str(f).upper() for f in observations_table["filters"]])
    rows = observations_table[np.char.find(filters, band.upper()) >= 0]
    if len(rows) == 0:
        return []
    exposure = np.ma.filled(np.ma.asarray(rows["t_exptime"], dtype=float), 0.0)
    best = {}
    for index, tile in enumerate(str(t) for t in rows["target_name"]):
        if tile not in best or exposure[index] > exposure[best[tile]]:
            best[tile] = index
    deepest = max(exposure[i] for i in best.values())
    return [str(rows["obsid"][i]) for i in best.values() if exposure[i] >= DEPTH_FRACTION * deepest]


def _product_files(products, code: str) -> dict:
    """Tile name to ``{"image"|"sky"|"exposure": dataURI}`` for band ``code`` (``nd``/``fd``)."""
    pattern = re.compile(rf"^(?P<tile>.+)-{code}-(?P<kind>int|skybg|rrhr)\.fits(\.gz)?$", re.IGNORECASE)
    tiles = {}
    for name, uri in zip(products["productFilename"], products["dataURI"]):
        match = pattern.match(str(name))
        if match:
            tiles.setdefault(match["tile"], {})[PRODUCT_KINDS[match["kind"].lower()]] = str(uri)
    return {tile: files for tile, files in tiles.items() if "image" in files}


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
        obsids = _deepest_tiles(found, band) if len(found) else []
        tiles = {}
        if obsids:
            products = _quietly(
                lambda: observations.get_product_list(obsids), service="MAST", url=endpoints.mast, endpoints=endpoints
            )
            tiles = _product_files(products, BANDS[band].galex_code) if len(products) else {}
        if not tiles:
            raise ArchiveEmptyError(
                f"MAST ({endpoints.mast}) has no deep GALEX {band.upper()} image within {catalog_radius_arcmin:g} arcmin "
                f"of RA {ra_deg}, Dec {dec_deg}; choose a position inside COSMOS or leave {band} out of bands"
            )
        band_entries = []
        for tile, uris in sorted(tiles.items()):
            entry = {"image": None, "unc": None, "sky": None, "exposure": None, "tile": tile}
            for kind, uri in uris.items():
                suffix = {"image": "int", "sky": "skybg", "exposure": "rrhr"}[kind]
                relative = f"galex/{tile}-{BANDS[band].galex_code}-{suffix}.fits"
                download(
                    f"{endpoints.mast}{PORTAL_PATHS['MAST_DOWNLOAD_URL']}?uri={quote(uri, safe=':/')}",
                    directory / relative,
                    service="MAST download",
                    endpoints=endpoints,
                    progress=progress,
                    finish=lambda temporary, t=tile: cut_to_box(temporary, ra_deg, dec_deg, side_arcmin, f"GALEX tile {t}"),
                )
                entry[kind] = relative
            band_entries.append(entry)
        write_json(directory / f"galex/{band}_tiles.json", band_entries)
        entries[band] = band_entries
    return {band: entries[band] for band in bands}
