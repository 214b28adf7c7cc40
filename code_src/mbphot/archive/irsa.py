"""IRSA: the COSMOS2015 catalogue (TAP) and the COSMOS IRAC mosaics (SIA found in the registry).

The catalogue is a cone on IRSA's ``cosmos2015`` table with only the columns the pipeline
uses, written with the same names, order, types and units as the simulated catalogue, and
COSMOS2015's sentinel values turned into missing values (`SENTINEL_RULE`). Cones wider than
``async_radius_arcmin`` go through TAP's asynchronous endpoint (a 48' cone is about 1.2
million rows, too long for one synchronous answer).

The IRAC ``go2`` science and uncertainty mosaics are found through IRSA's COSMOS image (SIA
1.0) service, itself found in the IVOA registry with a RegTAP query. IRSA serves these
mosaics as plain files under ``/data/COSMOS/images/spitzer/irac/`` (about 480 MB each), where
its ``center``/``size`` cutout parameters do not apply, so only the field's box is read, with
HTTP range requests (`mbphot.archive.sections`); a whole mosaic is downloaded only where the
server ignores ranges and ``whole_files`` is set. Where the image service names a cloud copy
(its ``cloud_access`` column) and the ``cloud`` setting allows, the box is read from that copy
in IRSA's public S3 bucket instead, the same way (`mbphot.archive.cloud`).
"""

import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pyvo
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import MaskedColumn, Table
from pyvo.dal.exceptions import DALOverflowWarning

from ..io import atomic_path
from .cache import (
    ArchiveEmptyError,
    ArchiveError,
    TimeoutSession,
    call_with_retries,
    download,
    is_cached,
    record_source,
)
from .config import ENDPOINTS_ENV, Endpoints
from .cutout import cut_to_box
from .cloud import CloudUnavailableError, fall_back_to_http, irsa_location
from .sections import HttpRanges, RangeNotSupportedError, read_section

__all__ = ["CATALOG_COLUMNS", "SENTINEL_RULE", "query_cosmos2015", "find_cosmos_image_service", "fetch_irac",
           "clean_sentinels"]

logger = logging.getLogger("mbphot.archive.irsa")

CATALOG_TABLE = "cosmos2015"
CATALOG_COLUMNS = {
    "ra": "deg", "dec": "deg", "id": None,
    "ks_flux_aper2": "uJy", "ks_fluxerr_aper2": "uJy", "photoz": None, "type": None,
    "splash_1_flux": "uJy", "splash_1_flux_err": "uJy", "splash_1_mag": "mag", "splash_1_magerr": "mag",
    "splash_2_flux": "uJy", "splash_2_flux_err": "uJy", "splash_3_flux": "uJy", "splash_3_flux_err": "uJy",
    "splash_4_flux": "uJy", "splash_4_flux_err": "uJy",
    "flux_galex_nuv": "uJy", "mag_galex_nuv": "mag", "magerr_galex_nuv": "mag",
    "flux_galex_fuv": "uJy", "mag_galex_fuv": "mag", "magerr_galex_fuv": "mag",
    "flux_chandra_05_2": "erg / (s cm2)", "flux_chandra_2_10": "erg / (s cm2)", "flux_chandra_05_10": "erg / (s cm2)",
    "id_chandra09": None, "r_mag_auto": "mag", "r_magerr_auto": "mag", "flux_24": "uJy", "fluxerr_24": "uJy",
}
"""COSMOS2015 columns the pipeline uses, in the simulated catalogue's order, with their units."""
INTEGER_COLUMNS = {"id": np.int64, "type": np.int32, "id_chandra09": np.int64}
MAX_ROWS = 2_000_000
"""Above COSMOS2015's 1.2 million rows in 2 deg^2: the whole survey fits, so no cone is cut short."""

IRAC_DATASET = "IRAC"
IRAC_TILE = "COSMOS"
ASYNC_WAIT_S = 3600.0
"""How long an asynchronous TAP job may run before mbphot gives up on it."""
DEFAULT_REGISTRY = "http://reg.g-vo.org/tap"
"""pyvo's default RegTAP service (GAVO's), used when neither ``registry`` nor ``IVOA_REGISTRY`` names one."""
REGTAP_QUERY = (
    "SELECT ivoid, access_url, standard_id FROM rr.capability NATURAL JOIN rr.interface "
    "WHERE standard_id LIKE 'ivo://ivoa.net/std/sia%' AND intf_role = 'std' AND ivoid LIKE '%irsa%cosmos%'"
)
"""RegTAP 1.1 (IVOA Recommendation, sections 8.5 and 8.6): SIA interfaces of IRSA's COSMOS
resources (RegTAP keeps ivoids in lower case)."""

