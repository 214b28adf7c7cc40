"""The PRF/PSF file of each band: a real instrument file where one is configured, else a model.

No archive serves the COSMOS IRAC PRFs or the GALEX PSFs through a query API, so a run uses
the model PRFs of `mbphot.sample` (written the same way, by the same functions) unless the
endpoint configuration names a file for the band (``prf: {irac1: https://.../PRF_IRAC_ch1.fits}``).
The manifest's ``prf_source`` says which one a band got.
"""

from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from astropy.io import fits

from ..bands import BAND_NAMES, BANDS
from ..io import atomic_path
from ..sample import GALEX_PSF_HALF_SIZE, IRAC_PRF_HALF_SIZE, IRAC_PRF_OVERSAMPLING, _airy_prf, _galex_psf, _write_fits
from .cache import download
from .config import Endpoints

__all__ = ["fetch_prfs", "MODEL_PRF_SOURCE"]

MODEL_PRF_SOURCE = "model PRF of mbphot.sample (no archive serves this band's PRF through an API)"


def _model_prf_path(band: str) -> str:
    if BANDS[band].instrument == "IRAC":
        return f"prf/PRF_IRAC_ch{band[-1]}.fits"
    return f"prf/PSF{band}.fits"


def _write_model_prf(band: str, path: Path) -> None:
    """The simulator's PRF of ``band`` with the simulator's header, written atomically."""
    spec = BANDS[band]
    header = fits.Header()
    if spec.instrument == "IRAC":
        data = _airy_prf(spec, IRAC_PRF_OVERSAMPLING, IRAC_PRF_HALF_SIZE)
        header["OVERSAMP"] = (IRAC_PRF_OVERSAMPLING, "PRF samples per mosaic pixel")
        header["PIXSCALE"] = (spec.pixel_scale_arcsec / IRAC_PRF_OVERSAMPLING, "[arcsec] PRF sample spacing")
        header["COMMENT"] = "Model PRF: Airy (0.85 m) x 1.22\" pixel x jitter x 0.6\" pixel"
    else:
        data = _galex_psf(spec, 1, GALEX_PSF_HALF_SIZE)
        data = data / data.max()
        header["COMMENT"] = "Model GALEX PSF on the 1.5\" grid, peak-normalised like the GALEX files"
    with atomic_path(path) as temporary:
        _write_fits(temporary, data, header)


def fetch_prfs(bands, directory, endpoints: Endpoints, progress: bool = False) -> dict:
    """Put the PRF file of every band in ``prf/`` and say where each came from.

    Returns
    -------
    dict
        Band name to ``{"prf": relative path, "prf_source": str}``.
    """
    unknown = sorted(set(endpoints.prf) - set(BAND_NAMES))
    if unknown:
        raise ValueError(f"endpoint prf names unknown band(s) {', '.join(unknown)}; choose from {', '.join(BAND_NAMES)}")
    directory = Path(directory)
    found = {}
    for band in bands:
        url = endpoints.prf.get(band)
        if url:
            relative = f"prf/{band}_{PurePosixPath(urlparse(url).path).name}"
            download(url, directory / relative, service="the PRF file server", endpoints=endpoints, progress=progress)
            found[band] = {"prf": relative, "prf_source": f"instrument file {url}"}
        else:
            relative = _model_prf_path(band)
            if not (directory / relative).is_file():
                _write_model_prf(band, directory / relative)
            found[band] = {"prf": relative, "prf_source": MODEL_PRF_SOURCE}
    return found
