"""The manifest: what was retrieved for a field and where it is.

One JSON file per field, written by the retrieve step and read by the next ones. Paths in it
are relative to the manifest's folder, so a field folder can be moved or shared whole.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from .io import write_json

__all__ = ["Manifest", "ImageEntry"]


@dataclass
class ImageEntry:
    """One image of a band: the science image and, where the archive has them, its
    uncertainty map (IRAC ``unc``), sky map (GALEX ``-skybg``) and effective-exposure map
    (GALEX ``-rrhr``, seconds)."""

    image: Path
    unc: Path | None = None
    sky: Path | None = None
    exposure: Path | None = None
    tile: str = ""


@dataclass
class Manifest:
    """Retrieved files of a field and the field's description.

    Attributes
    ----------
    directory : Path
        The field folder; every path is resolved against it.
    field : dict
        ``ra``, ``dec`` (deg), ``radius_arcmin``, ``data_source``, ``catalog_radius_arcmin``.
    catalog, chandra, truth : Path or None
        COSMOS2015-like catalogue, Chandra catalogue, and (sample only) the truth table.
    bands : dict
        Band name to ``{"prf": Path, "prf_source": str, "images": [ImageEntry, ...]}``.
    tile_choice : Path or None
        Table of the GALEX tile chosen per source and band.
    """

    directory: Path
    field: dict
    catalog: Path
    chandra: Path
    truth: Path | None = None
    bands: dict = field(default_factory=dict)
    tile_choice: Path | None = None

    @property
    def path(self) -> Path:
        return self.directory / "manifest.json"

    def resolve(self, relative) -> Path | None:
        return None if relative is None else (self.directory / relative)

    def images(self, band: str) -> list[ImageEntry]:
        return [
            ImageEntry(
                image=self.resolve(entry["image"]),
                unc=self.resolve(entry.get("unc")),
                sky=self.resolve(entry.get("sky")),
                exposure=self.resolve(entry.get("exposure")),
                tile=entry.get("tile", ""),
            )
            for entry in self.bands[band]["images"]
        ]

    def prf_path(self, band: str) -> Path:
        return self.resolve(self.bands[band]["prf"])

    def save(self) -> Path:
        payload = {
            "field": self.field,
            "catalog": str(self.catalog),
            "chandra": str(self.chandra),
            "truth": None if self.truth is None else str(self.truth),
            "tile_choice": None if self.tile_choice is None else str(self.tile_choice),
            "bands": self.bands,
        }
        return write_json(self.path, payload)

    @classmethod
    def load(cls, path) -> "Manifest":
        """Read a manifest, with a clear error if the retrieve step has not been run."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no manifest at {path}: run the retrieve step (notebook 01_retrieve or "
                "`mbphot run`) with the same ra, dec, radius_arcmin and data_source first"
            )
        payload = json.loads(path.read_text())
        return cls(
            directory=path.parent,
            field=payload["field"],
            catalog=Path(payload["catalog"]),
            chandra=Path(payload["chandra"]),
            truth=None if payload.get("truth") is None else Path(payload["truth"]),
            tile_choice=None if payload.get("tile_choice") is None else Path(payload["tile_choice"]),
            bands=payload["bands"],
        )
