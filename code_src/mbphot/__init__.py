"""mbphot: automated multiband forced photometry of COSMOS fields from a notebook.

The pipeline, one step per notebook: `retrieve` a field, `measure_field` forced photometry,
`match_chandra` X-ray counterparts with nway, then the `plots`.
"""

from .bands import BANDS, BAND_NAMES, get_band
from .catalog import read_catalog, science_catalog, write_catalog
from .crossmatch import match_chandra, merge_chandra, sky_area_deg2
from .manifest import Manifest
from .params import RunParameters
from .photometry import measure_field
from .retrieve import retrieve

__all__ = [
    "BANDS",
    "BAND_NAMES",
    "Manifest",
    "RunParameters",
    "get_band",
    "match_chandra",
    "measure_field",
    "merge_chandra",
    "read_catalog",
    "retrieve",
    "science_catalog",
    "sky_area_deg2",
    "write_catalog",
]

__version__ = "0.1.0"
