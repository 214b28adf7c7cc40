"""Retrieve a field: catalogue, images, PRFs and the Chandra catalogue, then write a manifest.

``data_source="sample"`` builds the simulated field offline; ``data_source="archive"`` fetches
the real data from IRSA, MAST and HEASARC (`mbphot.archive`); ``data_source="files"`` takes your
own files, listed in a YAML files manifest (`mbphot.user_files`).
"""

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits

from .bands import BANDS
from .crossmatch import sky_area_deg2
from .io import atomic_path, file_lock, read_header, read_table, read_wcs
from .manifest import Manifest
from .params import RunParameters
from .sample import SampleSpec, make_sample_field, sample_files
from .user_files import retrieve_files

__all__ = ["retrieve", "choose_tiles", "load_catalog", "load_chandra", "load_truth", "footprint_area_deg2", "summary", "write_tile_choice"]


def choose_tiles(ra_deg, dec_deg, image_paths, band_name) -> np.ndarray:
    """Pick, for each source, the image (tile) to measure it on.

    Among the images whose data cover the source's whole cutout, the one whose pointing
    centre (``RA_CENT``/``DEC_CENT`` for GALEX, else the image centre) is nearest wins: GALEX
    depth and PSF quality fall off towards a tile's edge. Sources that no image covers whole
    fall back to an image holding their centre, and get -1 if none does.

    Returns
    -------
    ndarray of int
        Index into ``image_paths`` per source, -1 for none.
    """
    half_cutout = BANDS[band_name].cutout_size_pixels // 2
    n = len(ra_deg)
    best = np.full(n, -1)
    best_distance = np.full(n, np.inf)
    fallback = np.full(n, -1)
    coords = SkyCoord(ra_deg * u.deg, dec_deg * u.deg)
    for index, path in enumerate(image_paths):
        header = read_header(path)
        wcs = read_wcs(header)
        ny, nx = header["NAXIS2"], header["NAXIS1"]
        x, y = wcs.world_to_pixel(coords)
        col, row = np.rint(x), np.rint(y)
        with fits.open(path, memmap=True) as hdul:
            data = hdul[0].data
            # The cutout's centre and corners must land on data (finite, non-zero: GALEX
            # tiles are zero outside the detector's field of view).
            whole = np.ones(n, dtype=bool)
            for d_col, d_row in ((-1, -1), (-1, 1), (1, -1), (1, 1), (0, 0)):
                whole &= _has_data(data, col + d_col * half_cutout, row + d_row * half_cutout)
            centre_inside = _has_data(data, col, row)
        if "RA_CENT" in header and "DEC_CENT" in header:
            pointing = SkyCoord(header["RA_CENT"] * u.deg, header["DEC_CENT"] * u.deg)
        else:
            pointing = wcs.pixel_to_world((nx - 1) / 2, (ny - 1) / 2)
        distance = coords.separation(pointing).deg
        better = whole & (distance < best_distance)
        best[better] = index
        best_distance[better] = distance[better]
        fallback[(fallback < 0) & centre_inside] = index
    return np.where(best >= 0, best, fallback)


def _has_data(data, col, row) -> np.ndarray:
    """Whether each (col, row) lies on the image and on data: a finite pixel that is not in a
    square of zeros (GALEX tiles are zero outside the detector's field of view, while a
    shallow tile holds single zero-count pixels; see `mbphot.photometry._images._read_image`)."""
    on = np.isfinite(col) & np.isfinite(row) & (col >= 0) & (col < data.shape[1]) & (row >= 0) & (row < data.shape[0])
    col, row = col[on].astype(np.intp), row[on].astype(np.intp)
    finite = np.isfinite(data[row, col])
    nonzero = np.zeros(col.size, dtype=bool)
    reach = _ZERO_BOX // 2
    for d_row in range(-reach, reach + 1):
        for d_col in range(-reach, reach + 1):
            rows = np.clip(row + d_row, 0, data.shape[0] - 1)
            cols = np.clip(col + d_col, 0, data.shape[1] - 1)
            nonzero |= data[rows, cols] != 0
    result = np.zeros(on.shape, dtype=bool)
    result[on] = finite & nonzero
    return result


_ZERO_BOX = 5


def load_catalog(manifest: Manifest) -> pd.DataFrame:
    """The field's catalogue as a DataFrame, with ``in_field`` marking the requested circle."""
    table = read_table(manifest.resolve(manifest.catalog))
    frame = table.to_pandas()
    centre = SkyCoord(manifest.field["ra"] * u.deg, manifest.field["dec"] * u.deg)
    separation = SkyCoord(frame["ra"].to_numpy() * u.deg, frame["dec"].to_numpy() * u.deg).separation(centre)
    frame["in_field"] = separation.arcmin <= manifest.field["radius_arcmin"]
    return frame


def load_chandra(manifest: Manifest):
    """Chandra sources inside the field circle (the catalogue file may reach further)."""
    chandra = read_table(manifest.resolve(manifest.chandra))
    centre = SkyCoord(manifest.field["ra"] * u.deg, manifest.field["dec"] * u.deg)
    positions = SkyCoord(np.asarray(chandra["RA"], dtype=float) * u.deg, np.asarray(chandra["DEC"], dtype=float) * u.deg)
    return chandra[positions.separation(centre).arcmin <= manifest.field["radius_arcmin"]]


