"""Tests of the nway cross-match with Chandra: synthetic fields, API behaviour, real COSMOS data."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import astropy.units as u
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astropy.units import UnitsWarning

from mbphot.crossmatch import MATCH_COLUMNS, hardness_ratio, match_chandra, merge_chandra, sky_area_deg2

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cosmos_real"
CODE_SRC = Path(__file__).resolve().parents[1] / "code_src"

RA0_DEG, DEC0_DEG, FIELD_RADIUS_ARCMIN = 150.01, 2.2, 3.0
OPTICAL_ERROR_ARCSEC = 0.1


def _to_radec(dx_arcsec, dy_arcsec):
    """Flat-sky offsets from the field centre (arcsec) to RA, Dec (deg)."""
    return (
        RA0_DEG + dx_arcsec / 3600.0 / np.cos(np.deg2rad(DEC0_DEG)),
        DEC0_DEG + dy_arcsec / 3600.0,
    )


def _synthetic_field(seed=2024, n_phot=2000, n_true=25, n_lonely=5):
    """Photometry uniform in the 3' field, Chandra sources with and without a counterpart.

    The X-ray position of a true pair is the photometry position plus a Gaussian offset
    per axis of sigma = hypot(ERROR_RADIUS, optical error): nway's ``error`` is a 1-sigma
    error per coordinate (its Bayes factor is exp(-psi^2 / 2(s1^2 + s2^2))).
    """
    rng = np.random.default_rng(seed)
    field_arcsec = FIELD_RADIUS_ARCMIN * 60.0
    r = field_arcsec * np.sqrt(rng.uniform(size=n_phot))
    theta = rng.uniform(0.0, 2.0 * np.pi, n_phot)
    px, py = r * np.cos(theta), r * np.sin(theta)
    ra, dec = _to_radec(px, py)
    photometry = pd.DataFrame(
        {
            "id": np.arange(500000, 500000 + n_phot, dtype=np.int64),
            "ra": ra,
            "dec": dec,
            "ks_flux": rng.lognormal(1.0, 1.0, n_phot),
        }
    )

    # Keep true pairs off the edge so that their scattered X-ray position stays in the field.
    true_rows = rng.choice(np.flatnonzero(r < field_arcsec - 10.0), n_true, replace=False)
    error_arcsec = rng.uniform(0.3, 1.5, n_true + n_lonely)
    sigma = np.hypot(error_arcsec[:n_true], OPTICAL_ERROR_ARCSEC)
    xx = px[true_rows] + rng.normal(0.0, sigma)
    xy = py[true_rows] + rng.normal(0.0, sigma)

    # X-ray sources without counterpart, > 4" from every photometry source.
    lonely = []
    while len(lonely) < n_lonely:
        rr = (field_arcsec - 10.0) * np.sqrt(rng.uniform())
        tt = rng.uniform(0.0, 2.0 * np.pi)
        cx, cy = rr * np.cos(tt), rr * np.sin(tt)
        if np.hypot(px - cx, py - cy).min() > 4.0:
            lonely.append((cx, cy))
    lonely = np.array(lonely)

    n_x = n_true + n_lonely
    x_ra, x_dec = _to_radec(np.r_[xx, lonely[:, 0]], np.r_[xy, lonely[:, 1]])
    soft = rng.uniform(1e-16, 1e-14, n_x)
    hard = rng.uniform(1e-16, 1e-14, n_x)
    soft[::4] = 0.0  # HEASARC style non-detections
    hard[1::5] = 0.0
    chandra = Table(
        {
            "NAME": np.array([f"CXOC SIM{i:03d}".encode() for i in range(n_x)]),
            "RA": x_ra,
            "DEC": x_dec,
            "ERROR_RADIUS": error_arcsec,
            "FLUX": soft + hard,
            "SB_FLUX": soft,
            "HB_FLUX": hard,
            "HARDNESS_RATIO": np.zeros(n_x),
        }
    )
    true_ids = photometry["id"].to_numpy()[true_rows]
    return photometry, chandra, true_ids


def _nearest_id(photometry, ra_deg, dec_deg):
    dx = (photometry["ra"].to_numpy() - ra_deg) * np.cos(np.deg2rad(dec_deg))
    dy = photometry["dec"].to_numpy() - dec_deg
    return photometry["id"].to_numpy()[np.argmin(np.hypot(dx, dy))]


def test_sky_area_deg2():
    # A 3' cap is flat to 1e-7 relative.
    assert sky_area_deg2(3.0) == pytest.approx(np.pi * 0.05**2, rel=1e-6)
    # Hemisphere and whole sky: 2 pi and 4 pi sr.
    assert sky_area_deg2(90 * 60) == pytest.approx(2 * np.pi * (180 / np.pi) ** 2, rel=1e-12)
    assert sky_area_deg2(180 * 60) == pytest.approx(41252.96125, rel=1e-9)
    assert sky_area_deg2(0.0) == 0.0
    with pytest.raises(ValueError, match="radius_arcmin"):
        sky_area_deg2(-1.0)


def test_hardness_ratio():
    soft = [1e-15, 0.0, 2e-15, 0.0, np.nan, 1e-15, -1e-15]
    hard = [3e-15, 4e-15, 0.0, 0.0, 2e-15, np.nan, -1e-15]
    hr = hardness_ratio(soft, hard)
    assert hr.shape == (7,)
    assert hr[0] == pytest.approx(0.5)
    # Undefined unless both bands are detected: no artificial +1 or -1.
    assert np.isnan(hr[1])  # only hard detected
    assert np.isnan(hr[2])  # only soft detected
    assert np.isnan(hr[3])  # neither
    assert np.isnan(hr[4])  # a NaN flux is a non-detection
    assert np.isnan(hr[5])
    assert np.isnan(hr[6])  # negative fluxes are non-detections
    assert hardness_ratio(1.0, 1.0) == 0.0
    assert hardness_ratio(np.array([[1.0], [2.0]]), np.array([3.0, 1.0])).shape == (2, 2)


def test_synthetic_field_recovers_true_pairs_and_leaves_cwd_clean(tmp_path, tmp_path_factory, monkeypatch):
    photometry, chandra, true_ids = _synthetic_field()
    cache_dir = tmp_path_factory.mktemp("nway-cache")
    monkeypatch.chdir(tmp_path)

    matches = match_chandra(
        photometry,
        chandra,
        area_deg2=sky_area_deg2(FIELD_RADIUS_ARCMIN),
        optical_error_arcsec=OPTICAL_ERROR_ARCSEC,
        cache_dir=cache_dir,
    )

    assert Path.cwd() == tmp_path
    assert list(tmp_path.iterdir()) == []
    assert (cache_dir / "cache").is_dir()  # nway's joblib cache went where it was sent

    assert list(matches.columns) == list(MATCH_COLUMNS)
    assert matches["id"].dtype == np.int64
    assert matches["chandra_name"].is_unique
    assert (matches["nway_p_any"] >= 0.5).all() and (matches["nway_p_i"] >= 0.1).all()

    matched = dict(zip(matches["chandra_name"], matches["id"]))
    names = [f"CXOC SIM{i:03d}" for i in range(len(chandra))]
    right = sum(matched.get(names[i]) == true_ids[i] for i in range(25))
    wrong = sum(names[i] in matched and matched[names[i]] != true_ids[i] for i in range(25))
    lonely_matched = sum(name in matched for name in names[25:])
    # At 2000 sources in 3' (one per ~50 arcsec²) and errors up to 1.5", the true
    # counterpart is the nearest source only ~90% of the time, so no positional method
    # can be right for all 25; over 30 random fields nway averaged 20.5 right
    # (17-24) and 2.2 wrong (0-6), which these bounds bracket.
    assert right >= 18, f"only {right} of 25 true pairs recovered"
    assert wrong <= 4, f"{wrong} X-ray sources matched to the wrong photometry source"
    assert lonely_matched <= 1, f"{lonely_matched} of 5 counterpart-less X-ray sources were matched"

    # All optical errors are equal, so nway's best candidate must be the nearest source:
    # this pins the row bookkeeping between nway's output and the input catalogues.
    by_name = {name: row for row, name in enumerate(names)}
    for _, match in matches.iterrows():
        row = by_name[match["chandra_name"]]
        assert match["id"] == _nearest_id(photometry, chandra["RA"][row], chandra["DEC"][row])
        assert match["chandra_ra"] == chandra["RA"][row]
        assert match["chandra_error_radius_arcsec"] == chandra["ERROR_RADIUS"][row]
        # HEASARC's 0.0 for a band without detection becomes NaN, never a measured zero.
        for column, heasarc in (("xray_flux_05_10_cgs", "FLUX"), ("xray_flux_05_2_cgs", "SB_FLUX"),
                                ("xray_flux_2_10_cgs", "HB_FLUX")):
            expected = chandra[heasarc][row]
            if expected > 0:
                assert match[column] == expected
            else:
                assert np.isnan(match[column])
        np.testing.assert_equal(
            match["hardness_ratio"], hardness_ratio(chandra["SB_FLUX"][row], chandra["HB_FLUX"][row])
        )
        phot = photometry.loc[photometry["id"] == match["id"]].iloc[0]
        separation_arcsec = 3600 * np.hypot(
            (phot["ra"] - match["chandra_ra"]) * np.cos(np.deg2rad(DEC0_DEG)), phot["dec"] - match["chandra_dec"]
        )
        assert match["chandra_separation_arcsec"] == pytest.approx(separation_arcsec, rel=1e-4)


def test_first_import_of_nway_does_not_touch_cwd(tmp_path):
    """nwaylib makes ``cache/`` in the cwd when imported; a fresh interpreter shows whether it leaks."""
    workdir = tmp_path / "work"
    tmpdir = tmp_path / "tmp"
    workdir.mkdir()
    tmpdir.mkdir()
    script = textwrap.dedent(
        """
        import sys
        import numpy as np, pandas as pd
        from mbphot.crossmatch import match_chandra
        assert "nwaylib" not in sys.modules
        phot = pd.DataFrame({"id": np.array([1, 2], dtype=np.int64), "ra": [150.0, 150.001], "dec": [2.2, 2.2]})
        chandra = pd.DataFrame({"NAME": ["X1"], "RA": [150.00001], "DEC": [2.2], "ERROR_RADIUS": [0.5],
                                "FLUX": [1e-15], "SB_FLUX": [1e-15], "HB_FLUX": [0.0]})
        matches = match_chandra(phot, chandra, area_deg2=1e-4)
        assert "nwaylib" in sys.modules
        print(matches["id"].tolist())
        """
    )
    env = dict(os.environ, PYTHONPATH=str(CODE_SRC), TMPDIR=str(tmpdir))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1]"
    assert done.stderr == ""  # the silent logger and no progress bars
    assert list(workdir.iterdir()) == []
    assert (tmpdir / "mbphot-nway-cache" / "cache").is_dir()


def test_match_chandra_empty_and_far_inputs(tmp_path):
    photometry, chandra, _ = _synthetic_field(n_phot=50, n_true=3, n_lonely=1)
    area = sky_area_deg2(FIELD_RADIUS_ARCMIN)

    no_xray = match_chandra(photometry, chandra[:0], area, cache_dir=tmp_path)
    no_phot = match_chandra(photometry.iloc[:0], chandra, area, cache_dir=tmp_path)
    far = chandra.copy()
    far["DEC"] = far["DEC"] + 1.0  # nothing within the match radius
    nothing_near = match_chandra(photometry, far, area, cache_dir=tmp_path)

    for result in (no_xray, no_phot, nothing_near):
        assert result.empty
        assert list(result.columns) == list(MATCH_COLUMNS)
        assert result["id"].dtype == np.int64


def test_match_chandra_rejects_missing_columns(tmp_path):
    photometry, chandra, _ = _synthetic_field(n_phot=50, n_true=3, n_lonely=1)
    area = sky_area_deg2(FIELD_RADIUS_ARCMIN)
    with pytest.raises(ValueError, match="chandra catalogue has no column 'ERROR_RADIUS'"):
        match_chandra(photometry, chandra[["NAME", "RA", "DEC", "FLUX", "SB_FLUX", "HB_FLUX"]], area)
    with pytest.raises(ValueError, match="photometry has no column 'dec'"):
        match_chandra(photometry.drop(columns="dec"), chandra, area)
    bad_error = chandra.copy()
    bad_error["ERROR_RADIUS"][0] = 0.0
    with pytest.raises(ValueError, match="ERROR_RADIUS"):
        match_chandra(photometry, bad_error, area, cache_dir=tmp_path)


def test_merge_chandra_keeps_best_match_and_fills_unmatched():
    photometry = pd.DataFrame(
        {"id": np.array([10, 11, 12], dtype=np.int64), "ra": [1.0, 2.0, 3.0], "dec": [0.0, 0.0, 0.0]},
        index=[7, 8, 9],
    )
    matches = pd.DataFrame(
        {
            "id": np.array([12, 10, 12], dtype=np.int64),
            "chandra_name": ["CXOC A", "CXOC B", "CXOC C"],
            "chandra_ra": [3.0, 1.0, 3.0001],
            "nway_p_any": [0.9, 0.8, 0.95],
            "nway_p_i": [0.4, 0.99, 0.6],
            "chandra_id": np.array([101, 102, 103], dtype=np.int64),
        }
    )
    merged = merge_chandra(photometry, matches)

    assert list(merged.index) == [7, 8, 9]
    assert merged["id"].tolist() == [10, 11, 12]
    assert merged["chandra_match"].dtype == bool
    assert merged["chandra_match"].tolist() == [True, False, True]
    assert merged["chandra_name"].tolist() == ["CXOC B", "", "CXOC C"]  # higher p_i wins for id 12
    assert merged.loc[9, "nway_p_i"] == 0.6
    assert np.isnan(merged.loc[8, "chandra_ra"]) and np.isnan(merged.loc[8, "nway_p_any"])
    assert merged["chandra_id"].dtype == "Int64"
    assert merged.loc[9, "chandra_id"] == 103 and merged["chandra_id"].isna().tolist() == [False, True, False]

    with pytest.raises(ValueError, match="chandra_name"):
        merge_chandra(merged, matches)


def _read_fits(path):
    with warnings.catch_warnings():
        # HEASARC writes units as DEGREE, ERG/S/CM^2, ... which astropy does not parse.
        warnings.simplefilter("ignore", UnitsWarning)
        return Table.read(path)


def test_real_cosmos_chandra_associations_recovered(tmp_path):
    if not REAL_DATA.is_dir():
        pytest.skip(f"real COSMOS test data not available at {REAL_DATA}")
    photometry = _read_fits(REAL_DATA / "cosmos2015_subset.fits").to_pandas()
    chandra = _read_fits(REAL_DATA / "chandra" / "COSMOS_chandra.fits")

    associated = photometry[photometry["id_chandra09"].notna()]
    assert len(associated) == 20
    # COSMOS2015's id_chandra09 is the C-COSMOS source number, HEASARC's SOURCE_NUMBER:
    # that row lies at the photometry position. HEASARC's ID is only a row number and
    # lands on the right source once in 20, by chance.
    x_pos = SkyCoord(np.asarray(chandra["RA"]) * u.deg, np.asarray(chandra["DEC"]) * u.deg)
    phot_pos = SkyCoord(associated["ra"].to_numpy() * u.deg, associated["dec"].to_numpy() * u.deg)
    wanted = associated["id_chandra09"].to_numpy(dtype=np.int64)

    def rows_where(column):
        row_of = {int(n): row for row, n in enumerate(chandra[column])}
        return np.array([row_of.get(n, -1) for n in wanted])

    by_number, by_id = rows_where("SOURCE_NUMBER"), rows_where("ID")
    assert (by_number >= 0).all()
    assert (phot_pos.separation(x_pos[by_number]).arcsec < 2.5).all()
    by_id_close = (by_id >= 0) & (phot_pos.separation(x_pos[np.maximum(by_id, 0)]).arcsec < 2.5)
    assert by_id_close.sum() <= 1

    centre_offset_arcmin = x_pos.separation(SkyCoord(RA0_DEG * u.deg, DEC0_DEG * u.deg)).arcmin
    field_chandra = chandra[centre_offset_arcmin < FIELD_RADIUS_ARCMIN]
    area = sky_area_deg2(FIELD_RADIUS_ARCMIN)
    matches = match_chandra(photometry, field_chandra, area_deg2=area, chandra_area_deg2=area, cache_dir=tmp_path)

    assert "chandra_id" in matches.columns
    expected = dict(zip(associated["id"], associated["id_chandra09"].astype(np.int64)))
    recovered = sum(expected.get(pid) == cid for pid, cid in zip(matches["id"], matches["chandra_id"]))
    contradicting = sum(
        pid in expected and expected[pid] != cid for pid, cid in zip(matches["id"], matches["chandra_id"])
    )
    print(f"nway recovered {recovered} of 20 COSMOS2015 id_chandra09 associations")
    assert recovered >= 15
    assert contradicting == 0

    merged = merge_chandra(photometry, matches)
    assert len(merged) == len(photometry)
    assert merged["chandra_match"].sum() == matches["id"].nunique()