SENTINEL_RULE = """\
COSMOS2015 marks missing values with sentinels (Laigle et al. 2016, README of the catalogue:
-99 or -99.9 for no measurement; TYPE -9 for a failed fit). mbphot turns them into missing
values as follows:
* every float column: a value <= -90 becomes NaN (no real COSMOS2015 flux, magnitude, error
  or redshift is that negative);
* magnitudes, magnitude errors and flux errors, which cannot be negative: any negative value
  becomes NaN (this catches -9 and -1 flags);
* fluxes keep values between -90 and 0: a faint source's measured flux can be negative;
* integer columns: ``type`` -9 and a negative ``id_chandra09`` become masked (missing).
The catalogue's header records how many values of each column were replaced (SENT_<n>)."""


def _never_negative(name: str) -> bool:
    return "mag" in name or "err" in name


def clean_sentinels(catalog: Table) -> dict:
    """Replace COSMOS2015's sentinel values in place (`SENTINEL_RULE`); return counts per column."""
    replaced = {}
    for name in catalog.colnames:
        column = catalog[name]
        if name in INTEGER_COLUMNS:
            values = np.ma.getdata(column)
            bad = (values == -9) if name == "type" else (values < 0) if name == "id_chandra09" else np.zeros(len(values), bool)
            if bad.any():
                mask = np.ma.getmaskarray(column) | bad
                catalog[name] = MaskedColumn(values, mask=mask, unit=column.unit)
        else:
            values = np.asarray(column, dtype=np.float64)
            bad = values <= -90.0
            if _never_negative(name):
                bad |= values < 0.0
            if bad.any():
                values = values.copy()
                values[bad] = np.nan
                catalog[name] = values
                catalog[name].unit = column.unit
        if bad.any():
            replaced[name] = int(bad.sum())
    return replaced


def _as_sample_catalog(table: Table) -> Table:
    """The TAP result with the simulated catalogue's column order, types and units.

    Missing values become NaN in float columns (as in the simulated catalogue); integer
    columns keep a mask (``id_chandra09`` is empty for sources without an X-ray match).
    """
    table = table.copy(copy_data=False)
    for name in table.colnames:
        if name != name.lower():
            table.rename_column(name, name.lower())
    missing = [name for name in CATALOG_COLUMNS if name not in table.colnames]
    if missing:
        raise ArchiveError(f"IRSA's {CATALOG_TABLE} answer lacks the column(s) {', '.join(missing)}")
    catalog = Table()
    for name, unit in CATALOG_COLUMNS.items():
        column = table[name]
        mask = np.ma.getmaskarray(column)
        if name in INTEGER_COLUMNS:
            values = np.ma.getdata(column).astype(INTEGER_COLUMNS[name])
            catalog[name] = MaskedColumn(values, mask=mask) if mask.any() else values
        else:
            catalog[name] = np.where(mask, np.nan, np.ma.getdata(column).astype(np.float64))
        catalog[name].unit = unit
    replaced = clean_sentinels(catalog)
    catalog.meta["ORIGIN"] = f"IRSA TAP, table {CATALOG_TABLE}"
    catalog.meta["SENTINEL"] = "COSMOS2015 sentinels (-99, -9, ...) replaced by NaN/masked; see mbphot.archive.irsa"
    for index, (name, count) in enumerate(replaced.items()):
        catalog.meta[f"SENT_{index}"] = f"{name}: {count}"
    return catalog