def footprint_area_deg2(manifest: Manifest, bands=None, n_grid: int = 201) -> float:
    """Sky area of the field circle that the field's images actually cover with data.

    The circle is sampled on a regular grid; the area is the spherical cap's times the
    fraction of grid points that land on a finite, non-zero pixel of an image of any of
    ``bands`` (default: every band of the field, so the answer does not depend on which
    bands a run measures).
    """
    radius_deg = manifest.field["radius_arcmin"] / 60.0
    offsets = np.linspace(-radius_deg, radius_deg, n_grid)
    d_ra, d_dec = np.meshgrid(offsets, offsets)
    inside = np.hypot(d_ra, d_dec) <= radius_deg
    centre = SkyCoord(manifest.field["ra"] * u.deg, manifest.field["dec"] * u.deg)
    points = centre.spherical_offsets_by(d_ra[inside] * u.deg, d_dec[inside] * u.deg)
    covered = np.zeros(points.size, dtype=bool)
    for band in manifest.bands if bands is None else bands:
        for entry in manifest.images(band):
            with fits.open(entry.image, memmap=True) as hdul:
                x, y = read_wcs(hdul[0].header).world_to_pixel(points)
                covered |= _has_data(hdul[0].data, np.rint(x), np.rint(y))
    return sky_area_deg2(manifest.field["radius_arcmin"]) * covered.mean()


def load_truth(manifest: Manifest) -> pd.DataFrame | None:
    """The simulated field's truth table (None for real data)."""
    return None if manifest.truth is None else read_table(manifest.resolve(manifest.truth)).to_pandas()


def summary(manifest: Manifest) -> pd.DataFrame:
    """One row per band: images, sources measured on each, PRF file and where it came from."""
    choice = pd.read_parquet(manifest.resolve(manifest.tile_choice))
    rows = []
    for band, entry in manifest.bands.items():
        for image in manifest.images(band):
            rows.append(
                {
                    "band": band,
                    "image": image.image.name,
                    "uncertainty map": image.unc.name if image.unc else "",
                    "sky map": image.sky.name if image.sky else "",
                    "exposure map": image.exposure.name if image.exposure else "",
                    "sources assigned": int((choice[band] == image.tile).sum()),
                    "PRF": Path(entry["prf"]).name,
                    "PRF source": entry["prf_source"],
                }
            )
    return pd.DataFrame(rows)


def _sample_manifest(params: RunParameters) -> Manifest:
    spec = SampleSpec(ra_deg=params.ra, dec_deg=params.dec, radius_arcmin=params.radius_arcmin, seed=params.seed,
                      realism=params.realism)
    directory = make_sample_field(spec, params.field_dir)
    files = sample_files(directory)
    bands = {
        name: {**entry, "prf_source": "model PRF of the simulated field"} for name, entry in files["bands"].items()
    }
    return Manifest(
        directory=directory,
        field={
            "ra": params.ra,
            "dec": params.dec,
            "radius_arcmin": params.radius_arcmin,
            "catalog_radius_arcmin": spec.catalog_radius_arcmin,
            "data_source": "sample",
            "seed": params.seed,
        },
        catalog=files["catalog"],
        chandra=files["chandra"],
        truth=files["truth"],
        bands=bands,
    )


def retrieve(params: RunParameters, progress: bool = True) -> Manifest:
    """Get every file the run needs and write the field's manifest.

    Parameters
    ----------
    params : RunParameters
    progress : bool
        Show download progress bars (archive mode).

    Returns
    -------
    Manifest
        Also saved as ``params.manifest_path``.

    Raises
    ------
    ValueError
        No catalogue source lies inside the field (e.g. ``radius_arcmin=0.001``).
    """
    field_dir = Path(params.field_dir)
    waiting = f"waiting for another run retrieving the same field ({field_dir})"
    # One retrieval of a field at a time: a second run of the field waits and then reuses it.
    with file_lock(Path(params.data_dir) / ".locks" / f"{params.data_source}-{field_dir.name}", waiting_message=waiting):
        _remove_stale_staging(field_dir)
        if params.data_source == "sample":
            manifest = _sample_manifest(params)
        elif params.data_source == "files":
            manifest = retrieve_files(params)
        else:
            from .archive import retrieve_archive

            manifest = retrieve_archive(params, progress=progress)
        write_tile_choice(manifest)
        _check_sources(manifest)
        manifest.save()
    return manifest


def _remove_stale_staging(field_dir: Path) -> None:
    """Remove the hidden folders a killed generation of this field left beside it.

    Called under the field's lock, so no other process is building the field now.
    """
    pattern = re.compile(rf"\.{re.escape(field_dir.name)}\.[a-z0-9_]{{8}}")
    if field_dir.parent.is_dir():
        for path in field_dir.parent.iterdir():
            if path.is_dir() and pattern.fullmatch(path.name):
                shutil.rmtree(path, ignore_errors=True)


def _check_sources(manifest: Manifest) -> None:
    """A field without a catalogue source inside it would give an empty catalogue: stop instead."""
    catalog = load_catalog(manifest)
    if not catalog["in_field"].any():
        field = manifest.field
        raise ValueError(
            f"no catalogue source lies within radius_arcmin={field['radius_arcmin']:g} of ra={field['ra']:g}, "
            f"dec={field['dec']:g} ({len(catalog)} sources around it); choose a larger radius_arcmin, e.g. 0.5"
        )


def write_tile_choice(manifest: Manifest) -> None:
    """Choose the image of every band for every catalogue source and record it in the field."""
    catalog = load_catalog(manifest)
    choice = pd.DataFrame({"id": catalog["id"].to_numpy()})
    for name in manifest.bands:
        entries = manifest.images(name)
        index = choose_tiles(catalog["ra"].to_numpy(), catalog["dec"].to_numpy(), [e.image for e in entries], name)
        choice[name] = np.array([e.tile for e in entries] + [""])[index]  # index -1 picks ""
    manifest.tile_choice = "tile_choice.parquet"
    with atomic_path(manifest.resolve(manifest.tile_choice)) as temporary:
        choice.to_parquet(temporary, index=False)
