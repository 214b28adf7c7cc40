"""The ``files`` data source: your own catalogue, images and PRFs, listed in a small YAML file.

The files manifest names the files of a field that is already on disk, in the formats of the
sample field (see `mbphot.sample`). Relative paths are read from the YAML file's folder::

    catalog: catalog/cosmos2015.fits        # table with ra, dec (deg) and a unique id
    chandra: chandra/ccosmoscat.fits        # HEASARC ccosmoscat columns (required)
    bands:
      irac1:
        prf: prf/PRF_IRAC_ch1.fits
        images:
          - image: irac/irac_ch1_go2_sci.fits   # MJy/sr, celestial WCS, data in HDU 0
            unc: irac/irac_ch1_go2_unc.fits     # optional, same grid
      nuv:
        prf: prf/PSFnuv.fits
        images:
          - image: galex/T01-nd-int.fits        # counts/s
            sky: galex/T01-nd-skybg.fits        # optional sky-background map
            exposure: galex/T01-nd-rrhr.fits    # optional effective exposure, s
            tile: T01                           # optional; default: the image's file name

An image can also be given as a bare path. The Chandra catalogue is required because the
cross-match notebook always reads one.

`load_files_manifest` checks the YAML and every file it names (existence, FITS files whole,
2-D images with a celestial WCS, the band's pixel scale, a unit mbphot reads or converts from
(`mbphot.bands.unit_factor`), maps on the image's grid,
PRFs finite with a positive sum) from their headers and the PRFs' pixels, so `RunParameters`
can check it before any work; `retrieve_files` also reads the catalogues and builds the
`Manifest`. Nothing is copied: the manifest points at your files where they are.
"""

import difflib
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from astropy.wcs.utils import proj_plane_pixel_scales

from .bands import BAND_NAMES, BANDS, Band, unit_factor
from .crossmatch import CHANDRA_COLUMNS
from .io import read_header, read_table, read_wcs
from .manifest import Manifest

__all__ = [
    "FilesManifestError",
    "FilesSpec",
    "load_files_manifest",
    "covered_radius_arcmin",
    "check_data_in_field",
    "retrieve_files",
    "CATALOG_COLUMNS",
]

TOP_KEYS = ("catalog", "chandra", "bands")
BAND_KEYS = ("prf", "images")
IMAGE_KEYS = ("image", "unc", "sky", "exposure", "tile")
MAPS = ("unc", "sky", "exposure")
CATALOG_COLUMNS = ("ra", "dec", "id")
README_SECTION = 'README section "Your own files"'
PIXEL_SCALE_TOLERANCE = 0.01
"""Relative difference allowed between an image's pixel scale and its band's: the PRF is
tabulated on the band's pixel grid, so a 1.2"/pixel IRAC image measured as 0.6" gave fluxes
4.5 times too low."""


class FilesManifestError(ValueError):
    """A problem in a files manifest or a file it names; the message says which and how to fix it."""


@dataclass(frozen=True)
class FilesSpec:
    """A checked files manifest.

    Attributes
    ----------
    path : Path
        The YAML file (absolute).
    catalog, chandra : Path
        The source catalogue and the Chandra catalogue (absolute).
    bands : dict
        Band name to ``{"prf": str, "images": [dict, ...]}``, every path absolute, each image
        with ``image``, ``unc``, ``sky``, ``exposure`` (None where absent) and ``tile``.
    grids : dict
        Band name to a list of ``(WCS, (ny, nx))``, one per image, for footprint checks.
    fingerprint : str
        Hash of the YAML text and of every named file's path, size and modification time:
        a field folder made from other files, or from changed files, gets another name.
    """

    path: Path
    catalog: Path
    chandra: Path
    bands: dict
    grids: dict
    fingerprint: str


def _error(manifest_path, where, problem) -> FilesManifestError:
    return FilesManifestError(f"files manifest {manifest_path}: {where}: {problem} (see the {README_SECTION})")


def _unknown_keys(mapping, allowed, manifest_path, where):
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _error(manifest_path, where, f"unknown key {key!r}, allowed keys are {', '.join(allowed)}{hint}")