def query_cosmos2015(ra_deg: float, dec_deg: float, radius_arcmin: float, path, endpoints: Endpoints) -> Path:
    """Write the COSMOS2015 sources within ``radius_arcmin`` of (ra, dec) to ``path`` (FITS).

    A complete file already at ``path`` is reused.

    Raises
    ------
    ArchiveEmptyError
        No source in the cone (a position outside COSMOS2015's coverage).
    ArchiveError
        The service failed; its own message is included.
    """
    path = Path(path)
    if is_cached(path):
        return path
    adql = (
        f"SELECT {', '.join(CATALOG_COLUMNS)} FROM {CATALOG_TABLE} "
        f"WHERE CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', {ra_deg:.7f}, {dec_deg:.7f}, {radius_arcmin / 60.0:.7f})) = 1"
    )
    service = pyvo.dal.TAPService(endpoints.irsa_tap, session=TimeoutSession(endpoints.timeout_s))
    asynchronous = radius_arcmin > endpoints.async_radius_arcmin

    def run():
        if not asynchronous:
            return service.run_sync(adql, maxrec=MAX_ROWS)
        # TAP 1.1 section 2.3.2 (UWS 1.1): create the job, run it, wait, fetch, delete.
        job = service.submit_job(adql, maxrec=MAX_ROWS)
        try:
            job.run()
            job.wait(timeout=ASYNC_WAIT_S)
            job.raise_if_error()
            return job.fetch_result()
        finally:
            try:
                job.delete()
            except Exception:  # a job the server already removed is no reason to fail
                pass

    with warnings.catch_warnings():
        warnings.simplefilter("error", DALOverflowWarning)
        try:
            result = call_with_retries(
                run, service="IRSA TAP (asynchronous job)" if asynchronous else "IRSA TAP",
                url=endpoints.irsa_tap, endpoints=endpoints,
            )
        except DALOverflowWarning:
            raise ArchiveError(
                f"IRSA TAP at {endpoints.irsa_tap} cut the COSMOS2015 cone short of {MAX_ROWS} rows; "
                "use a smaller radius_arcmin"
            ) from None
    table = result.to_table()
    if len(table) == 0:
        raise ArchiveEmptyError(
            f"IRSA TAP at {endpoints.irsa_tap} has no COSMOS2015 source within {radius_arcmin:g} arcmin of "
            f"RA {ra_deg}, Dec {dec_deg}: the position is outside the catalogue's coverage; "
            "choose a position inside COSMOS, e.g. ra=150.01, dec=2.20"
        )
    catalog = _as_sample_catalog(table)
    with atomic_path(path) as temporary:
        catalog.write(temporary, format="fits")
    return path


def _registry_url(endpoints: Endpoints) -> str:
    """The RegTAP service: ``registry``, else pyvo's choice (``IVOA_REGISTRY``, else GAVO's).

    pyvo 1.9 added `pyvo.registry.get_RegTAP_service_url`; earlier versions keep the same
    address in `pyvo.registry.regtap.REGISTRY_BASEURL`.
    """
    if endpoints.registry is not None:
        return endpoints.registry
    from pyvo.registry import regtap

    getter = getattr(regtap, "get_RegTAP_service_url", None)
    return getter() if getter is not None else getattr(regtap, "REGISTRY_BASEURL", DEFAULT_REGISTRY)


def find_cosmos_image_service(endpoints: Endpoints, session=None):
    """IRSA's COSMOS image (SIA 1.0) service, as the IVOA registry describes it.

    The registry is asked with a RegTAP query over pyvo's TAP client and mbphot's session
    (so with its time-out), rather than with `pyvo.regsearch`, which takes no session.

    Returns
    -------
    pyvo.dal.SIAService
    """
    session = session or TimeoutSession(endpoints.timeout_s)
    registry_url = _registry_url(endpoints)
    registry = pyvo.dal.TAPService(registry_url, session=session)
    rows = call_with_retries(
        lambda: registry.run_sync(REGTAP_QUERY).to_table(), service="the IVOA registry", url=registry_url, endpoints=endpoints
    )
    candidates = [
        (str(row["ivoid"]), str(row["access_url"]), str(row["standard_id"]))
        for row in rows
        if "irsa" in str(row["ivoid"]).lower() and "cosmos" in str(row["ivoid"]).lower()
    ]
    # SIA 1.0 first (the standard id without a 2.0 fragment): the fields read below are SIA 1.0's.
    candidates.sort(key=lambda c: ("2.0" in c[2], c[0]))
    if not candidates:
        raise ArchiveError(
            f"the IVOA registry at {registry_url} lists no IRSA COSMOS image (SIA) service; "
            f"set 'registry' in ${ENDPOINTS_ENV} to another RegTAP service"
        )
    return pyvo.dal.SIAService(candidates[0][1], session=session)


def _irac_records(results, channel: int, centre: SkyCoord) -> dict:
    """The science and uncertainty mosaic records of one channel; the one centred nearest wins."""
    chosen = {}
    for kind in ("sci", "unc"):
        pattern = re.compile(rf"irac_ch{channel}_go2_{kind}", re.IGNORECASE)
        records = [r for r in results if str(r["dataset"]).strip() == IRAC_DATASET and pattern.search(str(r["fname"]))]
        if records:
            chosen[kind] = records[0] if len(records) == 1 else min(
                records, key=lambda r: r.pos.separation(centre).deg if r.pos is not None else np.inf
            )
    return chosen


