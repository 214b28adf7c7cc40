"""Local stand-ins for the archives, speaking the protocols mbphot's clients use.

One threaded HTTP server on 127.0.0.1 (an ephemeral port; never another address) plays every
service, each under its own path, with data from a simulated field
(`mbphot.sample.make_sample_field`). Each answer follows the structure of the real service's,
from the documentation or public example named here:

* ``/irsa/TAP/sync`` and ``/irsa/TAP/async`` -- IRSA TAP (IVOA TAP 1.1: ``QUERY`` posted to
  ``/sync``; ``/async`` a UWS 1.1 job list with ``phase``, ``results/result``; answers VOTable
  1.4 with ``<INFO name="QUERY_STATUS">``, TAP 1.1 section 5). The ``cosmos2015`` columns and
  their lower-case names are those IRSA's TAP returns to the Fornax ``multiband_photometry``
  notebook's query and IRSA's "Accessing COSMOS data" tutorial (Caltech-IPAC/irsa-tutorials).
* ``/registry/tap`` -- a RegTAP 1.1 service (``/capabilities``, ``/sync``) answering the
  ``rr.capability NATURAL JOIN rr.interface`` query with ``ivoid``, ``access_url``,
  ``standard_id`` (RegTAP 1.1 sections 8.5-8.6), listing IRSA's COSMOS SIA service and a decoy.
* ``/irsa/sia`` -- IRSA's COSMOS SIA 1.0 service: a VOTable with the UCDs SIA 1.0 requires
  (``VOX:Image_Title``, ``POS_EQ_RA_MAIN``, ``VOX:Image_AccessReference``, ...) and IRSA's own
  ``dataset``, ``band_name`` and ``fname`` columns, as IRSA's tutorial "Searching for
  contributed COSMOS images" (Caltech-IPAC/irsa-tutorials, tutorials/cosmos/sia_v1_cosmos.md:
  ``band_name == 'IRAC1'``, ``sia_url``) and the Fornax notebook (``dataset == 'IRAC'``,
  ``go2_sci`` in ``fname``) read them. Access URLs point at
  ``/data/COSMOS/images/spitzer/irac/irac_ch<N>_go2_<kind>_10.fits``, IRSA's layout.
* ``/data/COSMOS/images/spitzer/irac/...`` -- IRSA's static file server: plain FITS mosaics
  that honour single ``Range: bytes=a-b`` requests with ``206 Partial Content`` and
  ``Content-Range`` (RFC 9110 section 14, as Apache does). Each served mosaic is
  `MOSAIC_PIXELS` square with the simulated field's image placed inside and NaN around it
  (the real mosaics are NaN outside coverage), so a field's box is a small part of it.
  ``bytes_sent`` counts the body bytes sent per route.
* ``/mast/...`` -- the MAST portal calls astroquery makes (``columnsconfig``,
  ``api/v0/invoke`` for ``Mast.Caom.Filtered.Position`` and ``Mast.Caom.Products``; JSON with
  ``status``, ``fields`` (name, type), ``data``, ``paging``, as in the MAST API documentation,
  mast.stsci.edu/api/v0) and ``Download/file?uri=mast:GALEX/...``. GALEX product names follow
  the pipeline's ``<tile>-<nd|fd>-<int|skybg|rrhr>.fits.gz`` (GALEX GR6/7 data description).
  With ``shared_target_name`` every deep observation has the same ``target_name``; with
  ``unsafe_product_name`` the deep tiles' products are named ``../../escaped-...``.
* ``/heasarc/tap/sync`` -- HEASARC's Xamin TAP (``SELECT * FROM clscat|ccosmoscat WHERE
  CONTAINS(...)``, the ADQL astroquery.heasarc 0.4.8 sends): ``ccosmoscat`` with its documented
  columns (HEASARC's ccosmoscat page: ``name, ra, dec, error_radius, flux, sb_flux, hb_flux,
  hardness_ratio, source_number``) and ``__row``; ``clscat`` (ivo://nasa.heasarc/clscat, the
  Chandra COSMOS Legacy catalogue) with ``name, ra, dec, error_radius, flux, soft_flux,
  hard_flux, hardness_ratio`` -- its column names are not checked against the live service
  from here (``pytest -m live`` does).
* ``/prf/irac/PRF_IRAC_ch<N>.fits``, ``/prf/galex/PSF<band>[_faint].fits`` -- plain files.
* ``/mast/api/v0.1/path_lookup/?uri=...&uri=...`` -- MAST's path lookup, the call
  astroquery's ``Observations.get_cloud_uris`` makes (astroquery ``mast/utils.py``,
  ``mast_relative_path``): JSON ``{uri: {"path": "/mast/galex/..."}}``.

A second server on 127.0.0.1 (`ArchiveServer.s3_url`) plays the public S3 buckets, path-style
(``/<bucket>/<key>``), speaking the part of the S3 REST API that s3fs uses to read an object
anonymously: ``HEAD`` (HeadObject: ``Content-Length``, ``ETag``, ``Last-Modified``), ``GET``
with or without a single ``Range`` (GetObject: ``206 Partial Content``, ``Content-Range``),
``GET /<bucket>?list-type=2`` (ListObjectsV2, asked when a HEAD finds nothing) and the XML
``NoSuchKey`` error (Amazon S3 API Reference: HeadObject, GetObject, ListObjectsV2, Error
responses). It holds MAST's ``stpubdata`` GALEX files at the keys the path lookup gives, and
the IRAC mosaics in ``nasa-irsa-spitzer`` (IRSA's Spitzer bucket, named in IRSA's "IRSA Cloud
Access Introduction" tutorial) at `IRSA_COSMOS_KEY`, a key of the stand-in's own: where IRSA
keeps the COSMOS mosaics in S3, if it does, is not known from here. With ``cloud_copies`` the
SIA answer names them in a ``cloud_access`` column, the JSON IRSA's SIA v2 service returns
(``{"aws": {"bucket_name", "key", "region"}}``, the same tutorial). Every S3 request is
counted in ``hits["s3"]`` and its body bytes in ``bytes_sent["s3"]``.

Faults are injected per route, consumed one per request: ``"500"`` (HTTP 500), ``"503_retry"``
(HTTP 503 with ``Retry-After: 1``), ``"truncate"`` (Content-Length larger than the body),
``"cut_fits"`` (a FITS file cut short, with a matching Content-Length), ``"empty"`` (no rows),
``"tap_error"`` (a TAP error VOTable with `TAP_ERROR_MESSAGE`), ``"no_range"`` (the whole file
with HTTP 200 whatever the ``Range``), ``"no_table"`` (a TAP error: the table does not exist),
``"slow"`` (an answer only after `SLOW_ANSWER_S`). Every request is counted per route in
``hits``.
"""