def _file(value, manifest_path, where) -> Path:
    """An existing file named by a manifest entry, relative paths read from the manifest's folder."""
    if not isinstance(value, str) or not value.strip():
        raise _error(manifest_path, where, f"expected a file path, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = manifest_path.parent / path
    path = path.resolve()
    if not path.is_file():
        raise _error(
            manifest_path,
            where,
            f"file {path} not found; correct the path (relative paths are read from {manifest_path.parent})",
        )
    if path.suffix.lower() in (".fits", ".fit", ".fts"):
        _check_complete(path, manifest_path, where)
    return path


def _check_complete(path, manifest_path, where) -> None:
    """Refuse a FITS file cut short: every HDU's data, as its header declares it, must be in the file.

    A copy or download that stopped part way otherwise passes the header checks and fails
    much later with ``buffer is too small``.
    """
    size = path.stat().st_size
    try:
        with warnings.catch_warnings():
            # astropy only warns of a short file; the error below says which HDU and what to do.
            warnings.simplefilter("ignore", AstropyUserWarning)
            hdul = fits.open(path, memmap=True)
        with hdul:
            for index, hdu in enumerate(hdul):
                header = hdu.header
                axes = [int(header.get(f"NAXIS{axis}", 0)) for axis in range(1, int(header.get("NAXIS", 0)) + 1)]
                count = int(np.prod(axes)) if axes else 0
                needed = abs(int(header.get("BITPIX", 8))) // 8 * int(header.get("GCOUNT", 1)) * (
                    int(header.get("PCOUNT", 0)) + count)
                end = hdu.fileinfo()["datLoc"] + needed
                if end > size:
                    raise _error(
                        manifest_path, where,
                        f"{path} is cut short: HDU {index} needs {end} bytes but the file has {size}; "
                        "copy or download the file again",
                    )
    except OSError as error:
        raise _error(manifest_path, where, f"{path} is not a readable FITS file ({error})") from None


def _image_grid(path, manifest_path, where, need_wcs):
    """Shape and WCS of the 2-D image in a FITS file's primary HDU, which is where mbphot reads it."""
    try:
        header = read_header(path)
    except OSError as error:
        raise _error(manifest_path, where, f"{path} is not a readable FITS file ({error})") from None
    if header.get("NAXIS") != 2:
        raise _error(
            manifest_path,
            where,
            f"{path} has no 2-D image in its primary HDU (NAXIS={header.get('NAXIS')}); "
            "mbphot reads images from HDU 0, so write the image there",
        )
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    wcs = read_wcs(header) if need_wcs else None
    if need_wcs and not wcs.has_celestial:
        raise _error(
            manifest_path,
            where,
            f"{path} has no celestial WCS in its primary header; add CTYPE1/CTYPE2 "
            "(e.g. RA---TAN/DEC--TAN), CRVAL1/2, CRPIX1/2 and CDELT1/2 or CD1_1..CD2_2",
        )
    return wcs, shape


def _check_prf(path, manifest_path, where):
    """A 2-D PRF, finite and with a positive sum (it is normalised to unit sum before use)."""
    try:
        with fits.open(path) as hdul:
            images = [hdu.data for hdu in hdul if hdu.header.get("NAXIS") == 2]
            prf = np.asarray(images[0], dtype=np.float64) if images else None
    except OSError as error:
        raise _error(manifest_path, where, f"{path} is not a readable FITS file ({error})") from None
    if prf is None:
        raise _error(manifest_path, where, f"{path} holds no 2-D PRF image in any HDU")
    finite = np.isfinite(prf)
    if not finite.all():
        raise _error(manifest_path, where, f"{path}: {int((~finite).sum())} of its {prf.size} PRF pixels are NaN or "
                     "infinite; give a PRF with a finite value in every pixel")
    if not prf.sum() > 0:
        raise _error(manifest_path, where, f"{path}: the PRF sums to {prf.sum():g}; give a PRF with a positive sum "
                     "(it is normalised to 1 before use)")


