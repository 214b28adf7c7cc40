"""Chandra X-ray counterparts of photometry sources, found with nway (Salvato et al. 2018).

The Chandra catalogue is nway's primary catalogue: each X-ray source is a question
("which optical/IR source, if any, emitted this?") and the photometry sources within the
search radius are its candidate answers. nway weighs every candidate by its positional
Bayes factor and by the sky density of both catalogues, and returns for each X-ray source
``p_any`` (probability that it has a counterpart at all) and, for each candidate, ``p_i``
(probability that it is *the* counterpart, given there is one).
"""

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["sky_area_deg2", "hardness_ratio", "detected_flux", "match_accuracy", "match_chandra", "merge_chandra"]

DEG2_PER_SR = (180.0 / np.pi) ** 2

# nway names output columns after the input catalogues; these names are private.
_PRIMARY = "CHANDRA"
_SECONDARY = "PHOT"

PHOTOMETRY_COLUMNS = ("id", "ra", "dec")
CHANDRA_COLUMNS = ("NAME", "RA", "DEC", "ERROR_RADIUS", "FLUX", "SB_FLUX", "HB_FLUX")
# HEASARC's ``ID`` column is only the row number of its table; the C-COSMOS source
# number (Elvis et al. 2009), which COSMOS2015's ``id_chandra09`` refers to, is here.
CHANDRA_ID_COLUMN = "SOURCE_NUMBER"

MATCH_COLUMNS = (
    "id",
    "chandra_name",
    "chandra_ra",
    "chandra_dec",
    "chandra_error_radius_arcsec",
    "chandra_separation_arcsec",
    "xray_flux_05_10_cgs",
    "xray_flux_05_2_cgs",
    "xray_flux_2_10_cgs",
    "hardness_ratio",
    "nway_p_any",
    "nway_p_i",
)


def sky_area_deg2(radius_arcmin: float) -> float:
    """Area of a cone-search footprint (a spherical cap).

    Parameters
    ----------
    radius_arcmin : float
        Opening radius of the cap in arcmin.

    Returns
    -------
    float
        Area in square degrees, ``2 pi (1 - cos r)`` steradians converted to deg².
    """
    if not radius_arcmin >= 0:
        raise ValueError(f"radius_arcmin must be >= 0, got {radius_arcmin!r}")
    radius_rad = np.deg2rad(radius_arcmin / 60.0)
    # 1 - cos r = 2 sin^2(r/2) keeps full precision for arcminute radii, where the
    # direct difference loses about half the significant digits.
    area_sr = 4.0 * np.pi * np.sin(radius_rad / 2.0) ** 2
    return float(area_sr * DEG2_PER_SR)