import gzip
import io
import json
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.io.votable import from_table
from astropy.io.votable.tree import Info
from astropy.table import Table

from mbphot.io import read_table, read_wcs

SLOW_ANSWER_S = 1.5
MOSAIC_PIXELS = 4000
"""Side of the served IRAC mosaics (40' at 0.6"/pixel; the real ones are about 11,000)."""
MOSAIC_OFFSET = (1700, 1900)
"""Pixel (x, y) of the served mosaic where the simulated image's first pixel lands."""
NAN_FRAME = 80
"""Pixels of NaN written around the simulated image; the rest of the mosaic is a sparse hole."""
IRSA_IRAC_PATH = "/data/COSMOS/images/spitzer/irac/"
TAP_ERROR_MESSAGE = "Query error: table cosmos2015 is being reloaded, retry in 10 minutes (code 7731)"
GALEX_FOV_RADIUS_DEG = 0.6
IRSA_BUCKET = "nasa-irsa-spitzer"
IRSA_COSMOS_KEY = "spitzer/cosmos/images/irac/"
MAST_BUCKET = "stpubdata"
GALEX_PATH = "GR6/pipe/01-vsn/50031-{tile}/d/01-main/0001-img/07-try/{name}"
UNSAFE_TILE = "../../escaped"
IRSA_SIA_IVOID = "ivo://irsa.ipac/cosmos/images"
REGTAP_SEPARATOR = ":::py VO sep:::"
MAST_COLUMNS_CONFIG = {
    "obs_collection": {"text": "Mission", "type": "string"},
    "dataproduct_type": {"text": "Product Type", "type": "string"},
    "target_name": {"text": "Target", "type": "string"},
    "filters": {"text": "Filters", "type": "string"},
    "t_exptime": {"text": "Exposure Time", "type": "float"},
    "s_ra": {"text": "RA", "type": "float"},
    "s_dec": {"text": "Dec", "type": "float"},
    "obsid": {"text": "Product Group ID", "type": "string"},
}
CAPABILITIES = """<?xml version="1.0" encoding="UTF-8"?>
<cap:capabilities xmlns:cap="http://www.ivoa.net/xml/VOSICapabilities/v1.0"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1"
    xmlns:tr="http://www.ivoa.net/xml/TAPRegExt/v1.0">
  <capability standardID="ivo://ivoa.net/std/TAP" xsi:type="tr:TableAccess">
    <interface xsi:type="vs:ParamHTTP" role="std"><accessURL use="base">{url}</accessURL></interface>
    <language><name>ADQL</name><version ivo-id="ivo://ivoa.net/std/ADQL#v2.0">2.0</version></language>
    <outputFormat><mime>application/x-votable+xml</mime></outputFormat>
  </capability>
</cap:capabilities>
"""


