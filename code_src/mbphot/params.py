"""Run parameters: defaults, validation with clear errors, and where a run's files go.

Every parameter is checked when a `RunParameters` is made, before any work: papermill and the
command line pass strings (``"3"``), YAML gives lists where a notebook user types a
comma-separated string, and a wrong value should stop the run at once with a message naming
the parameter, the value and what is allowed.
"""

import hashlib
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .bands import BAND_NAMES, BANDS
from .engine.tractor import INSTALL_HINT, tractor_available

__all__ = [
    "RunParameters",
    "ParameterError",
    "PARAMETER_NAMES",
    "DATA_SOURCES",
    "ENGINES",
    "MODES",
    "REALISM_LEVELS",
    "COSMOS_FIELD",
    "FULL_FIELD_RADIUS_ARCMIN",
    "exact_label",
]

DATA_SOURCES = ("sample", "archive", "files")
ENGINES = ("mbphot", "tractor")
MODES = ("source", "scene")
REALISM_LEVELS = ("ideal", "realistic")
"""Realism of the simulated field (`mbphot.sample.Realism`): ``"ideal"`` draws the sky exactly as
the fitter models it; ``"realistic"`` adds the effects of real COSMOS images."""

COSMOS_FIELD = {"ra_min": 149.33, "ra_max": 150.89, "dec_min": 1.43, "dec_max": 2.98}
"""The COSMOS footprint (about 2 deg^2 around RA 150.12, Dec 2.21)."""
FULL_FIELD_RADIUS_ARCMIN = 48.0
COSMOS2015_SOURCES_PER_ARCMIN2 = 160.0
"""Mean density of the COSMOS2015 catalogue (Laigle et al. 2016: 1.18 million sources over 2 deg^2)."""
MIN_RADIUS_ARCMIN = 0.05
"""Below this a COSMOS field holds on average fewer than one catalogue source (at 160 per arcmin^2)."""
"""The radius that takes in the whole of COSMOS from its centre (the published tutorial's
full field); a larger circle only adds sky without data."""


def exact_label(value: float, spec: str) -> str:
    """``value`` formatted with ``spec`` when that reads back as exactly ``value``, else in full.

    Folder names made with this label are short for the usual values (``150.0100``, ``3``)
    and never shared by two different values: 150.010049 is ``150.010049``, not ``150.0100``,
    so that it never reuses the files of RA 150.01.

    Examples
    --------
    >>> exact_label(150.01, ".4f"), exact_label(150.010049, ".4f"), exact_label(2.2, "+.4f")
    ('150.0100', '150.010049', '+2.2000')
    """
    short = format(value, spec)
    if float(short) == value:
        return short
    return format(value, "+" if "+" in spec else "")


ENDPOINT_DATA_SETTINGS = ("irsa_tap", "registry", "mast", "heasarc", "prf", "prf_base")
"""The endpoint settings that change what is retrieved (addresses), unlike timeouts and retries."""


def endpoints_label() -> str:
    """Names the archive endpoints in effect: empty for the real archives' defaults, else
    ``_e`` and a digest of the addresses ``$MBPHOT_ENDPOINTS`` sets, so that a mirror's data
    never stand for the real archive's (`mbphot.archive.config`)."""
    from .archive.config import Endpoints, load_endpoints

    chosen, default = load_endpoints(), Endpoints()
    addresses = {name: getattr(chosen, name) for name in ENDPOINT_DATA_SETTINGS}
    if addresses == {name: getattr(default, name) for name in ENDPOINT_DATA_SETTINGS}:
        return ""
    return "_e" + hashlib.sha1(json.dumps(addresses, sort_keys=True).encode()).hexdigest()[:8]


class ParameterError(ValueError, TypeError):
    """A run parameter with a wrong type or value.

    Both a `ValueError` and a `TypeError`, so that callers catching either see it.

    Attributes
    ----------
    parameter : str
        The parameter's name.
    value : object
        The value given.
    """

    def __init__(self, parameter, value, message):
        super().__init__(message)
        self.parameter = parameter
        self.value = value