def hardness_ratio(soft_flux, hard_flux) -> np.ndarray:
    """X-ray hardness ratio ``HR = (H - S) / (H + S)`` from band fluxes.

    A band counts as detected when its flux is finite and > 0 (HEASARC writes 0.0 for a
    band in which the source was not detected). HR is defined only where both bands are
    detected: counting a non-detection as zero flux would give an artificial HR of
    exactly +1 or -1, which says more about the survey depth than about the source.

    Parameters
    ----------
    soft_flux : array_like
        Soft-band (0.5-2 keV) flux, erg/s/cm², e.g. ``SB_FLUX``.
    hard_flux : array_like
        Hard-band (2-10 keV) flux, erg/s/cm², e.g. ``HB_FLUX``.

    Returns
    -------
    numpy.ndarray
        HR per source (broadcast shape of the inputs), in (-1, 1) where both bands are
        detected and NaN where either is not.
    """
    soft, hard = np.broadcast_arrays(np.asarray(soft_flux, dtype=float), np.asarray(hard_flux, dtype=float))
    both = np.isfinite(soft) & (soft > 0) & np.isfinite(hard) & (hard > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (hard - soft) / (hard + soft)
    return np.where(both, ratio, np.nan)


def detected_flux(flux) -> np.ndarray:
    """X-ray band fluxes with non-detections (0.0, negative or NaN in HEASARC) as NaN."""
    flux = np.asarray(flux, dtype=float)
    return np.where(np.isfinite(flux) & (flux > 0), flux, np.nan)


@contextlib.contextmanager
def _inside(directory: Path):
    """Run the enclosed block with ``directory`` as working directory.

    nwaylib creates ``cache/`` (a joblib cache) relative to the working directory when
    it is imported and writes into it on every match, so both must happen here rather
    than in the user's directory.
    """
    directory.mkdir(parents=True, exist_ok=True)
    previous = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


def _column_names(table) -> list:
    # pandas.DataFrame.columns and astropy Table.columns both iterate over names.
    return [str(name) for name in table.columns]


def _require_columns(table, required, what: str) -> None:
    present = set(_column_names(table))
    for name in required:
        if name not in present:
            raise ValueError(
                f"{what} has no column {name!r}; expected columns {', '.join(required)} "
                f"(found: {', '.join(sorted(present)) or 'none'})"
            )


def _float_column(table, name: str) -> np.ndarray:
    # Masked entries (astropy MaskedColumn, pandas NA) become NaN instead of their fill value.
    values = np.ma.asarray(table[name]).astype(float)
    return np.ma.filled(values, np.nan)


def _name_column(table, name: str) -> np.ndarray:
    values = np.asarray(table[name])
    return np.array(
        [v.decode("ascii", errors="replace").strip() if isinstance(v, bytes) else str(v).strip() for v in values],
        dtype=object,
    )


def _empty_matches(with_chandra_id: bool) -> pd.DataFrame:
    columns = {name: pd.Series(dtype=float) for name in MATCH_COLUMNS}
    columns["id"] = pd.Series(dtype=np.int64)
    columns["chandra_name"] = pd.Series(dtype=object)
    if with_chandra_id:
        columns["chandra_id"] = pd.Series(dtype=np.int64)
    return pd.DataFrame(columns)


def match_chandra(
    photometry: pd.DataFrame,
    chandra,
    area_deg2: float,
    chandra_area_deg2: float | None = None,
    match_radius_arcsec: float = 5.0,
    prior_completeness: float = 0.9,
    optical_error_arcsec: float = 0.1,
    p_any_min: float = 0.5,
    p_i_min: float = 0.1,
    cache_dir=None,
) -> pd.DataFrame:
    """Find the confident photometry counterparts of Chandra sources with nway.

    The match keeps a candidate when ``(match_flag == 1) & (p_any >= p_any_min) &
    (p_i >= p_i_min)``: it is nway's best candidate for its X-ray source, the X-ray
    source probably has a counterpart at all, and this candidate is a plausible one.
    The parentheses matter. The filter printed in the published nway tutorial,
    ``(p_i>=0.1) & df['match_flag']==1``, is wrong by Python operator precedence:
    ``&`` binds tighter than ``==``, so it evaluates
    ``((p_i>=0.1) & df['match_flag']) == 1``, a bitwise and of a boolean with the
    integer flag. It picks the intended rows only by accident (nway's flags are 0, 1, 2
    and ``True & 2 == 0``), and it never looks at ``p_any``.

    Parameters
    ----------
    photometry : pandas.DataFrame
        Photometry catalogue with columns ``id`` (int64), ``ra``, ``dec`` (deg); other
        columns are ignored. Rows with non-finite positions cannot match and are skipped.
    chandra : astropy.table.Table or pandas.DataFrame
        Chandra catalogue in HEASARC ``ccosmoscat`` form: ``NAME`` (str or bytes),
        ``RA``, ``DEC`` (deg), ``ERROR_RADIUS`` (arcsec, used as nway's 1-sigma
        positional error), ``FLUX``, ``SB_FLUX``, ``HB_FLUX`` (0.5-10, 0.5-2, 2-10 keV,
        erg/s/cm², 0.0 when not detected in that band). If ``SOURCE_NUMBER`` is present
        it is returned as ``chandra_id``.
    area_deg2 : float
        Sky area covered by ``photometry`` in deg²; with the number of sources it sets
        the chance-alignment density (see :func:`sky_area_deg2`).
    chandra_area_deg2 : float or None
        Sky area covered by ``chandra`` in deg²; None means ``area_deg2``.
    match_radius_arcsec : float
        Largest X-ray-to-photometry separation considered, arcsec. nway advises several
        times the largest positional error.
    prior_completeness : float
        Expected fraction of the Chandra sources that have a counterpart in
        ``photometry``.
    optical_error_arcsec : float
        1-sigma positional error of the photometry positions, arcsec.
    p_any_min : float
        Smallest accepted probability that the X-ray source has any counterpart.
    p_i_min : float
        Smallest accepted probability that this candidate is the counterpart.
    cache_dir : str or pathlib.Path or None
        Working directory for nway's joblib cache; None means
        ``<system temp dir>/mbphot-nway-cache``. The caller's working directory is
        left untouched.

    Returns
    -------
    pandas.DataFrame
        One row per confident match, columns ``id`` (photometry id), ``chandra_name``,
        ``chandra_ra``, ``chandra_dec`` (deg), ``chandra_error_radius_arcsec``,
        ``chandra_separation_arcsec``, ``xray_flux_05_10_cgs``, ``xray_flux_05_2_cgs``,
        ``xray_flux_2_10_cgs`` (erg/s/cm², NaN = not detected in that band), ``hardness_ratio``
        (:func:`hardness_ratio` of ``SB_FLUX``, ``HB_FLUX``), ``nway_p_any``,
        ``nway_p_i``, plus ``chandra_id`` when ``chandra`` has ``SOURCE_NUMBER``.
        Empty (with these columns) when nothing matches.

    Raises
    ------
    ValueError
        When a required column is missing or a parameter is out of range.
    """
    _require_columns(photometry, PHOTOMETRY_COLUMNS, "photometry")
    _require_columns(chandra, CHANDRA_COLUMNS, "chandra catalogue")
    if chandra_area_deg2 is None:
        chandra_area_deg2 = area_deg2
    if not (area_deg2 > 0 and chandra_area_deg2 > 0):
        raise ValueError(f"sky areas must be > 0 deg², got {area_deg2!r} and {chandra_area_deg2!r}")
    if not 0 < prior_completeness <= 1:
        raise ValueError(f"prior_completeness must be in (0, 1], got {prior_completeness!r}")
    if not (optical_error_arcsec > 0 and match_radius_arcsec > 0):
        raise ValueError(
            f"optical_error_arcsec and match_radius_arcsec must be > 0, "
            f"got {optical_error_arcsec!r} and {match_radius_arcsec!r}"
        )
    with_chandra_id = CHANDRA_ID_COLUMN in _column_names(chandra)

    phot_id = np.asarray(photometry["id"])
    phot_ra = _float_column(photometry, "ra")
    phot_dec = _float_column(photometry, "dec")
    phot_ok = np.isfinite(phot_ra) & np.isfinite(phot_dec)
    phot_id, phot_ra, phot_dec = phot_id[phot_ok], phot_ra[phot_ok], phot_dec[phot_ok]

    x_ra = _float_column(chandra, "RA")
    x_dec = _float_column(chandra, "DEC")
    x_err_arcsec = _float_column(chandra, "ERROR_RADIUS")
    x_ok = np.isfinite(x_ra) & np.isfinite(x_dec)
    if not (np.isfinite(x_err_arcsec[x_ok]) & (x_err_arcsec[x_ok] > 0)).all():
        # nway weighs offsets by 1/error^2; a zero or NaN error turns its Bayes factor
        # into NaN and stops it on an internal assertion instead of a readable message.
        raise ValueError("chandra catalogue column 'ERROR_RADIUS' must be finite and > 0 arcsec")
    x_rows = np.flatnonzero(x_ok)

    if len(x_rows) == 0 or len(phot_id) == 0:
        return _empty_matches(with_chandra_id)

    # nway turns number / area into the chance-alignment density, so it must see the
    # whole catalogue that the area describes; rows without a position are the only cut.
    tables = [
        dict(
            name=_PRIMARY,
            ra=x_ra[x_rows],
            dec=x_dec[x_rows],
            error=x_err_arcsec[x_rows],
            area=float(chandra_area_deg2),
            mags=[],
            magnames=[],
            maghists=[],
        ),
        dict(
            name=_SECONDARY,
            ra=phot_ra,
            dec=phot_dec,
            error=np.full(len(phot_ra), float(optical_error_arcsec)),
            area=float(area_deg2),
            mags=[],
            magnames=[],
            maghists=[],
        ),
    ]

    workdir = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "mbphot-nway-cache"
    with _inside(workdir):
        import nwaylib
        from nwaylib.logger import NullOutputLogger

        # The silent logger does not reach nway's pair search, which draws tqdm bars on
        # stderr directly; warnings are caught apart so that they are not lost with them.
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):
            try:
                result = nwaylib.nway_match(
                    tables,
                    match_radius=float(match_radius_arcsec),
                    prior_completeness=float(prior_completeness),
                    store_mag_hists=False,
                    logger=NullOutputLogger(),
                )
            except nwaylib.EmptyResultException:
                result = None
    for caught_warning in caught:
        warnings.warn_explicit(
            caught_warning.message, caught_warning.category, caught_warning.filename, caught_warning.lineno
        )
    if result is None:
        return _empty_matches(with_chandra_id)

    # Recent pandas moves the groupby key of nway's final groupby-apply from the
    # columns into the index, older pandas keeps it as a column.
    if _PRIMARY in result.columns:
        primary_pos = result[_PRIMARY].to_numpy()
    else:
        primary_pos = result.index.get_level_values(_PRIMARY).to_numpy()
    p_any = result["prob_has_match"].to_numpy()
    p_i = result["prob_this_match"].to_numpy()
    confident = (result["match_flag"].to_numpy() == 1) & (p_any >= p_any_min) & (p_i >= p_i_min)

    rows = x_rows[primary_pos[confident]]
    phot_pos = result[_SECONDARY].to_numpy()[confident]
    soft = _float_column(chandra, "SB_FLUX")[rows]
    hard = _float_column(chandra, "HB_FLUX")[rows]
    matches = pd.DataFrame(
        {
            "id": phot_id[phot_pos],
            "chandra_name": _name_column(chandra, "NAME")[rows],
            "chandra_ra": x_ra[rows],
            "chandra_dec": x_dec[rows],
            "chandra_error_radius_arcsec": x_err_arcsec[rows],
            "chandra_separation_arcsec": result[f"Separation_{_PRIMARY}_{_SECONDARY}"].to_numpy()[confident],
            "xray_flux_05_10_cgs": detected_flux(_float_column(chandra, "FLUX")[rows]),
            "xray_flux_05_2_cgs": detected_flux(soft),
            "xray_flux_2_10_cgs": detected_flux(hard),
            "hardness_ratio": hardness_ratio(soft, hard),
            "nway_p_any": p_any[confident],
            "nway_p_i": p_i[confident],
        }
    )
    if with_chandra_id:
        matches["chandra_id"] = np.asarray(chandra[CHANDRA_ID_COLUMN], dtype=np.int64)[rows]
    return matches


