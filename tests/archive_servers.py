"""Local stand-ins for the archives, speaking the protocols mbphot's clients use.

One threaded HTTP server on 127.0.0.1 (an ephemeral port) plays every service, each under its
own path, with data from a simulated field (`mbphot.sample.make_sample_field`):

* ``/irsa/TAP/sync`` -- IRSA TAP (ADQL cone on ``cosmos2015``; VOTable answers);
* ``/registry/tap`` -- a RegTAP registry (``/capabilities`` and ``/sync``) listing IRSA's
  COSMOS image service and a decoy;
* ``/irsa/sia`` -- SIA 1 with IRAC sci/unc/cov mosaics and a decoy ACS row; access URLs under
  ``/irsa/data/`` honour IRSA's ``center``/``size`` cutout parameters (astropy Cutout2D);
* ``/mast/...`` -- the MAST portal calls astroquery makes (``columnsconfig``, ``api/v0/invoke``
  for ``Mast.Caom.Filtered.Position`` and ``Mast.Caom.Products``) and ``Download/file``;
* ``/heasarc/tap/sync`` -- HEASARC's Xamin TAP (cone on ``ccosmoscat``, with ``__row``);
* ``/prf/<file>`` -- plain PRF files.

Faults are injected per route, consumed one per request: ``"500"`` (HTTP 500), ``"truncate"``
(Content-Length larger than the body), ``"cut_fits"`` (a FITS file cut short, with a matching
Content-Length), ``"empty"`` (no rows), ``"tap_error"`` (a TAP error VOTable with
`TAP_ERROR_MESSAGE`), ``"refuse_cutout"`` (HTTP 400 for cutout parameters), ``"slow"`` (an
answer only after `SLOW_ANSWER_S`). Every request is
counted per route in ``hits``.
"""

import gzip
import io
import json
import re
import threading
import time
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
from astropy.nddata import Cutout2D
from astropy.table import Table

from mbphot.io import read_table, read_wcs

