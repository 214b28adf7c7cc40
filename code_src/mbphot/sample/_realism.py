"""Which departures from an ideal field the simulated sky makes: the `Realism` switches.

Each field of `Realism` switches one effect that real COSMOS images have and a naive forced
photometry code gets wrong. ``Realism.ideal()`` (every switch off) gives the field the
simulator has always made, byte for byte; ``Realism.realistic()`` switches every effect on.
See ``docs/simulator.md`` for what each effect does to the images and to a fitter.
"""

import zlib
from dataclasses import dataclass, fields, replace

__all__ = ["Realism", "REALISM_LEVELS"]

REALISM_LEVELS = ("ideal", "realistic")
"""The named settings a run parameter may take."""


@dataclass(frozen=True)
class Realism:
    """The effects the simulated sky includes; each one is independent of the others.

    Attributes
    ----------
    prf_mismatch : bool
        IRAC: the sky is drawn with a PRF that differs from the file's as the real sky's
        does: rotated by the roll angle, mixing two rolls with weights that vary smoothly
        across the field, about 4 % broader, with wings reaching past the file's 17 x 17 box
        (to 41 x 41 pixels, 12", the IRAC calibration aperture's radius).
    galex_psf_wings : bool
        GALEX: the sky's PSF is as large as the real GALEX PSFs (99.9 % of the flux within
        36 px in NUV, 47 px in FUV); the PSF file is 120 x 120, peak-normalised, with a core
        4 % broader than the sky's.
    astrometric_noise : bool
        Catalogue positions scattered from the light, 0.10" (bright) to 0.20" (catalogue
        limit) per axis, and every image offset from the catalogue by up to 0.1".
    resolved_galaxies : bool
        About half of the galaxies (never stars or AGN) are exponential discs of half-light
        radius 0.1-1", drawn convolved with the band's sky PRF (GalSim); the catalogue gets
        a ``flux_radius_arcsec`` size column.
    confusion : bool
        Sources 10 times fainter than the catalogue limit (3 times its density) in the
        images, absent from the catalogue.
    correlated_noise : bool
        IRAC noise drawn on 1.2" native frames at four dithers and resampled bilinearly onto
        the 0.6" grid; the ``unc`` map holds the exact per-pixel sigma.
    galex_depth : bool
        GALEX counts are Poisson at two depths: one deep tile (40 ks) and one at Medium
        Imaging Survey depth (1.5 ks), with genuine zero-count pixels; the effective-exposure
        map (``-rrhr``) falls to zero at the edge of a circular 0.6 deg footprint, which
        crosses the field.
    sky_error : bool
        GALEX: the ``-skybg`` map carries a smooth error against the true sky (4 % rms,
        large scale).
    detection_blending : bool
        The catalogue is detected at 0.8" seeing: a source that makes no peak of its own
        beside a brighter one (about 0.7" apart at equal flux, 1.5" at a hundredth) is part
        of that one's catalogue entry, at their flux-weighted position, its truth their summed
        flux. Both are drawn.
    """

    prf_mismatch: bool = False
    galex_psf_wings: bool = False
    astrometric_noise: bool = False
    resolved_galaxies: bool = False
    confusion: bool = False
    correlated_noise: bool = False
    galex_depth: bool = False
    sky_error: bool = False
    detection_blending: bool = False

    @classmethod
    def ideal(cls) -> "Realism":
        """No effect: the sky is drawn exactly as the fitter models it."""
        return cls()

    @classmethod
    def realistic(cls) -> "Realism":
        """Every effect on."""
        return cls(**{f.name: True for f in fields(cls)})

    @classmethod
    def named(cls, value) -> "Realism":
        """A `Realism` from itself or from one of the names in `REALISM_LEVELS`."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.strip().lower() in REALISM_LEVELS:
            return getattr(cls, value.strip().lower())()
        raise ValueError(f"realism must be one of {', '.join(map(repr, REALISM_LEVELS))} or a Realism, got {value!r}")

    def but(self, **changes) -> "Realism":
        """A copy with some switches changed, e.g. ``Realism.realistic().but(confusion=False)``."""
        return replace(self, **changes)

    @property
    def is_ideal(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    @property
    def name(self) -> str:
        """``"ideal"``, ``"realistic"``, or ``"custom-"`` and the switches that are on, by initial."""
        if self.is_ideal:
            return "ideal"
        if self == Realism.realistic():
            return "realistic"
        on = [f.name for f in fields(self) if getattr(self, f.name)]
        return "custom-" + "".join(word[0] for name in on for word in name.split("_"))[:16] + f"{zlib.crc32(','.join(on).encode()) % 1000:03d}"