def merge_chandra(photometry: pd.DataFrame, matches: pd.DataFrame) -> pd.DataFrame:
    """Attach Chandra matches to the photometry catalogue.

    Parameters
    ----------
    photometry : pandas.DataFrame
        Photometry catalogue with an ``id`` column.
    matches : pandas.DataFrame
        Output of :func:`match_chandra`.

    Returns
    -------
    pandas.DataFrame
        ``photometry`` (same rows, order and index) with the match columns added and a
        boolean ``chandra_match``. Unmatched rows get NaN, an empty ``chandra_name`` and
        a missing (``<NA>``) ``chandra_id``, which is a nullable ``Int64`` so that the
        matched ids stay integers. When several Chandra sources matched the same
        photometry source, the one with the highest ``nway_p_i`` is kept.

    Raises
    ------
    ValueError
        When either table has no ``id`` column or ``photometry`` already has one of the
        match columns (e.g. when merging twice).
    """
    _require_columns(photometry, ("id",), "photometry")
    _require_columns(matches, ("id", "chandra_name", "nway_p_i"), "matches")
    added = [name for name in matches.columns if name != "id"]
    clashing = [name for name in added + ["chandra_match"] if name in photometry.columns]
    if clashing:
        raise ValueError(f"photometry already has match column(s) {', '.join(clashing)}; drop them before merging")

    best = matches.sort_values("nway_p_i", ascending=False, kind="stable").drop_duplicates("id")
    # join() rather than merge() keeps the photometry index and row order.
    merged = photometry.join(best.set_index("id"), on="id")
    merged["chandra_match"] = merged["chandra_name"].notna()
    merged["chandra_name"] = merged["chandra_name"].fillna("").astype(object)
    if "chandra_id" in merged.columns:
        merged["chandra_id"] = merged["chandra_id"].astype("Int64")
    return merged


def match_accuracy(matches: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """Compare matches with the simulated field's true X-ray counterparts.

    Parameters
    ----------
    matches : pandas.DataFrame
        Output of `match_chandra` (needs ``id`` and ``chandra_id``).
    truth : pandas.DataFrame
        ``id`` and ``true_chandra_id`` (the counterpart's ``SOURCE_NUMBER``, -1 for none)
        for the photometry sources that could be matched.

    Returns
    -------
    dict
        ``matches``, ``correct``, ``wrong`` and ``true_pairs`` (sources in ``truth`` that
        have a counterpart).
    """
    truth_by_id = truth.set_index("id")["true_chandra_id"]
    expected = truth_by_id.reindex(matches["id"]).to_numpy()
    correct = int(np.sum(expected == matches["chandra_id"].to_numpy()))
    return {
        "matches": len(matches),
        "correct": correct,
        "wrong": len(matches) - correct,
        "true_pairs": int((truth_by_id > 0).sum()),
    }
