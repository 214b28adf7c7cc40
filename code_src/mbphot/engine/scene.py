"""Scene-mode forced photometry: every source of an image region fitted at once.

The per-source engine (`solve.forced_photometry`) fits each target in its own cutout with its
neighbours. Here the whole region is one linear least-squares problem: one flux per source
(and, optionally, one constant sky offset per square tile), every usable pixel of the image
as data. The weighted normal matrix A = P^T W P is built directly from stamp overlaps, as a
sparse matrix with a nonzero wherever two stamps share a usable pixel, never through a
design matrix. Memory and time grow linearly with the number of sources (one core, 100,000
GALEX-like sources with 21 x 21 stamps: 18 s and 11 kB per source; IRAC-like: 10 s):

- Fluxes: conjugate gradients preconditioned by overlapping subdomains (additive Schwarz),
  each subdomain a strip of about a thousand sources factorised exactly (a band Cholesky).
  A one-subdomain scene is therefore a direct solve. A single sparse factorisation of the
  whole scene is exact too, but its fill-in grows faster than the scene (N^1.5 time for a
  2-D field: 12 s and 1,500 factor entries per source for 50,000 GALEX-like sources, against
  3 s and 750 with the subdomains factorised by SuperLU, before the band Cholesky), and
  Jacobi-preconditioned CG needs thousands of iterations at GALEX crowding (sources a
  fraction of a pixel apart), where the Schwarz preconditioner needs about ten.
- Variances: diag(A^-1) from local dense blocks, see `_local_variances`.
"""

from dataclasses import dataclass

import numpy as np
from numba import typed
from scipy import fft as sp_fft
from scipy import linalg, ndimage, sparse
from scipy.linalg import blas, lapack
from scipy.sparse.linalg import splu

from .kernels import (
    add_stamps, add_tile_levels, band_block, block_members, envelope_inverse_diagonals, overlapping_pairs, padded_pixels,
    pair_overlaps, residual_sums, stamp_dots, submatrix_entries, symmetric_csr, tile_dots, tile_sums, weighted_stamps,
)
from .prf import PRFTable, normalise_prf, placed_wings, point_weights, prf_centre, spline_stamps
from .solve import MIN_COVERED_FRACTION, Measurement, finish_measurement, is_blended, start_measurement, total_variance

__all__ = ["disc_images", "disc_tables", "extended_profiles", "scene_photometry"]

_SUBDOMAIN_SOURCES = 1000
# A subdomain's band (`_BandedCholesky`) is as wide as the unknowns across its shorter side:
# long thin subdomains cost fewer flops per source, and capture more of the coupling along
# their length. On the realistic bench field, 8 times as wide as high against squares: NUV
# 4.9 against 11.6 Gflop of factorisations and 81 against 95 wing convolutions; irac1 0.9
# against 2.6 Gflop, 55 against 71 convolutions; the full field's NUV alike (11.0 against
# 23.7 Gflop in 9 of its partitions). 16 times gave no more.
_SUBDOMAIN_ASPECT = 8.0
# Conjugate gradients stop when sqrt(r^T M^-1 r), which approximates the A-norm of the error
# and bounds every flux's error in units of its own sigma, is below this.
_TOLERANCE = 1e-6
_MAX_ITERATIONS = 200
# The fits with PRF wings (`_solve_with_wings`) stop at a tenth of a sigma: the fixed-point
# steps when what they would still change is less (after the first step, its change; after
# later ones, the geometric sum of the changes to come at the last two steps' ratio), the full
# problem's conjugate gradients (two FFT convolutions an iteration) at this bound. On the
# realistic bench field an irac1 scene's steps changed 523, 7.7, 0.18, then 0 sigma (the fit
# of the cores no longer moving): its four scenes took 10 steps instead of 15 when each
# step's change alone had to be below the bound, the fluxes within 0.005 sigma of those
# (irac2 0.011, NUV 0.018). The bound is loose: when the conjugate gradients
# did all of it, the realistic bench field's fluxes were within 2.6e-3 sigma (99 % of them
# within 1e-3) of those at a hundredth, for 23 % fewer convolutions in irac1 (40 against 52)
# and 21 % in NUV (15 against 19); at 0.3 within 8e-3 sigma, for 4 convolutions fewer.
_WING_TOLERANCE = 0.1
# At most this many fixed-point steps, each shrinking the change by at least this factor (on
# the realistic bench field, by 0.005-0.05), before the conjugate gradients take over.
_WING_STEPS = 4
_WING_CONTRACTION = 0.25
# So do the fits that only decide which sources move or resize, and where the next fit
# starts, and each fixed-point step's fit of the cores.
_STEP_TOLERANCE = 0.1
# Ridge on the unit-diagonal (Jacobi-scaled) normal matrix: coincident catalogue entries make
# A singular; this keeps it factorisable and splits their flux evenly, with the huge variance
# they deserve. (The per-source engine's ridge is 1e-10 of its largest unscaled diagonal
# element, sky included, so it is not the same number relative to a source.)
_RIDGE = 1e-10
# The variance blocks (`_local_variances`): LAPACK's, and the largest the compiled loop takes.
_VARIANCE_BLOCK_UNKNOWNS = 250
_COMPILED_BLOCK_UNKNOWNS = 250
# A flux is never corrected by more than this fraction for its position: larger offsets are
# not the small catalogue errors the correction is made for.
_MAX_POSITION_LOSS = 0.2
# Without a known position error, below this signal-to-noise the correction's own noise
# (about 1 / (S/N)^2) outweighs the loss it corrects (a few per cent for IRAC's 0.15"
# catalogue errors).
_POSITION_MIN_SNR = 5.0
# A source this bright measures its own position to about FWHM / (2 S/N): a few hundredths of
# an arcsecond, well inside the catalogue's errors. With a known catalogue error sigma (per
# axis), a source must also be brighter than width / sigma (width: the PRF's rms radius per
# axis): a Gaussian PRF off by sigma leaves a residual of chi^2 (S/N sigma / width)^2, and
# below 1 the offset hides in the noise. A precise catalogue moves only its brightest sources
# (the ideal bench field's, 0.01 px: S/N above about 150).
_SHIFT_MIN_SNR = 20.0
# Gauss-Newton steps of the joint position fit. One step is exact only to first order: a
# bright source 0.2 px off its light is left about 0.02 px off, and a faint neighbour
# within the PRF's core takes up the light that leaves. A step leaves about shift^2 / width
# (width: the PRF's rms radius per axis), against a position noise of about width / (S/N):
# another step is taken only where some source's S/N (shift / width)^2 exceeds this. The
# last step is the final fit (wings included), its fluxes fitted with the step's position
# derivatives: a separate fit at the positions it moves to cost a fifth of a GALEX fit.
_SHIFT_STEPS = 2
_NEXT_STEP_MIN = 0.5
# A resolved source this bright (in units of its flux error) may change its size bin
# (`_size_steps`). Below it a one-bin change is worth a chi^2 of at most 0.7 (discs of 0.5-5.6
# px on a PRF of FWHM 2.8 px), a third of the prior's cost of one bin for a catalogue error of
# two thirds of a bin: only the noise could move such a source.
_RESIZE_MIN_SNR = 10.0
# How far (bins) a source may move from its catalogue size: three times the prior's sigma.
_MAX_RESIZE_BINS = 2
# A resolved source's size is an unknown of the final fit (`_SizeFreedom`) where its error
# moves the source's flux, fitted alone, by more than this fraction of the flux's error
# (adding 1 % to its variance); fainter ones keep their size bin.
_SIZE_FREE_MIN = 0.1


def _pixel_arrays(image, sky, sigma, margin):
    """Whitened data, square-root weights and usability of every pixel, padded by ``margin``
    (`kernels.padded_pixels`).

    Whitening (dividing by sigma) lets every A element be a plain dot product of two
    weighted stamps: u_i = P_i sqrt(W), A_ij = u_i . u_j, b_i = u_i . (d sqrt(W)).
    """
    shape = np.shape(image)
    arrays = []
    for values in (image, sky, sigma):
        # Read-only views whatever the inputs (a scalar's broadcast is copied, a contiguous
        # array is not): the kernel then has one compiled signature, which the photometry's
        # warm-up loads, where a second one took its first scene 8 ms more.
        array = np.ascontiguousarray(np.broadcast_to(np.asarray(values, dtype=np.float64), shape)).view()
        array.flags.writeable = False
        arrays.append(array)
    return padded_pixels(*arrays, margin)


