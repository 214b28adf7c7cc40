"""Forced photometry as pure functions over arrays: no file I/O, no globals.

`prf` places a point-response function at sub-pixel positions, `background` estimates the
local sky and noise from source-masked pixels, `solve` fits PRF-shaped point sources at
fixed positions to batches of cutouts (per-source mode), `scene` fits all sources of a region
together (scene mode), and `tractor` runs The Tractor on the same problem where installed.
`epsf` measures an image's effective PRF and its offset from the catalogue from its own stars;
`variation` how that PRF changes across the image;
`calibrate` measures what correlated noise and PRF-model errors add to the flux errors.
"""

from .background import sky_and_rms_maps
from .calibrate import noise_inflation, prf_model_error
from .epsf import ImageOffset, MeasuredPRF, image_offset, measure_prf
from .prf import PRFTable, build_prf_table, normalise_prf
from .scene import scene_photometry
from .solve import FLAGS, forced_photometry

__all__ = [
    "FLAGS",
    "ImageOffset",
    "MeasuredPRF",
    "PRFTable",
    "build_prf_table",
    "forced_photometry",
    "image_offset",
    "measure_prf",
    "noise_inflation",
    "normalise_prf",
    "prf_model_error",
    "scene_photometry",
    "sky_and_rms_maps",
]