def _check_pixel_scale(band: Band, wcs, path, manifest_path, where) -> None:
    """The image's pixels must be the band's: the PRF is tabulated on that grid."""
    scales_arcsec = np.abs(proj_plane_pixel_scales(wcs.celestial)) * 3600.0
    if np.any(np.abs(scales_arcsec / band.pixel_scale_arcsec - 1.0) > PIXEL_SCALE_TOLERANCE):
        shown = " x ".join(f'{scale:.4g}"' for scale in scales_arcsec)
        raise _error(
            manifest_path, where,
            f"{path} has {shown} pixels, but {band.name} images must have {band.pixel_scale_arcsec:g}\" pixels "
            f"(the grid its PRF is tabulated for); resample the image to {band.pixel_scale_arcsec:g}\"/pixel, "
            "conserving surface brightness (e.g. with the reproject package), or give the original mosaic",
        )


def _check_unit(band: Band, path, manifest_path, where) -> None:
    """The image's ``BUNIT`` must be the band's unit or one mbphot converts from when it reads
    the image (`mbphot.bands.unit_factor`); a missing or empty ``BUNIT`` is taken to be the
    band's."""
    bunit = str(read_header(path).get("BUNIT", "")).strip()
    if bunit and unit_factor(bunit, band) is None:
        raise _error(
            manifest_path, where,
            f"{path} has BUNIT={bunit!r}, which mbphot cannot convert to {band.image_unit}, the unit of {band.name} "
            f"images; give the image in {band.image_unit} (or a flux density per pixel such as uJy) and set BUNIT",
        )


def _image_entry(raw, manifest_path, where, band: Band) -> tuple[dict, tuple]:
    if isinstance(raw, str):
        raw = {"image": raw}
    if not isinstance(raw, dict):
        raise _error(manifest_path, where, f"expected a path or a mapping with 'image', got {raw!r}")
    _unknown_keys(raw, IMAGE_KEYS, manifest_path, where)
    if "image" not in raw:
        raise _error(manifest_path, where, "'image' is missing; name the science image")
    image = _file(raw["image"], manifest_path, f"{where}.image")
    wcs, shape = _image_grid(image, manifest_path, f"{where}.image", need_wcs=True)
    _check_pixel_scale(band, wcs, image, manifest_path, f"{where}.image")
    _check_unit(band, image, manifest_path, f"{where}.image")
    entry = {"image": str(image)}
    for key in MAPS:
        if raw.get(key) is None:
            entry[key] = None
            continue
        path = _file(raw[key], manifest_path, f"{where}.{key}")
        _, map_shape = _image_grid(path, manifest_path, f"{where}.{key}", need_wcs=False)
        if map_shape != shape:
            raise _error(
                manifest_path,
                f"{where}.{key}",
                f"{path} is {map_shape[1]} x {map_shape[0]} pixels but its image {image.name} is "
                f"{shape[1]} x {shape[0]}; the map must be on the image's pixel grid",
            )
        if key == "unc":
            _check_unit(band, path, manifest_path, f"{where}.{key}")
        entry[key] = str(path)
    tile = raw.get("tile", image.name.removesuffix(".gz").removesuffix(".fits"))
    if not isinstance(tile, str) or not tile:
        raise _error(manifest_path, f"{where}.tile", f"expected a non-empty name, got {tile!r}")
    entry["tile"] = tile
    return entry, (wcs, shape)


def _fingerprint(manifest_path, text, paths) -> str:
    digest = hashlib.sha256(f"{manifest_path}\n{text}".encode())
    for path in sorted(set(paths)):
        status = os.stat(path)
        digest.update(f"\n{path} {status.st_size} {status.st_mtime_ns}".encode())
    return digest.hexdigest()[:10]