class _StampPool:
    """The whitened stamps of one `scene_photometry` call's scenes, each source's in a slot.

    A source that a later scene keeps (same position and profile) keeps its slot: copying the
    stamps of every kept source into each new scene cost about 5 % of the realistic bench's
    irac1 engine time. The pool only grows (a scene's stamps stay valid while the call
    lasts); `numpy.empty` leaves the room not yet written unallocated. The stamps are single
    precision (`kernels.weighted_stamps`): the kernels that sum over them read half the
    memory (the realistic bench's irac1 and irac2 scenes 4-5 % quicker, their fluxes within
    5e-6 sigma).
    """

    def __init__(self, size, capacity):
        self.stamps = np.empty((capacity, size, size), dtype=np.float32)
        self.used = 0

    def allocate(self, n):
        """Slots for ``n`` new stamps."""
        if self.used + n > self.stamps.shape[0]:
            capacity = max(self.used + n, self.stamps.shape[0] * 3 // 2)
            grown = np.empty((capacity, *self.stamps.shape[1:]), dtype=self.stamps.dtype)
            grown[: self.used] = self.stamps[: self.used]
            self.stamps = grown
        slots = np.arange(self.used, self.used + n)
        self.used += n
        return slots


def _source_terms(tables, profile, x, y, col, row, padded, half_cutout, pool, previous=None, old=None):
    """Each source's slot of ``pool`` (its whitened stamp), A diagonal, b and the
    per-source-engine coverage; ``profile`` indexes ``tables`` (`_Tables`).

    ``covered`` is the fraction of the stamp's flux inside the target's cutout that falls on
    usable pixels, as `solve.forced_photometry` computes it, so both engines flag alike.

    With a ``previous`` scene (whose pool ``pool`` is), a source whose unknown there is
    ``old`` (-1: none) keeps its slot and terms from it; the others are computed in one
    pass, in the sources' (strip) order.
    """
    whitened, sqrt_weight, valid = padded
    n = col.size
    slots = np.empty(n, dtype=np.intp)
    rhs, diagonal, covered = np.empty(n), np.empty(n), np.empty(n)
    fresh = np.arange(n)
    if previous is not None:
        kept = np.flatnonzero(old >= 0)
        slots[kept] = previous.slots[old[kept]]
        rhs[kept] = previous.terms.rhs[old[kept]]
        diagonal[kept] = previous.terms.diagonal[old[kept]]
        covered[kept] = previous.covered[old[kept]]
        fresh = np.flatnonzero(old < 0)
    slots[fresh] = pool.allocate(fresh.size)
    if fresh.size:
        phases = tables[0].phases
        weighted_stamps(
            tables.stamps, tables.base[profile[fresh]], tables.axis[profile[fresh]], float(phases[0]),
            float(phases[1] - phases[0]), x[fresh] - col[fresh], y[fresh] - row[fresh], col[fresh], row[fresh],
            whitened, sqrt_weight, valid, min(tables[0].half_size, half_cutout), slots[fresh], pool.stamps, fresh,
            rhs, diagonal, covered,
        )
    return slots, rhs, diagonal, covered


class _Tables(list):
    """A scene's tables (`_profiles`; with a position step's gradients after them,
    `with_gradients`) and their stamps as the compiled kernels take them.

    ``stamps`` holds each profile's stamps once, a typed list of one array type (read-only
    float32 views, whatever the arrays' own flags); ``base`` and ``axis`` give each table's
    entry there and its derivative axis (0: the profile itself, else a `_Derivative`'s). A
    typed list takes about 10 us an entry to build: once per `scene_photometry` call.
    """

    def __init__(self, tables, stamps=None, base=None, axis=None):
        super().__init__(tables)
        if stamps is None:
            views = []
            for table in tables:
                view = np.asarray(table.stamps, dtype=np.float32).view()
                view.flags.writeable = False
                views.append(view)
            stamps, base, axis = typed.List(views), np.arange(len(tables)), np.zeros(len(tables), dtype=np.intp)
        self.stamps, self.base, self.axis = stamps, base, axis

    def with_gradients(self):
        """These tables, then their derivatives along x, then along y."""
        gradients = [*(_Derivative(t, 1) for t in self), *(_Derivative(t, 2) for t in self)]
        n = len(self)
        axis = np.concatenate([self.axis, np.full(n, 1), np.full(n, 2)])
        return _Tables([*self, *gradients], self.stamps, np.tile(self.base, 3), axis)


def _overlap_couplings(weighted, slots, col, row, half, previous=None, old=None):
    """Off-diagonal A elements of every pair of sources whose stamps overlap.

    The sources are in strip order (`_normal_equations`). With a ``previous`` scene (``old``
    as in `_source_terms`), the pairs of two kept sources are taken from it, and only those of
    a source new or moved are computed.
    """
    fresh = np.ones(col.size, dtype=np.bool_)
    kept_first = kept_second = np.zeros(0, dtype=np.intp)
    kept_values = np.zeros(0)
    if previous is not None:
        fresh = old < 0
        new_of_old = np.full(previous.n_source, -1, dtype=np.intp)
        new_of_old[old[~fresh]] = np.flatnonzero(~fresh)
        old_first, old_second, old_values = previous.terms.pairs
        kept_first, kept_second = new_of_old[old_first], new_of_old[old_second]
        both = (kept_first >= 0) & (kept_second >= 0)
        # Kept sources keep their order, so each kept pair stays (lower, higher).
        kept_first, kept_second, kept_values = kept_first[both], kept_second[both], old_values[both]
    # Sorted pairs: the same sums in the same order whatever the scene's history.
    first, second = overlapping_pairs(col, row, 2 * half, fresh)
    values = pair_overlaps(weighted, slots, col, row, first, second)
    return np.concatenate([kept_first, first]), np.concatenate([kept_second, second]), np.concatenate([kept_values, values])


def _tile_of_pixel(image_shape, tile_size):
    """The sky tile of each pixel of an image: square tiles of ``tile_size`` from pixel (0, 0),
    numbered along rows."""
    n_cols = -(-image_shape[1] // tile_size)
    return (np.arange(image_shape[0]) // tile_size)[:, None] * n_cols + np.arange(image_shape[1]) // tile_size


def _sky_couplings(weighted, slots, col, row, padded, tile_of_pixel, tile_size, half, previous=None, old=None):
    """A and b terms of one constant sky offset per ``tile_size`` square tile of the image
    (``tile_of_pixel``: the tile of each image pixel, `_tile_of_pixel`).

    Returns the source-tile couplings (source, tile, value), the tiles' diagonal and b, and
    the number of tile columns. With a ``previous`` scene (``old`` as in `_source_terms`),
    the tiles' terms and those of kept sources are taken from it.
    """
    whitened, sqrt_weight, _ = padded
    image_shape = tile_of_pixel.shape
    n_rows = -(-image_shape[0] // tile_size)
    n_cols = -(-image_shape[1] // tile_size)
    fresh = np.arange(col.size)
    if previous is None:
        margin = 2 * half
        inner = (slice(margin, margin + image_shape[0]), slice(margin, margin + image_shape[1]))
        tile_diagonal = tile_dots(tile_of_pixel, sqrt_weight[inner], sqrt_weight[inner], n_rows * n_cols)
        tile_rhs = tile_dots(tile_of_pixel, sqrt_weight[inner], whitened[inner], n_rows * n_cols)
        kept_sources = kept_tiles = np.zeros(0, dtype=np.intp)
        kept_values = np.zeros(0)
    else:
        old_sources, old_tiles, old_values, tile_diagonal, tile_rhs, _ = previous.terms.sky
        new_of_old = np.full(previous.n_source, -1, dtype=np.intp)
        new_of_old[old[old >= 0]] = np.flatnonzero(old >= 0)
        kept_sources = new_of_old[old_sources]
        kept_tiles, kept_values = old_tiles[kept_sources >= 0], old_values[kept_sources >= 0]
        kept_sources = kept_sources[kept_sources >= 0]
        fresh = np.flatnonzero(old < 0)

    size = 2 * half + 1
    span = (size - 1) // tile_size + 2  # tiles per axis a stamp can meet
    sources, tiles, values = tile_sums(
        weighted, slots[fresh], col[fresh], row[fresh], sqrt_weight, tile_size, span, n_rows, n_cols
    )
    return (
        np.concatenate([kept_sources, fresh[sources]]), np.concatenate([kept_tiles, tiles]),
        np.concatenate([kept_values, values]), tile_diagonal, tile_rhs, n_cols,
    )


def _variance_cells(density, halo):
    """Side (pixels) of `_local_variances`' cells in a scene of ``density`` source unknowns per
    pixel, and whether its compiled loop takes them."""
    compiled = density * (4 * halo) ** 2 <= _COMPILED_BLOCK_UNKNOWNS
    return (2 * halo if compiled else max(halo, int(np.sqrt(_VARIANCE_BLOCK_UNKNOWNS / density)) - 2 * halo)), compiled


def _local_variances(normal, centres, extents, target_unknowns, cell_size, halo, compiled):
    """Approximate diag(A^-1) of ``target_unknowns`` from local blocks of A.

    The targets are grouped into square cells. For each cell the block of A over every unknown
    within ``halo`` pixels of the cell (sources by position, sky tiles by overlap;
    `kernels.block_members`) is factorised once, with the cell's targets ordered last: then
    the targets' block of the inverse is L22^-T L22^-1, L22 the trailing block of the Cholesky
    factor, and its diagonal is the column sums of squares of L22^-1.

    Where a block of cells two halos wide holds at most `_COMPILED_BLOCK_UNKNOWNS` unknowns
    (IRAC: about 120; `_variance_cells`), the blocks are factorised over their rows' envelopes
    in one compiled loop (`kernels.envelope_inverse_diagonals`): the other unknowns along the
    rows, each row of the factor starts at its first coupling. On the realistic bench field's
    irac1 scenes this took 0.055 s against 0.10 s for LAPACK on cells of
    `_VARIANCE_BLOCK_UNKNOWNS` unknowns (with a halo four pixels narrower, too), whose Python
    per block cost as much as its factorisation. In crowded fields (GALEX: a block of cells two halos wide would hold 600)
    the cells hold about `_VARIANCE_BLOCK_UNKNOWNS` unknowns and LAPACK factorises each, the
    other unknowns eliminated in pieces of the ring around the cell, corners first
    (`_trailing_variances`): the ring is as wide as the couplings reach, so opposite pieces
    never meet, and the dense factorisation's work on their zero couplings is skipped (a
    third of the time at GALEX crowding).

    The result is the variance conditional on the unknowns outside the block, so it can only
    underestimate diag(A^-1). With a halo of the stamp-overlap reach every unknown coupled to
    a target is in its block, and only couplings through at least one intermediate unknown
    (a neighbour, or a sky tile that couples all its sources) are cut; `scene_photometry`
    adds a quarter sky tile. Against the exact diag(A^-1) of the realistic bench field's
    largest scene (400 targets), irac1 came within 7e-5 (1 % of them below -2e-5), irac2
    1.4e-4, the ideal field's irac1 1.4e-5, and NUV, whose 27-pixel sky tiles hold about 60
    sources each, 1.8 % (1 % below -0.7 %); without the quarter tile irac1 within 1.6e-3 and
    NUV 5.8 % (1 % below -2.3 %), with NUV's variances taking 0.19 s instead of 0.41.

    Parameters
    ----------
    normal : scipy.sparse.csr_matrix
        A, symmetric positive definite.
    centres : ndarray, shape (n_unknown, 2)
        (col, row) of each unknown (sky tiles: their centre).
    extents : ndarray, shape (n_unknown,)
        Half-width of each unknown's footprint (0 for sources, half the tile for sky tiles),
        so that a tile joins a block when it overlaps the block's box.
    target_unknowns : ndarray of int
        The unknowns whose variances are wanted.
    cell_size, halo : float
        Side of the cells and how far around its cell a block reaches (pixels).
    compiled : bool
        Factorise the blocks in the compiled loop, else by LAPACK.
    """
    unique, inverse = np.unique(target_unknowns, return_inverse=True)
    cell = np.floor(centres[unique] / cell_size).astype(np.int64)
    low = cell.min(axis=0)
    cell_key = (cell[:, 1] - low[1]) * (cell[:, 0].max() - low[0] + 1) + cell[:, 0] - low[0]
    order = np.argsort(cell_key, kind="stable")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(cell_key[order])) + 1, [order.size]])
    centres = np.ascontiguousarray(centres, dtype=np.float64)
    members, member_bounds = block_members(
        centres, np.asarray(extents, dtype=np.float64), unique[order].astype(np.int64), np.ascontiguousarray(cell[order]),
        bounds.astype(np.int64), float(cell_size), float(halo),
    )
    n_targets = np.diff(bounds)
    unique_variances = np.empty(unique.size)
    if compiled:
        unique_variances[order] = envelope_inverse_diagonals(
            normal.indptr, normal.indices, normal.data, members, member_bounds, n_targets
        )
        return unique_variances[inverse]
    position_in_block = np.full(normal.shape[0], -1, dtype=np.intp)
    scratch = np.empty(0)
    for start, stop, first_member, stop_member in zip(bounds[:-1], bounds[1:], member_bounds[:-1], member_bounds[1:]):
        others = members[first_member : stop_member - (stop - start)]
        block_index = members[first_member:stop_member]
        piece_bounds = [0]
        if others.size >= _PIECEWISE_UNKNOWNS:
            # Piece of the ring (or the cell itself) of each other unknown: -1, 0 or 1 per axis.
            cell_low = cell[order[start]] * cell_size
            side = np.clip(np.floor((centres[others] - cell_low) / cell_size), -1, 1).astype(np.intp) + 1
            piece = _ELIMINATION_ORDER[side[:, 1], side[:, 0]]
            sorted_pieces = np.argsort(piece, kind="stable")
            block_index = np.concatenate([others[sorted_pieces], block_index[others.size :]])
            piece_bounds = np.append(np.searchsorted(piece[sorted_pieces], np.arange(9)), others.size)
        if scratch.size < block_index.size**2:
            scratch = np.empty(block_index.size**2)
        block = _dense_block(normal, block_index, position_in_block, scratch)
        unique_variances[order[start:stop]] = _trailing_variances(block, piece_bounds, stop - start)
    return unique_variances[inverse]


# Where each piece of a cell's ring is eliminated (indexed by row side, column side): the
# corners, which meet only their two edges and the cell; then the top and bottom edges, the
# left and right ones, and the cell's other unknowns.
_ELIMINATION_ORDER = np.array([[0, 4, 1], [6, 8, 7], [2, 5, 3]])
# Below this many unknowns around a cell, one dense factorisation is quicker than the Python
# of a piecewise one.
_PIECEWISE_UNKNOWNS = 600


def _trailing_variances(block, bounds, n_target):
    """Diagonal of the inverse of a symmetric positive definite ``block`` over its last
    ``n_target`` unknowns.

    The groups ``block[bounds[g]:bounds[g + 1]]`` are eliminated one at a time (block
    Cholesky), each updating only the unknowns it is coupled to: zero couplings, whether zero
    from the start or never filled in, cost nothing. What is left after the last group is
    factorised whole. The result is that of one dense Cholesky factorisation of the whole
    block, to rounding. Only the lower triangle is read and kept up to date; ``block`` is
    overwritten.

    Returns NaN for every target if the block is not positive definite to working precision
    (they get fit_failed).
    """
    try:
        for first, stop in zip(bounds[:-1], bounds[1:]):
            if stop == first:
                continue
            factor = linalg.cholesky(block[first:stop, first:stop], lower=True, check_finite=False)
            coupled = stop + np.flatnonzero((block[stop:, first:stop] != 0).any(axis=1))
            if coupled.size == 0:
                continue
            # Rows of L^-1 times the coupling: the Schur update is their Gram matrix.
            reduced = linalg.solve_triangular(factor, block[coupled, first:stop].T, lower=True, check_finite=False)
            block[np.ix_(coupled, coupled)] -= blas.dsyrk(1.0, reduced, trans=1, lower=1)
        factor = linalg.cholesky(block[bounds[-1] :, bounds[-1] :], lower=True, check_finite=False)
    except linalg.LinAlgError:
        return np.full(n_target, np.nan)
    trailing_inverse = linalg.solve_triangular(factor[-n_target:, -n_target:], np.eye(n_target), lower=True, check_finite=False)
    return (trailing_inverse**2).sum(axis=0)


def _submatrix_entries(normal, index, position):
    """Nonzeros of ``normal[index][:, index]`` as (row, column, value), read straight from the
    CSR arrays (`kernels.submatrix_entries`): many times faster than scipy's fancy indexing.
    ``position`` is scratch of length n, all -1, and is left so."""
    return submatrix_entries(normal.indptr, normal.indices, normal.data, index, position)


def _dense_block(normal, index, position, scratch):
    """``normal[index][:, index]`` as a dense array, written over the start of ``scratch``
    (at least ``index.size**2`` long): a fresh array of tens of MB per block costs page faults
    worth several times the block's own copying."""
    block = scratch[: index.size**2].reshape(index.size, index.size)
    block.fill(0.0)
    rows, columns, values = _submatrix_entries(normal, index, position)
    block[rows, columns] = values
    return block


def _subdomains(centres, extents, shape, half, n_source):
    """Unknowns of each overlapping rectangular subdomain of the scene.

    The image plus the stamp margin is cut into rectangles holding about `_SUBDOMAIN_SOURCES`
    sources, `_SUBDOMAIN_ASPECT` times as wide as high (or as wide as the scene); each
    subdomain takes every unknown whose footprint reaches within ``2 * half`` (the
    stamp-overlap reach) of its rectangle, so every coupled pair shares a subdomain.
    """
    height, width = shape[0] + 2 * half, shape[1] + 2 * half
    side = np.sqrt(_SUBDOMAIN_SOURCES * height * width / max(n_source, 1))
    reach = extents + 2 * half
    axis_ranges = []
    for coordinate, length, step in (
        (centres[:, 0], width, side * np.sqrt(_SUBDOMAIN_ASPECT)), (centres[:, 1], height, side / np.sqrt(_SUBDOMAIN_ASPECT)),
    ):
        edges = np.linspace(-half - 0.5, length - half - 0.5, max(1, int(round(length / step))) + 1)
        low = np.searchsorted(edges[1:-1], coordinate - reach, side="left")
        high = np.searchsorted(edges[1:-1], coordinate + reach, side="right")
        axis_ranges.append((low, high, edges.size - 1))
    (low_x, high_x, n_x), (low_y, high_y, n_y) = axis_ranges
    unknowns, squares = [], []
    for step_y in range(int((high_y - low_y).max()) + 1):
        for step_x in range(int((high_x - low_x).max()) + 1):
            member = np.flatnonzero((low_y + step_y <= high_y) & (low_x + step_x <= high_x))
            unknowns.append(member)
            squares.append((low_y[member] + step_y) * n_x + low_x[member] + step_x)
    unknowns = np.concatenate(unknowns)
    squares = np.concatenate(squares)
    order = np.argsort(squares, kind="stable")
    bounds = np.searchsorted(squares[order], np.arange(n_x * n_y + 1))
    return [unknowns[order[a:b]] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _factorise(matrix):
    """SuperLU of a symmetric positive definite matrix, as a Cholesky factorisation.

    Minimum degree on A + A^T and no pivoting keep the ordering symmetric and the fill low.
    """
    return splu(matrix.tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})


class _BandedCholesky:
    """Cholesky factor of a symmetric positive definite matrix's block over the unknowns
    ``index`` (at ``centres``), in LAPACK's band storage (`kernels.band_block`), its unknowns
    ordered along the longer side of the ``centres``: `index` holds them in that order, and
    `solve` takes and returns vectors over them in it (a subdomain solve took 79 us with
    the order applied and undone inside it, 57 us so, against 52 for LAPACK's own).

    A subdomain's sources couple only to those within the stamps' reach, so in that order
    its matrix is a band: its width is the unknowns of a strip one reach wide across the
    shorter side. The dense band factorisation beats SuperLU's sparse one (realistic NUV
    subdomains of ~1,450 unknowns, one thread: 11 ms against 16; solves 0.20 ms against
    0.29), and the strip order gives half the band flops of a reverse Cuthill-McKee order,
    whose level sets run diagonally from a corner (square subdomains of the realistic bench
    field: NUV 6.7 against 14.9 Gflop, 39 % less time; irac1 1.7 against 2.8 Gflop).
    ``position`` is scratch as `kernels.band_block` takes it.
    """

    def __init__(self, normal, index, centres, position):
        span = centres.max(axis=0) - centres.min(axis=0)
        self.index = index[np.argsort(centres[:, int(span[1] > span[0])], kind="stable")]
        band = band_block(normal.indptr, normal.indices, normal.data, self.index, position)
        # LAPACK's band routines straight, as `linalg.cholesky_banded` and
        # `linalg.cho_solve_banded` call them: the 360 subdomain solves of irac1's bench
        # scenes took 0.045 s with their argument checks, 0.018 s without (under cProfile).
        self.factor, info = lapack.dpbtrf(band, overwrite_ab=True)
        if info > 0:
            raise linalg.LinAlgError(f"{info}-th leading minor not positive definite")

    def solve(self, rhs):
        return lapack.dpbtrs(self.factor, rhs, overwrite_b=True)[0]


class _SparseCholesky:
    """SuperLU (`_factorise`) of a block over the unknowns ``index``, with `_BandedCholesky`'s
    interface: `index` and `solve`."""

    def __init__(self, normal, index, position):
        self.index = index
        rows, columns, values = _submatrix_entries(normal, index, position)
        self.solve = _factorise(sparse.csc_matrix((values, (rows, columns)), shape=(index.size, index.size))).solve


def _factorise_subdomain(normal, index, centres, position):
    """The factor of the block of ``normal`` over the unknowns ``index`` (at ``centres``):
    banded (`_BandedCholesky`), or SuperLU (`_SparseCholesky`) where the band is not positive
    definite to working precision. ``position`` is scratch as `_submatrix_entries` takes it."""
    try:
        return _BandedCholesky(normal, index, centres, position)
    except linalg.LinAlgError:
        return _SparseCholesky(normal, index, position)


class _Solver:
    """Solves ``normal @ solution = rhs`` by Schwarz-preconditioned conjugate gradients.

    The subdomains of ``normal`` (its unknowns at ``centres``) are factorised once. `solve`
    takes another symmetric positive definite operator close to ``normal`` (the scene with PRF
    wings), which the same preconditioner serves. Without one it falls back to one
    factorisation of the whole matrix if the iteration does not converge.
    """

    def __init__(self, normal, subdomains, centres):
        self.normal = normal
        position = np.full(normal.shape[0], -1, dtype=np.intp)
        self.factors = [_factorise_subdomain(normal, members, centres[members], position) for members in subdomains]

    def _precondition(self, residual):
        result = np.zeros_like(residual)
        for factor in self.factors:
            result[factor.index] += factor.solve(residual[factor.index])
        return result

    def solve(self, rhs, operator=None, start=None, tolerance=_TOLERANCE):
        """Solve ``operator(solution) = rhs`` (default: ``normal @ solution = rhs``) from ``start``."""
        product_of = (lambda vector: self.normal @ vector) if operator is None else operator
        solution = np.zeros_like(rhs) if start is None else start.copy()
        residual = rhs - product_of(solution) if start is not None else rhs.copy()
        preconditioned = self._precondition(residual)
        direction = preconditioned.copy()
        energy = residual @ preconditioned
        for _ in range(_MAX_ITERATIONS):
            if 0 <= energy <= tolerance**2:
                return solution
            if not energy > 0:
                # NaN or negative: the preconditioner is not positive definite to precision.
                break
            product = product_of(direction)
            step = energy / (direction @ product)
            solution += step * direction
            residual -= step * product
            preconditioned = self._precondition(residual)
            new_energy = residual @ preconditioned
            direction = preconditioned + (new_energy / energy) * direction
            energy = new_energy
        if operator is not None:
            return solution
        return _factorise(self.normal).solve(rhs)


@dataclass
class _Scene:
    """Jacobi-scaled normal equations of a scene: ``normal @ (flux / scale) = rhs``.

    Unknowns are the modelled sources, then the sky tiles. ``unknown_of_source`` maps a
    catalogue index to its unknown (-1: not modelled); ``centres`` (col, row) and
    ``extents`` (footprint half-width) place each unknown for `_local_variances`.
    ``modelled``, ``col``, ``row`` and ``slots`` are the modelled sources' catalogue
    indices, central pixels and slots of ``pool`` (their whitened stamps, `weighted`);
    ``padded`` the whitened data, square-root weights and usability (`_pixel_arrays`);
    ``tile_of_pixel`` the sky tile of each image pixel (None without sky tiles); ``terms``
    what the next scene of the image reuses; ``prior`` what a Gaussian prior adds to each
    unknown's diagonal (None: no prior).
    """

    normal: sparse.csr_matrix
    rhs: np.ndarray
    scale: np.ndarray
    unconstrained: np.ndarray
    covered: np.ndarray
    unknown_of_source: np.ndarray
    n_source: int
    centres: np.ndarray
    extents: np.ndarray
    modelled: np.ndarray
    col: np.ndarray
    row: np.ndarray
    slots: np.ndarray
    pool: _StampPool
    padded: tuple
    tile_of_pixel: np.ndarray | None
    terms: "_Terms"
    prior: np.ndarray | None = None

    @property
    def weighted(self):
        """The stamps of ``pool``: source unknown i's is ``weighted[slots[i]]``."""
        return self.pool.stamps


@dataclass
class _Terms:
    """A scene's unscaled terms that `_normal_equations` reuses in the next scene of the same
    image: each modelled source's position (``x``, ``y``) and table (``tables[profile]``), b
    and A diagonal; the A elements of overlapping pairs of sources (first, second, value) and,
    with sky tiles, `_sky_couplings`' result (else None)."""

    x: np.ndarray
    y: np.ndarray
    tables: list
    profile: np.ndarray
    rhs: np.ndarray
    diagonal: np.ndarray
    pairs: tuple
    sky: tuple | None


def _previous_unknowns(previous, modelled, x, y, tables, profile):
    """Each modelled source's unknown in the ``previous`` scene if it is there with the same
    position and table, else -1."""
    old = np.full(modelled.size, -1, dtype=np.intp)
    if previous is None:
        return old
    known = modelled < previous.unknown_of_source.size
    old[known] = previous.unknown_of_source[modelled[known]]
    there = np.flatnonzero(old >= 0)
    source, unknown = modelled[there], old[there]
    # A table is the same object, not only the same index: the scenes of a position step
    # add gradient tables after the profiles.
    index_of_table = {id(table): k for k, table in enumerate(tables)}
    now_index = np.array([index_of_table.get(id(table), -1) for table in previous.terms.tables], dtype=np.intp)
    same = (
        (previous.terms.x[unknown] == x[source]) & (previous.terms.y[unknown] == y[source])
        & (now_index[previous.terms.profile[unknown]] == profile[source])
    )
    old[there[~same]] = -1
    return old


def _normal_equations(
    image, x, y, prf_table, cutout_size, sky, sigma, fit_sky, tables, profile, previous=None, prior_sigma=None,
    prior_mean=None,
) -> _Scene:
    """Assemble the scene's normal equations from stamp overlaps (see `scene_photometry`).

    ``previous``: a scene of the same image, sky, noise and PRF. Its terms are reused for
    every source at the same index, position and table: the scenes of one `scene_photometry`
    call differ only in the bright sources moved onto their light and their gradients.

    ``prior_sigma`` and ``prior_mean`` (per source of ``x``; sigma infinite for none): a
    Gaussian prior N(mean, sigma^2) on each source's coefficient. It adds 1 / sigma^2 to the
    unknown's diagonal and mean / sigma^2 to its right-hand side: in the scaled unknowns,
    scale^2 / sigma^2 and scale mean / sigma^2.
    """
    ny, nx = image.shape
    half = prf_table.half_size
    col = np.rint(x)
    row = np.rint(y)
    with np.errstate(invalid="ignore"):
        touching = (col >= -half) & (col <= nx - 1 + half) & (row >= -half) & (row <= ny - 1 + half)
    modelled = np.flatnonzero(touching)
    # Strips one stamp high, each read along x, keep overlapping stamps close in memory (and
    # are the order `overlapping_pairs` scans): sorted by one integer key, strip then column
    # (as a lexsort of the two, in 0.13 ms instead of 0.34 for 4,000 sources).
    size = 2 * half + 1
    key = col[modelled].astype(np.int64)
    strip = np.floor(row[modelled] / size).astype(np.int64)
    if modelled.size:
        low = key.min()
        key = (strip - strip.min()) * (key.max() - low + 1) + key - low
    modelled = modelled[np.argsort(key, kind="stable")]
    unknown_of_source = np.full(x.size, -1, dtype=np.intp)
    unknown_of_source[modelled] = np.arange(modelled.size)
    m_col = col[modelled].astype(np.intp)
    m_row = row[modelled].astype(np.intp)
    padded = _pixel_arrays(image, sky, sigma, margin=2 * half) if previous is None else previous.padded
    old = _previous_unknowns(previous, modelled, x, y, tables, profile)
    # Room for the later fits' stamps too (moved and resized sources, gradients: 2.35-2.53
    # times the scene's sources in the realistic bench's irac1, 1.25-1.51 in other bands), as
    # growing the pool copies it.
    pool = _StampPool(2 * half + 1, 3 * modelled.size) if previous is None else previous.pool
    slots, rhs, diagonal, covered = _source_terms(
        tables, profile[modelled], x[modelled], y[modelled], m_col, m_row, padded, cutout_size // 2, pool, previous, old
    )
    pairs = first, second, values = _overlap_couplings(pool.stamps, slots, m_col, m_row, half, previous, old)
    terms = _Terms(x[modelled], y[modelled], tables, profile[modelled], rhs, diagonal, pairs, None)

    n_source = modelled.size
    centres = np.column_stack([m_col, m_row]).astype(np.float64)
    extents = np.zeros(n_source)
    tile_of_pixel = None
    if fit_sky:
        tile_of_pixel = _tile_of_pixel((ny, nx), cutout_size) if previous is None else previous.tile_of_pixel
        terms.sky = sources, tiles, sky_values, tile_diagonal, tile_rhs, n_tile_cols = _sky_couplings(
            pool.stamps, slots, m_col, m_row, padded, tile_of_pixel, cutout_size, half, previous, old
        )
        first = np.concatenate([first, sources])
        second = np.concatenate([second, n_source + tiles])
        values = np.concatenate([values, sky_values])
        diagonal = np.concatenate([diagonal, tile_diagonal])
        rhs = np.concatenate([rhs, tile_rhs])
        tile_rows, tile_cols = np.divmod(np.arange(tile_diagonal.size), n_tile_cols)
        tile_centres = np.column_stack([tile_cols, tile_rows]) * cutout_size + (cutout_size - 1) / 2
        centres = np.vstack([centres, tile_centres])
        extents = np.concatenate([extents, np.full(tile_diagonal.size, cutout_size / 2)])

    # Unknowns that touch no usable pixel have an all-zero row: decouple them with a unit
    # diagonal. Scaling to a unit diagonal makes the ridge relative and the factorisation
    # insensitive to the many decades of source brightness.
    unconstrained = diagonal <= 0
    scale = 1.0 / np.sqrt(np.where(unconstrained, 1.0, diagonal))
    rhs = np.where(unconstrained, 0.0, rhs) * scale
    n_unknown = diagonal.size
    prior = None
    if prior_sigma is not None:
        prior = np.zeros(n_unknown)
        prior[:n_source] = (scale[:n_source] / prior_sigma[modelled]) ** 2
        if prior_mean is not None:
            rhs[:n_source] += scale[:n_source] * prior_mean[modelled] / prior_sigma[modelled] ** 2
    unit_diagonal = np.full(n_unknown, 1.0 + _RIDGE) if prior is None else (1.0 + _RIDGE) + prior
    normal = sparse.csr_matrix(symmetric_csr(n_unknown, unit_diagonal, first, second, values, scale), shape=(n_unknown, n_unknown))
    normal.has_sorted_indices = True
    return _Scene(
        normal, rhs, scale, unconstrained, covered, unknown_of_source, n_source, centres, extents,
        modelled, m_col, m_row, slots, pool, padded, tile_of_pixel, terms, prior,
    )


def _tile_view(scene: _Scene, padded_image):
    """The image part of a padded array (the sky tiles' pixels)."""
    margin = (padded_image.shape[0] - scene.tile_of_pixel.shape[0]) // 2
    return padded_image[margin : padded_image.shape[0] - margin, margin : padded_image.shape[1] - margin]


def _whitened_model(scene: _Scene, solution, wings=None, wing_image=None):
    """The fitted model of the scene's data over the noise, on the padded grid; with ``wings``,
    their image of the solution's fluxes, or ``wing_image`` where given."""
    flux = solution * scene.scale
    model = np.zeros_like(scene.padded[0])
    add_stamps(scene.weighted, scene.slots, scene.col, scene.row, flux[: scene.n_source], model)
    if scene.tile_of_pixel is not None:
        add_tile_levels(_tile_view(scene, model), scene.tile_of_pixel, flux[scene.n_source :], _tile_view(scene, scene.padded[1]))
    if wings is not None:
        model += wings.image(flux[: scene.n_source]) if wing_image is None else wing_image
    return model


class _Wings:
    """The PRF wings of a scene's modelled sources, over the noise, on the padded grid.

    `image` spreads each flux over the 4 x 4 pixels around its source (`point_weights`: the
    kernel is interpolated to the source's sub-pixel position by cubic convolution) and
    convolves with the wing kernel; `adjoint` is its transpose. ``fitted_image``: the image
    that the final fit of the cores was made against (`_solve_with_wings`), None if unknown.

    The convolutions are those of ``scipy.signal.fftconvolve(..., mode="same")``, with the
    kernel's transforms computed once rather than at every product, and on a periodic grid
    only half a kernel larger than the image: the wrap-around then lands outside the part
    that is kept. They are computed in single precision, in half the time: their rounding
    (about 1e-7 of the brightest wing) is far below the tenth of a sigma the wings' fits
    stop at.
    """

    def __init__(self, kernel, x, y, sqrt_weight, margin, with_wings):
        self.sqrt_weight = sqrt_weight
        # "same" keeps the full convolution from the kernel's centre on; a period as long as
        # what is left of the full convolution never folds the kept part onto itself.
        self.centre = tuple((k - 1) // 2 for k in kernel.shape)
        self.fft_shape = tuple(
            sp_fft.next_fast_len(n + k - 1 - c, real=True) for n, k, c in zip(sqrt_weight.shape, kernel.shape, self.centre)
        )
        self.kernel = np.asarray(kernel, dtype=np.float32)
        self.kernel_transform = self._transform(self.kernel)
        # Only the conjugate gradients' fallback takes the adjoint: its transform when needed.
        self.flipped_transform = None
        self.fitted_image = None
        # Only the sources with wings are placed (a position step's gradients, a third of
        # irac1's bright scenes' unknowns, have none).
        self.n_source = x.size
        self.sources = np.flatnonzero(with_wings)
        shape = sqrt_weight.shape
        rows, cols, shares = point_weights(x[self.sources], y[self.sources])
        rows, cols = rows + margin, cols + margin
        inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        self.indices = np.where(inside, rows * shape[1] + cols, 0)
        self.shares = np.where(inside, shares, 0.0)

    def _transform(self, kernel):
        """``rfft2(kernel, fft_shape)``, the rows' transforms taken of the kernel's own rows
        only (the same numbers in a third of the time: the padding rows are zeros)."""
        return sp_fft.fft(sp_fft.rfft(kernel, n=self.fft_shape[1], axis=1), n=self.fft_shape[0], axis=0)

    def image(self, flux):
        weights = self.shares * flux[self.sources]
        points = np.bincount(self.indices.ravel(), weights.ravel(), minlength=self.sqrt_weight.size)
        return self._convolve(points.reshape(self.sqrt_weight.shape), self.kernel_transform) * self.sqrt_weight

    def adjoint(self, image):
        if self.flipped_transform is None:
            self.flipped_transform = self._transform(self.kernel[::-1, ::-1])
        correlated = self._convolve(image * self.sqrt_weight, self.flipped_transform).ravel()
        result = np.zeros(self.n_source)
        result[self.sources] = (correlated[self.indices] * self.shares).sum(axis=0)
        return result

    def _convolve(self, image, kernel_transform):
        """``image`` convolved with the kernel whose transform is given, "same" mode.

        The image is cast straight into the zero-padded periodic grid and the kernel's
        transform multiplies in place: the same products as padding by `rfft2`, with two
        image-sized temporaries fewer."""
        padded = np.zeros(self.fft_shape, dtype=np.float32)
        padded[: image.shape[0], : image.shape[1]] = image
        spectrum = sp_fft.rfft2(padded, overwrite_x=True)
        spectrum *= kernel_transform
        full = sp_fft.irfft2(spectrum, self.fft_shape, overwrite_x=True)
        (row, col), (n_row, n_col) = self.centre, image.shape
        return full[row : row + n_row, col : col + n_col]


def _solve_with_wings(scene: _Scene, solver: _Solver, prf_table, x, y, shape, cores, n_catalogue):
    """The scene's solution with its PRFs whole: cores as stamps, wings by FFT (`_Wings`).

    Without wings, the normal equations of the cores. With them, C the cores and G the
    wings, the fluxes that fit the data less their own wings, C^T W C f = C^T W (d - G f),
    by fixed-point steps from the cores' solution (``cores``, scaled unknowns, where the
    caller knows it; else solved here): each step one wing image and a warm fit of the
    cores. Where the steps do not shrink fast, the full least-squares problem
    (C + G)^T W (C + G) f = (C + G)^T W d, solved by conjugate gradients with the operator
    applied through images (stamps and FFTs) and the cores' subdomain factorisations as the
    preconditioner. Returns the solution (scaled unknowns) and the `_Wings` (None without
    wings). Only the first ``n_catalogue`` sources of ``x`` have wings: the others are a
    position step's gradients (`_position_shifts`).
    """
    if prf_table.wings is None:
        return solver.solve(scene.rhs, start=cores), None
    solution = solver.solve(scene.rhs, tolerance=_STEP_TOLERANCE) if cores is None else cores
    # `_pixel_arrays` pads by two stamp half-widths.
    ny, nx = shape
    with np.errstate(invalid="ignore"):
        on_image = (scene.col >= 0) & (scene.col < nx) & (scene.row >= 0) & (scene.row < ny)
    with_wings = (
        on_image & (scene.covered >= MIN_COVERED_FRACTION) & ~scene.unconstrained[: scene.n_source]
        & (scene.modelled < n_catalogue)
    )
    wings = _Wings(prf_table.wings, x[scene.modelled], y[scene.modelled], scene.padded[1], 2 * prf_table.half_size, with_wings)
    n_source = scene.n_source

    def cores_adjoint(image):
        """(C, S)^T W times a model image given whitened: the cores' and sky tiles' rows."""
        return np.concatenate([
            stamp_dots(scene.weighted, scene.slots, scene.col, scene.row, image),
            tile_dots(
                scene.tile_of_pixel, _tile_view(scene, scene.padded[1]), _tile_view(scene, image), scene.rhs.size - n_source
            ) if scene.tile_of_pixel is not None else np.empty(0),
        ])

    def normal_product(solution):
        # Unknowns on no usable pixel are decoupled (a unit row of their own), as in A.
        model = _whitened_model(scene, np.where(scene.unconstrained, 0.0, solution), wings)
        product = cores_adjoint(model)
        product[:n_source] += wings.adjoint(model)
        product = np.where(scene.unconstrained, 0.0, product * scene.scale)
        product += np.where(scene.unconstrained, 1.0, _RIDGE) * solution
        return product if scene.prior is None else product + scene.prior * solution

    # Fixed-point steps: each a warm fit of the cores (a few sparse products) and one wing
    # image, where a product of the full problem costs two wing images and the stamps. The
    # full least squares would weigh the wing pixels too, but they hold a small share of
    # the light at low signal to noise, and the flux errors are the cores' anyway: on the
    # realistic bench field the fluxes are within 0.11 sigma of it in IRAC (99 % within
    # 0.04) and 0.23 in NUV (0.08), irac1's scenes needing 3 wing images instead of 10.
    flux_scale = scene.scale[:n_source]
    last_change = np.inf
    for _ in range(_WING_STEPS):
        wing_image = wings.image(solution[:n_source] * flux_scale)
        wing_light = cores_adjoint(wing_image) * scene.scale
        step = solver.solve(scene.rhs - np.where(scene.unconstrained, 0.0, wing_light), start=solution, tolerance=_STEP_TOLERANCE)
        change = np.max(np.abs(step - solution), initial=0.0)
        if not change < _WING_CONTRACTION * last_change:
            break
        solution = step
        # The steps shrink geometrically: what they would still change after this one is
        # about change * ratio / (1 - ratio), the ratio that of the last two changes (after
        # the first step, unknown: its change).
        ratio = change / last_change
        still_to_change = change if ratio == 0.0 else change * ratio / (1.0 - ratio)
        if still_to_change < _WING_TOLERANCE:
            # The quality metrics' model takes the wings this fit subtracted, made from the
            # fluxes one step back, rather than a wing image more: on the realistic bench
            # field the fluxes moved by at most 1.6e-4 sigma (NUV 2e-5), rchisq by 0.4 %.
            wings.fitted_image = wing_image
            return solution, wings
        last_change = change
    # Steps that shrink slowly or grow (where a source's wings outweigh what its core sees:
    # its core off the data, say) leave it to the full least-squares problem, solved by
    # conjugate gradients from the last good step.
    wing_rhs = np.zeros_like(scene.rhs)
    wing_rhs[:n_source] = wings.adjoint(scene.padded[0]) * scene.scale[:n_source]
    rhs = scene.rhs + np.where(scene.unconstrained, 0.0, wing_rhs)
    return solver.solve(rhs, normal_product, start=solution, tolerance=_WING_TOLERANCE), wings


def _profiles(prf_table, extended, n_source):
    """All tables and each source's index into them (0: the point PRF)."""
    if extended is None:
        return _Tables([prf_table]), np.zeros(n_source, dtype=np.intp)
    tables, index = extended
    if any(t.half_size != prf_table.half_size or t.phases.size != prf_table.phases.size for t in tables):
        raise ValueError("extended profiles need the point PRF's stamp size and phases")
    return _Tables([prf_table, *tables]), np.asarray(index, dtype=np.intp) + 1


def extended_profiles(prf, oversampling, radii_pix, prf_table: PRFTable, flux_fraction: float = 1.0) -> list:
    """Tables of the PRF convolved with exponential discs of half-light radii ``radii_pix``
    (image pixels), for `scene_photometry`'s ``extended``: `disc_tables` of `disc_images`."""
    return disc_tables(disc_images(prf, oversampling, radii_pix), oversampling, prf_table, flux_fraction)


def disc_images(prf, oversampling, radii_pix) -> list:
    """The PRF convolved with exponential discs of half-light radii ``radii_pix`` (image
    pixels), on the PRF's own grid.

    The convolution is GalSim's (the PRF as an interpolated image, drawn without a further
    pixel since it holds the pixel already).
    """
    import galsim

    fine = 1.0 / oversampling
    image = galsim.InterpolatedImage(galsim.Image(np.asarray(prf, dtype=np.float64) / oversampling**2, scale=fine))
    return [
        galsim.Convolve(galsim.Exponential(half_light_radius=float(radius)), image)
        .drawImage(nx=prf.shape[1], ny=prf.shape[0], scale=fine, method="no_pixel").array
        for radius in radii_pix
    ]


def disc_tables(images, oversampling, prf_table: PRFTable, flux_fraction: float = 1.0) -> list:
    """Stamp tables of `disc_images` (or of any profiles, such as the PRF's variants) with the
    point table's stamp size and phases; each puts ``flux_fraction`` of its disc's flux on
    the image, as ``prf_table`` does of a point source's (`mbphot.photometry._prf.tabulate_prf`).

    Where the point table has wings, the engine adds them to every source, a disc's
    included: each table's stamps are then its profile less the placed wings
    (`mbphot.engine.prf.placed_wings`), so that a source's model is its profile over the
    whole stamp and the point PRF's wings beyond (a disc of an arcsecond changes those
    little). The images are cut to the stamps' reach first, which keeps this quick for PRFs
    with far wings. The stamps have the point table's type.
    """
    half_size, phases = prf_table.half_size, prf_table.phases
    reach = (half_size + _DISC_MARGIN_PIX) * oversampling
    wings = None if prf_table.wings is None else placed_wings(prf_table.wings, phases, half_size)
    tables = []
    for drawn in images:
        centre_y, centre_x = drawn.shape[0] // 2, drawn.shape[1] // 2
        cut = drawn[max(0, centre_y - reach) : centre_y + reach + 1, max(0, centre_x - reach) : centre_x + reach + 1]
        normalised = normalise_prf(cut, oversampling)
        stamps = spline_stamps(
            ndimage.spline_filter(normalised, order=3, mode="constant"), prf_centre(normalised), oversampling, phases,
            half_size, flux_fraction * cut.sum() / drawn.sum(), wings, prf_table.stamps.dtype,
        )
        tables.append(PRFTable(stamps, phases, half_size))
    return tables


# Pixels of a disc image kept beyond the stamps, for the spline interpolation at their edge.
_DISC_MARGIN_PIX = 3


def _size_derivatives(tables, first, stop) -> list:
    """For the size sequence ``tables[first:stop]`` (equal log spacing), each profile's
    derivative with respect to its size in units of the spacing (bins): central differences
    of its neighbours' tables, one-sided at the ends. A table has no wings of its own: every
    size has the point PRF's (`disc_tables`)."""
    derivatives = []
    for k in range(first, stop):
        low, high = max(k - 1, first), min(k + 1, stop - 1)
        difference = (tables[high].stamps - tables[low].stamps) / max(high - low, 1)
        derivatives.append(PRFTable(difference.astype(tables[k].stamps.dtype), tables[k].phases, tables[k].half_size))
    return derivatives


class _SizeFreedom:
    """The sizes of bright resolved sources as unknowns of a scene's fits.

    A source of profile ``u_k`` (bin ``k`` of a size sequence) whose size is off by ``d`` bins
    is ``F u_k + F d u_k'`` to first order: one more unknown, the coefficient ``c = F d`` of the
    derivative profile ``u_k'`` (`_size_derivatives`), with a Gaussian prior about the
    catalogue's size ``j``: mean ``F (j - k)``, sigma ``F`` times the catalogue size's error
    in bins (the catalogue's own error and the spread of sizes within its bin, one bin wide).
    Fitted with every flux at once, the fluxes are those at the sizes the light and the
    catalogue prefer, and their variances are marginalised over the sizes, the neighbours'
    and the sky's part in it included. An error for the size alone, from an isolated
    source's fit, was 0.55-0.8 times how much the realistic bench's NUV fluxes moved with
    their catalogue sizes (their neighbours and sky tiles take up part of a size's change):
    with it, that field's (seed 23) resolved sources at S/N > 30 with neighbours (fracflux
    above 0.05) had pull sd 1.49, with the sizes unknowns 1.18 (seeds 23 and 5; with their
    true sizes in the catalogue, 1.05).

    The prior's sigma is divided by ``noise_scale`` (the flux errors' factor for correlated
    noise): the normal equations count the pixels as independent, and their variances are
    multiplied by its square.
    """

    def __init__(self, scene, solution, tables, profile, catalogue_profile, sequence, prior_sigma_bins, noise_scale):
        first, stop = sequence
        unknown = scene.unknown_of_source[: profile.size]
        free = (profile >= first) & (profile < stop) & (unknown >= 0)
        free[free] = ~scene.unconstrained[unknown[free]]
        sigma_bins = np.hypot(prior_sigma_bins, np.sqrt(1.0 / 12.0))
        derivatives = _size_derivatives(tables, first, stop)
        centre = tables[first].n_phase // 2
        sensitivity = np.array([
            abs(np.sum(d.stamps[centre, centre] * t.stamps[centre, centre], dtype=np.float64))
            / np.sum(t.stamps[centre, centre].astype(np.float64) ** 2)
            for d, t in zip(derivatives, tables[first:stop])
        ])
        # In the unit-diagonal equations a source's solution is its flux over its white error.
        snr = np.zeros(profile.size)
        snr[free] = solution[unknown[free]] / noise_scale
        free[free] = snr[free] * sensitivity[profile[free] - first] * sigma_bins > _SIZE_FREE_MIN
        self.sources = np.flatnonzero(free)
        flux = solution[unknown[self.sources]] * scene.scale[unknown[self.sources]]
        self.prior_sigma = flux * sigma_bins / noise_scale
        self.prior_mean = flux * (catalogue_profile[self.sources] - profile[self.sources])
        self.first_table = len(tables)
        self.tables = _Tables([*tables, *derivatives])
        self.derivative_profile = self.first_table + profile[self.sources] - first

    def augment(self, x, y, profile, prior_sigma, prior_mean):
        """A scene's sources (``x``, ``y``, ``profile`` into `tables`, the catalogue's first)
        with the size unknowns after them, and their priors."""
        prior_sigma = np.full(x.size, np.inf) if prior_sigma is None else prior_sigma
        prior_mean = np.zeros(x.size) if prior_mean is None else prior_mean
        return (
            np.concatenate([x, x[self.sources]]), np.concatenate([y, y[self.sources]]),
            np.concatenate([profile, self.derivative_profile]),
            np.concatenate([prior_sigma, self.prior_sigma]), np.concatenate([prior_mean, self.prior_mean]),
        )


def _position_corrections(sums, flux, diagonal, noise_scale, expected_offset_sq=None):
    """Flux corrections for catalogue positions off the light, from the residual's gradient.

    A point source fitted at a position off by delta keeps the fraction
    rho = <P(delta), P> / <P, P> ~ 1 - delta^T G delta / (2 <P, P>) of its flux (G the
    weighted Fisher matrix of the position), and leaves a residual whose projection on the
    PRF's gradient is b = flux G delta. The estimate of X = flux^2 delta^T G delta,
    b^T G^-1 b, is biased by the noise, by 2 noise_scale^2 on average: subtracting that keeps
    the correction unbiased however faint the source.

    Unbiased, but for a faint source mostly noise, so that half of them are corrected too
    little: with ``expected_offset_sq`` (per source, the catalogue's position variance per
    axis in pixels^2; 0 for a source moved onto its light) the estimate is shrunk toward
    what that variance predicts, flux^2 s^2 tr G, by the ratio of its prior variance
    (2 flux^4 s^4 tr G^2) to that plus the noise's (4 noise_scale^2 (X + noise_scale^2)). A
    faint source then loses the mean fraction s^2 tr G / (2 <P, P>) that its PRF and the
    catalogue's errors predict, a bright one what its own light shows. Returns the factor
    each flux is divided by, and the fitted offsets (pixels).
    """
    _, _, bx, by, gxx, gxy, gyy = sums.T
    determinant = gxx * gyy - gxy**2
    with np.errstate(invalid="ignore", divide="ignore"):
        quadratic = (gyy * bx**2 - 2 * gxy * bx * by + gxx * by**2) / determinant
        estimate = quadratic - 2 * noise_scale**2
        if expected_offset_sq is not None:
            prior_mean = flux**2 * expected_offset_sq * (gxx + gyy)
            prior_variance = 2 * flux**4 * expected_offset_sq**2 * (gxx**2 + 2 * gxy**2 + gyy**2)
            noise_variance = 4 * noise_scale**2 * (prior_mean + noise_scale**2)
            weight = prior_variance / (prior_variance + noise_variance)
            estimate = prior_mean + weight * (estimate - prior_mean)
        loss = 0.5 * estimate / (flux**2 * diagonal)
        offset_x = (gyy * bx - gxy * by) / (determinant * flux)
        offset_y = (gxx * by - gxy * bx) / (determinant * flux)
    loss = np.where(np.isfinite(loss), np.clip(loss, -_MAX_POSITION_LOSS, _MAX_POSITION_LOSS), 0.0)
    return 1.0 - loss, offset_x, offset_y


def _rms_width_sq(table: PRFTable) -> float:
    """Squared rms radius per axis (pixels) of the PRF's centred core stamp."""
    stamp = np.clip(table.stamp_at(0.0, 0.0), 0.0, None)
    rows, cols = np.indices(stamp.shape) - table.half_size
    return float(0.5 * ((rows**2 + cols**2) * stamp).sum() / stamp.sum())


@dataclass(frozen=True, eq=False)
class _Derivative:
    """A table's stamps differentiated with respect to the source's position along ``axis``
    (1: x, 2: y), per pixel, as `kernels.weighted_stamps` computes them from the table (central
    differences between its phases): a scene's gradient unknowns are sources with these
    profiles. Differencing whole tables at every position step cost a seventh of an IRAC fit."""

    table: PRFTable
    axis: int

    @property
    def stamps(self):
        return self.table.stamps

    @property
    def phases(self):
        return self.table.phases

    @property
    def half_size(self):
        return self.table.half_size


def _position_shifts(solve, tables, profile, x, y, candidates, max_shift_pix, prior=None, start=None, final=False):
    """Per source of ``x``, the shift (pixels) onto its light: for the ``candidates`` whose
    fitted S/N is above `_SHIFT_MIN_SNR`, at most ``max_shift_pix`` long; zero for the others.

    ``start`` (shift_x, shift_y): the shifts of a previous step, from which this one goes on
    (a Gauss-Newton step: the derivatives are those at the shifted positions).

    Each candidate gets two more unknowns, the coefficients of its profile's x and y
    derivatives, and the scene's cores are solved with them:
    F P(x + d) ~ F P(x) + F d . grad P, so d = coefficient / F. Fitted with every flux at
    once, a neighbour cannot take up the light a bright source's offset leaves: at GALEX
    crowding, the residual's projection on one source's gradient with its neighbours' fluxes
    held recovers about half of the offset.

    ``prior`` (flux, position_error_pix): per candidate its flux, and the catalogue's position
    error in pixels; their product is the prior sigma of its coefficients. It makes the offsets
    the most probable ones rather than the best fitting: a source whose light cannot tell its
    position from its neighbours' is moved little, and none is moved where the catalogue is
    exact.

    Also returns the augmented scene, its solution and its `_Wings` (None without
    candidates): its normal matrix, prior included, gives flux variances marginalised over
    the candidates' positions. The scene is a fit of the cores, or with ``final`` the whole
    fit, wings included: its fluxes are then those at the shifted positions to first order in
    this step (`scene_photometry`'s last step).
    """
    start_x, start_y = (np.zeros(x.size), np.zeros(y.size)) if start is None else start
    shift_x, shift_y = start_x.copy(), start_y.copy()
    if candidates.size == 0:
        return shift_x, shift_y, None, None, None
    x, y = x + start_x, y + start_y
    n_table = len(tables)
    augmented_tables = tables.with_gradients()
    augmented_profile = np.concatenate([profile, profile[candidates] + n_table, profile[candidates] + 2 * n_table])
    prior_sigma = prior_mean = None
    if prior is not None:
        prior_flux, position_error_pix = prior
        coefficient_sigma = np.abs(prior_flux) * position_error_pix
        prior_sigma = np.concatenate([np.full(x.size, np.inf), coefficient_sigma, coefficient_sigma])
        # The prior is on the whole offset from the catalogue: this step's coefficient (flux
        # times step) has its mean at minus the flux times the shift already taken.
        prior_mean = np.concatenate([np.zeros(x.size), -prior_flux * start_x[candidates], -prior_flux * start_y[candidates]])
    augmented, solution, wings = solve(
        np.concatenate([x, x[candidates], x[candidates]]), np.concatenate([y, y[candidates], y[candidates]]),
        augmented_tables, augmented_profile, cores_only=not final, prior_sigma=prior_sigma, prior_mean=prior_mean,
    )
    unknowns = augmented.unknown_of_source
    own = unknowns[candidates]
    along_x = unknowns[x.size + np.arange(candidates.size)]
    along_y = unknowns[x.size + candidates.size + np.arange(candidates.size)]
    fluxes = solution * augmented.scale
    # In the unit-diagonal equations a source's solution is its flux in units of its error.
    bright = (own >= 0) & (along_x >= 0) & (along_y >= 0)
    bright[bright] = np.abs(solution[own[bright]]) > _SHIFT_MIN_SNR
    flux = fluxes[own[bright]]
    with np.errstate(invalid="ignore", divide="ignore"):
        dx, dy = fluxes[along_x[bright]] / flux, fluxes[along_y[bright]] / flux
    finite = np.isfinite(dx) & np.isfinite(dy) & (flux > 0)
    dx, dy = np.where(finite, dx, 0.0), np.where(finite, dy, 0.0)
    moved = candidates[bright]
    dx, dy = start_x[moved] + dx, start_y[moved] + dy
    length = np.hypot(dx, dy)
    shrink = np.minimum(1.0, max_shift_pix / np.where(length > 0, length, 1.0))
    shift_x[moved] = dx * shrink
    shift_y[moved] = dy * shrink
    return shift_x, shift_y, augmented, solution, wings


def _size_steps(scene, solution, tables, profile, sequence, prior_sigma_bins, noise_scale):
    """Each source's profile after the bright resolved ones move along their size sequence.

    ``scene`` and ``solution``: a fit of the PRFs' cores (the wings are broad and the same for
    every size) with every source's ``profile``. ``sequence`` (first, stop): the profiles
    ``tables[first:stop]`` are sizes in increasing order at equal log spacing; each source
    with one of them, its flux at S/N above `_RESIZE_MIN_SNR`, may move by up to
    `_MAX_RESIZE_BINS` within them.

    Its neighbours held, a source's model f u_j is replaced by the best-fitting f' u_k: the
    data less the neighbours, s = r + f u_j (r the residual, all weighted), fit u_k with
    chi^2 = |s|^2 - (u_k . s)^2 / (u_k . u_k). The bin that minimises this over
    ``noise_scale``^2 plus the prior's ((k - j) / prior_sigma_bins)^2, j the catalogue's bin,
    is taken: with correlated noise (``noise_scale`` > 1, the factor of a flux's error) a
    chi^2 of the pixels overstates what they tell, and the prior would count for too little
    (on the IRAC bench field, noise_scale 2.6, the resolved sources' flux pulls at S/N > 10
    were 1.02-1.11 without the scaling, 0.96-1.02 with it). The bins are tried outwards from
    the catalogue's, each further one only where the one before it lowered this (on the
    realistic bench field's scenes, the same choices as trying every bin). Neighbours resized
    in the same step are compared against each other's old sizes: the final joint fit settles
    their fluxes. Returns the new ``profile``.
    """
    first, stop = sequence
    unknown = scene.unknown_of_source[: profile.size]
    in_sequence = (profile >= first) & (profile < stop) & (unknown >= 0)
    in_sequence[in_sequence] = ~scene.unconstrained[unknown[in_sequence]]
    # In the unit-diagonal equations a source's solution is its flux over its error from the
    # pixels' noise alone, which noise_scale scales to its flux error.
    in_sequence[in_sequence] = solution[unknown[in_sequence]] > _RESIZE_MIN_SNR * noise_scale
    resized = np.flatnonzero(in_sequence)
    if resized.size == 0:
        return profile
    own = unknown[resized]
    own_flux = solution[own] * scene.scale[own]
    own_model = own_flux[:, None, None] * scene.weighted[scene.slots[own]]
    # Off the usable pixels the whitened data and every model are 0 (their weight is).
    residual = scene.padded[0] - _whitened_model(scene, solution)
    col, row = scene.col[own], scene.row[own]
    source_x, source_y = scene.terms.x[own], scene.terms.y[own]
    catalogue = profile[resized]

    def cost_of(step, projection, diagonal):
        with np.errstate(invalid="ignore", divide="ignore"):
            explained = np.where(diagonal > 0, projection**2 / diagonal, -np.inf)
        return (step / prior_sigma_bins) ** 2 - explained / noise_scale**2

    cost = np.full((2 * _MAX_RESIZE_BINS + 1, resized.size), np.inf)
    # The catalogue's bin is the scene's own stamp: u_j . s = u_j . r + f u_j . u_j.
    own_diagonal = scene.terms.diagonal[own]
    own_projection = stamp_dots(scene.weighted, scene.slots[own], col, row, residual) + own_flux * own_diagonal
    cost[_MAX_RESIZE_BINS] = cost_of(0, own_projection, own_diagonal)
    for step in sorted(range(-_MAX_RESIZE_BINS, _MAX_RESIZE_BINS + 1), key=abs)[1:]:
        candidate = catalogue + step
        eligible = (candidate >= first) & (candidate < stop)
        if abs(step) > 1:
            # A bin further out only where the one before it lowered the cost: a source's
            # chi^2 changes smoothly with its size, and the prior's cost grows as the square.
            nearer = _MAX_RESIZE_BINS + step - np.sign(step)
            eligible &= cost[nearer] < cost[nearer - np.sign(step)]
        inside = np.flatnonzero(eligible)
        if inside.size == 0:
            continue
        trial = _StampPool(scene.weighted.shape[1], inside.size)
        slots, _, diagonal, _ = _source_terms(
            tables, candidate[inside], source_x[inside], source_y[inside], col[inside], row[inside], scene.padded,
            tables[0].half_size, trial,
        )
        projection = stamp_dots(trial.stamps, slots, col[inside], row[inside], residual) + np.einsum(
            "nij,nij->n", trial.stamps, own_model[inside]
        )
        cost[step + _MAX_RESIZE_BINS, inside] = cost_of(step, projection, diagonal)
    new_profile = profile.copy()
    new_profile[resized] = catalogue + np.argmin(cost, axis=0) - _MAX_RESIZE_BINS
    return new_profile


def scene_photometry(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    targets: np.ndarray,
    prf_table: PRFTable,
    cutout_size: int,
    sky,
    sigma,
    fit_sky: bool = False,
    *,
    noise_scale: float = 1.0,
    prf_error: float = 0.0,
    pixel_error: float | None = None,
    neighbour_error: float | None = None,
    correct_positions: bool = True,
    max_shift_pix: float = 0.0,
    position_error_pix: float | None = None,
    extended=None,
    sizes=None,
    return_positions: bool = False,
    return_profiles: bool = False,
):
    """Forced PRF photometry of ``targets``, fitting every source on the image at once.

    Same inputs, outputs and flags as `forced_photometry`, but a single fit: every source
    whose PRF stamp reaches the image gets a free flux and every usable pixel of the image is
    data (see the module docstring for the solver). Pass the image section that holds the
    targets plus a margin for their neighbours: the whole section is fitted, however few the
    targets.

    Parameters
    ----------
    image : ndarray
        The image region (any linear unit), NaN where there is no data. It is read whole.
    x, y : ndarray
        0-based pixel positions of *every* catalogue source on this image (pixel centres at
        integers). Every source whose stamp touches the image is modelled.
    targets : ndarray of int
        Indices into ``x``/``y`` of the sources to report.
    prf_table : PRFTable
        The band's PRF, see `build_prf_table`. With wings (``core_radius``), the cores are
        fitted and the wings subtracted iteratively (`_solve_with_wings`).
    cutout_size : int
        Odd side, in pixels, of the per-source engine's cutout. Here it only (a) defines the
        coverage flags exactly as the per-source engine does (``partial_coverage`` when the
        target's cutout leaves the image or its stamp within the cutout has masked pixels,
        ``no_data`` when less than half of that stamp flux is on usable pixels) and (b) sets
        the side of the sky tiles when ``fit_sky`` is True, so the sky has about the freedom
        of one constant per cutout.
    sky : ndarray or float
        Sky level per pixel (same shape as ``image``) or one value, subtracted before the fit.
    sigma : ndarray or float
        Per-pixel noise (1-sigma), same shape as ``image`` or one value.
    fit_sky : bool
        Also fit one constant sky offset per ``cutout_size`` square tile of the image (tiles
        aligned on pixel 0), on top of ``sky``; its covariance with the fluxes enters the
        uncertainties.
    noise_scale, prf_error : float
        Added to the uncertainties, see `mbphot.engine.solve.total_variance`.
    pixel_error : float or ndarray, optional
        ``rchisq`` counts each pixel's residual against its noise and ``pixel_error`` times
        its model: how well the PRF model fits a point source pixel by pixel
        (`mbphot.calibration.Calibration.pixel_error`); one value, or one per source of ``x``
        (a source fitted with a variant of the PRF, `mbphot.engine.variation`, is fitted
        better than with the mean PRF). Default ``prf_error``.
    neighbour_error : float, optional
        Fractional error of the light the neighbours' models put into a target's profile
        (`mbphot.engine.solve.total_variance`; `mbphot.calibration.Calibration.neighbour_error`).
        Default ``pixel_error``. A neighbour whose position is fitted (``max_shift_pix``) has
        its ``pixel_error`` instead: the target's variance is marginalised over its position.
    correct_positions : bool
        Correct each target's flux for the offset of its catalogue position from its light,
        measured from the residuals (`_position_corrections`).
    max_shift_pix : float
        When positive, sources bright enough to measure their own position and to show an
        offset of ``position_error_pix`` (S/N above `_SHIFT_MIN_SNR` in a fit of the PRFs'
        cores, and above the PRF's rms width over that error) are moved onto their light, by at most
        this many pixels (the prior: the catalogue's position error), their offsets fitted
        with every flux at once (`_position_shifts`) in Gauss-Newton steps, the last of
        which is the final fit. Fainter sources keep their catalogue positions and the flux
        correction above.
    position_error_pix : float, optional
        The catalogue positions' error per axis (pixels), e.g.
        `mbphot.calibration.Calibration.position_scatter_arcsec`: a Gaussian prior on the
        offsets, so that a source is moved by what its light tells against that error (see
        `_position_shifts`), and the flux each unmoved source is expected to lose to its
        offset (`_position_corrections`). None: no prior, the offsets that fit best.
    extended : (list of PRFTable, ndarray of int), optional
        Resolved sources: tables of the PRF convolved with each galaxy profile (same
        ``half_size``, phases and wings as ``prf_table``; `extended_profiles`), and for each
        source of ``x`` the index of its table, -1 for a point source.
    sizes : (int, int, float), optional
        ``(first, stop, prior_sigma_bins)``: the tables ``extended[0][first:stop]`` are one
        sequence of sizes (increasing, equally spaced in log size), and ``prior_sigma_bins``
        the catalogue size's error in units of that spacing. Sources with one of these
        profiles and S/N above `_RESIZE_MIN_SNR` may move up to `_MAX_RESIZE_BINS` bins
        within the sequence, where the fit of their light (its chi^2 over ``noise_scale``^2)
        and a Gaussian prior about the catalogue's bin prefer it (`_size_steps`); the scene
        is then fitted with the new profiles, and the sources whose size error matters to
        their flux (`_SIZE_FREE_MIN`) with their sizes as unknowns under that prior
        (`_SizeFreedom`): their fluxes are those at the fitted sizes, their errors
        marginalised over them. Other profiles (e.g. PRF variants before ``first``) never
        change.
    return_positions : bool
        Also return the positions of every source of ``x`` as fitted (moved by
        ``max_shift_pix``).
    return_profiles : bool
        Also return each source's profile as fitted (index into ``extended``'s tables, -1 for
        the point PRF; changed by ``sizes``).

    Returns
    -------
    Measurement
        Fluxes (image unit times pixels, since the PRF sums to one), uncertainties (see
        `_local_variances` for their accuracy), flags and quality metrics of the targets.
    x, y : ndarray
        With ``return_positions``: the fitted positions.
    profiles : ndarray of int
        With ``return_profiles``: the fitted profiles.
    """
    pixel_error = prf_error if pixel_error is None else pixel_error
    neighbour_error = float(np.max(pixel_error)) if neighbour_error is None else neighbour_error
    source_pixel_error = np.broadcast_to(np.asarray(pixel_error, dtype=np.float64), np.shape(x))
    x, y, targets, result, measured = start_measurement(image.shape, x, y, targets, cutout_size)

    def outputs(result, x, y, profile):
        extra = ((x, y) if return_positions else ()) + ((profile - 1,) if return_profiles else ())
        return (result, *extra) if extra else result

    if sizes is not None and extended is None:
        raise ValueError("sizes needs the extended profiles")
    if measured.size == 0:
        return outputs(result, x, y, _profiles(prf_table, extended, x.size)[1])
    ny, nx = image.shape
    half = prf_table.half_size
    half_cutout = cutout_size // 2
    col = np.rint(x)
    row = np.rint(y)

    tables, profile = _profiles(prf_table, extended, x.size)

    # The last fit's scene and solution: the next fit reuses the terms of the sources that did
    # not move, and starts from its fluxes. (Not its factorisations: kept alive through the
    # next assembly they double a GALEX fit's peak memory.)
    last_fit = None, None
    n_catalogue = x.size
    size_freedom = None

    def solve(x, y, tables=tables, profile=profile, cores_only=False, prior_sigma=None, prior_mean=None):
        nonlocal last_fit
        previous, previous_solution = last_fit
        if size_freedom is not None:
            x, y, profile, prior_sigma, prior_mean = size_freedom.augment(x, y, profile, prior_sigma, prior_mean)
        scene = _normal_equations(
            image, x, y, prf_table, cutout_size, sky, sigma, fit_sky, tables, profile, previous, prior_sigma, prior_mean
        )
        subdomains = _subdomains(scene.centres, scene.extents, image.shape, half, scene.n_source)
        solver = _Solver(scene.normal, subdomains, scene.centres)
        start = None
        if previous is not None:
            # The last fit's fluxes are those at these positions to first order in the moves.
            # Each unknown's counterpart there is found by catalogue index (sky tiles alike); a
            # position step's gradients start at zero, the step being what is left to move.
            known = np.full(x.size, -1, dtype=np.intp)
            common = min(n_catalogue, x.size, previous.unknown_of_source.size)
            known[:common] = previous.unknown_of_source[:common]
            n_tile = scene.normal.shape[0] - scene.n_source
            old_of_new = np.concatenate([known[scene.modelled], previous.n_source + np.arange(n_tile)])
            mapped = (old_of_new >= 0) & ~scene.unconstrained
            start = np.zeros(scene.normal.shape[0])
            start[mapped] = previous_solution[old_of_new[mapped]] * previous.scale[old_of_new[mapped]] / scene.scale[mapped]
        if cores_only:
            solution = solver.solve(scene.rhs, start=start, tolerance=_STEP_TOLERANCE)
            last_fit = scene, solution
            return scene, solution, None
        return (scene, *_solve_with_wings(scene, solver, prf_table, x, y, image.shape, start, n_catalogue))

    if max_shift_pix > 0 or sizes is not None:
        # Which sources are bright enough to move or resize, and where to, the PRFs' cores
        # tell: their wings (broad and smooth, the same for every size) are left for the
        # final fit.
        first, first_solution = solve(x, y, cores_only=True)[:2]
    if sizes is not None:
        # Sizes first: a disc fitted at the wrong size leaves a residual that the position
        # steps would take up by moving it and its neighbours (in pairs of discs 1.5 FWHM
        # apart, sizes chosen after the position steps left fluxes 12 % off, against 1.5 %).
        first_size, stop_size, prior_sigma_bins = sizes
        catalogue_profile = profile
        profile = _size_steps(
            first, first_solution, tables, profile, (first_size + 1, stop_size + 1), prior_sigma_bins, noise_scale
        )
        size_freedom = _SizeFreedom(
            first, first_solution, tables, profile, catalogue_profile, (first_size + 1, stop_size + 1), prior_sigma_bins,
            noise_scale,
        )
        tables = size_freedom.tables
    if max_shift_pix > 0:
        width_sq = _rms_width_sq(prf_table)
        min_snr = _SHIFT_MIN_SNR
        if position_error_pix is not None:
            # An exact catalogue: nothing to move.
            min_snr = max(min_snr, np.sqrt(width_sq) / position_error_pix) if position_error_pix > 0 else np.inf
        bright = np.abs(first_solution[: first.n_source]) > min_snr
        candidates = first.modelled[bright]
        prior = None
        if position_error_pix is not None:
            prior = (first_solution[: first.n_source][bright] * first.scale[: first.n_source][bright], position_error_pix)
        shift_x, shift_y = np.zeros(x.size), np.zeros(y.size)
        snr = np.abs(first_solution[: first.n_source][bright])
        # The last step is the final fit: its fluxes, fitted with the step's position
        # derivatives, are those at the positions it moves to, to first order in a move of
        # about shift^2 / width (the move of the step before).
        for step in range(_SHIFT_STEPS):
            last = step == _SHIFT_STEPS - 1
            step_x, step_y = x + shift_x, y + shift_y
            shift_x, shift_y, augmented, solution, wings = _position_shifts(
                solve, tables, profile, x, y, candidates, max_shift_pix, prior, (shift_x, shift_y), final=last
            )
            if last or not np.any(snr * (shift_x[candidates] ** 2 + shift_y[candidates] ** 2) / width_sq > _NEXT_STEP_MIN):
                break
        fitted_x, fitted_y = x + shift_x, y + shift_y
        x, y = (step_x, step_y) if last and augmented is not None else (fitted_x, fitted_y)
        col, row = np.rint(x), np.rint(y)
    else:
        augmented, last = None, False
        candidates = np.zeros(0, dtype=np.intp)
    moved = np.zeros(x.size, dtype=bool)
    moved[candidates] = True
    if last and augmented is not None:
        scene = augmented
    else:
        fitted_x, fitted_y = x, y
        scene, solution, wings = solve(x, y, tables, profile)
    target_unknowns = scene.unknown_of_source[targets[measured]]
    scale = scene.scale[target_unknowns]
    fitted = solution[target_unknowns] * scale
    # The stamp-overlap reach: every unknown coupled to a target is in its block. A sky tile
    # also links a target to every source in the tile, through the tile, which is in the
    # block: a quarter tile more keeps most of these (see `_local_variances`).
    halo = 2 * half + (cutout_size // 4 if fit_sky else 0)
    variance = np.empty(target_unknowns.size)
    marginal = np.zeros(target_unknowns.size, dtype=bool)
    if augmented is not None:
        # A bright neighbour's position is known only to its prior: where its light and a
        # target's are hard to tell apart, moving it moves light between them. The variance
        # with its offsets as unknowns (same unit-diagonal scaling) is marginalised over them.
        moved_unknowns = augmented.unknown_of_source[targets[measured]]
        marginal = moved_unknowns >= 0
        cell_size, compiled = _variance_cells(augmented.n_source / (ny * nx), halo)
        variance[marginal] = _local_variances(
            augmented.normal, augmented.centres, augmented.extents, moved_unknowns[marginal], cell_size, halo, compiled,
        )
    if not marginal.all():
        cell_size, compiled = _variance_cells(scene.n_source / (ny * nx), halo)
        variance[~marginal] = _local_variances(
            scene.normal, scene.centres, scene.extents, target_unknowns[~marginal], cell_size, halo, compiled,
        )
    variance = variance * scale**2

    # Quality metrics from the residual of the whole fit. In the scaled equations A_ii = 1,
    # so a target's neighbours put (A x)_i - x_i of light into its profile (x in sigma units).
    model = _whitened_model(scene, solution, wings, None if wings is None else wings.fitted_image)
    chi = scene.padded[0] - model  # 0 off the usable pixels, as the data and the model are
    # A position step's gradients are their sources' own model, not neighbours' light.
    real = scene.modelled < n_catalogue
    sources_only = np.zeros(solution.size)
    sources_only[: scene.n_source] = np.where(real, solution[: scene.n_source], 0.0)
    neighbour_signal = (scene.normal @ sources_only)[target_unknowns] - (1.0 + _RIDGE) * solution[target_unknowns]
    couplings = abs(scene.normal[target_unknowns][:, : scene.n_source])
    light = np.abs(sources_only[: scene.n_source])
    absolute = couplings @ light
    neighbour_light = (absolute - (1.0 + _RIDGE) * np.abs(solution[target_unknowns])) * scale
    # The light of each neighbour, times its model's fractional error: ``neighbour_error``
    # (its PRF and its catalogue position) for most, but only its pixel error for a bright
    # point source whose position was fitted, when the target's variance is marginalised over
    # that position (counted twice, the errors of IRAC1 targets whose neighbours put 0.5-2
    # times their flux into their profiles were 1.3 times their scatter). A resolved
    # neighbour's size is not marginalised: it keeps ``neighbour_error``.
    neighbour_model_error = np.full(scene.n_source, neighbour_error)
    point_like = np.ones(x.size, dtype=bool)
    if sizes is not None:
        point_like = (profile < sizes[0] + 1) | (profile >= sizes[1] + 1)
    fitted_position = np.zeros(scene.n_source, dtype=bool)
    fitted_position[real] = (moved & point_like)[scene.modelled[real]]
    neighbour_model_error[fitted_position] = source_pixel_error[scene.modelled[fitted_position]]
    own = (1.0 + _RIDGE) * np.abs(solution[target_unknowns]) * neighbour_model_error[target_unknowns]
    marginalised_light_error = (couplings @ (light * neighbour_model_error) - own) * scale
    light_error = np.where(marginal, marginalised_light_error, neighbour_error * neighbour_light)
    neighbour_flux = neighbour_signal * scale
    with np.errstate(invalid="ignore", divide="ignore"):
        fracflux = neighbour_flux / np.abs(fitted)
    target_sources = targets[measured]

    # In strip order (`kernels.weighted_stamps`), the targets being in catalogue order.
    target_col, target_row = col[target_sources].astype(np.intp), row[target_sources].astype(np.intp)
    order = np.lexsort((target_col, target_row // (2 * half + 1)))
    sums = np.empty((order.size, 7))
    phases = prf_table.phases
    sums[order] = residual_sums(
        tables.stamps, tables.base[profile[target_sources]][order], float(phases[0]), float(phases[1] - phases[0]),
        (x - col)[target_sources][order], (y - row)[target_sources][order], target_col[order], target_row[order],
        chi, model, np.ascontiguousarray(source_pixel_error[target_sources][order]), scene.padded[1], scene.padded[2],
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        rchisq = sums[:, 1] / sums[:, 0]
    if correct_positions:
        expected_offset_sq = None
        if position_error_pix is not None:
            expected_offset_sq = np.where(moved[target_sources], 0.0, position_error_pix**2)
        kept, _, _ = _position_corrections(sums, fitted, 1.0 / scale**2, noise_scale, expected_offset_sq)
        if expected_offset_sq is None:
            with np.errstate(invalid="ignore"):
                kept = np.where(np.abs(fitted) > _POSITION_MIN_SNR * noise_scale * np.sqrt(variance), kept, 1.0)
        fitted = fitted / kept
        variance = variance / kept**2
    with np.errstate(invalid="ignore"):
        blended = is_blended(neighbour_flux, fitted, noise_scale * np.sqrt(variance))
    variance = total_variance(variance, fitted, light_error, noise_scale, prf_error, 1.0)

    cutout_inside = (
        (target_col >= half_cutout) & (target_col < nx - half_cutout)
        & (target_row >= half_cutout) & (target_row < ny - half_cutout)
    )
    result = finish_measurement(
        result, measured, fitted, variance,
        scene.covered[target_unknowns], cutout_inside, scene.unconstrained[target_unknowns], rchisq, fracflux, blended,
    )
    return outputs(result, fitted_x, fitted_y, profile)