SLOW_ANSWER_S = 1.5
TAP_ERROR_MESSAGE = "Query error: table cosmos2015 is being reloaded, retry in 10 minutes (code 7731)"
GALEX_FOV_RADIUS_DEG = 0.6
IRSA_SIA_IVOID = "ivo://irsa.ipac/COSMOS/images"
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
        self.faults = defaultdict(list)
        self._lock = threading.Lock()
        self._server = None
        self._thread = None
        self.catalog = read_table(self.field_dir / "catalog/cosmos2015.fits")
        chandra = read_table(self.field_dir / "chandra/ccosmoscat.fits")
        chandra.rename_columns(chandra.colnames, [name.lower() for name in chandra.colnames])
        chandra.rename_column("id", "__row")
        self.chandra = chandra
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
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def endpoints(self, **overrides) -> dict:
        """The endpoint settings that point mbphot at this server (fast retries)."""
        settings = {
            "irsa_tap": f"{self.url}/irsa/TAP",
            "registry": f"{self.url}/registry/tap",
            "mast": f"{self.url}/mast",
            "heasarc": f"{self.url}/heasarc",
            "timeout_s": 10.0,
            "retries": 2,
            "backoff_s": 0.01,
        }
        settings.update(overrides)
        return settings

    def reset(self) -> None:
        with self._lock:
            self.hits.clear()
            self.faults.clear()

    def inject(self, route: str, *faults: str) -> None:
        """Answer the next requests on ``route`` with ``faults``, in order."""
        with self._lock:
            self.faults[route].extend(faults)

    def _next_fault(self, route: str) -> str | None:
        with self._lock:
            self.hits[route] += 1
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

    def registry_answer(self) -> bytes:
        rows = [
            ("ivo://cds.vizier/ii/284", "COSMOS photometry (VizieR)", "http://vizier.example/sia?"),
            (IRSA_SIA_IVOID, "COSMOS images at IRSA", f"{self.url}/irsa/sia?"),
        ]
        columns = {
            "ivoid": [r[0] for r in rows], "res_type": ["vs:catalogservice"] * 2, "short_name": ["COSMOS"] * 2,
            "res_title": [r[1] for r in rows], "content_level": ["research"] * 2, "res_description": [r[1] for r in rows],
            "reference_url": ["https://example.org"] * 2, "creator_seq": ["Scoville, N."] * 2,
            "created": ["2008-01-01T00:00:00"] * 2, "updated": ["2020-01-01T00:00:00"] * 2, "rights": ["public"] * 2,
            "content_type": ["survey"] * 2, "source_format": ["bibcode"] * 2, "source_value": ["2007ApJS..172....1S"] * 2,
            "region_of_regard": [np.nan] * 2, "waveband": ["infrared#optical"] * 2, "access_urls": [r[2] for r in rows],
            "standard_ids": ["ivo://ivoa.net/std/sia"] * 2, "intf_types": ["vs:paramhttp"] * 2, "intf_roles": ["std"] * 2,
            "cap_descriptions": ["SIA"] * 2,
        }
        return _votable_bytes(Table(columns))

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
                    url = f"{self.url}/irsa/data/{name}"
                    rows.append((f"IRAC ch{channel} {kind}", centre.ra.deg, centre.dec.deg, "IRAC", name, url))
            rows.append(("ACS F814W", ra, dec, "ACS", "acs_I_030mas_077_sci.fits", f"{self.url}/irsa/data/acs.fits"))
        table = Table(
            rows=rows or None,
            names=("sia_title", "ra", "dec", "dataset", "fname", "sia_url"),
            dtype=(str, float, float, str, str, str),
        )
        table.add_column(["image/fits"] * len(table), name="sia_fmt")
        ucds = {
            "sia_title": "VOX:Image_Title", "ra": "POS_EQ_RA_MAIN", "dec": "POS_EQ_DEC_MAIN",
            "sia_url": "VOX:Image_AccessReference", "sia_fmt": "VOX:Image_Format",
        }
        return _votable_bytes(table, ucds=ucds)

    def irac_file(self, name: str, query: dict) -> bytes | None:
        match = re.fullmatch(r"irac_ch(\d)_go2_(sci|unc)_10\.fits", name)
        if not match:
            return None
        path = self.field_dir / f"irac/irac_ch{match[1]}_go2_{match[2]}.fits"
        if "center" not in query:
            return _fits_bytes(path)
        ra, dec = (float(v) for v in query["center"].split(","))
        size = u.Quantity(query["size"].replace("arcmin", " arcmin"))
        with fits.open(path) as hdul:
            header = hdul[0].header.copy()
            cut = Cutout2D(hdul[0].data, SkyCoord(ra * u.deg, dec * u.deg), size, wcs=read_wcs(header), mode="trim")
        header.update(cut.wcs.to_header())
        buffer = io.BytesIO()
        fits.PrimaryHDU(cut.data, header).writeto(buffer)
        return buffer.getvalue()

    # --- MAST -------------------------------------------------------------------------------
    def _galex_observations(self) -> list:
        rows = []
        for index, (tile, header) in enumerate(self.galex_tiles.items()):
            for band_index, band in enumerate(("NUV", "FUV")):
                rows.append({
                    "obsid": str(2000 + 10 * index + band_index), "obs_collection": "GALEX", "dataproduct_type": "image",
                    "target_name": tile, "filters": band, "t_exptime": float(header["EXPTIME"]),
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

    def _galex_products(self, obsids) -> list:
        rows = []
        for observation in self._galex_observations():
            if observation["obsid"] not in obsids:
                continue
            tile = observation["target_name"]
            for code in ("nd", "fd"):
                for kind in ("int", "skybg", "rrhr", "cat"):
                    name = f"{tile}-{code}-{kind}.fits.gz"
                    rows.append({
                        "obsID": observation["obsid"], "obs_collection": "GALEX", "dataproduct_type": "image",
                        "productFilename": name,
                        "dataURI": f"mast:GALEX/url/data/GR6/pipe/01-vsn/50031-{tile}/d/01-main/0001-img/07-try/{name}",
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
        }
        route = routes.get(path) or ("irac_download" if path.startswith("/irsa/data/") else None) or (
            "prf_download" if path.startswith("/prf/") else None)
        if route is None:
            return self._send(404, b"not found", "text/plain")
        fault = archive._next_fault(route)
        if fault == "slow":
            time.sleep(SLOW_ANSWER_S)
        if fault == "500":
            return self._send(500, b"Internal Server Error: the archive is overloaded", "text/plain")
        if fault == "tap_error":
            return self._send(200, _tap_error(TAP_ERROR_MESSAGE), "text/xml")
        if fault == "refuse_cutout" and "center" in query:
            return self._send(400, b"cutouts are not supported for this file", "text/plain")
        empty = fault == "empty"

        if route in ("irsa_tap", "registry", "heasarc_tap"):
            adql = form.get("QUERY", "")
            if route == "registry":
                body = archive.registry_answer()
            else:
                table = archive.catalog if route == "irsa_tap" else archive.chandra
                name = "cosmos2015" if route == "irsa_tap" else "ccosmoscat"
                body = archive.tap_answer(adql, {name: table[:0] if empty else table})
            return self._send(200, body, "application/x-votable+xml")
        if route == "sia":
            return self._send(200, archive.sia_answer(query.get("POS", "0,0"), empty), "text/xml")
        if route == "mast_columnsconfig":
            return self._send(200, json.dumps(MAST_COLUMNS_CONFIG).encode(), "application/json")
        if route == "mast_invoke":
            return self._send(200, archive.mast_invoke(json.loads(form["REQUEST"]), empty), "application/json")

        if route == "irac_download":
            body = archive.irac_file(unquote(path.rsplit("/", 1)[-1]), query)
        elif route == "mast_download":
            body = archive.galex_file(query.get("uri", ""))
        else:
            file = archive.field_dir / "prf" / unquote(path.rsplit("/", 1)[-1])
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