def load_files_manifest(path) -> FilesSpec:
    """Read and check a files manifest and every file it names (from headers only).

    Parameters
    ----------
    path : path-like
        The YAML file.

    Returns
    -------
    FilesSpec

    Raises
    ------
    FilesManifestError
        Naming the file or key at fault and the fix: a missing or unreadable file, an
        unknown key or band, an image without a 2-D primary HDU or a celestial WCS, a map
        off its image's grid, duplicate tile or image names.
    """
    manifest_path = Path(path).expanduser().resolve()
    if not manifest_path.is_file():
        raise FilesManifestError(f"files manifest {manifest_path} not found; give the path of your YAML files manifest")
    text = manifest_path.read_text()
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise FilesManifestError(f"files manifest {manifest_path} is not valid YAML: {error}") from None
    if not isinstance(content, dict):
        raise FilesManifestError(
            f"files manifest {manifest_path} must be a YAML mapping with keys {', '.join(TOP_KEYS)}, "
            f"got {type(content).__name__} (see the {README_SECTION})"
        )
    _unknown_keys(content, TOP_KEYS, manifest_path, "top level")
    if "catalog" not in content:
        raise _error(manifest_path, "catalog", "missing; name the source catalogue (columns ra, dec, id)")
    if "chandra" not in content:
        raise _error(
            manifest_path,
            "chandra",
            "missing; the cross-match step needs a Chandra catalogue with columns "
            f"{', '.join(CHANDRA_COLUMNS)} (HEASARC ccosmoscat)",
        )
    catalog = _file(content["catalog"], manifest_path, "catalog")
    chandra = _file(content["chandra"], manifest_path, "chandra")
    raw_bands = content.get("bands")
    if not isinstance(raw_bands, dict) or not raw_bands:
        raise _error(
            manifest_path,
            "bands",
            f"expected a mapping from band names ({', '.join(BAND_NAMES)}) to their prf and images, got {raw_bands!r}",
        )

    bands, grids, used_files = {}, {}, [catalog, chandra]
    image_names = {}
    for raw_name, raw_band in raw_bands.items():
        name = str(raw_name).lower()
        where = f"bands.{raw_name}"
        if name not in BANDS:
            raise _error(manifest_path, where, f"unknown band {raw_name!r}; choose from {', '.join(BAND_NAMES)}")
        if name in bands:
            raise _error(manifest_path, where, f"band {name} is listed twice; list it once")
        if not isinstance(raw_band, dict):
            raise _error(manifest_path, where, f"expected a mapping with 'prf' and 'images', got {raw_band!r}")
        _unknown_keys(raw_band, BAND_KEYS, manifest_path, where)
        if "prf" not in raw_band:
            raise _error(manifest_path, f"{where}.prf", "missing; name the band's PRF (or PSF) FITS file")
        prf = _file(raw_band["prf"], manifest_path, f"{where}.prf")
        _check_prf(prf, manifest_path, f"{where}.prf")
        raw_images = raw_band.get("images")
        if not isinstance(raw_images, list) or not raw_images:
            raise _error(manifest_path, f"{where}.images", f"expected a non-empty list of images, got {raw_images!r}")
        entries, band_grids = [], []
        for index, raw_image in enumerate(raw_images):
            entry, grid = _image_entry(raw_image, manifest_path, f"{where}.images[{index}]", BANDS[name])
            if entry["tile"] in [e["tile"] for e in entries]:
                raise _error(
                    manifest_path,
                    f"{where}.images[{index}].tile",
                    f"tile name {entry['tile']!r} is used twice in band {name}; give each image a distinct 'tile'",
                )
            # The photometry caches each image's sky and noise maps under its file name.
            stem = Path(entry["image"]).name.removesuffix(".gz").removesuffix(".fits")
            if stem in image_names:
                raise _error(
                    manifest_path,
                    f"{where}.images[{index}].image",
                    f"{entry['image']} has the same file name as {image_names[stem]}; the photometry caches "
                    "sky and noise maps by image file name, so rename one of them",
                )
            image_names[stem] = entry["image"]
            entries.append(entry)
            band_grids.append(grid)
            used_files += [Path(entry[key]) for key in ("image", *MAPS) if entry[key] is not None]
        bands[name] = {"prf": str(prf), "images": entries}
        grids[name] = band_grids
        used_files.append(prf)
    return FilesSpec(
        path=manifest_path,
        catalog=catalog,
        chandra=chandra,
        bands={name: bands[name] for name in BAND_NAMES if name in bands},
        grids=grids,
        fingerprint=_fingerprint(manifest_path, text, used_files),
    )


