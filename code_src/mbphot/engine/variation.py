"""How an image's PRF changes across it, measured from the residuals of its bright sources.

A mosaic's PRF is the average of its frames' PRFs, each turned by the spacecraft's roll when
the frame was taken (IRAC). Where the mix of rolls changes across the mosaic, so does the PRF:
its round part stays, its angular structure (the pixel's square, the diffraction pattern, the
pointing jitter's ellipse) turns and fades with the mix. One PRF per image fits the bright
sources of some regions well and of others by several per cent of their flux, which flags
them as poor fits and biases their neighbours.

Written in angular orders m, the instrument's PRF is ``sum_m p_m(r) exp(i m phi)``, and a
mix of copies turned by angles theta_j with weights w_j has the order m multiplied by
``c_m = sum_j w_j exp(i m theta_j)``. The change from the image's mean PRF is therefore
``sum_m Re[delta c_m(x, y) p_m(r) exp(i m phi)]``: linear in two numbers per order and
position. For orders 3 and up the basis (`variation_basis`) is taken from the PRF file,
whose angular structure is the instrument's; order 2, the blur's ellipse (pointing jitter),
which a published PRF may lack, from the mean PRF's second derivatives. Order 1 is a shift,
which the positions take; order 0 does not turn.

The coefficients are measured from the residual of a scene fit with the mean PRF: around
each bright point source it holds the source's flux times the PRF's local error
(`source_terms`, one small least-squares problem per source). A Gaussian-weighted
least-squares average over the sources near each cell of a grid gives the map
(`variation_map`), at the smoothing scale that predicts each source's residual best from the
others (leave-one-out), or no map at all where none predicts better than one change common
to the whole section (which is the mean PRF's own error, not a variation). The cells'
coefficients are grouped into a few variants (k-means in the metric of the PRF's pixel
values), which the engine fits as one table each (``extended`` of
`mbphot.engine.scene.scene_photometry`).

Everything here is pure: arrays in, arrays out.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.cluster.vq import kmeans2

from .epsf import _FileProfile

__all__ = ["HARMONIC_ORDERS", "PRFVariation", "harmonic_parts", "measure_variation", "profile_indices", "source_terms",
           "variation_basis", "variation_map"]

HARMONIC_ORDERS = (2, 3, 4, 5, 6)
"""Angular orders of the PRF that may change across an image: 2 (ellipticity) to 6 (the
hexagonal diffraction pattern of a three-legged secondary support and the pixel's square)."""
_ANGLES = 48
_MIN_BASIS_NORM = 1e-4
"""Orders whose basis image is weaker than this, relative to the PRF, are dropped (a round
file has nothing to turn)."""
_RIDGE = 1e-3
"""Ridge on each cell's solve, relative to its mean diagonal: a cell with few sources keeps
the mean PRF rather than its noise."""
_ROUNDS = 4
_OUTLIER_CHI2 = 5.0
"""Sources whose coefficients are off the map by more than this chi^2 per coefficient are
left out of it."""
_MIN_GAIN_PER_COEFFICIENT = 4.0
"""The map is used only if it lowers the bright sources' chi^2 (each predicted from the
others) by this much per coefficient of the basis, in all, more than one change common to the
whole section does: well beyond what noise gives. (A common change is the mean PRF's own
error, not a variation.)"""


@dataclass
class PRFVariation:
    """A map of the PRF's variants across an image section.

    Attributes
    ----------
    coefficients : ndarray, shape (n_variant, n_basis)
        Each variant's change from the mean PRF, in units of `basis`.
    basis : ndarray, shape (n_basis, n, n)
        The changes' images, on the mean PRF's grid (`variation_basis`).
    cells : ndarray of int, shape (n_cell_y, n_cell_x)
        The variant of each cell (``cell_pix`` on a side, the first at pixel (0, 0)).
    cell_pix : float
    smoothing_pix : float
        Gaussian sigma of the average over sources that made each cell's coefficients.
    gain : float
        How much the map lowered the chi^2 of the bright sources' residuals, each predicted
        from the other sources.
    n_sources : int
        Bright sources the map was measured from.
    """

    coefficients: np.ndarray
    basis: np.ndarray
    cells: np.ndarray
    cell_pix: float
    smoothing_pix: float
    gain: float
    n_sources: int

    def variant_prfs(self, prf: np.ndarray) -> np.ndarray:
        """The variants' PRFs: ``prf`` (the mean, on the basis's grid) plus each change."""
        return prf[None] + np.tensordot(self.coefficients, self.basis, axes=1)

    def variant_at(self, x, y) -> np.ndarray:
        """The variant of each position (pixels of the section), -1 (the mean PRF) off the map."""
        col = np.floor(np.asarray(x, dtype=np.float64) / self.cell_pix)
        row = np.floor(np.asarray(y, dtype=np.float64) / self.cell_pix)
        inside = (col >= 0) & (col < self.cells.shape[1]) & (row >= 0) & (row < self.cells.shape[0])
        inside &= np.isfinite(col) & np.isfinite(row)
        variant = np.full(np.shape(col), -1, dtype=np.intp)
        variant[inside] = self.cells[row[inside].astype(np.intp), col[inside].astype(np.intp)]
        return variant


def profile_indices(variant, size_bin, n_variants: int) -> np.ndarray:
    """Each source's table for ``extended`` = (variant tables, then disc tables): its
    variant if it is a point source (-1, the point table, off the map), else its disc."""
    variant = np.asarray(variant, dtype=np.intp)
    if size_bin is None:
        return variant
    size_bin = np.asarray(size_bin, dtype=np.intp)
    return np.where(size_bin >= 0, n_variants + size_bin, variant)


def variation_basis(prf, oversampling, file_prf, file_oversampling, orders=HARMONIC_ORDERS) -> np.ndarray:
    """The images a change of the PRF across an image is fitted with, on the grid of the
    centred mean ``prf``.

    Order 2 is a change of the blur's shape: the mean PRF convolved with a little more
    elongation along x or along the diagonal, the traceless part of its second derivatives
    (a pointing jitter's ellipse turned with the roll). Orders 3 and up are the file's own
    angular structure (cosine and sine parts, `harmonic_parts`), which the roll turns; orders
    weaker than `_MIN_BASIS_NORM` of the PRF are left out.
    """
    samples = np.asarray(prf, dtype=np.float64)
    d_y, d_x = np.gradient(samples, 1.0 / oversampling)
    d_yy, d_yx = np.gradient(d_y, 1.0 / oversampling)
    _, d_xx = np.gradient(d_x, 1.0 / oversampling)
    shear = [d_xx - d_yy, 2.0 * d_yx]
    higher = harmonic_parts(file_prf, file_oversampling, samples.shape, oversampling, [m for m in orders if m > 2])
    basis = np.concatenate([np.asarray(shear), higher])
    return basis[np.linalg.norm(basis, axis=(1, 2)) > _MIN_BASIS_NORM * np.linalg.norm(samples)]


def harmonic_parts(file_prf, file_oversampling, shape, oversampling, orders) -> np.ndarray:
    """The file PRF's angular orders ``orders``, cosine parts then sine parts (normalised like
    the file), sampled on the grid of a centred PRF of ``shape`` and ``oversampling``."""
    n_y, n_x = shape
    orders = np.asarray(orders, dtype=np.float64)
    if orders.size == 0:
        return np.zeros((0, n_y, n_x))
    profile = _FileProfile(file_prf, file_oversampling)
    ux = ((np.arange(n_x) - (n_x - 1) / 2) / oversampling)[None, :]
    uy = ((np.arange(n_y) - (n_y - 1) / 2) / oversampling)[:, None]
    parts = np.zeros((orders.size, n_y, n_x), dtype=np.complex128)
    # The PRF turned by alpha, weighted by exp(i m alpha) and averaged over the turn, is its
    # order m: p_m(r) exp(i m phi).
    for alpha in 2 * np.pi * np.arange(_ANGLES) / _ANGLES:
        turned = profile(ux * np.cos(alpha) + uy * np.sin(alpha), -ux * np.sin(alpha) + uy * np.cos(alpha))
        parts += turned[None] * np.exp(1j * orders * alpha)[:, None, None] / _ANGLES
    return np.concatenate([2 * parts.real, 2 * parts.imag])


def source_terms(residual, sigma, x, y, flux, sources, basis, oversampling, radius_pix):
    """Per source of ``sources``, the normal matrix and right-hand side of its residual fitted
    with its flux times the basis images placed at its position, within ``radius_pix``, with
    a level and slope of the sky fitted too and marginalised out.

    Returns (indices of the sources used, fisher (n, k, k), rhs (n, k)); a source whose window
    leaves the section or holds a NaN is not used.
    """
    residual = np.asarray(residual, dtype=np.float64)
    sigma = np.broadcast_to(sigma, residual.shape)
    coefficients = [ndimage.spline_filter(b, order=3, mode="constant") for b in basis]
    centre = ((basis.shape[1] - 1) / 2, (basis.shape[2] - 1) / 2)
    half = int(np.ceil(radius_pix))
    offsets = np.arange(-half, half + 1)
    inside = np.hypot(offsets[:, None], offsets[None, :]) <= radius_pix
    dy, dx = np.nonzero(inside)
    dy, dx = offsets[dy], offsets[dx]
    used, fisher, rhs = [], [], []
    for source in sources:
        col, row = int(np.rint(x[source])), int(np.rint(y[source]))
        if not (half <= row < residual.shape[0] - half and half <= col < residual.shape[1] - half):
            continue
        r = residual[row + dy, col + dx]
        s = sigma[row + dy, col + dx]
        if not (np.isfinite(r).all() and np.isfinite(s).all() and np.isfinite(flux[source])):
            continue
        coords = np.stack([centre[0] + oversampling * (row + dy - y[source]), centre[1] + oversampling * (col + dx - x[source])])
        design = np.stack([ndimage.map_coordinates(c, coords, order=3, prefilter=False) for c in coefficients], axis=1)
        design *= flux[source]
        # A local sky level and slope under each source are not the PRF's: they are fitted
        # with the basis and marginalised (a sky map off by a smooth few per cent read as
        # a varying PRF on a deep GALEX tile).
        full = np.column_stack([design, np.ones(dx.size), dx, dy])
        weighted = full / s[:, None] ** 2
        normal, right = full.T @ weighted, weighted.T @ r
        k = design.shape[1]
        nuisance = np.linalg.solve(normal[k:, k:], np.column_stack([normal[k:, :k], right[k:]]))
        used.append(source)
        fisher.append(normal[:k, :k] - normal[:k, k:] @ nuisance[:, :k])
        rhs.append(right[:k] - normal[:k, k:] @ nuisance[:, k])
    k = basis.shape[0]
    if not used:
        return np.zeros(0, dtype=np.intp), np.zeros((0, k, k)), np.zeros((0, k))
    return np.asarray(used, dtype=np.intp), np.asarray(fisher), np.asarray(rhs)


def _kernel(from_x, from_y, to_x, to_y, scale, exclusion=0.0):
    d2 = (from_x[:, None] - to_x[None, :]) ** 2 + (from_y[:, None] - to_y[None, :]) ** 2
    return np.where(d2 > exclusion**2, np.exp(-0.5 * d2 / scale**2), 0.0)


def _smoothed(at_x, at_y, x, y, weight, weighted_estimate, scale, exclusion=0.0, chunk=256):
    """The coefficients at (at_x, at_y): the least-squares average of the sources' estimates
    (``weight`` their inverse covariances, ``weighted_estimate`` weight times estimate), with
    Gaussian weights of ``scale``, leaving out sources within ``exclusion``."""
    n, k = weighted_estimate.shape
    flat = weight.reshape(n, k * k)
    out = np.zeros((at_x.size, k))
    for start in range(0, at_x.size, chunk):
        rows = slice(start, min(at_x.size, start + chunk))
        kernel = _kernel(at_x[rows], at_y[rows], x, y, scale, exclusion)
        sums = (kernel @ flat).reshape(-1, k, k)
        trace = np.trace(sums, axis1=-2, axis2=-1)
        # Where no source is near enough to weigh (the Gaussian underflows), no change.
        near = np.flatnonzero(trace > 0)
        ridge = _RIDGE * trace[near, None, None] / k
        out[start + near] = np.linalg.solve(sums[near] + ridge * np.eye(k), (kernel[near] @ weighted_estimate)[..., None])[..., 0]
    return out


def variation_map(x, y, fisher, rhs, shape, basis, oversampling, *, cell_pix, scales_pix, exclusion_pix,
                  n_variants=12, seed=0):
    """The map of PRF variants from `source_terms` of sources at ``x``, ``y`` (section
    pixels), or None where no smoothing scale of ``scales_pix`` predicts the sources'
    residuals better than one change common to all of them, by `_MIN_GAIN_PER_COEFFICIENT`
    per coefficient.

    Each source's coefficients scatter about the map by their noise and by what is the
    source's own (an unresolved pair, a faint galaxy, a neighbour's residual): that scatter is
    measured per coefficient and added to each source's covariance, and sources off the map
    by more than `_OUTLIER_CHI2` are left out (random-effects averaging, a few rounds). A
    source's coefficients are predicted from the sources beyond ``exclusion_pix`` (whose
    windows do not overlap its own) to choose the scale. Each cell's coefficients are the
    weighted average at the chosen scale; the cells are grouped into at most ``n_variants``
    variants by k-means in the metric of the PRF's pixel values (the basis's Gram matrix).
    """
    k = rhs.shape[1]
    if rhs.shape[0] < 2 * k:
        return None
    covariance = np.linalg.pinv(fisher)
    estimate = np.einsum("nkl,nl->nk", covariance, rhs)
    scatter = np.zeros(k)
    keep = np.ones(rhs.shape[0], dtype=bool)
    scales = np.asarray(scales_pix, dtype=np.float64)
    scale = float(np.median(scales))
    for _ in range(_ROUNDS):
        weight = np.linalg.inv(covariance + np.diag(scatter))
        weighted = np.einsum("nkl,nl->nk", weight, estimate)
        gains = []
        for trial in scales:
            predicted = _smoothed(x[keep], y[keep], x[keep], y[keep], weight[keep], weighted[keep], trial, exclusion_pix)
            gains.append(float(np.sum(2 * np.einsum("nk,nk->n", predicted, weighted[keep])
                                      - np.einsum("nk,nkl,nl->n", predicted, weight[keep], predicted))))
        constant = _smoothed(x[keep], y[keep], x[keep], y[keep], weight[keep], weighted[keep], np.inf, exclusion_pix)
        gain_of_constant = float(np.sum(2 * np.einsum("nk,nk->n", constant, weighted[keep])
                                        - np.einsum("nk,nkl,nl->n", constant, weight[keep], constant)))
        scale = float(scales[int(np.argmax(gains))])
        predicted = _smoothed(x, y, x[keep], y[keep], weight[keep], weighted[keep], scale, exclusion_pix)
        deviation = estimate - predicted
        keep = np.einsum("nk,nkl,nl->n", deviation, weight, deviation) < _OUTLIER_CHI2 * k
        own = np.mean(deviation[keep] ** 2, axis=0) - np.mean(np.einsum("nkk->nk", covariance[keep]), axis=0)
        scatter = np.maximum(own, 0.0)
    gain = max(gains) - max(gain_of_constant, 0.0)
    if not gain > _MIN_GAIN_PER_COEFFICIENT * k:
        return None
    weight = np.linalg.inv(covariance + np.diag(scatter))
    weighted = np.einsum("nkl,nl->nk", weight, estimate)
    n_cell_y, n_cell_x = (int(np.ceil(side / cell_pix)) for side in shape)
    cell_y, cell_x = np.mgrid[0:n_cell_y, 0:n_cell_x]
    per_cell = _smoothed((cell_x.ravel() + 0.5) * cell_pix, (cell_y.ravel() + 0.5) * cell_pix, x[keep], y[keep],
                         weight[keep], weighted[keep], scale)
    gram = np.tensordot(basis, basis, axes=([1, 2], [1, 2])) / oversampling**2
    metric = np.linalg.cholesky(gram + 1e-12 * np.trace(gram) * np.eye(k)).T
    whitened = per_cell @ metric.T
    n_variants = min(n_variants, whitened.shape[0])
    centroids, labels = kmeans2(whitened, n_variants, seed=seed, minit="++")
    present = np.unique(labels)
    centroids, labels = centroids[present], np.searchsorted(present, labels)
    coefficients = np.linalg.solve(metric, centroids.T).T
    return PRFVariation(
        coefficients=coefficients, basis=basis, cells=labels.reshape(n_cell_y, n_cell_x).astype(np.intp),
        cell_pix=float(cell_pix), smoothing_pix=scale, gain=gain, n_sources=int(keep.sum()),
    )


def measure_variation(residual, sigma, x, y, flux, sources, prf, oversampling, file_prf, file_oversampling, *,
                      radius_pix, cell_pix, scales_pix, n_variants=12):
    """`variation_map` of a scene fit's ``residual`` around its bright point ``sources``
    (indices into ``x``, ``y``, ``flux``), on `harmonic_basis` of the PRF file for the mean
    ``prf``'s grid; None where the PRF does not measurably vary (or the file is round)."""
    basis = variation_basis(prf, oversampling, file_prf, file_oversampling)
    if basis.shape[0] == 0:
        return None
    used, fisher, rhs = source_terms(residual, sigma, x, y, flux, sources, basis, oversampling, radius_pix)
    return variation_map(x[used], y[used], fisher, rhs, np.shape(residual), basis, oversampling, cell_pix=cell_pix,
                         scales_pix=scales_pix, exclusion_pix=2 * radius_pix + 1, n_variants=n_variants)
