"""Cut a downloaded image to the field's box, where a service sent more than the run needs.

GALEX tiles come whole from MAST (1.2 deg across), and a server that ignores cutout
parameters sends a whole IRAC mosaic; the field folder keeps only the box the run measures,
with every header keyword of the original and the WCS moved with the cut.
"""

from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import Cutout2D

from ..io import read_wcs
from .cache import ArchiveEmptyError

__all__ = ["cut_to_box"]

SLACK_PIXELS = 2
"""An image at most this much larger than the box per side is kept whole (nothing to gain)."""


def cut_to_box(path, ra_deg: float, dec_deg: float, side_arcmin: float, what: str) -> Path:
    """Rewrite the FITS image at ``path`` as its square cut of ``side_arcmin`` around (ra, dec).

    Parameters
    ----------
    path : path-like
        A FITS file whose primary HDU is a 2-D image with a celestial WCS; rewritten in place.
    ra_deg, dec_deg : float
        Box centre (deg, ICRS).
    side_arcmin : float
        Box side.
    what : str
        Names the image in the error (``"the IRAC ch1 mosaic"``).

    Raises
    ------
    ArchiveEmptyError
        The image does not overlap the box.
    """
    path = Path(path)
    # Memory-mapped: of a whole mosaic only the cut is read.
    with fits.open(path, memmap=True) as hdul:
        header = hdul[0].header.copy()
        wcs = read_wcs(header).celestial
        scale_arcmin = np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 60.0
        side_pixels = int(np.ceil(side_arcmin / scale_arcmin))
        centre = SkyCoord(ra_deg * u.deg, dec_deg * u.deg)
        x, y = wcs.world_to_pixel(centre)
        n_y, n_x = hdul[0].shape
        half = side_pixels / 2
        if x + half < -0.5 or x - half > n_x - 0.5 or y + half < -0.5 or y - half > n_y - 0.5:
            raise ArchiveEmptyError(
                f"{what} does not cover RA {ra_deg}, Dec {dec_deg}: the position is outside this survey's images"
            )
        if max(n_x, n_y) <= side_pixels + 2 * SLACK_PIXELS:
            return path
        cut = Cutout2D(hdul[0].data, centre, (side_pixels, side_pixels), wcs=wcs, mode="trim", copy=True)
    header.update(cut.wcs.to_header())
    fits.PrimaryHDU(data=cut.data, header=header).writeto(path, overwrite=True)
    return path
