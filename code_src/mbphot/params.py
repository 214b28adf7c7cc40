"""Run parameters: defaults, validation with clear errors, and where a run's files go."""

from dataclasses import asdict, dataclass
from pathlib import Path

from .bands import parse_bands
from .engine.tractor import INSTALL_HINT, tractor_available

__all__ = ["RunParameters", "DATA_SOURCES", "ENGINES", "MODES", "COSMOS_FIELD"]

DATA_SOURCES = ("sample", "archive", "files")
ENGINES = ("mbphot", "tractor")
MODES = ("source", "scene")

COSMOS_FIELD = {"ra_min": 149.33, "ra_max": 150.89, "dec_min": 1.43, "dec_max": 2.98}
"""The COSMOS footprint (about 2 deg^2 around RA 150.12, Dec 2.21)."""


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})") from None
    return float(value)


@dataclass
class RunParameters:
    """Everything a run depends on; the notebooks' ``parameters`` cells map onto it.

    Parameters
    ----------
    ra, dec : float
        Field centre in degrees (ICRS), inside COSMOS.
    radius_arcmin : float
        Field radius in arcmin; photometry is reported for catalogue sources inside it.
    bands : list of str or str
        Bands to measure (``"all"`` or a subset of irac1..irac4, nuv, fuv).
    data_source : str
        ``"sample"`` (the simulated field, offline), ``"archive"`` or ``"files"``.
    seed : int
        Seed of the simulated field.
    engine : str
        Photometry engine: ``"mbphot"`` or ``"tractor"`` (The Tractor, where installed).
    mode : str
        ``"scene"`` (default: all sources of a region fitted together) or ``"source"`` (each
        target in its own cutout with its neighbours); see `mbphot.photometry.measure_field`.
    n_workers : int
        Worker processes for photometry (0: one per core).
    data_dir, output_dir : path
        Where retrieved/derived data and the outputs go.
    """

    ra: float = 150.01
    dec: float = 2.20
    radius_arcmin: float = 3.0
    bands: list | str = "all"
    data_source: str = "sample"
    seed: int = 42
    engine: str = "mbphot"
    mode: str = "scene"
    n_workers: int = 0
    data_dir: str = "data"
    output_dir: str = "output"

    def __post_init__(self):
        self.ra = _number("ra", self.ra)
        self.dec = _number("dec", self.dec)
        self.radius_arcmin = _number("radius_arcmin", self.radius_arcmin)
        self.bands = parse_bands(self.bands)
        if not (COSMOS_FIELD["ra_min"] <= self.ra <= COSMOS_FIELD["ra_max"]) or not (
            COSMOS_FIELD["dec_min"] <= self.dec <= COSMOS_FIELD["dec_max"]
        ):
            raise ValueError(
                f"ra={self.ra}, dec={self.dec} is outside the COSMOS field "
                f"(RA {COSMOS_FIELD['ra_min']}..{COSMOS_FIELD['ra_max']}, "
                f"Dec {COSMOS_FIELD['dec_min']}..{COSMOS_FIELD['dec_max']} deg); "
                "choose a position inside COSMOS, e.g. ra=150.01, dec=2.20"
            )
        if not self.radius_arcmin > 0:
            raise ValueError(f"radius_arcmin must be positive, got {self.radius_arcmin}; try 3.0")
        if self.radius_arcmin > 48:
            raise ValueError(f"radius_arcmin={self.radius_arcmin} is larger than COSMOS (48 arcmin at most)")
        if self.data_source not in DATA_SOURCES:
            raise ValueError(f"unknown data_source {self.data_source!r}; choose from {', '.join(DATA_SOURCES)}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose from {', '.join(ENGINES)}")
        if self.engine == "tractor" and not tractor_available():
            raise ValueError(f"engine='tractor' needs The Tractor, which cannot be imported here. {INSTALL_HINT}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        try:
            whole = not isinstance(self.seed, bool) and int(self.seed) == self.seed
        except (TypeError, ValueError):
            whole = False
        if not whole or int(self.seed) < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {self.seed!r}")
        self.seed = int(self.seed)
        if self.n_workers is None:
            self.n_workers = 0
        if isinstance(self.n_workers, bool) or not isinstance(self.n_workers, (int, float)) or int(self.n_workers) != self.n_workers or self.n_workers < 0:
            raise ValueError(f"n_workers must be a whole number >= 0 (0 = one per core), got {self.n_workers!r}")
        self.n_workers = int(self.n_workers)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def field_tag(self) -> str:
        """Names the retrieved field: same position, radius and source give the same folder."""
        base = f"ra{self.ra:.4f}_dec{self.dec:+.4f}_r{self.radius_arcmin:g}"
        return f"{base}_s{self.seed}" if self.data_source == "sample" else base

    @property
    def field_dir(self) -> Path:
        return Path(self.data_dir) / self.data_source / self.field_tag

    @property
    def manifest_path(self) -> Path:
        return self.field_dir / "manifest.json"
