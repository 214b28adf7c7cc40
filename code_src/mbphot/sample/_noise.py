"""Noise and backgrounds of the realistic field: correlated IRAC noise, GALEX sky errors.

`DitheredNoise` makes the noise of a mosaic resampled from native frames: white noise on
1.2" pixels (twice the 0.6" mosaic pixel) at `IRAC_DITHERS` sub-pixel offsets, each frame
interpolated bilinearly onto the mosaic grid and the frames averaged. Neighbouring mosaic
pixels share native pixels, so the noise is correlated (0.7 at one-pixel lag, 0.25 at two) while the
per-pixel sigma, which the ``unc`` map holds, is exact: it varies with the phase of the
mosaic pixel in the native grids and is computed from the interpolation weights.

Every frame draws its native rows, in order, from its own random stream, so a strip's noise
does not depend on where the strips start.
"""

import numpy as np

IRAC_DITHERS = ((0.0, 0.0), (1.3, 0.6), (0.6, 1.5), (1.7, 1.1))
"""(x, y) offsets of the native frames' grids, in 0.6" mosaic pixels (a native pixel is 2)."""
NATIVE_PER_MOSAIC = 0.5
SKY_ERROR_RMS = 0.04
"""Root-mean-square fractional error of the GALEX ``-skybg`` map against the true sky."""
SKY_ERROR_WAVELENGTH_ARCMIN = (4.0, 10.0)


class DitheredNoise:
    """Unit-variance-on-average noise of a mosaic resampled from dithered native frames.

    Parameters
    ----------
    shape : tuple of int
        The mosaic's (rows, columns).
    rngs : list of numpy.random.Generator
        One stream per dither.
    """

    def __init__(self, shape, rngs):
        self._height, self._width = shape
        self._frames = []
        for (offset_x, offset_y), rng in zip(IRAC_DITHERS, rngs):
            u = (np.arange(self._width) + offset_x) * NATIVE_PER_MOSAIC
            low_x = np.floor(u).astype(np.intp)
            fx = u - low_x
            self._frames.append({"rng": rng, "offset_y": offset_y, "low_x": low_x, "fx": fx,
                                 "native_width": int(low_x.max()) + 2, "rows": np.empty((0, int(low_x.max()) + 2)),
                                 "first": 0})
        # Mean variance over the mosaic, so that the average pixel has unit variance.
        n = len(self._frames)
        mean_variance = 0.0
        for frame in self._frames:
            vx = np.mean((1 - frame["fx"]) ** 2 + frame["fx"] ** 2)
            v = (np.arange(self._height) + frame["offset_y"]) * NATIVE_PER_MOSAIC
            fy = v - np.floor(v)
            vy = np.mean((1 - fy) ** 2 + fy**2)
            mean_variance += vx * vy / n**2
        self._scale = 1.0 / np.sqrt(mean_variance)

    def _native_rows(self, frame, first, last):
        """Native rows ``first..last`` (inclusive) of a frame, drawn in order as needed."""
        have_last = frame["first"] + frame["rows"].shape[0] - 1
        if last > have_last:
            new = frame["rng"].standard_normal((last - have_last, frame["native_width"]))
            frame["rows"] = np.vstack([frame["rows"], new])
        keep = first - frame["first"]
        if keep > 0:  # rows above the strip are not needed again
            frame["rows"] = frame["rows"][keep:]
            frame["first"] = first
        return frame["rows"][first - frame["first"] : last - frame["first"] + 1]

    def rows(self, start_row, stop_row):
        """Noise and its per-pixel sigma on rows ``start_row:stop_row`` (taken in increasing order).

        Returns
        -------
        noise, sigma : ndarray, shape (stop_row - start_row, width)
        """
        n = len(self._frames)
        noise = np.zeros((stop_row - start_row, self._width))
        variance = np.zeros_like(noise)
        for frame in self._frames:
            v = (np.arange(start_row, stop_row) + frame["offset_y"]) * NATIVE_PER_MOSAIC
            low_y = np.floor(v).astype(np.intp)
            fy = (v - low_y)[:, None]
            native = self._native_rows(frame, int(low_y[0]), int(low_y[-1]) + 1)
            # Interpolate along x once per native row, then along y per mosaic row.
            low_x, fx = frame["low_x"], frame["fx"]
            along_x = (1 - fx) * native[:, low_x] + fx * native[:, low_x + 1]
            relative = low_y - low_y[0]
            noise += (1 - fy) * along_x[relative] + fy * along_x[relative + 1]
            variance += ((1 - fy) ** 2 + fy**2) * ((1 - fx) ** 2 + fx**2)[None, :]
        return noise * (self._scale / n), np.sqrt(variance) * (self._scale / n)


class SkyError:
    """A smooth fractional error of a sky map: three plane waves of 4-10' wavelength.

    Parameters
    ----------
    shape : tuple of int
    pixel_arcsec : float
    rng : numpy.random.Generator
    rms : float
        Root-mean-square of the fractional error.
    """

    def __init__(self, shape, pixel_arcsec, rng, rms=SKY_ERROR_RMS):
        self._width = shape[1]
        self._pixel_arcmin = pixel_arcsec / 60.0
        wavelength = rng.uniform(*SKY_ERROR_WAVELENGTH_ARCMIN, 3)
        angle = rng.uniform(0, np.pi, 3)
        self._kx = 2 * np.pi * np.cos(angle) / wavelength
        self._ky = 2 * np.pi * np.sin(angle) / wavelength
        self._phase = rng.uniform(0, 2 * np.pi, 3)
        self._amplitude = rms * np.sqrt(2.0 / 3.0)  # three unit waves have rms sqrt(3/2)

    def rows(self, start_row, stop_row):
        """``1 + error`` on rows ``start_row:stop_row``."""
        y = np.arange(start_row, stop_row)[:, None] * self._pixel_arcmin
        x = np.arange(self._width)[None, :] * self._pixel_arcmin
        waves = sum(np.sin(kx * x + ky * y + phase) for kx, ky, phase in zip(self._kx, self._ky, self._phase))
        return 1.0 + self._amplitude * waves