def _fetch_region(record, path, ra_deg, dec_deg, side_arcmin, endpoints, progress, what) -> int:
    """The box of one mosaic: from its cloud copy where allowed and readable, else by HTTP range
    requests; the whole file only if allowed. Returns bytes received."""
    url = record.getdataurl()
    if endpoints.cloud != "http":
        cloud = irsa_location(record, endpoints)
        if cloud is None:
            reason = "IRSA's image service names no cloud copy"
        else:
            try:
                received = read_section(cloud, path, ra_deg, dec_deg, side_arcmin, what=what, progress=progress)
                logger.info("%s: %.2f MB read from the cloud copy %s", what, received / 1e6, cloud.url)
                return received
            except CloudUnavailableError as error:
                reason = str(error)
        fall_back_to_http(what, reason, url, endpoints, listed=cloud is not None)
    try:
        received = read_section(HttpRanges(url, service="IRSA's image server", endpoints=endpoints), path, ra_deg,
                                dec_deg, side_arcmin, what=what, progress=progress)
        logger.info("%s: %.2f MB received over HTTP for the field's box", what, received / 1e6)
        return received
    except RangeNotSupportedError:
        if not endpoints.whole_files:
            raise ArchiveError(
                f"IRSA's image server does not honour HTTP range requests for {url}, so the field's box of {what} "
                f"cannot be read alone; set whole_files: true in ${ENDPOINTS_ENV} to download whole mosaics "
                "(about 480 MB each) and cut them here"
            ) from None
    logger.warning("%s: the server ignores range requests; downloading the whole file (whole_files is set)", what)

    def finish(temporary):
        cut_to_box(temporary, ra_deg, dec_deg, side_arcmin, what)
        record_source(temporary, url, "http")

    download(url, path, service="IRSA's image server", endpoints=endpoints, progress=progress, finish=finish)
    return path.stat().st_size


def fetch_irac(bands, ra_deg, dec_deg, side_arcmin, directory, endpoints: Endpoints, progress: bool = False) -> dict:
    """Science and uncertainty mosaics of the IRAC ``bands`` over a square box, into ``irac/``.

    Parameters
    ----------
    bands : list of str
        IRAC band names (``irac1`` ... ``irac4``).
    ra_deg, dec_deg : float
        Box centre (deg).
    side_arcmin : float
        Box side.
    directory : Path
        The field folder.

    Returns
    -------
    dict
        Band name to its list of image entries (manifest format, paths relative to the folder).
    """
    directory = Path(directory)
    entries = {}
    for band in bands:
        channel = int(band[-1])
        entries[band] = [{
            "image": f"irac/irac_ch{channel}_go2_sci.fits",
            "unc": f"irac/irac_ch{channel}_go2_unc.fits",
            "sky": None,
            "exposure": None,
            "tile": IRAC_TILE,
        }]
    needed = [b for b in bands if not all(is_cached(directory / entries[b][0][k]) for k in ("image", "unc"))]
    if not needed:
        return entries  # every file is in the cache: no need to ask the registry or IRSA
    session = TimeoutSession(endpoints.timeout_s)
    service = find_cosmos_image_service(endpoints, session=session)
    centre = SkyCoord(ra_deg * u.deg, dec_deg * u.deg)
    results = call_with_retries(
        lambda: service.search(pos=centre, size=side_arcmin / 60.0 * u.deg),
        service="IRSA's COSMOS image service",
        url=service.baseurl,
        endpoints=endpoints,
    )
    for band in needed:
        channel = int(band[-1])
        records = _irac_records(results, channel, centre)
        if set(records) != {"sci", "unc"}:
            lacking = " and ".join(k for k in ("sci", "unc") if k not in records)
            raise ArchiveEmptyError(
                f"IRSA's COSMOS image service ({service.baseurl}) has no IRAC channel {channel} go2 {lacking} mosaic "
                f"covering RA {ra_deg}, Dec {dec_deg}: the position is outside COSMOS's IRAC coverage"
            )
        for kind, key in (("sci", "image"), ("unc", "unc")):
            if is_cached(directory / entries[band][0][key]):
                continue
            _fetch_region(
                records[kind], directory / entries[band][0][key], ra_deg, dec_deg, side_arcmin,
                endpoints, progress, f"the IRAC channel {channel} {kind} mosaic",
            )
    return entries