def covered_radius_arcmin(spec: FilesSpec, band: str, ra_deg: float, dec_deg: float, radius_arcmin: float,
                          n_rings: int = 64, n_angles: int = 90) -> float:
    """Largest radius, up to ``radius_arcmin``, of a circle around (ra, dec) inside a band's images.

    The circle is sampled on ``n_rings`` rings of ``n_angles`` points; a point is covered when
    it falls on the pixel grid of any image of the band (headers only: pixels without data
    inside an image still count, and are flagged by the photometry).

    Returns
    -------
    float
        ``radius_arcmin`` when the whole circle is covered, 0 when the centre is not, else
        the radius of the last ring that is whole, in arcmin.
    """
    ring_arcmin = radius_arcmin * np.arange(1, n_rings + 1) / n_rings
    angle_deg = np.arange(n_angles) * 360.0 / n_angles
    ring_grid, angle_grid = np.meshgrid(ring_arcmin, angle_deg, indexing="ij")
    centre = SkyCoord(ra_deg * u.deg, dec_deg * u.deg)
    points = centre.directional_offset_by(angle_grid.ravel() * u.deg, ring_grid.ravel() * u.arcmin)

    def covered(coords):
        inside = np.zeros(coords.shape, dtype=bool)
        for wcs, (ny, nx) in spec.grids[band]:
            x, y = wcs.world_to_pixel(coords)
            inside |= (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)
        return inside

    if not covered(centre.reshape(1))[0]:
        return 0.0
    whole_rings = covered(points).reshape(n_rings, n_angles).all(axis=1)
    if whole_rings.all():
        return float(radius_arcmin)
    first_broken = int(np.argmin(whole_rings))
    return float(ring_arcmin[first_broken - 1]) if first_broken > 0 else 0.0


def check_data_in_field(spec: FilesSpec, band: str, ra_deg: float, dec_deg: float, radius_arcmin: float) -> None:
    """Refuse a band whose images hold no data in the field: every pixel of the field's
    bounding box NaN or zero on every image (only that box is read, through a memory map).

    Raises
    ------
    FilesManifestError
        Naming the band, its images and what to do.
    """
    centre = SkyCoord(ra_deg * u.deg, dec_deg * u.deg)
    corners = centre.directional_offset_by([0, 90, 180, 270] * u.deg, radius_arcmin * u.arcmin)
    images = [entry["image"] for entry in spec.bands[band]["images"]]
    for image, (wcs, (ny, nx)) in zip(images, spec.grids[band]):
        x, y = (np.asarray(v) for v in wcs.world_to_pixel(SkyCoord([centre.ra, *corners.ra], [centre.dec, *corners.dec])))
        x0, x1 = int(np.clip(np.floor(x.min()), 0, nx)), int(np.clip(np.ceil(x.max()) + 1, 0, nx))
        y0, y1 = int(np.clip(np.floor(y.min()), 0, ny)), int(np.clip(np.ceil(y.max()) + 1, 0, ny))
        with fits.open(image, memmap=True) as hdul:
            section = np.asarray(hdul[0].data[y0:y1, x0:x1], dtype=np.float64)
        if (np.isfinite(section) & (section != 0)).any():
            return
    raise _error(
        spec.path, f"bands.{band}.images",
        f"no data in the field: every pixel within radius_arcmin={radius_arcmin:g} of ra={ra_deg:g}, dec={dec_deg:g} "
        f"is NaN or zero in {', '.join(images)}; check the images, or leave {band} out of bands",
    )