def _votable_bytes(table: Table, status: str = "OK", ucds: dict | None = None) -> bytes:
    votable = from_table(table)
    votable.resources[0].type = "results"
    votable.resources[0].infos.append(Info(name="QUERY_STATUS", value=status))
    for field in votable.get_first_table().fields:
        if ucds and field.name in ucds:
            field.ucd = ucds[field.name]
    buffer = io.BytesIO()
    votable.to_xml(buffer)
    return buffer.getvalue()


def _tap_error(message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">\n'
        '  <RESOURCE type="results">\n'
        f'    <INFO name="QUERY_STATUS" value="ERROR">{message}</INFO>\n'
        "  </RESOURCE>\n</VOTABLE>\n"
    ).encode()


def _fits_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


class ArchiveServer:
    """The local archives for one simulated field directory.

    Parameters
    ----------
    field_dir : Path
        A folder written by `mbphot.sample.make_sample_field`.
    """

    def __init__(self, field_dir):
        self.field_dir = Path(field_dir)
        self.hits = Counter()
        self.request_times = defaultdict(list)
        self.bytes_sent = Counter()
        self.faults = defaultdict(list)
        self.shared_target_name = False
        self.unsafe_product_name = False
        self.cloud_copies = False
        self._current_fault = None
        self.jobs = {}
        self.mosaic_dir = self.field_dir.parent / f"{self.field_dir.name}_served_mosaics"
        self._lock = threading.Lock()
        self._server = None
        self._thread = None
        self._s3_server = None
        self._s3_thread = None
        self.catalog = read_table(self.field_dir / "catalog/cosmos2015.fits")
        chandra = read_table(self.field_dir / "chandra/ccosmoscat.fits")
        chandra.rename_columns(chandra.colnames, [name.lower() for name in chandra.colnames])
        chandra.rename_column("id", "__row")
        self.chandra = chandra
        legacy = chandra.copy()
        legacy.remove_columns(["__row", "source_number"])
        legacy.rename_columns(["sb_flux", "hb_flux"], ["soft_flux", "hard_flux"])
        self.legacy = legacy
        self.galex_tiles = {}
        for path in sorted((self.field_dir / "galex").glob("*-nd-int.fits")):
            header = fits.getheader(path)
            self.galex_tiles[header["TILENAME"]] = header

    # --- life cycle -------------------------------------------------------------------------
    def start(self) -> "ArchiveServer":
        handler = type("Handler", (_Handler,), {"archive": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        s3_handler = type("S3Handler", (_S3Handler,), {"archive": self})
        self._s3_server = ThreadingHTTPServer(("127.0.0.1", 0), s3_handler)
        self._s3_server.daemon_threads = True
        self._s3_thread = threading.Thread(target=self._s3_server.serve_forever, daemon=True)
        self._s3_thread.start()
        return self

    def stop(self) -> None:
        for server, thread in ((self._server, self._thread), (self._s3_server, self._s3_thread)):
            server.shutdown()
            server.server_close()
            thread.join()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def s3_url(self) -> str:
        host, port = self._s3_server.server_address[:2]
        return f"http://{host}:{port}"

    def endpoints(self, **overrides) -> dict:
        """The endpoint settings that point mbphot at this server (fast retries; the cloud off
        unless ``cloud`` is overridden, and then this server's S3 stand-in)."""
        settings = {
            "irsa_tap": f"{self.url}/irsa/TAP",
            "registry": f"{self.url}/registry/tap",
            "mast": f"{self.url}/mast",
            "heasarc": f"{self.url}/heasarc",
            "prf_base": {"irac": f"{self.url}/prf/irac", "galex": f"{self.url}/prf/galex"},
            "timeout_s": 10.0,
            "retries": 2,
            "backoff_s": 0.01,
            "cloud": "http",
            "s3_endpoint": self.s3_url,
        }
        settings.update(overrides)
        return settings

    def reset(self) -> None:
        with self._lock:
            self.hits.clear()
            self.request_times.clear()
            self.bytes_sent.clear()
            self.faults.clear()
            self.shared_target_name = False
            self.unsafe_product_name = False
            self.cloud_copies = False

    def inject(self, route: str, *faults: str) -> None:
        """Answer the next requests on ``route`` with ``faults``, in order."""
        with self._lock:
            self.faults[route].extend(faults)

    def _next_fault(self, route: str) -> str | None:
        with self._lock:
            self.hits[route] += 1
            self.request_times[route].append(time.monotonic())
            return self.faults[route].pop(0) if self.faults[route] else None

    # --- TAP ----------------------------------------------------------------------------
    def tap_answer(self, query: str, tables: dict) -> bytes:
        match = re.search(
            r"SELECT\s+(?P<columns>.+?)\s+FROM\s+(?P<table>\S+)\s+WHERE.*?CIRCLE\(\s*'ICRS'\s*,\s*(?P<ra>[-+\d.eE]+)\s*,"
            r"\s*(?P<dec>[-+\d.eE]+)\s*,\s*(?P<radius>[-+\d.eE]+)\s*\)",
            query,
            re.IGNORECASE | re.DOTALL,
        )
        if not match:
            return _tap_error(f"cannot parse ADQL: {query}")
        name = match["table"].lower()
        if name not in tables:
            return _tap_error(f"Table '{match['table']}' does not exist")
        table = tables[name]
        columns = [c.strip() for c in match["columns"].split(",")]
        if columns == ["*"]:
            columns = list(table.colnames)
        by_lower = {c.lower(): c for c in table.colnames}
        unknown = [c for c in columns if c.lower() not in by_lower]
        if unknown:
            return _tap_error(f"Column '{unknown[0]}' does not exist in table {name}")
        centre = SkyCoord(float(match["ra"]) * u.deg, float(match["dec"]) * u.deg)
        positions = SkyCoord(np.asarray(table[by_lower["ra"]]) * u.deg, np.asarray(table[by_lower["dec"]]) * u.deg)
        rows = table[positions.separation(centre).deg <= float(match["radius"])]
        result = Table([rows[by_lower[c.lower()]] for c in columns], names=[c.lower() for c in columns])
        for column in result.itercols():
            column.unit = None  # archives' own unit strings differ; the client sets its units
        return _votable_bytes(result)

    def registry_answer(self, query: str) -> bytes:
        if "rr.interface" not in query or "rr.capability" not in query:
            return _tap_error(f"this RegTAP stand-in answers only the capability/interface join, not: {query}")
        table = Table({
            "ivoid": ["ivo://cds.vizier/ii/284", IRSA_SIA_IVOID, IRSA_SIA_IVOID],
            "access_url": ["http://vizier.example/sia?", f"{self.url}/irsa/sia2?", f"{self.url}/irsa/sia?"],
            "standard_id": ["ivo://ivoa.net/std/sia", "ivo://ivoa.net/std/sia#query-2.0", "ivo://ivoa.net/std/sia"],
        })
        return _votable_bytes(table)

    # --- SIA and the image server ---------------------------------------------------------
    def sia_answer(self, position: str, empty: bool) -> bytes:
        ra, dec = (float(v) for v in position.split(","))
        header = fits.getheader(self.field_dir / "irac/irac_ch1_go2_sci.fits")
        covered = read_wcs(header).footprint_contains(SkyCoord(ra * u.deg, dec * u.deg)) and not empty
        rows = []
        if covered:
            centre = read_wcs(header).pixel_to_world((header["NAXIS1"] - 1) / 2, (header["NAXIS2"] - 1) / 2)
            for channel in range(1, 5):
                for kind in ("sci", "unc", "cov"):
                    name = f"irac_ch{channel}_go2_{kind}_10.fits"
                    url = f"{self.url}{IRSA_IRAC_PATH}{name}"
                    rows.append((f"IRAC ch{channel} {kind}", centre.ra.deg, centre.dec.deg, "IRAC", f"IRAC{channel}", name, url))
            rows.append(("ACS F814W", ra, dec, "ACS", "F814W", "acs_I_030mas_077_sci.fits",
                         f"{self.url}/data/COSMOS/images/acs_mosaic_2.0/acs.fits"))
        table = Table(
            rows=rows or None,
            names=("sia_title", "ra", "dec", "dataset", "band_name", "fname", "sia_url"),
            dtype=(str, float, float, str, str, str, str),
        )
        table.add_column(["image/fits"] * len(table), name="sia_fmt")
        if self.cloud_copies:
            table.add_column([
                json.dumps({"aws": {"bucket_name": IRSA_BUCKET, "key": IRSA_COSMOS_KEY + name, "region": "us-west-2"}})
                if name.startswith("irac_") else "" for name in table["fname"]
            ], name="cloud_access")
        ucds = {
            "sia_title": "VOX:Image_Title", "ra": "POS_EQ_RA_MAIN", "dec": "POS_EQ_DEC_MAIN",
            "sia_url": "VOX:Image_AccessReference", "sia_fmt": "VOX:Image_Format",
        }
        return _votable_bytes(table, ucds=ucds)

    def mosaic(self, name: str) -> Path | None:
        """The served mosaic file ``name``, written on first use (sparse: NaN only near the data)."""
        match = re.fullmatch(r"irac_ch(\d)_go2_(sci|unc)_10\.fits", name)
        if not match:
            return None
        path = self.mosaic_dir / name
        with self._lock:
            if path.is_file():
                return path
            with fits.open(self.field_dir / f"irac/irac_ch{match[1]}_go2_{match[2]}.fits") as hdul:
                data, header = hdul[0].data, hdul[0].header.copy()
            dtype = data.dtype.newbyteorder(">")
            header["NAXIS1"] = header["NAXIS2"] = MOSAIC_PIXELS
            header["CRPIX1"] += MOSAIC_OFFSET[0]
            header["CRPIX2"] += MOSAIC_OFFSET[1]
            header_bytes = header.tostring(padding=True).encode("ascii")
            size = len(header_bytes) + MOSAIC_PIXELS * MOSAIC_PIXELS * dtype.itemsize
            size += -size % 2880
            ox, oy = MOSAIC_OFFSET
            n_y, n_x = data.shape
            block = np.full((n_y + 2 * NAN_FRAME, n_x + 2 * NAN_FRAME), np.nan, dtype=dtype)
            block[NAN_FRAME : NAN_FRAME + n_y, NAN_FRAME : NAN_FRAME + n_x] = data
            self.mosaic_dir.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".part")
            with open(partial, "wb") as out:
                out.write(header_bytes)
                out.truncate(size)
                for index, row in enumerate(block):
                    y = oy - NAN_FRAME + index
                    out.seek(len(header_bytes) + (y * MOSAIC_PIXELS + ox - NAN_FRAME) * dtype.itemsize)
                    out.write(row.tobytes())
            partial.rename(path)
        return path

    # --- MAST -------------------------------------------------------------------------------
    def _galex_observations(self) -> list:
        rows = []
        for index, (tile, header) in enumerate(self.galex_tiles.items()):
            for band_index, band in enumerate(("NUV", "FUV")):
                rows.append({
                    "obsid": str(2000 + 10 * index + band_index), "obs_collection": "GALEX", "dataproduct_type": "image",
                    "target_name": "COSMOS" if self.shared_target_name else tile, "filters": band,
                    "t_exptime": float(header["EXPTIME"]),
                    "s_ra": float(header["RA_CENT"]), "s_dec": float(header["DEC_CENT"]), "project": "DIS",
                })
        # A shallow all-sky-survey tile over the same sky: the deepest-exposure rule must drop it.
        first = next(iter(self.galex_tiles.values()))
        for band_index, band in enumerate(("NUV", "FUV")):
            rows.append({
                "obsid": str(3000 + band_index), "obs_collection": "GALEX", "dataproduct_type": "image",
                "target_name": "AIS_101_sg32", "filters": band, "t_exptime": 112.0,
                "s_ra": float(first["RA_CENT"]) + 0.1, "s_dec": float(first["DEC_CENT"]), "project": "AIS",
            })
        rows.append({
            "obsid": "4000", "obs_collection": "HST", "dataproduct_type": "image", "target_name": "COSMOS-HST",
            "filters": "F814W", "t_exptime": 2028.0, "s_ra": float(first["RA_CENT"]), "s_dec": float(first["DEC_CENT"]),
            "project": "COSMOS",
        })
        return rows

    def _tile_of(self, observation: dict) -> str:
        """The tile a deep observation covers, from its pointing (its products' name prefix)."""
        for tile, header in self.galex_tiles.items():
            if float(header["RA_CENT"]) == observation["s_ra"] and float(header["DEC_CENT"]) == observation["s_dec"]:
                return tile
        raise KeyError(observation)

    def _galex_products(self, obsids) -> list:
        rows = []
        for observation in self._galex_observations():
            if observation["obsid"] not in obsids:
                continue
            tile = observation["target_name"] if observation["project"] != "DIS" else self._tile_of(observation)
            named = UNSAFE_TILE if self.unsafe_product_name and observation["project"] == "DIS" else tile
            for code in ("nd", "fd"):
                for kind in ("int", "skybg", "rrhr", "cat"):
                    name = f"{named}-{code}-{kind}.fits.gz"
                    rows.append({
                        "obsID": observation["obsid"], "obs_collection": "GALEX", "dataproduct_type": "image",
                        "productFilename": name,
                        "dataURI": f"mast:GALEX/url/data/{GALEX_PATH.format(tile=tile, name=name)}",
                        "productType": "SCIENCE" if kind == "int" else "AUXILIARY", "size": 1000,
                    })
            rows.append({
                "obsID": observation["obsid"], "obs_collection": "GALEX", "dataproduct_type": "image",
                "productFilename": f"{tile}-xd-mcat.fits.gz", "dataURI": f"mast:GALEX/url/data/{tile}-xd-mcat.fits.gz",
                "productType": "AUXILIARY", "size": 1000,
            })
        return rows

    def mast_invoke(self, request: dict, empty: bool) -> bytes:
        service, params = request["service"], request.get("params", {})
        if service == "Mast.Caom.Filtered.Position":
            ra, dec, radius = (float(v) for v in params["position"].split(","))
            centre = SkyCoord(ra * u.deg, dec * u.deg)
            rows = []
            for row in self._galex_observations():
                wanted = all(str(row[f["paramName"]]) in [str(v) for v in f["values"]] for f in params.get("filters", []))
                distance = SkyCoord(row["s_ra"] * u.deg, row["s_dec"] * u.deg).separation(centre).deg
                if wanted and distance <= GALEX_FOV_RADIUS_DEG + radius:
                    rows.append(row)
            types = {"t_exptime": "float", "s_ra": "float", "s_dec": "float"}
        elif service == "Mast.Caom.Products":
            rows = self._galex_products(set(str(params["obsid"]).split(",")))
            types = {"size": "int"}
        else:
            return json.dumps({"status": "ERROR", "msg": f"unknown service {service}"}).encode()
        if empty:
            rows = []
        names = list(rows[0]) if rows else list(MAST_COLUMNS_CONFIG)
        payload = {
            "status": "COMPLETE",
            "msg": "",
            "fields": [{"name": n, "type": types.get(n, "string")} for n in names],
            "data": rows,
            "paging": {"page": 1, "pageSize": len(rows), "pagesFiltered": 1, "rows": len(rows),
                       "rowsFiltered": len(rows), "rowsTotal": len(rows)},
        }
        return json.dumps(payload).encode()

    def path_lookup(self, uris) -> bytes:
        """MAST's path lookup: each GALEX ``dataURI`` to its path, which names its key in ``stpubdata``."""
        answer = {}
        for uri in uris:
            prefix = "mast:GALEX/url/data/"
            answer[uri] = {"path": f"/mast/galex/{uri[len(prefix):]}" if uri.startswith(prefix) else None}
        return json.dumps(answer).encode()

    def s3_object(self, bucket: str, key: str) -> bytes | Path | None:
        """The object at ``bucket``/``key`` of the S3 stand-in (a served mosaic's path, or bytes)."""
        if bucket == IRSA_BUCKET and key.startswith(IRSA_COSMOS_KEY):
            return self.mosaic(key[len(IRSA_COSMOS_KEY):])
        if bucket == MAST_BUCKET and key.startswith("galex/"):
            return self.galex_file(key)
        return None

    def galex_file(self, uri: str) -> bytes | None:
        name = uri.rsplit("/", 1)[-1]
        match = re.fullmatch(r"(.+)-(nd|fd)-(int|skybg|rrhr)\.fits\.gz", name)
        if not match or match[1] not in self.galex_tiles:
            return None
        return gzip.compress(_fits_bytes(self.field_dir / f"galex/{name[:-3]}"), mtime=0)


class _Handler(BaseHTTPRequestHandler):
    archive: ArchiveServer

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a time-out test): nothing to answer
            pass

    def _send(self, status: int, body: bytes, content_type: str = "application/octet-stream", length: int | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def _form(self) -> dict:
        size = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(size).decode() if size else ""
        return {k.upper(): v[0] for k, v in parse_qs(body).items()}

    def _send_file(self, path: Path, route: str):
        """A static file, honouring a single ``Range: bytes=a-b`` (RFC 9110 section 14.2)."""
        archive = self.archive
        total = path.stat().st_size
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        if wanted is None or self._fault == "no_range":
            start, stop, status = 0, total - 1, 200
        else:
            start = int(wanted[1])
            stop = min(int(wanted[2]) if wanted[2] else total - 1, total - 1)
            if start >= total:
                return self._send(416, b"range not satisfiable", "text/plain")
            status = 206
        with open(path, "rb") as handle:
            handle.seek(start)
            body = handle.read(stop - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/fits")
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop}/{total}")
        if self._fault == "truncate":
            self.close_connection = True
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            body = body[: len(body) // 2]
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
        self.wfile.write(body)
        with archive._lock:
            archive.bytes_sent[route] += len(body)

    def _uws_job(self, job_id: str) -> bytes:
        archive = self.archive
        job = archive.jobs[job_id]
        base = f"{archive.url}/irsa/TAP/async/{job_id}"
        result = f'<uws:result id="result" xlink:href="{base}/results/result"/>' if job["phase"] == "COMPLETED" else ""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<uws:job xmlns:uws="http://www.ivoa.net/xml/UWS/v1.0" xmlns:xlink="http://www.w3.org/1999/xlink" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" version="1.1">\n'
            f"  <uws:jobId>{job_id}</uws:jobId>\n  <uws:runId/>\n  <uws:ownerId xsi:nil=\"true\"/>\n"
            f"  <uws:phase>{job['phase']}</uws:phase>\n  <uws:quote xsi:nil=\"true\"/>\n"
            "  <uws:creationTime>2026-01-01T00:00:00Z</uws:creationTime>\n"
            "  <uws:startTime xsi:nil=\"true\"/>\n  <uws:endTime xsi:nil=\"true\"/>\n"
            "  <uws:executionDuration>3600</uws:executionDuration>\n"
            "  <uws:destruction>2026-01-08T00:00:00Z</uws:destruction>\n"
            "  <uws:parameters>\n"
            f"    <uws:parameter id=\"query\">{job['query'].replace('&', '&amp;').replace('<', '&lt;')}</uws:parameter>\n"
            "  </uws:parameters>\n"
            f"  <uws:results>{result}</uws:results>\n</uws:job>\n"
        ).encode()

    def _redirect(self, location: str):
        self.send_response(303)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _route(self, method: str):
        archive = self.archive
        parsed = urlparse(self.path)
        path = parsed.path
        query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
        form = self._form() if method == "POST" else {}

        if path == "/registry/tap/capabilities":
            archive._next_fault("registry_capabilities")
            return self._send(200, CAPABILITIES.replace("{url}", f"{archive.url}/registry/tap").encode(), "text/xml")
        routes = {
            "/irsa/TAP/sync": "irsa_tap", "/registry/tap/sync": "registry", "/heasarc/tap/sync": "heasarc_tap",
            "/irsa/sia": "sia", "/mast/portal/Mashup/Mashup.asmx/columnsconfig": "mast_columnsconfig",
            "/mast/api/v0/invoke": "mast_invoke", "/mast/api/v0.1/Download/file": "mast_download",
            "/mast/api/v0.1/path_lookup/": "mast_path_lookup",
        }
        route = (routes.get(path) or ("irac_download" if path.startswith(IRSA_IRAC_PATH) else None)
                 or ("prf_download" if path.startswith("/prf/") else None)
                 or ("irsa_tap_async" if path.startswith("/irsa/TAP/async") else None))
        if route is None:
            return self._send(404, b"not found", "text/plain")
        fault = archive._next_fault(route)
        self._fault = fault
        if fault == "slow":
            time.sleep(SLOW_ANSWER_S)
        if fault == "500":
            return self._send(500, b"Internal Server Error: the archive is overloaded", "text/plain")
        if fault == "503_retry":
            self.send_response(503)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if fault == "tap_error":
            return self._send(200, _tap_error(TAP_ERROR_MESSAGE), "text/xml")
        empty = fault == "empty"

        if route == "irsa_tap_async":
            parts = path[len("/irsa/TAP/async"):].strip("/").split("/")
            if parts == [""] and method == "POST":  # TAP 1.1 section 2.3.2: create the job, redirect to it
                job_id = uuid.uuid4().hex[:12]
                archive.jobs[job_id] = {"phase": "PENDING", "query": form.get("QUERY", ""), "empty": empty}
                return self._redirect(f"{archive.url}/irsa/TAP/async/{job_id}")
            job_id = parts[0]
            if job_id not in archive.jobs:
                return self._send(404, b"no such job", "text/plain")
            job = archive.jobs[job_id]
            if method == "DELETE" or (method == "POST" and parts[1:] == [] and form.get("ACTION") == "DELETE"):
                del archive.jobs[job_id]  # UWS 1.1 section 2.2.3.2: HTTP DELETE, or POST ACTION=DELETE
                return self._redirect(f"{archive.url}/irsa/TAP/async")
            if parts[1:] == ["phase"] and method == "POST":
                if form.get("PHASE") == "RUN":
                    job["phase"] = "COMPLETED"  # the stand-in's jobs finish at once
                return self._redirect(f"{archive.url}/irsa/TAP/async/{job_id}")
            if parts[1:] == ["results", "result"]:
                table = archive.catalog[:0] if job["empty"] else archive.catalog
                return self._send(200, archive.tap_answer(job["query"], {"cosmos2015": table}), "application/x-votable+xml")
            return self._send(200, self._uws_job(job_id), "text/xml")
        if route in ("irsa_tap", "registry", "heasarc_tap"):
            adql = form.get("QUERY", "")
            if route == "registry":
                body = archive.registry_answer(adql)
            elif route == "irsa_tap":
                body = archive.tap_answer(adql, {"cosmos2015": archive.catalog[:0] if empty else archive.catalog})
            else:
                tables = {"ccosmoscat": archive.chandra, "clscat": archive.legacy}
                if fault == "no_table":
                    tables.pop("clscat")
                body = archive.tap_answer(adql, {k: v[:0] if empty else v for k, v in tables.items()})
            return self._send(200, body, "application/x-votable+xml")
        if route == "sia":
            return self._send(200, archive.sia_answer(query.get("POS", "0,0"), empty), "text/xml")
        if route == "mast_columnsconfig":
            return self._send(200, json.dumps(MAST_COLUMNS_CONFIG).encode(), "application/json")
        if route == "mast_invoke":
            return self._send(200, archive.mast_invoke(json.loads(form["REQUEST"]), empty), "application/json")
        if route == "mast_path_lookup":
            return self._send(200, archive.path_lookup(parse_qs(parsed.query).get("uri", [])), "application/json")

        if route == "irac_download":
            mosaic = archive.mosaic(unquote(path.rsplit("/", 1)[-1]))
            if mosaic is None:
                return self._send(404, b"no such file", "text/plain")
            return self._send_file(mosaic, route)
        if route == "mast_download":
            body = archive.galex_file(query.get("uri", ""))
        else:
            name = unquote(path.rsplit("/", 1)[-1])
            file = archive.field_dir / "prf" / {"PSFnuv_faint.fits": "PSFnuv.fits"}.get(name, name)
            body = file.read_bytes() if file.is_file() else None
        if body is None:
            return self._send(404, b"no such file", "text/plain")
        if fault == "truncate":
            # Announce the whole file, send half, hang up: a connection lost mid-transfer.
            self.close_connection = True
            return self._send(200, body[: len(body) // 2], length=len(body))
        if fault == "cut_fits":
            if route == "mast_download":
                body = gzip.compress(gzip.decompress(body)[: 2 * 2880], mtime=0)
            else:
                body = body[: len(body) - 2880]
        return self._send(200, body, "application/fits")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_DELETE(self):
        self._route("DELETE")


class _S3Handler(BaseHTTPRequestHandler):
    """The S3 REST calls s3fs makes to read a public object (path-style addressing)."""

    archive: ArchiveServer

    def log_message(self, *args):
        pass

    def _headers(self, status: int, headers: dict):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _error(self, status: int, code: str, message: str, head: bool):
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<Resource>{self.path}</Resource><RequestId>mbphot-test</RequestId></Error>").encode()
        self._headers(status, {"Content-Type": "application/xml", "Content-Length": str(0 if head else len(body))})
        if not head:
            self.wfile.write(body)

    def _answer(self, head: bool):
        archive = self.archive
        archive._next_fault("s3")
        parsed = urlparse(self.path)
        bucket, _, key = unquote(parsed.path).lstrip("/").partition("/")
        if not key:  # ListObjectsV2 of a prefix: nothing but the objects served is there
            prefix = parse_qs(parsed.query).get("prefix", [""])[0]
            body = ('<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                    f"<Name>{bucket}</Name><Prefix>{prefix}</Prefix><KeyCount>0</KeyCount><MaxKeys>1</MaxKeys>"
                    "<IsTruncated>false</IsTruncated></ListBucketResult>").encode()
            self._headers(200, {"Content-Type": "application/xml", "Content-Length": str(0 if head else len(body))})
            if not head:
                self.wfile.write(body)
            return
        found = archive.s3_object(bucket, key)
        if found is None:
            return self._error(404, "NoSuchKey", "The specified key does not exist.", head)
        total = found.stat().st_size if isinstance(found, Path) else len(found)
        headers = {"Content-Type": "binary/octet-stream", "Accept-Ranges": "bytes", "ETag": f'"{total:032x}"',
                   "Last-Modified": "Thu, 01 Jan 2026 00:00:00 GMT"}
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        start, stop, status = 0, total - 1, 200
        if wanted and not head:
            start, stop, status = int(wanted[1]), min(int(wanted[2]) if wanted[2] else total - 1, total - 1), 206
            if start >= total:
                return self._error(416, "InvalidRange", "The requested range is not satisfiable", head)
            headers["Content-Range"] = f"bytes {start}-{stop}/{total}"
        headers["Content-Length"] = str(stop - start + 1)
        self._headers(status, headers)
        if head:
            return
        if isinstance(found, Path):
            with open(found, "rb") as handle:
                handle.seek(start)
                body = handle.read(stop - start + 1)
        else:
            body = found[start : stop + 1]
        self.wfile.write(body)
        with archive._lock:
            archive.bytes_sent["s3"] += len(body)

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)
