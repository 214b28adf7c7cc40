"""IRSA: the COSMOS2015 catalogue (TAP) and the COSMOS IRAC mosaics (SIA found in the registry).

The catalogue is a cone on IRSA's ``cosmos2015`` table with only the columns the pipeline
uses, written with the same names, order, types and units as the simulated catalogue. The
IRAC ``go2`` science and uncertainty mosaics come from IRSA's COSMOS image service, found in
the IVOA registry the way a VO user finds it; only the field's box is fetched, through the
image server's cutout parameters, and a whole mosaic is fetched (and cut here) only where the
server refuses them.
"""

import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pyvo
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import MaskedColumn, Table
from pyvo.dal.exceptions import DALOverflowWarning
from pyvo.registry import choose_RegTAP_service, get_RegTAP_service_url

from ..io import atomic_path
from .cache import (
    ArchiveEmptyError,
    ArchiveError,
    TimeoutSession,
    call_with_retries,
    download,
    is_cached,
)
from .config import ENDPOINTS_ENV, Endpoints
from .cutout import cut_to_box

__all__ = ["CATALOG_COLUMNS", "query_cosmos2015", "find_cosmos_image_service", "fetch_irac"]

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
REGISTRY_KEYWORD = "cosmos"


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
    catalog.meta["ORIGIN"] = f"IRSA TAP, table {CATALOG_TABLE}"
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
    with warnings.catch_warnings():
        warnings.simplefilter("error", DALOverflowWarning)
        try:
            result = call_with_retries(
                lambda: service.run_sync(adql, maxrec=MAX_ROWS), service="IRSA TAP", url=endpoints.irsa_tap, endpoints=endpoints
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


@contextmanager
def _registry(url: str | None):
    """Point pyvo's registry searches at ``url`` for the block (None: pyvo's own choice)."""
    if url is None:
        yield get_RegTAP_service_url()
        return
    previous = get_RegTAP_service_url()
    choose_RegTAP_service(url)
    try:
        yield url
    finally:
        choose_RegTAP_service(previous)


def find_cosmos_image_service(endpoints: Endpoints, session=None):
    """IRSA's COSMOS image (SIA) service, as the IVOA registry describes it.

    Returns
    -------
    pyvo.dal.SIAService
    """
    with _registry(endpoints.registry) as registry_url:
        resources = call_with_retries(
            lambda: pyvo.regsearch(servicetype="sia", keywords=[REGISTRY_KEYWORD]),
            service="the IVOA registry",
            url=registry_url,
            endpoints=endpoints,
        )
    for resource in resources:
        ivoid = resource.ivoid.lower()
        if "irsa" in ivoid and "cosmos" in ivoid:
            return resource.get_service("sia", lax=True, session=session)
    raise ArchiveError(
        f"the IVOA registry at {registry_url} lists no IRSA COSMOS image (SIA) service among "
        f"{len(resources)} SIA services matching {REGISTRY_KEYWORD!r}; set 'registry' in ${ENDPOINTS_ENV} to another registry"
    )


def _cutout_url(url: str, ra_deg: float, dec_deg: float, side_arcmin: float) -> str:
    """IRSA's image server cuts a file on the fly given ``center`` and ``size``."""
    query = urlencode({"center": f"{ra_deg:.6f},{dec_deg:.6f}", "size": f"{side_arcmin:.4f}arcmin", "gzip": "false"})
    return f"{url}{'&' if '?' in url else '?'}{query}"


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


def _fetch_region(url, path, ra_deg, dec_deg, side_arcmin, endpoints, session, progress, what):
    """The box of one mosaic: a server-side cutout, or the whole file cut here if refused."""
    def finish(temporary):
        cut_to_box(temporary, ra_deg, dec_deg, side_arcmin, what)

    common = dict(service="IRSA image server", endpoints=endpoints, session=session, progress=progress, finish=finish)
    try:
        return download(_cutout_url(url, ra_deg, dec_deg, side_arcmin), path, **common)
    except ArchiveError as error:
        if error.status is None or not 400 <= error.status < 500:
            raise
    return download(url, path, **common)


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
    needed = [b for b in bands if not all((directory / entries[b][0][k]).is_file() for k in ("image", "unc"))]
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
            _fetch_region(
                records[kind].getdataurl(), directory / entries[band][0][key], ra_deg, dec_deg, side_arcmin,
                endpoints, session, progress, f"the IRAC channel {channel} {kind} mosaic",
            )
    return entries
