"""Figures that show how the photometry is done, for the tutorial notebooks.

`fit_cutout` takes one source's cutout and fits it the way the per-source engine does
(`mbphot.engine.forced_photometry` with ``fit_sky=True``): the target and every catalogue
neighbour whose PRF stamp reaches the cutout, each the band's PRF (`PRFTable.stamp_at`) at
its fixed catalogue position with a free flux, plus a constant sky offset, weighted by the
per-pixel noise. The engine returns the target's flux only; this module solves the same small
linear problem once more so that a figure can show every part of the model: the target, the
neighbours, the sky and what is left. A test checks that both give the same flux.

`field_images` shows the centre of the field in every band with the catalogue over it;
`method_figure` draws the parts of the fit for a few sources; `example_sources` picks the sources
(an isolated one, a blended one, a faint one); `crossmatch_figure` draws the Chandra error
circles and their nway counterparts over an image.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.io import fits
from matplotlib.colors import Normalize
from matplotlib.patches import Circle

from .bands import get_band, measured_columns, quality_columns
from .calibration import Calibration
from .engine import PRFTable, sky_and_rms_maps
from .engine.background import source_mask
from .io import read_header, read_wcs
from .manifest import Manifest
from .photometry import load_prf, tabulate_prf
from .photometry._prf import read_calibration
from .plots import LABEL_SIZE, TEXT_SIZE, TICK_SIZE, TITLE_SIZE, InlineFigure, band_label
from .retrieve import load_catalog

__all__ = ["CutoutFit", "crossmatch_figure", "example_sources", "field_cutouts", "field_images", "fit_cutout", "method_figure"]

SECTION_HALF_PIXELS = 48
"""Half-side of the image section read around a source: the sky and noise maps are box
statistics over 32-pixel boxes (`mbphot.engine.sky_and_rms_maps`), so they need a few boxes."""
MASK_RADIUS_ARCSEC = 3.0
"""Catalogue sources are masked within this radius when the sky is measured from the image."""
BLEND_RADIUS_ARCSEC = 5.0
"""Neighbours this close to the blended example must be point-like too."""
ISOLATED_SNR_MAX = 60.0
"""The isolated example is the brightest clean, point-like source below this S/N."""
POINT_LIKE_RCHISQ = 1.5
"""Examples are chosen among sources whose pipeline fit has a reduced chi^2 below this."""
RESIDUAL_LIMIT_SIGMA = 5.0
"""The residual panels span +/- this many sigma."""


@dataclass
class CutoutFit:
    """One source's cutout and the fitted model, split into its parts (image units).

    Attributes
    ----------
    data : ndarray
        The cutout minus the sky map (NaN where there is no data).
    sigma : ndarray
        Per-pixel noise (1-sigma).
    target, neighbours : ndarray
        The fitted target, and the sum of the fitted neighbours, as images.
    sky_offset : float
        The constant sky offset fitted with the fluxes, on top of the sky map.
    flux, flux_err : float
        The target's flux (image unit times pixels) and its 1-sigma error from the fit's
        covariance, which includes the covariance with blended neighbours and the sky (the
        engine scales a poor fit's by sqrt(rchisq), `mbphot.engine.solve.finish_measurement`).
    prf : ndarray
        The target's PRF (unit flux) on the cutout's pixels.
    target_xy : tuple of float
        The target's position in cutout pixels.
    neighbour_xy : ndarray, shape (n, 2)
        The neighbours' positions in cutout pixels (some may lie outside the cutout).
    neighbour_flux : ndarray
        The neighbours' fitted fluxes.
    """

    data: np.ndarray
    sigma: np.ndarray
    target: np.ndarray
    neighbours: np.ndarray
    sky_offset: float
    flux: float
    flux_err: float
    prf: np.ndarray
    target_xy: tuple
    neighbour_xy: np.ndarray
    neighbour_flux: np.ndarray

    @property
    def model(self) -> np.ndarray:
        """Target + neighbours + sky offset."""
        return self.target + self.neighbours + self.sky_offset

    @property
    def residual_sigma(self) -> np.ndarray:
        """(data - model) / sigma."""
        return (self.data - self.model) / self.sigma


def _placed(stamp: np.ndarray, col: int, row: int, origin_col: int, origin_row: int, size: int) -> np.ndarray:
    """A stamp centred on pixel (col, row), cut to the size x size cutout starting at the origin."""
    out = np.zeros((size, size))
    half = stamp.shape[0] // 2
    r0, c0 = row - half - origin_row, col - half - origin_col
    rows = slice(max(r0, 0), min(r0 + stamp.shape[0], size))
    cols = slice(max(c0, 0), min(c0 + stamp.shape[1], size))
    if rows.start < rows.stop and cols.start < cols.stop:
        out[rows, cols] = stamp[rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0]
    return out


def fit_cutout(image, x, y, target: int, prf_table: PRFTable, cutout_size: int, sky, sigma) -> CutoutFit:
    """Fit one target's cutout with its neighbours and a sky offset, and keep every part.

    Parameters
    ----------
    image : ndarray
        The image (or a section of it), NaN where there is no data.
    x, y : ndarray
        0-based pixel positions of every catalogue source on ``image``.
    target : int
        Index into ``x``/``y`` of the source to show.
    prf_table : PRFTable
        The band's PRF without a core/wing split (`mbphot.photometry.load_prf`).
    cutout_size : int
        Odd side of the cutout in pixels (`mbphot.bands.Band.cutout_size_pixels`).
    sky, sigma : ndarray
        Sky level and 1-sigma noise per pixel, with ``image``'s shape.

    Returns
    -------
    CutoutFit
    """
    half = cutout_size // 2
    col, row = int(np.rint(x[target])), int(np.rint(y[target]))
    origin_col, origin_row = col - half, row - half
    if origin_col < 0 or origin_row < 0 or col + half >= image.shape[1] or row + half >= image.shape[0]:
        raise ValueError(f"the cutout of source {target} is not wholly inside the image section")
    window = (slice(origin_row, origin_row + cutout_size), slice(origin_col, origin_col + cutout_size))
    data = np.asarray(image[window], dtype=np.float64) - sky[window]
    noise = np.asarray(sigma[window], dtype=np.float64)

    # The same members as the engine: every source whose stamp reaches the cutout.
    reach = half + prf_table.half_size
    with np.errstate(invalid="ignore"):
        near = (np.abs(np.rint(x) - col) <= reach) & (np.abs(np.rint(y) - row) <= reach)
    members = np.concatenate([[target], np.flatnonzero(near & (np.arange(x.size) != target))])
    columns = [
        _placed(prf_table.stamp_at(x[j], y[j]), int(np.rint(x[j])), int(np.rint(y[j])), origin_col, origin_row, cutout_size)
        for j in members
    ]
    design = np.stack([c.ravel() for c in columns] + [np.ones(cutout_size**2)], axis=1)
    valid = (np.isfinite(data) & np.isfinite(noise) & (noise > 0)).ravel()
    root_weight = np.where(valid, 1.0 / np.where(valid, noise.ravel(), 1.0), 0.0)
    weighted = design * root_weight[:, None]
    solution = np.linalg.lstsq(weighted, np.where(valid, data.ravel(), 0.0) * root_weight, rcond=None)[0]
    covariance = np.linalg.pinv(weighted.T @ weighted)
    fluxes = solution[:-1]
    return CutoutFit(
        data=np.where(valid.reshape(data.shape), data, np.nan),
        sigma=noise,
        target=fluxes[0] * columns[0],
        neighbours=np.tensordot(fluxes[1:], np.array(columns[1:]).reshape(-1, cutout_size, cutout_size), axes=1)
        if members.size > 1 else np.zeros_like(data),
        sky_offset=float(solution[-1]),
        flux=float(fluxes[0]),
        flux_err=float(np.sqrt(covariance[0, 0])),
        prf=_placed(prf_table.stamp_at(x[target], y[target]), col, row, origin_col, origin_row, cutout_size),
        target_xy=(x[target] - origin_col, y[target] - origin_row),
        neighbour_xy=np.column_stack([x[members[1:]] - origin_col, y[members[1:]] - origin_row]),
        neighbour_flux=fluxes[1:],
    )


def _read_section(path, rows: slice, cols: slice):
    """A section of a FITS image's primary HDU as float64 (None for no file)."""
    if path is None:
        return None
    with fits.open(path, memmap=True) as hdul:
        return np.array(hdul[0].section[rows, cols], dtype=np.float64)


def _image_calibration(manifest: Manifest, image, band: str) -> Calibration | None:
    """The calibration `mbphot.measure_field` saved for an image (its PRF measured from the
    image's stars, its offset from the catalogue, its sky offset), or None before photometry."""
    stem = image.name.removesuffix(".gz").removesuffix(".fits")
    saved = sorted((manifest.directory / "derived").glob(f"{stem}_*.{band}.*.calibration.npz"),
                   key=lambda path: path.stat().st_mtime)
    if not saved:
        return None
    return read_calibration(saved[-1])[0]


def field_cutouts(manifest: Manifest, band: str, source_ids) -> dict:
    """Fit the cutouts of ``source_ids`` on the band's first image that holds them.

    The sky comes from the sky map where the archive gives one (GALEX), else from box
    statistics of the section with the catalogue sources masked; the noise from the
    uncertainty map where there is one (IRAC), else from the same box statistics. The PRF and
    the image's offset from the catalogue are those the photometry measured on the image's
    own stars (`mbphot.calibration`), or, before photometry has run, the band's PRF file.
    The pipeline's scene fit also moves bright sources onto their light and models resolved
    galaxies as discs, so its fluxes can differ a little from these.

    Returns
    -------
    dict
        Source id to `CutoutFit`, for the sources whose cutout lies on an image.
    """
    band_info = get_band(band)
    catalog = load_catalog(manifest)
    size = band_info.cutout_size_pixels
    fits_by_id = {}
    for source_id in source_ids:
        index = int(np.flatnonzero(catalog["id"].to_numpy() == source_id)[0])
        for entry in manifest.images(band):
            header = read_header(entry.image)
            x_all, y_all = read_wcs(header).world_to_pixel_values(catalog["ra"].to_numpy(), catalog["dec"].to_numpy())
            col, row = int(np.rint(x_all[index])), int(np.rint(y_all[index]))
            half = max(SECTION_HALF_PIXELS, size // 2 + 1)
            if not (half <= col < header["NAXIS1"] - half and half <= row < header["NAXIS2"] - half):
                continue
            rows, cols = slice(row - half, row + half + 1), slice(col - half, col + half + 1)
            image = _read_section(entry.image, rows, cols)
            if not np.isfinite(image[half - size // 2 : half + size // 2 + 1, half - size // 2 : half + size // 2 + 1]).all():
                continue
            calibration = _image_calibration(manifest, entry.image, band)
            if calibration is None:
                prf_table, offset = load_prf(manifest.prf_path(band), band_info), (0.0, 0.0, 0.0)
            else:
                prf_table = tabulate_prf(calibration.prf, calibration.oversampling, band_info,
                                         flux_fraction=calibration.flux_fraction)
                offset = (calibration.offset_x_pix, calibration.offset_y_pix, calibration.sky_offset)
            x, y = x_all - cols.start + offset[0], y_all - rows.start + offset[1]
            mask = source_mask(image.shape, x, y, MASK_RADIUS_ARCSEC / band_info.pixel_scale_arcsec)
            sky, rms = sky_and_rms_maps(image, mask=mask, sky=_read_section(entry.sky, rows, cols))
            sky = sky + offset[2]
            unc = _read_section(entry.unc, rows, cols)
            fits_by_id[source_id] = fit_cutout(image, x, y, index, prf_table, size, sky, rms if unc is None else unc)
            break
    return fits_by_id


def example_sources(photometry: pd.DataFrame, band: str) -> dict:
    """Three point-like sources that show the method: an isolated bright one, the most
    blended one with a clean flag, and a faint one (S/N near 5).

    Returns
    -------
    dict
        Label (``"isolated"``, ``"blended"``, ``"faint"``) to source id; a kind with no
        suitable source is left out.
    """
    flux, err, flag = (photometry[c].to_numpy(dtype=float) for c in measured_columns(band))
    rchisq, fracflux = (photometry[c].to_numpy(dtype=float) for c in quality_columns(band)[:2])
    fracflux = np.abs(fracflux)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = flux / err
    # Point-like fits only (rchisq near 1): a resolved galaxy is fitted by the pipeline as a
    # disc, which this figure's point-source model does not show.
    clean = (flag == 0) & np.isfinite(snr) & np.isfinite(fracflux) & (rchisq < POINT_LIKE_RCHISQ)
    ids = photometry["id"].to_numpy()
    chosen = {}
    # Not the brightest: at S/N in the hundreds the catalogue's 0.1-0.2" position error shows,
    # which the pipeline corrects by moving bright sources onto their light.
    isolated = clean & (fracflux < 0.01) & (snr > 20) & (snr < ISOLATED_SNR_MAX)
    if isolated.any():
        chosen["isolated"] = ids[isolated][np.argmax(snr[isolated])]
    # The most blended source whose close neighbours are point-like too: a resolved neighbour,
    # which the pipeline fits as a disc, would leave its shape in this figure's residual.
    ra, dec = photometry["ra"].to_numpy(dtype=float), photometry["dec"].to_numpy(dtype=float)
    for index in np.flatnonzero(clean & (snr > 10))[np.argsort(-fracflux[clean & (snr > 10)], kind="stable")]:
        separation_arcsec = 3600.0 * np.hypot((ra - ra[index]) * np.cos(np.radians(dec[index])), dec - dec[index])
        close = (separation_arcsec < BLEND_RADIUS_ARCSEC) & (np.arange(ra.size) != index)
        if (rchisq[close] < POINT_LIKE_RCHISQ).all():
            chosen["blended"] = ids[index]
            break
    faint = clean & (snr > 3) & (snr < 10) & (fracflux < 0.5)
    if faint.any():
        chosen["faint"] = ids[faint][np.argmin(np.abs(snr[faint] - 5))]
    return chosen


def _pixel_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def method_figure(fits_by_label: dict, band: str) -> InlineFigure:
    """For each source, a row of five panels: the cutout, the PRF, the fitted model, the
    neighbours' part of it and the residual.

    Parameters
    ----------
    fits_by_label : dict
        Row label (e.g. ``"blended (id 1234)"``) to `CutoutFit`.
    band : str
        The band, for the title and the flux unit.

    Returns
    -------
    InlineFigure
    """
    band_info = get_band(band)
    n_rows = len(fits_by_label)
    fig = InlineFigure(figsize=(16, 3.4 * n_rows + 0.9), layout="constrained")
    titles = ("Cutout - sky", "PRF (unit flux)", "Model: all + sky", "Neighbours' part", "(Data - model) / noise")
    axes = fig.subplots(n_rows, 5, squeeze=False)
    for row, (label, fit) in enumerate(fits_by_label.items()):
        scale = np.nanpercentile(np.abs(fit.data), 99.5)
        image_norm = Normalize(-0.1 * scale, scale)
        panels = (fit.data, fit.prf, fit.model, fit.neighbours, fit.residual_sigma)
        for column, (ax, panel) in enumerate(zip(axes[row], panels)):
            if column == 1:
                shown = ax.imshow(panel, origin="lower", cmap="magma")
            elif column == 4:
                shown = ax.imshow(panel, origin="lower", cmap="RdBu_r",
                                  norm=Normalize(-RESIDUAL_LIMIT_SIGMA, RESIDUAL_LIMIT_SIGMA))
            else:
                shown = ax.imshow(panel, origin="lower", cmap="magma", norm=image_norm)
            if column != 1:
                ax.plot(*fit.target_xy, marker="+", color="cyan", markersize=16, mew=2)
                ax.scatter(fit.neighbour_xy[:, 0], fit.neighbour_xy[:, 1], s=70, facecolors="none",
                           edgecolors="lime", linewidths=1.5)
                ax.set_xlim(-0.5, panel.shape[1] - 0.5)
                ax.set_ylim(-0.5, panel.shape[0] - 0.5)
            if column == 4:
                fig.colorbar(shown, ax=ax, shrink=0.8).ax.tick_params(labelsize=TICK_SIZE)
            _pixel_axes(ax)
            if row == 0:
                ax.set_title(titles[column], fontsize=LABEL_SIZE)
        flux = fit.flux * band_info.ujy_per_pixel_unit
        flux_err = fit.flux_err * band_info.ujy_per_pixel_unit
        chi = fit.residual_sigma
        axes[row, 0].set_ylabel(f"{label}\n{flux:.2f} ± {flux_err:.2f} µJy", fontsize=LABEL_SIZE)
        axes[row, 4].set_xlabel(f"rms {np.sqrt(np.nanmean(chi**2)):.2f} σ", fontsize=TEXT_SIZE)
        axes[row, 3].set_xlabel(f"{len(fit.neighbour_flux)} neighbours fitted with it", fontsize=TEXT_SIZE)
    fig.suptitle(f"Forced photometry in {band_label(band)}: + target, o catalogue neighbours "
                 f"({band_info.cutout_arcsec:g}\" cutouts)", fontsize=TITLE_SIZE)
    return fig


def crossmatch_figure(manifest: Manifest, band: str, chandra, matches: pd.DataFrame,
                      photometry: pd.DataFrame, half_size_arcsec: float = 10.0, n_panels: int = 3) -> InlineFigure:
    """Chandra error circles over the band's image, with the nway counterparts marked.

    One panel per Chandra source, for the ``n_panels`` sources with the most photometry
    candidates within their search area (where nway has a choice to make).

    Parameters
    ----------
    manifest : Manifest
    band : str
        The image to draw on (IRAC 3.6 micron shows most counterparts).
    chandra : astropy.table.Table
        The Chandra catalogue (``RA``, ``DEC``, ``ERROR_RADIUS`` in arcsec, ``NAME``).
    matches : DataFrame
        `mbphot.match_chandra`'s confident matches (``id``, ``chandra_name``, ``nway_p_any``,
        ``nway_p_i``).
    photometry : DataFrame
        The photometry sources (``id``, ``ra``, ``dec``): the candidates.
    half_size_arcsec : float
        Half-side of each panel.
    n_panels : int
        How many Chandra sources to show.

    Returns
    -------
    InlineFigure
    """
    band_info = get_band(band)
    entry = manifest.images(band)[0]
    header = read_header(entry.image)
    wcs = read_wcs(header)
    scale = band_info.pixel_scale_arcsec
    half = int(np.ceil(half_size_arcsec / scale))
    x_ray_x, x_ray_y = wcs.world_to_pixel_values(np.asarray(chandra["RA"], float), np.asarray(chandra["DEC"], float))
    phot_x, phot_y = wcs.world_to_pixel_values(photometry["ra"].to_numpy(), photometry["dec"].to_numpy())
    radius_pix = np.asarray(chandra["ERROR_RADIUS"], float) / scale
    names = np.array([str(n).strip() for n in chandra["NAME"]])
    inside = (x_ray_x > half) & (x_ray_x < header["NAXIS1"] - half - 1) & (x_ray_y > half) & (x_ray_y < header["NAXIS2"] - half - 1)
    # Rank by how many candidates lie within three error radii: those are where nway chooses.
    candidates = np.array([
        np.sum(np.hypot(phot_x - xx, phot_y - yy) < 3 * max(r, 1.0)) for xx, yy, r in zip(x_ray_x, x_ray_y, radius_pix)
    ])
    shown = np.flatnonzero(inside)[np.argsort(-candidates[inside], kind="stable")][:n_panels]
    fig = InlineFigure(figsize=(5.4 * max(len(shown), 1), 6.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(shown), 1)))
    matched_ids = dict(zip(matches["chandra_name"].astype(str).str.strip(), matches["id"]))
    p_i = dict(zip(matches["chandra_name"].astype(str).str.strip(), matches["nway_p_i"]))
    p_any = dict(zip(matches["chandra_name"].astype(str).str.strip(), matches["nway_p_any"]))
    for ax, k in zip(axes, shown):
        col, row = int(np.rint(x_ray_x[k])), int(np.rint(x_ray_y[k]))
        section = _read_section(entry.image, slice(row - half, row + half + 1), slice(col - half, col + half + 1))
        low, high = np.nanpercentile(section, [5, 99.5])
        extent = (col - half - 0.5, col + half + 0.5, row - half - 0.5, row + half + 0.5)
        ax.imshow(section, origin="lower", cmap="gray_r", vmin=low, vmax=high, extent=extent)
        ax.scatter(phot_x, phot_y, s=120, facecolors="none", edgecolors="tab:blue", linewidths=1.2,
                   label="photometry sources")
        for factor, style in ((1, "-"), (3, ":")):
            ax.add_patch(Circle((x_ray_x[k], x_ray_y[k]), factor * radius_pix[k], fill=False, color="red", ls=style, lw=2))
        name = names[k]
        if name in matched_ids:
            j = np.flatnonzero(photometry["id"].to_numpy() == matched_ids[name])[0]
            ax.plot(phot_x[j], phot_y[j], marker="*", color="gold", markeredgecolor="black", markersize=26,
                    label="nway counterpart")
            verdict = f"p_any {p_any[name]:.2f}, p_i {p_i[name]:.2f}"
        else:
            verdict = "no confident counterpart"
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
        _pixel_axes(ax)
        ax.set_title(f"{name}\n{verdict}", fontsize=LABEL_SIZE)
        ax.set_xlabel(f"{2 * half_size_arcsec:g}\" x {2 * half_size_arcsec:g}\"", fontsize=TEXT_SIZE)
    if len(shown):
        axes[0].legend(loc="lower left", fontsize=TEXT_SIZE, framealpha=0.9)
    fig.suptitle(f"Chandra positions on {band_label(band)}: error circle (solid) and 3x it (dotted)",
                 fontsize=TITLE_SIZE)
    return fig


def field_images(manifest: Manifest, bands, width_arcmin: float = 1.0) -> InlineFigure:
    """The central ``width_arcmin`` of the field in each band, with the catalogue positions.

    Each band's first image that holds the field centre is shown (for GALEX, one tile), on
    a linear stretch from the 1st to the 99.5th percentile, so that the same sources can be
    compared from the ultraviolet to the mid-infrared.

    Parameters
    ----------
    manifest : Manifest
    bands : list of str
    width_arcmin : float
        Side of the square shown.

    Returns
    -------
    InlineFigure
    """
    catalog = load_catalog(manifest)
    centre_ra, centre_dec = manifest.field["ra"], manifest.field["dec"]
    n_columns = min(3, len(bands))
    n_rows = int(np.ceil(len(bands) / n_columns))
    fig = InlineFigure(figsize=(4.8 * n_columns, 4.9 * n_rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(n_rows, n_columns, squeeze=False).ravel())
    half_arcsec = 30.0 * width_arcmin
    for ax, band in zip(axes, bands):
        scale = get_band(band).pixel_scale_arcsec
        half = int(np.ceil(half_arcsec / scale))
        for entry in manifest.images(band):
            header = read_header(entry.image)
            wcs = read_wcs(header)
            centre_x, centre_y = (float(v) for v in wcs.world_to_pixel_values(centre_ra, centre_dec))
            col, row = int(np.rint(centre_x)), int(np.rint(centre_y))
            if half <= col < header["NAXIS1"] - half and half <= row < header["NAXIS2"] - half:
                break
        else:
            ax.set_axis_off()
            ax.set_title(f"{band_label(band)}: centre not on an image", fontsize=LABEL_SIZE)
            continue
        section = _read_section(entry.image, slice(row - half, row + half + 1), slice(col - half, col + half + 1))
        low, high = np.nanpercentile(section, [1, 99.5])
        edge = (half + 0.5) * scale
        ax.imshow(section, origin="lower", cmap="gray_r", vmin=low, vmax=high,
                  extent=((col - half - 0.5 - centre_x) * scale, (col + half + 0.5 - centre_x) * scale,
                          (row - half - 0.5 - centre_y) * scale, (row + half + 0.5 - centre_y) * scale))
        x, y = wcs.world_to_pixel_values(catalog["ra"].to_numpy(), catalog["dec"].to_numpy())
        ax.scatter((x - centre_x) * scale, (y - centre_y) * scale, s=25, facecolors="none",
                   edgecolors="tab:orange", linewidths=0.9)
        ax.set_xlim(-edge, edge)
        ax.set_ylim(-edge, edge)
        ax.set_title(band_label(band), fontsize=LABEL_SIZE)
        ax.set_xlabel("x offset (arcsec)", fontsize=TEXT_SIZE)
        ax.set_ylabel("y offset (arcsec)", fontsize=TEXT_SIZE)
        ax.tick_params(labelsize=TICK_SIZE)
    for ax in axes[len(bands):]:
        ax.set_axis_off()
    fig.suptitle(f"The central {width_arcmin:g}' of the field; circles: catalogue positions", fontsize=TITLE_SIZE)
    return fig