def _number(name, value, unit) -> float:
    """A finite float from a number or a numeric string (papermill and the shell pass strings)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise ParameterError(name, value, f"{name} must be a number ({unit}), got {value!r} ({type(value).__name__})")
    try:
        number = float(value)
    except ValueError:
        raise ParameterError(name, value, f"{name} must be a number ({unit}), got {value!r} ({type(value).__name__})") from None
    if not math.isfinite(number):
        raise ParameterError(name, value, f"{name} must be a finite number ({unit}), got {value!r}")
    return number


def _whole(name, value, meaning) -> int:
    """A whole number >= 0 from an int, an integral float or a string of one."""
    allowed = f"{name} must be a whole number >= 0 ({meaning}), got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise ParameterError(name, value, allowed)
    try:
        number = float(value)
    except ValueError:
        raise ParameterError(name, value, allowed) from None
    if not math.isfinite(number) or number != int(number) or number < 0:
        raise ParameterError(name, value, allowed)
    return int(number)


def _choice(name, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ParameterError(name, value, f"unknown {name} {value!r}; choose from {', '.join(choices)}")
    return value


def _path(name, value, allow_none=False) -> str | None:
    if value is None and allow_none:
        return None
    if isinstance(value, os.PathLike) or (isinstance(value, str) and value.strip()):
        return os.fspath(value)
    raise ParameterError(name, value, f"{name} must be a folder or file path (a non-empty string), got {value!r}")


def _bands(value) -> tuple[list[str], bool]:
    """Band names in band-table order, and whether ``"all"`` was asked for."""
    allowed = f"'all' or band names from {', '.join(BAND_NAMES)}, as a list or a comma-separated string"
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return list(BAND_NAMES), True
        names = [name.strip() for name in value.split(",") if name.strip()]
    elif isinstance(value, (list, tuple)):
        names = list(value)
    else:
        raise ParameterError("bands", value, f"bands must be {allowed}, got {value!r} ({type(value).__name__})")
    if not names:
        raise ParameterError("bands", value, f"bands must be {allowed}, got {value!r} (no band)")
    for name in names:
        if not isinstance(name, str) or name.strip().lower() not in BANDS:
            raise ParameterError(
                "bands", value, f"unknown band {name!r} in bands={value!r}; bands must be {allowed}"
            )
    chosen = {name.strip().lower() for name in names}
    return [name for name in BAND_NAMES if name in chosen], False


@dataclass
class RunParameters:
    """Everything a run depends on; the notebooks' ``parameters`` cells map onto it.

    Parameters
    ----------
    ra, dec : float
        Field centre in degrees (ICRS): inside COSMOS for ``"sample"`` and ``"archive"``,
        inside your images for ``"files"``.
    radius_arcmin : float
        Field radius in arcmin, > 0; photometry is reported for catalogue sources inside it.
        At most `FULL_FIELD_RADIUS_ARCMIN` (``"sample"``, ``"archive"``: the whole of COSMOS),
        or inside every chosen band's images (``"files"``).
    bands : list of str or str
        Bands to measure: ``"all"``, or a list or comma-separated string of irac1..irac4,
        nuv, fuv. With ``"files"``, ``"all"`` means every band the files manifest lists.
    data_source : str
        ``"sample"`` (the simulated field, offline), ``"archive"`` or ``"files"`` (your own
        files, listed in ``files_manifest``).
    seed : int
        Seed of the simulated field, >= 0.
    realism : str
        The simulated field's realism: ``"realistic"`` (default: PRF mismatch, real-size
        GALEX PSFs, astrometric errors, resolved galaxies, confusion, correlated noise, GALEX
        depth and sky-map errors; see ``docs/simulator.md``) or ``"ideal"`` (the sky drawn
        exactly as the engine models it, for tests). Only used with ``data_source="sample"``.
    engine : str
        Photometry engine: ``"mbphot"`` or ``"tractor"`` (The Tractor, where installed).
    mode : str
        ``"scene"`` (default: all sources of a region fitted together) or ``"source"`` (each
        target in its own cutout with its neighbours); see `mbphot.photometry.measure_field`.
    n_workers : int
        Worker processes for photometry (0 or None: one per CPU the run may use, within its container limit).
    data_dir, output_dir : path
        Where retrieved/derived data and the outputs go.
    files_manifest : path or None
        The YAML files manifest (see `mbphot.user_files`); required with
        ``data_source="files"``, ignored otherwise. Stored as an absolute path.
    scheduler : str or None
        Address of a ``dask.distributed`` scheduler (``"tcp://host:8786"``) to run the
        photometry partitions on; None runs them in local processes. It does not change
        the results, so it is not part of the run's name.

    Raises
    ------
    ParameterError
        Naming the parameter, the value given and what is allowed.
    """

    ra: float = 150.01
    dec: float = 2.20
    radius_arcmin: float = 3.0
    bands: list | str = "all"
    data_source: str = "sample"
    seed: int = 42
    realism: str = "realistic"
    engine: str = "mbphot"
    mode: str = "scene"
    n_workers: int = 0
    data_dir: str = "data"
    output_dir: str = "output"
    files_manifest: str | None = None
    scheduler: str | None = None

    def __post_init__(self):
        self.ra = _number("ra", self.ra, "deg")
        self.dec = _number("dec", self.dec, "deg")
        self.radius_arcmin = _number("radius_arcmin", self.radius_arcmin, "arcmin")
        self.bands, all_bands = _bands(self.bands)
        self.data_source = _choice("data_source", self.data_source, DATA_SOURCES)
        self.engine = _choice("engine", self.engine, ENGINES)
        self.mode = _choice("mode", self.mode, MODES)
        self.seed = _whole("seed", self.seed, "seed of the simulated field")
        self.realism = _choice("realism", self.realism, REALISM_LEVELS)
        self.n_workers = 0 if self.n_workers is None else _whole("n_workers", self.n_workers, "0 = one per CPU the run may use")
        self.data_dir = _path("data_dir", self.data_dir)
        self.output_dir = _path("output_dir", self.output_dir)
        self.files_manifest = _path("files_manifest", self.files_manifest, allow_none=True)
        if self.scheduler is not None and not (isinstance(self.scheduler, str) and "://" in self.scheduler):
            raise ParameterError(
                "scheduler", self.scheduler,
                f"scheduler must be a dask scheduler address such as 'tcp://10.0.0.5:8786', or None for local "
                f"processes, got {self.scheduler!r}",
            )

        if not self.radius_arcmin > 0:
            raise ParameterError(
                "radius_arcmin", self.radius_arcmin,
                f"radius_arcmin must be positive (> 0 arcmin), got {self.radius_arcmin:g}; try 3.0",
            )
        if self.engine == "tractor" and not tractor_available():
            raise ParameterError(
                "engine", self.engine, f"engine='tractor' needs The Tractor, which cannot be imported here. {INSTALL_HINT}"
            )
        self._files_fingerprint = None
        if self.data_source == "files":
            self._check_files(all_bands)
        else:
            self._check_cosmos()

    def _check_cosmos(self):
        inside_ra = COSMOS_FIELD["ra_min"] <= self.ra <= COSMOS_FIELD["ra_max"]
        inside_dec = COSMOS_FIELD["dec_min"] <= self.dec <= COSMOS_FIELD["dec_max"]
        if not (inside_ra and inside_dec):
            raise ParameterError(
                "ra" if not inside_ra else "dec",
                self.ra if not inside_ra else self.dec,
                f"ra={self.ra:g}, dec={self.dec:g} is outside the COSMOS field: data_source={self.data_source!r} "
                f"needs ra within {COSMOS_FIELD['ra_min']}..{COSMOS_FIELD['ra_max']} and dec within "
                f"{COSMOS_FIELD['dec_min']}..{COSMOS_FIELD['dec_max']} deg; e.g. ra=150.01, dec=2.20",
            )
        if self.radius_arcmin < MIN_RADIUS_ARCMIN:
            expected = math.pi * self.radius_arcmin**2 * COSMOS2015_SOURCES_PER_ARCMIN2
            raise ParameterError(
                "radius_arcmin", self.radius_arcmin,
                f"radius_arcmin={self.radius_arcmin:g} holds about {expected:.2g} COSMOS2015 sources on average "
                f"({COSMOS2015_SOURCES_PER_ARCMIN2:g} per arcmin^2): too small a field to measure; radius_arcmin must "
                f"be at least {MIN_RADIUS_ARCMIN:g} arcmin, e.g. 0.5",
            )
        if self.radius_arcmin > FULL_FIELD_RADIUS_ARCMIN:
            raise ParameterError(
                "radius_arcmin", self.radius_arcmin,
                f"radius_arcmin={self.radius_arcmin:g} reaches beyond the COSMOS field: radius_arcmin must be at most "
                f"{FULL_FIELD_RADIUS_ARCMIN:g} arcmin (the whole field seen from its centre)",
            )

    def _check_files(self, all_bands):
        from .user_files import check_catalog, check_data_in_field, covered_radius_arcmin, load_files_manifest

        if self.files_manifest is None:
            raise ParameterError(
                "files_manifest", None,
                "files_manifest must be the path of your YAML files manifest when data_source='files', got None; "
                'see the README section "Your own files" (command line: --files-manifest FILE)',
            )
        self.files_manifest = str(Path(self.files_manifest).expanduser().resolve())
        if not Path(self.files_manifest).is_file():
            raise ParameterError(
                "files_manifest", self.files_manifest,
                f"files_manifest must be an existing YAML file, got {self.files_manifest!r} (not found)",
            )
        if not (0.0 <= self.ra < 360.0 and -90.0 <= self.dec <= 90.0):
            raise ParameterError(
                "ra" if not 0.0 <= self.ra < 360.0 else "dec",
                self.ra if not 0.0 <= self.ra < 360.0 else self.dec,
                f"ra={self.ra:g}, dec={self.dec:g} is not a sky position: ra must be within 0..360 and dec "
                "within -90..90 deg",
            )
        spec = load_files_manifest(self.files_manifest)
        if all_bands:
            self.bands = list(spec.bands)
        missing = [band for band in self.bands if band not in spec.bands]
        if missing:
            raise ParameterError(
                "bands", self.bands,
                f"bands={self.bands} asks for {', '.join(missing)}, which files_manifest {self.files_manifest} "
                f"does not list; bands must be 'all' or among {', '.join(spec.bands)}",
            )
        for band in self.bands:
            covered_arcmin = covered_radius_arcmin(spec, band, self.ra, self.dec, self.radius_arcmin)
            if covered_arcmin == 0.0:
                raise ParameterError(
                    "ra", self.ra,
                    f"ra={self.ra:g}, dec={self.dec:g} is outside the {band} images of files_manifest "
                    f"{self.files_manifest}: the field centre must lie on the images",
                )
            if covered_arcmin < self.radius_arcmin:
                raise ParameterError(
                    "radius_arcmin", self.radius_arcmin,
                    f"radius_arcmin={self.radius_arcmin:g} reaches beyond the {band} images of files_manifest "
                    f"{self.files_manifest}: around ra={self.ra:g}, dec={self.dec:g} radius_arcmin must be at most "
                    f"about {covered_arcmin:.2f} arcmin, or leave {band} out of bands",
                )
            check_data_in_field(spec, band, self.ra, self.dec, self.radius_arcmin)
        # An empty field is refused here, before any notebook runs.
        check_catalog(spec, self.ra, self.dec, self.radius_arcmin)
        self._files_fingerprint = spec.fingerprint

    @classmethod
    def from_namespace(cls, namespace) -> "RunParameters":
        """Build from a mapping that holds the parameters among other names, e.g. a notebook's ``globals()``.

        Names that are not parameters are ignored; parameters missing from ``namespace`` take
        their defaults.
        """
        return cls(**{name: namespace[name] for name in PARAMETER_NAMES if name in namespace})

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def field_tag(self) -> str:
        """Names the retrieved field: same position, radius and source give the same folder
        (position and radius exact, see `exact_label`).

        Sample fields add the seed; fields of your own files add a fingerprint of the files
        manifest and its files, so that other or changed files never reuse an older field's
        tile choice and photometry; archive fields retrieved through other endpoints than the
        real archives' add a digest of them (`endpoints_label`).
        """
        base = self._position_label
        if self.data_source == "sample":
            return f"{base}_s{self.seed}" + ("" if self.realism == "ideal" else f"_{self.realism}")
        if self.data_source == "files":
            return f"{base}_f{self._files_fingerprint}"
        return base + endpoints_label()

    @property
    def run_tag(self) -> str:
        """Names a run's output folder: exact position and radius, bands, data source (with the seed,
        the files' fingerprint or the endpoints' digest), engine and mode. ``n_workers`` and ``scheduler`` do not change the
        results and are left out."""
        bands = "all" if self.bands == list(BAND_NAMES) else "-".join(self.bands)
        source = {
            "sample": f"sample-s{self.seed}" + ("" if self.realism == "ideal" else f"-{self.realism}"),
            "files": f"files-{self._files_fingerprint}",
            "archive": "archive",
        }[self.data_source]
        if self.data_source == "archive":
            source += endpoints_label()
        return f"{self._position_label}_{bands}_{source}_{self.engine}-{self.mode}"

    @property
    def _position_label(self) -> str:
        """Centre and radius, exact (`exact_label`): nearby fields never share a folder."""
        return (f"ra{exact_label(self.ra, '.4f')}_dec{exact_label(self.dec, '+.4f')}"
                f"_r{exact_label(self.radius_arcmin, 'g')}")

    @property
    def run_dir(self) -> Path:
        """The run's own folder, ``<output_dir>/runs/<run_tag>``: the notebooks write their
        photometry table, catalogue and figures there, whether `mbphot run` runs them or you do
        by hand, so that nothing but a finished `mbphot run` changes the published outputs."""
        return Path(self.output_dir) / "runs" / self.run_tag

    @property
    def photometry_path(self) -> Path:
        """The run's photometry table, which ``02_photometry`` writes and ``03_crossmatch`` reads."""
        return self.run_dir / "photometry.parquet"

    @property
    def field_dir(self) -> Path:
        return Path(self.data_dir) / self.data_source / self.field_tag

    @property
    def manifest_path(self) -> Path:
        return self.field_dir / "manifest.json"


PARAMETER_NAMES: tuple[str, ...] = tuple(f.name for f in fields(RunParameters))
"""The parameters, in the order of the notebooks' ``parameters`` cells."""