def check_catalog(spec: FilesSpec, ra_deg, dec_deg, radius_arcmin) -> None:
    """The catalogue of ``spec`` is readable, has ra, dec and a unique id, and has a source in the field."""
    try:
        catalog = read_table(spec.catalog)
    except Exception as error:  # astropy raises many kinds for files it cannot parse
        raise _error(spec.path, "catalog", f"cannot read {spec.catalog} as a table ({error}); write it as FITS") from None
    missing = [c for c in CATALOG_COLUMNS if c not in catalog.colnames]
    if missing:
        other_case = [name for name in catalog.colnames if name.lower() in missing]
        hint = f"; rename {', '.join(other_case)} to lower case" if other_case else ""
        raise _error(
            spec.path,
            "catalog",
            f"{spec.catalog} lacks column(s) {', '.join(missing)}; it needs ra, dec (deg) and a unique id{hint}",
        )
    ids = catalog["id"]
    if getattr(ids, "mask", None) is not None and np.any(ids.mask):
        raise _error(spec.path, "catalog", f"{spec.catalog}: column id has missing values; give every source an id")
    if len(np.unique(np.asarray(ids))) != len(ids):
        raise _error(spec.path, "catalog", f"{spec.catalog}: column id is not unique; give every source its own id")
    ra = np.asarray(catalog["ra"], dtype=float)
    dec = np.asarray(catalog["dec"], dtype=float)
    if not (np.isfinite(ra).all() and np.isfinite(dec).all()):
        raise _error(spec.path, "catalog", f"{spec.catalog}: ra or dec is missing for some sources; drop those rows")
    separation_arcmin = SkyCoord(ra * u.deg, dec * u.deg).separation(SkyCoord(ra_deg * u.deg, dec_deg * u.deg)).arcmin
    if not np.any(separation_arcmin <= radius_arcmin):
        raise _error(
            spec.path,
            "catalog",
            f"no source of {spec.catalog} lies within radius_arcmin={radius_arcmin:g} of ra={ra_deg}, dec={dec_deg}; "
            "choose a field the catalogue covers",
        )


def _check_chandra(spec: FilesSpec) -> None:
    try:
        chandra = read_table(spec.chandra)
    except Exception as error:  # astropy raises many kinds for files it cannot parse
        raise _error(spec.path, "chandra", f"cannot read {spec.chandra} as a table ({error}); write it as FITS") from None
    missing = [c for c in CHANDRA_COLUMNS if c not in chandra.colnames]
    if missing:
        raise _error(
            spec.path,
            "chandra",
            f"{spec.chandra} lacks column(s) {', '.join(missing)}; the cross-match needs the HEASARC ccosmoscat "
            f"columns {', '.join(CHANDRA_COLUMNS)} (RA, DEC in deg, ERROR_RADIUS in arcsec, fluxes in erg/s/cm2)",
        )


def retrieve_files(params) -> Manifest:
    """The manifest of a field made of your own files (``data_source="files"``).

    Checks the files manifest and every file it names, reads the catalogue (columns ``ra``,
    ``dec``, a unique ``id``, at least one source inside the field) and the Chandra catalogue
    (the ``ccosmoscat`` columns), and describes the field. Nothing is written here; the
    caller chooses the tiles and saves the manifest.

    Parameters
    ----------
    params : RunParameters
        With ``data_source="files"`` and ``files_manifest`` set.

    Returns
    -------
    Manifest
        In ``params.field_dir``, pointing at your files by absolute path.

    Raises
    ------
    FilesManifestError
        Naming the file or key at fault and the fix.
    """
    spec = load_files_manifest(params.files_manifest)
    missing = [band for band in params.bands if band not in spec.bands]
    if missing:
        raise _error(
            spec.path,
            "bands",
            f"band(s) {', '.join(missing)} requested but not listed; it lists {', '.join(spec.bands)}",
        )
    check_catalog(spec, params.ra, params.dec, params.radius_arcmin)
    _check_chandra(spec)
    return Manifest(
        directory=params.field_dir,
        field={
            "ra": params.ra,
            "dec": params.dec,
            "radius_arcmin": params.radius_arcmin,
            "data_source": "files",
            "files_manifest": str(spec.path),
        },
        catalog=spec.catalog,
        chandra=spec.chandra,
        truth=None,
        bands={
            name: {**entry, "prf_source": f"your file, listed in {spec.path.name}"}
            for name, entry in spec.bands.items()
        },
    )
