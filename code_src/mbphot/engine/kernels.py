"""Compiled inner loops of the engine (numba), for the few steps that numpy cannot batch.

Each function here is a plain loop over arrays; numba compiles it on first use and caches
the machine code beside this file, so worker processes start without compiling again.
"""

import numpy as np
from numba import njit

__all__ = [
    "add_interpolated_stamps", "add_stamps", "add_tile_levels", "band_block", "block_members",
    "envelope_inverse_diagonals", "overlapping_pairs", "padded_pixels", "pair_overlaps", "residual_sums",
    "sample_spline", "stamp_dots", "submatrix_entries", "symmetric_csr", "tile_dots", "tile_sums", "weighted_stamps",
]


@njit(cache=True, nogil=True)
def _strip_pairs(col, row, reach, fresh, first, second):
    """Count the pairs `overlapping_pairs` finds, and write them where ``first`` and
    ``second`` have room for them (pass empty arrays to count only)."""
    n = col.size
    height = reach + 1
    count = 0
    strip = np.iinfo(np.int64).min
    low = 0
    for i in range(n):
        if row[i] // height != strip:
            strip = row[i] // height
            # The next strip's first source; the first of its sources within reach of i is
            # found from there on, and moves only on as i moves along its strip.
            low = i + 1
            while low < n and row[low] // height == strip:
                low += 1
        # The same strip: the sources after i, up to ``reach`` columns on (rows within a
        # strip are at most ``reach`` apart).
        j = i + 1
        while j < n and row[j] // height == strip and col[j] - col[i] <= reach:
            if fresh[i] or fresh[j]:
                if count < first.size:
                    first[count] = i
                    second[count] = j
                count += 1
            j += 1
        # The next strip: its sources within ``reach`` columns and rows.
        while low < n and row[low] // height == strip + 1 and col[low] < col[i] - reach:
            low += 1
        j = low
        while j < n and row[j] // height == strip + 1 and col[j] <= col[i] + reach:
            if (fresh[i] or fresh[j]) and row[j] - row[i] <= reach:
                if count < first.size:
                    first[count] = i
                    second[count] = j
                count += 1
            j += 1
    return count


@njit(cache=True, nogil=True)
def overlapping_pairs(col, row, reach, fresh):
    """Every pair of sources at most ``reach`` pixels apart along both axes of which at least
    one is ``fresh``, as (first, second) with first < second, sorted by first then second.

    The sources must be in strip order: by ``row // (reach + 1)``, then by ``col``. A source's
    partners are then a run of the sources after it in its strip and a run in the next one,
    found by scanning, in the order the sparse matrix wants them.
    """
    empty = np.empty(0, dtype=np.intp)
    count = _strip_pairs(col, row, reach, fresh, empty, empty)
    first = np.empty(count, dtype=np.intp)
    second = np.empty(count, dtype=np.intp)
    _strip_pairs(col, row, reach, fresh, first, second)
    return first, second


@njit(cache=True, nogil=True)
def padded_pixels(image, sky, sigma, margin):
    """The whitened data (image less sky, over sigma), square-root weights (1 / sigma) and
    usability of every pixel, each padded by ``margin`` zeros (False) on every side, in one
    pass. A pixel is usable where image, sky and sigma are finite and sigma is positive;
    elsewhere both values are 0. ``image``, ``sky`` and ``sigma``: arrays of one shape."""
    ny, nx = image.shape
    whitened = np.zeros((ny + 2 * margin, nx + 2 * margin))
    sqrt_weight = np.zeros((ny + 2 * margin, nx + 2 * margin))
    valid = np.zeros((ny + 2 * margin, nx + 2 * margin), dtype=np.bool_)
    for r in range(ny):
        for c in range(nx):
            data, level, noise = image[r, c], sky[r, c], sigma[r, c]
            if np.isfinite(data) and np.isfinite(level) and np.isfinite(noise) and noise > 0:
                weight = 1.0 / noise
                sqrt_weight[r + margin, c + margin] = weight
                whitened[r + margin, c + margin] = (data - level) * weight
                valid[r + margin, c + margin] = True
    return whitened, sqrt_weight, valid


@njit(cache=True, nogil=True)
def pair_overlaps(stamps, slots, col, row, first, second):
    """Dot products of pairs of square stamps placed on one pixel grid.

    Parameters
    ----------
    stamps : ndarray, shape (n_slot, size, size)
        The stamps; source i's is ``stamps[slots[i]]``, centred on pixel (``row[i]``,
        ``col[i]``) of the grid. Single-precision stamps are multiplied in double precision.
    slots : ndarray of int
        Each source's stamp.
    col, row : ndarray of int
        Pixel of each source's stamp centre.
    first, second : ndarray of int
        The pairs of sources.

    Returns
    -------
    ndarray
        For each pair, the sum over the pixels both stamps cover of the product of their
        values.
    """
    size = stamps.shape[1]
    values = np.empty(first.size)
    # Each column of the overlap summed down its rows first: the columns' sums are independent
    # and run side by side, where one running sum waits on each addition (a fifth quicker).
    column_sums = np.empty(size)
    for pair in range(first.size):
        i = first[pair]
        j = second[pair]
        # Pixel (a, b) of stamp i is pixel (a - d_row, b - d_col) of stamp j.
        d_row = row[j] - row[i]
        d_col = col[j] - col[i]
        stamp_i = stamps[slots[i]]
        stamp_j = stamps[slots[j]]
        low, high = max(d_col, 0), size + min(d_col, 0)
        width = high - low
        column_sums[:width] = 0.0
        for a in range(max(d_row, 0), size + min(d_row, 0)):
            row_i = stamp_i[a, low:high]
            row_j = stamp_j[a - d_row, low - d_col : high - d_col]
            for b in range(width):
                column_sums[b] += np.float64(row_i[b]) * np.float64(row_j[b])
        total = 0.0
        for b in range(width):
            total += column_sums[b]
        values[pair] = total
    return values


@njit(cache=True, nogil=True, inline="always")
def _phase(offset, first_phase, phase_step, n_phase):
    """The tabulated phase just below ``offset`` and the interpolation weight of the next."""
    position = min(max((offset - first_phase) / phase_step, 0.0), n_phase - 1.0)
    low = min(int(np.floor(position)), n_phase - 2)
    return low, position - low


@njit(cache=True, nogil=True, inline="always")
def _difference_taps(table, phase_y, phase_x, weight, derivative, phase_step):
    """The two stamps, and the coefficient of their difference, that give ``weight`` times
    the change of the stamp at phases (``phase_y``, ``phase_x``) per pixel of source position
    along x (``derivative`` 1) or y (2): the central difference between the neighbouring
    phases (one-sided at the first and last)."""
    last = table.shape[0] - 1
    if derivative == 1:
        high, low = min(phase_x + 1, last), max(phase_x - 1, 0)
        return table[phase_y, high], table[phase_y, low], weight / ((high - low) * phase_step)
    high, low = min(phase_y + 1, last), max(phase_y - 1, 0)
    return table[high, phase_x], table[low, phase_x], weight / ((high - low) * phase_step)


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def weighted_stamps(
    tables, table_of_source, derivative, first_phase, phase_step, offset_x, offset_y, col, row, whitened, sqrt_weight,
    valid, reach, slots, weighted, indices, rhs, diagonal, covered,
):
    """Each source's PRF stamp, interpolated between tabulated phases and multiplied by the
    square-root weights of the pixels it lands on, with its terms of the normal equations,
    written into the given arrays (in place).

    The sources are taken in the order given, whatever their tables: in a scene's strip
    order, each stamp finds most of its pixels' weights and data in the cache from its
    neighbours'. (Grouped by table, each group spread over the whole scene, irac1's stamps
    took twice as long.)

    Parameters
    ----------
    tables : numba.typed.List of ndarray, each of shape (n_phase, n_phase, size, size)
        PRF stamps at regularly spaced sub-pixel phases (see `PRFTable`), the same phases
        and size in every table.
    table_of_source : ndarray of int
        Each source's table.
    derivative : ndarray of int
        Per source, 0: its stamp; 1 or 2: the derivative of its stamp with respect to the
        source's x or y position, differenced between the table's phases.
    first_phase, phase_step : float
        The phase of the first stamp and the spacing of the phases, in pixels.
    offset_x, offset_y : ndarray
        Each source's offset from its nearest pixel centre (``col``, ``row``).
    col, row : ndarray of int
        That pixel, in a grid padded by ``size - 1`` on every side.
    whitened, sqrt_weight : ndarray
        The padded image, sky-subtracted and divided by its noise, and 1 / noise (0 where
        unusable); ``valid`` marks usable pixels.
    reach : int
        Half-side of the square (around the centre) over which the coverage is measured.
    slots : ndarray of int
        Where each source's stamp goes in ``weighted``.
    weighted : ndarray of float32, shape (n_slot, size, size)
        Stamp times sqrt(weight), rounded to single precision. The terms below are summed
        (in double precision) from the rounded values, as `pair_overlaps` sums the products
        of two stamps: the normal matrix is the exact Gram matrix of the stamps as stored,
        positive semi-definite whatever the rounding (two sources at one position included).
        The sums may be reassociated (``fastmath`` reassoc), so that they vectorise: the
        rounding of a few hundred double-precision terms in another order.
    indices : ndarray of int
        Where each source's terms go in the arrays below.
    rhs, diagonal : ndarray, shape (n_index,)
        ``weighted . whitened`` and ``weighted . weighted`` per source.
    covered : ndarray, shape (n_index,)
        Fraction of the stamp's flux within ``reach`` that falls on usable pixels (0 for a
        derivative: its source's stamp has the coverage).
    """
    n_phase = tables[0].shape[0]
    size = tables[0].shape[2]
    half = size // 2
    n_pixel = size * size
    profile = np.empty(n_pixel, dtype=np.float32)
    for source in range(col.size):
        table = tables[table_of_source[source]]
        slot = slots[source]
        low_x, weight_x = _phase(offset_x[source], first_phase, phase_step, n_phase)
        low_y, weight_y = _phase(offset_y[source], first_phase, phase_step, n_phase)
        # Bilinear weights of the four tabulated phases around the source's.
        w00, w01 = (1 - weight_y) * (1 - weight_x), (1 - weight_y) * weight_x
        w10, w11 = weight_y * (1 - weight_x), weight_y * weight_x
        # The padding is size - 1, so a stamp centred on pixel (row, col) starts at row + half.
        top = row[source] + half
        left = col[source] + half
        # The profile first, over the stamps' contiguous pixels in single precision (a loop
        # the compiler vectorises; along rows as short as IRAC's 13 pixels it did not). A
        # derivative is the same bilinear sum of central differences.
        axis = derivative[source]
        if axis == 0:
            t00, t01 = table[low_y, low_x].ravel(), table[low_y, low_x + 1].ravel()
            t10, t11 = table[low_y + 1, low_x].ravel(), table[low_y + 1, low_x + 1].ravel()
            f00, f01, f10, f11 = np.float32(w00), np.float32(w01), np.float32(w10), np.float32(w11)
            for k in range(n_pixel):
                profile[k] = f00 * t00[k] + f01 * t01[k] + f10 * t10[k] + f11 * t11[k]
        else:
            p00, m00, c00 = _difference_taps(table, low_y, low_x, w00, axis, phase_step)
            p01, m01, c01 = _difference_taps(table, low_y, low_x + 1, w01, axis, phase_step)
            p10, m10, c10 = _difference_taps(table, low_y + 1, low_x, w10, axis, phase_step)
            p11, m11, c11 = _difference_taps(table, low_y + 1, low_x + 1, w11, axis, phase_step)
            p00, p01, p10, p11 = p00.ravel(), p01.ravel(), p10.ravel(), p11.ravel()
            m00, m01, m10, m11 = m00.ravel(), m01.ravel(), m10.ravel(), m11.ravel()
            g00, g01, g10, g11 = np.float32(c00), np.float32(c01), np.float32(c10), np.float32(c11)
            for k in range(n_pixel):
                profile[k] = (
                    g00 * (p00[k] - m00[k]) + g01 * (p01[k] - m01[k]) + g10 * (p10[k] - m10[k]) + g11 * (p11[k] - m11[k])
                )
        # Then weighted and summed, row by row of the image.
        stamp = weighted[slot].ravel()
        b_sum = 0.0
        a_sum = 0.0
        for a in range(size):
            weight_row = sqrt_weight[top + a, left : left + size]
            data_row = whitened[top + a, left : left + size]
            for b in range(size):
                w = np.float32(profile[a * size + b] * weight_row[b])
                stamp[a * size + b] = w
                b_sum += w * data_row[b]
                a_sum += np.float64(w) * w
        # A derivative's coverage is never read (its source's own stamp has one).
        core_total = 0.0
        core_on_data = 0.0
        if axis == 0:
            for a in range(half - reach, half + reach + 1):
                valid_row = valid[top + a, left : left + size]
                for b in range(half - reach, half + reach + 1):
                    value = profile[a * size + b]
                    core_total += value
                    if valid_row[b]:
                        core_on_data += value
        index = indices[source]
        rhs[index] = b_sum
        diagonal[index] = a_sum
        covered[index] = core_on_data / core_total if core_total > 0 else 0.0


@njit(cache=True, nogil=True)
def tile_sums(weighted, slots, col, row, sqrt_weight, tile_size, span, n_tile_rows, n_tile_cols):
    """Each weighted stamp times the square-root weights, summed over each square sky tile.

    Parameters
    ----------
    weighted : ndarray, shape (n_slot, size, size)
        Stamps times sqrt(weight); source i's is ``weighted[slots[i]]``, centred on pixel
        (``row[i]``, ``col[i]``) of the image.
    slots : ndarray of int
        Each source's stamp.
    col, row : ndarray of int
        Image pixel of each source's stamp centre.
    sqrt_weight : ndarray
        1 / noise of the image, padded by ``size - 1`` on every side (0 off the image).
    tile_size : int
        Side of the tiles; tile (i, j) holds image rows i * tile_size ... and likewise columns.
    span : int
        Tiles per axis that a stamp can meet.
    n_tile_rows, n_tile_cols : int
        The image's tiles per column and per row.

    Returns
    -------
    sources, tiles : ndarray of int
        For each nonzero sum over a tile of the image, its source (an index into ``slots``)
        and its tile (numbered along rows), by source, then tile row, then tile column.
    values : ndarray
        The sums.
    """
    n, size = slots.size, weighted.shape[1]
    half = size // 2
    sums = np.zeros((n, span, span))
    first_tile_row = np.empty(n, dtype=np.int64)
    first_tile_col = np.empty(n, dtype=np.int64)
    # The stamp's columns in each tile column, runs between the tiles' edges: each row's sums
    # are plain runs, where a sum per pixel into its column's tile waited on the last one.
    bounds = np.empty(span + 1, dtype=np.int64)
    for source in range(n):
        stamp = weighted[slots[source]]
        top = row[source] - half
        left = col[source] - half
        first_tile_row[source] = top // tile_size
        first_tile_col[source] = left // tile_size
        bounds[0] = 0
        for t in range(1, span + 1):
            bounds[t] = min(max((first_tile_col[source] + t) * tile_size - left, 0), size)
        for a in range(size):
            tile_row = (top + a) // tile_size - first_tile_row[source]
            # The padding is size - 1, so image pixel (top + a) is padded row top + a + 2 half.
            weights = sqrt_weight[row[source] + half + a, col[source] + half : col[source] + half + size]
            stamp_row = stamp[a]
            for t in range(span):
                total = 0.0
                for b in range(bounds[t], bounds[t + 1]):
                    total += stamp_row[b] * weights[b]
                sums[source, tile_row, t] += total
    sources = np.empty(sums.size, dtype=np.intp)
    tiles = np.empty(sums.size, dtype=np.intp)
    values = np.empty(sums.size)
    k = 0
    for source in range(n):
        for a in range(span):
            for b in range(span):
                tile_row, tile_col = first_tile_row[source] + a, first_tile_col[source] + b
                if sums[source, a, b] != 0 and 0 <= tile_row < n_tile_rows and 0 <= tile_col < n_tile_cols:
                    sources[k] = source
                    tiles[k] = tile_row * n_tile_cols + tile_col
                    values[k] = sums[source, a, b]
                    k += 1
    return sources[:k], tiles[:k], values[:k]


@njit(cache=True, nogil=True)
def tile_dots(tile_of_pixel, weights, image, n_tiles):
    """Per sky tile, the sum of ``weights * image`` over its pixels (``tile_of_pixel``: each
    pixel's tile): ``np.bincount`` of the product, the same sums in the same order, without
    the image-sized temporaries."""
    sums = np.zeros(n_tiles)
    for r in range(tile_of_pixel.shape[0]):
        for c in range(tile_of_pixel.shape[1]):
            sums[tile_of_pixel[r, c]] += weights[r, c] * image[r, c]
    return sums


@njit(cache=True, nogil=True)
def add_tile_levels(image, tile_of_pixel, levels, weights):
    """Add each pixel's tile's level times its weight to ``image`` (in place)."""
    for r in range(tile_of_pixel.shape[0]):
        for c in range(tile_of_pixel.shape[1]):
            image[r, c] += levels[tile_of_pixel[r, c]] * weights[r, c]


@njit(cache=True, nogil=True)
def stamp_dots(weighted, slots, col, row, image):
    """Each source's weighted stamp's dot product with a padded image.

    Parameters
    ----------
    weighted : ndarray, shape (n_slot, size, size)
        The stamps; source i's is ``weighted[slots[i]]``, centred on pixel (``row[i]``,
        ``col[i]``) of the image.
    slots : ndarray of int
        Each source's stamp.
    col, row : ndarray of int
        Image pixel of each source's stamp centre.
    image : ndarray
        The image padded by ``size - 1`` on every side.

    Returns
    -------
    ndarray, shape (n,)
    """
    n, size = slots.size, weighted.shape[1]
    half = size // 2
    dots = np.empty(n)
    # Summed down the columns first, side by side, as in `pair_overlaps`.
    column_sums = np.empty(size)
    for source in range(n):
        stamp = weighted[slots[source]]
        first_row = row[source] + half
        first_col = col[source] + half
        column_sums[:] = 0.0
        for a in range(size):
            pixels = image[first_row + a, first_col : first_col + size]
            for b in range(size):
                column_sums[b] += stamp[a, b] * pixels[b]
        total = 0.0
        for b in range(size):
            total += column_sums[b]
        dots[source] = total
    return dots


@njit(cache=True, nogil=True)
def add_stamps(weighted, slots, col, row, amplitude, image):
    """Add ``amplitude[i]`` times source i's stamp ``weighted[slots[i]]`` to the padded
    ``image`` (in place), for every source.

    Same layout as `stamp_dots`.
    """
    n, size = slots.size, weighted.shape[1]
    half = size // 2
    for source in range(n):
        first_row = row[source] + half
        first_col = col[source] + half
        value = amplitude[source]
        if value == 0.0:
            continue
        stamp = weighted[slots[source]]
        for a in range(size):
            for b in range(size):
                image[first_row + a, first_col + b] += value * stamp[a, b]


@njit(cache=True, nogil=True)
def add_interpolated_stamps(table, first_phase, phase_step, offset_x, offset_y, col, row, flux, image):
    """Add ``flux[i]`` times source i's stamp, interpolated between the tabulated phases as
    in `weighted_stamps`, to ``image`` (in place), padded by twice the stamp's half size."""
    n_phase = table.shape[0]
    size = table.shape[2]
    for source in range(col.size):
        value = flux[source]
        if value == 0.0:
            continue
        low_x, weight_x = _phase(offset_x[source], first_phase, phase_step, n_phase)
        low_y, weight_y = _phase(offset_y[source], first_phase, phase_step, n_phase)
        w00 = (1.0 - weight_y) * (1.0 - weight_x) * value
        w01 = (1.0 - weight_y) * weight_x * value
        w10 = weight_y * (1.0 - weight_x) * value
        w11 = weight_y * weight_x * value
        first_row = row[source] + size // 2
        first_col = col[source] + size // 2
        for a in range(size):
            for b in range(size):
                image[first_row + a, first_col + b] += (
                    w00 * table[low_y, low_x, a, b] + w01 * table[low_y, low_x + 1, a, b]
                    + w10 * table[low_y + 1, low_x, a, b] + w11 * table[low_y + 1, low_x + 1, a, b]
                )


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def residual_sums(
    tables, table_of_source, first_phase, phase_step, offset_x, offset_y, col, row, chi, model, model_error, sqrt_weight,
    valid,
):
    """Sums over each source's stamp of its PRF profile, the residuals and the PRF's gradient.

    Parameters
    ----------
    tables, table_of_source, first_phase, phase_step, offset_x, offset_y, col, row, sqrt_weight, valid
        As in `weighted_stamps`; the sources best in strip order, as there.
    chi : ndarray
        The padded residual image divided by the noise: (data - sky - model) / sigma.
    model : ndarray
        The padded model divided by the noise.
    model_error : ndarray
        Per source, the fractional error of its model: a pixel's chi^2 counts against sigma^2
        plus (model_error * model)^2, so that a PRF known to 1 % does not make every bright
        source a poor fit.

    Returns
    -------
    sums : ndarray, shape (n, 7)
        Per source, over its usable stamp pixels, with P its unit-flux profile, g = dP/dx and
        h = dP/dy its derivatives with respect to the source position, and w = 1 / sigma^2:
        sum P, sum P chi^2 / (1 + (model_error model)^2), sum g chi sqrt(w), sum h chi sqrt(w),
        sum g g w, sum g h w, sum h h w.
    """
    n_phase = tables[0].shape[0]
    size = tables[0].shape[2]
    half = size // 2
    n_pixel = size * size
    n = col.size
    sums = np.zeros((n, 7))
    profile = np.empty(n_pixel)
    gradient_x = np.empty(n_pixel)
    gradient_y = np.empty(n_pixel)
    for source in range(n):
        table = tables[table_of_source[source]]
        low_x, weight_x = _phase(offset_x[source], first_phase, phase_step, n_phase)
        low_y, weight_y = _phase(offset_y[source], first_phase, phase_step, n_phase)
        # The profile and its gradient over the stamps' contiguous pixels first (a loop the
        # compiler vectorises), then the sums row by row of the image.
        t00, t01 = table[low_y, low_x].ravel(), table[low_y, low_x + 1].ravel()
        t10, t11 = table[low_y + 1, low_x].ravel(), table[low_y + 1, low_x + 1].ravel()
        for k in range(n_pixel):
            profile[k] = (1 - weight_y) * ((1 - weight_x) * t00[k] + weight_x * t01[k]) + weight_y * (
                (1 - weight_x) * t10[k] + weight_x * t11[k]
            )
            gradient_x[k] = ((1 - weight_y) * (t01[k] - t00[k]) + weight_y * (t11[k] - t10[k])) / phase_step
            gradient_y[k] = ((1 - weight_x) * (t10[k] - t00[k]) + weight_x * (t11[k] - t01[k])) / phase_step
        first_row = row[source] + half
        first_col = col[source] + half
        error = model_error[source]
        profile_sum = chi_sq = gx_chi = gy_chi = gx_gx = gx_gy = gy_gy = 0.0
        for a in range(size):
            valid_row = valid[first_row + a, first_col : first_col + size]
            weight_row = sqrt_weight[first_row + a, first_col : first_col + size]
            chi_row = chi[first_row + a, first_col : first_col + size]
            model_row = model[first_row + a, first_col : first_col + size]
            for b in range(size):
                if not valid_row[b]:
                    continue
                k = a * size + b
                value = profile[k]
                grad_x = gradient_x[k]
                grad_y = gradient_y[k]
                s = weight_row[b]
                c = chi_row[b]
                m = error * model_row[b]
                profile_sum += value
                chi_sq += value * c * c / (1.0 + m * m)
                gx_chi += grad_x * c * s
                gy_chi += grad_y * c * s
                gx_gx += grad_x * grad_x * s * s
                gx_gy += grad_x * grad_y * s * s
                gy_gy += grad_y * grad_y * s * s
        sums[source, 0] = profile_sum
        sums[source, 1] = chi_sq
        sums[source, 2] = gx_chi
        sums[source, 3] = gy_chi
        sums[source, 4] = gx_gx
        sums[source, 5] = gx_gy
        sums[source, 6] = gy_gy
    return sums


@njit(cache=True, nogil=True)
def symmetric_csr(n, diagonal, first, second, values, scale):
    """CSR arrays (data, indices, indptr) of the n x n symmetric matrix with ``diagonal`` (one
    value per row) on its diagonal and ``values[k] * scale[first[k]] * scale[second[k]]`` at
    (first[k], second[k]) and (second[k], first[k]), for every k whose value is nonzero.

    The pairs must be distinct, with ``first < second``. Each row's columns come out in
    increasing order, as scipy's conversion from coordinates sorts them, and the same
    products, so the matrix is the same to the bit. The pairs usually come in a few runs each
    sorted by (first, second) (kept and new pairs, then sky tiles), which leave each row a few
    sorted runs: an insertion sort puts them in order in about one pass.
    """
    counts = np.ones(n, dtype=np.int64)
    for k in range(first.size):
        if values[k] != 0.0:
            counts[first[k]] += 1
            counts[second[k]] += 1
    indptr = np.empty(n + 1, dtype=np.int64)
    indptr[0] = 0
    for i in range(n):
        indptr[i + 1] = indptr[i] + counts[i]
    indices = np.empty(indptr[n], dtype=np.int64)
    data = np.empty(indptr[n])
    fill = indptr[:n].copy()
    for i in range(n):
        indices[fill[i]] = i
        data[fill[i]] = diagonal[i]
        fill[i] += 1
    for k in range(first.size):
        if values[k] != 0.0:
            i, j = first[k], second[k]
            value = values[k] * scale[i] * scale[j]
            indices[fill[i]] = j
            data[fill[i]] = value
            fill[i] += 1
            indices[fill[j]] = i
            data[fill[j]] = value
            fill[j] += 1
    for i in range(n):
        for a in range(indptr[i] + 1, indptr[i + 1]):
            column, value = indices[a], data[a]
            b = a - 1
            while b >= indptr[i] and indices[b] > column:
                indices[b + 1] = indices[b]
                data[b + 1] = data[b]
                b -= 1
            indices[b + 1] = column
            data[b + 1] = value
    return data, indices, indptr


@njit(cache=True, nogil=True)
def submatrix_entries(indptr, indices, data, index, position):
    """Nonzeros of the CSR matrix's ``[index][:, index]`` as (row, column, value), in CSR order.

    ``position`` is scratch with one entry per row of the matrix, all -1; it is left so.
    """
    for k in range(index.size):
        position[index[k]] = k
    count = 0
    for k in range(index.size):
        for a in range(indptr[index[k]], indptr[index[k] + 1]):
            if position[indices[a]] >= 0:
                count += 1
    rows = np.empty(count, dtype=np.int64)
    columns = np.empty(count, dtype=np.int64)
    values = np.empty(count)
    count = 0
    for k in range(index.size):
        for a in range(indptr[index[k]], indptr[index[k] + 1]):
            column = position[indices[a]]
            if column >= 0:
                rows[count] = k
                columns[count] = column
                values[count] = data[a]
                count += 1
    for k in range(index.size):
        position[index[k]] = -1
    return rows, columns, values


@njit(cache=True, nogil=True)
def band_block(indptr, indices, data, index, position):
    """The symmetric CSR matrix's block ``[index][:, index]`` in LAPACK's upper band storage:
    ``band[width + i - j, j]`` holds element (i, j), i <= j, ``width`` the largest j - i of a
    nonzero. Shape (width + 1, n), Fortran-ordered, so that LAPACK factorises it in place.

    ``position`` is scratch with one entry per row of the matrix, all -1; it is left so.
    """
    n = index.size
    for k in range(n):
        position[index[k]] = k
    width = 0
    for k in range(n):
        for a in range(indptr[index[k]], indptr[index[k] + 1]):
            width = max(width, position[indices[a]] - k)
    # Row j of the transpose is column j of the band.
    transposed = np.zeros((n, width + 1))
    for k in range(n):
        for a in range(indptr[index[k]], indptr[index[k] + 1]):
            column = position[indices[a]]
            if column >= k:
                transposed[column, width + k - column] = data[a]
    for k in range(n):
        position[index[k]] = -1
    return transposed.T


@njit(cache=True, nogil=True)
def block_members(centres, extents, targets, cells, bounds, cell_size, halo):
    """The unknowns of each cell's block: every unknown whose footprint reaches within ``halo``
    pixels of the cell, the others first (in increasing row), then the cell's targets.

    Parameters
    ----------
    centres : ndarray, shape (n_unknown, 2)
        (col, row) of each unknown; ``extents`` the half-width of its footprint.
    targets : ndarray of int
        The target unknowns, grouped by cell: block b's are ``targets[bounds[b]:bounds[b + 1]]``
        and ``cells`` (n_target, 2) holds each target's cell (col, row) in units of
        ``cell_size`` pixels.

    Returns
    -------
    members : ndarray of int
        Block b's unknowns are ``members[member_bounds[b]:member_bounds[b + 1]]``, ending
        with its targets.
    member_bounds : ndarray of int
    """
    n_unknown = centres.shape[0]
    # The unknowns binned by the cell their centre is in: a block's candidates are those of
    # the cells within its reach.
    bin_col = np.floor(centres[:, 0] / cell_size).astype(np.int64)
    bin_row = np.floor(centres[:, 1] / cell_size).astype(np.int64)
    col0, row0 = bin_col.min(), bin_row.min()
    n_col, n_row = bin_col.max() - col0 + 1, bin_row.max() - row0 + 1
    key = (bin_row - row0) * n_col + bin_col - col0
    start = np.zeros(n_col * n_row + 1, dtype=np.int64)
    for u in range(n_unknown):
        start[key[u] + 1] += 1
    for k in range(n_col * n_row):
        start[k + 1] += start[k]
    fill = start[:-1].copy()
    binned = np.empty(n_unknown, dtype=np.int64)
    for u in range(n_unknown):
        binned[fill[key[u]]] = u
        fill[key[u]] += 1
    box_half = (cell_size - 1) / 2 + halo
    reach = int(np.ceil((box_half + extents.max()) / cell_size))
    is_target = np.zeros(n_unknown, dtype=np.bool_)
    n_block = bounds.size - 1
    member_bounds = np.zeros(n_block + 1, dtype=np.int64)
    members = np.empty(max(16, 8 * targets.size), dtype=np.int64)
    others = np.empty(n_unknown, dtype=np.int64)
    for b in range(n_block):
        first, stop = bounds[b], bounds[b + 1]
        cell_col, cell_row = cells[first, 0], cells[first, 1]
        box_col = cell_col * cell_size + (cell_size - 1) / 2
        box_row = cell_row * cell_size + (cell_size - 1) / 2
        for t in range(first, stop):
            is_target[targets[t]] = True
        n_other = 0
        for q_row in range(max(cell_row - reach - row0, 0), min(cell_row + reach - row0, n_row - 1) + 1):
            for q_col in range(max(cell_col - reach - col0, 0), min(cell_col + reach - col0, n_col - 1) + 1):
                q = q_row * n_col + q_col
                for r in range(start[q], start[q + 1]):
                    u = binned[r]
                    distance = max(abs(centres[u, 0] - box_col), abs(centres[u, 1] - box_row)) - extents[u]
                    if not is_target[u] and distance <= box_half:
                        others[n_other] = u
                        n_other += 1
        size = n_other + stop - first
        offset = member_bounds[b]
        if offset + size > members.size:
            grown = np.empty(max(2 * members.size, offset + size), dtype=np.int64)
            grown[:offset] = members[:offset]
            members = grown
        row_order = np.argsort(centres[others[:n_other], 1], kind="mergesort")
        members[offset : offset + n_other] = others[:n_other][row_order]
        for t in range(first, stop):
            members[offset + n_other + t - first] = targets[t]
            is_target[targets[t]] = False
        member_bounds[b + 1] = offset + size
    return members[: member_bounds[n_block]], member_bounds


@njit(cache=True, nogil=True)
def envelope_inverse_diagonals(indptr, indices, data, members, member_bounds, n_targets):
    """Diagonal of the inverse of each block of a symmetric positive definite CSR matrix, over
    the block's last ``n_targets[b]`` unknowns (`block_members`' blocks).

    Each block is factorised by a Cholesky (Crout) over its rows' envelopes: row i of the
    factor is zero left of the first column row i of the block couples to, so an order with
    short envelopes (the others along the rows, as `block_members` gives them) skips the
    zeros. With the targets last, their block of the inverse is L22^-T L22^-1, L22 the
    trailing block of the factor: its diagonal is the column sums of squares of L22^-1.
    Blocks that are not positive definite to working precision give NaN.
    """
    n_block = member_bounds.size - 1
    out = np.empty(n_targets.sum())
    largest = 0
    for b in range(n_block):
        largest = max(largest, member_bounds[b + 1] - member_bounds[b])
    block = np.empty((largest, largest))
    envelope = np.empty(largest, dtype=np.int64)
    inverse_diagonal = np.empty(largest)
    column = np.empty(largest)
    position = np.full(indptr.size - 1, -1, dtype=np.int64)
    written = 0
    for b in range(n_block):
        first_member, stop_member = member_bounds[b], member_bounds[b + 1]
        n = stop_member - first_member
        n_target = n_targets[b]
        for k in range(n):
            position[members[first_member + k]] = k
        # The lower triangle, and each row's first coupled column.
        for k in range(n):
            u = members[first_member + k]
            block[k, : k + 1] = 0.0
            low = k
            for a in range(indptr[u], indptr[u + 1]):
                p = position[indices[a]]
                if 0 <= p <= k:
                    block[k, p] = data[a]
                    low = min(low, p)
            envelope[k] = low
        for k in range(n):
            position[members[first_member + k]] = -1
        definite = True
        for i in range(n):
            low_i = envelope[i]
            for j in range(low_i, i):
                total = block[i, j]
                for k in range(max(low_i, envelope[j]), j):
                    total -= block[i, k] * block[j, k]
                block[i, j] = total * inverse_diagonal[j]
            total = block[i, i]
            for k in range(low_i, i):
                total -= block[i, k] * block[i, k]
            if not total > 0.0:
                definite = False
                break
            block[i, i] = np.sqrt(total)
            inverse_diagonal[i] = 1.0 / block[i, i]
        trailing = n - n_target
        for j in range(n_target):
            if not definite:
                out[written + j] = np.nan
                continue
            # Column j of L22^-1, by forward substitution.
            column[j] = inverse_diagonal[trailing + j]
            total = column[j] ** 2
            for i in range(j + 1, n_target):
                value = 0.0
                for k in range(j, i):
                    value -= block[trailing + i, trailing + k] * column[k]
                column[i] = value * inverse_diagonal[trailing + i]
                total += column[i] ** 2
            out[written + j] = total
        written += n_target
    return out


@njit(cache=True, nogil=True)
def sample_spline(coefficients, row_taps, row_weights, col_taps, col_weights, scale, placed, out):
    """A PRF table's stamps from its cubic spline (`mbphot.engine.prf.spline_stamps`):
    ``out[p, q, i, j]`` is ``scale`` times the spline of ``coefficients`` at row
    ``p * size + i`` of the row taps and weights (four each) and row ``q * size + j`` of the
    column ones, less ``placed[p, q, i, j]`` unless ``placed`` is empty.

    Each phase's rows are sampled once (the coefficients' columns side by side), then each
    stamp's columns into a small block, transposed as it is written: the table is written
    once, in its own layout. The sums are those of two sparse products, in the same order.
    """
    n_phase, size = out.shape[0], out.shape[2]
    n_cols = coefficients.shape[1]
    subtract = placed.size > 0
    along = np.empty((n_cols, size))
    block = np.empty((size, size))
    for p in range(n_phase):
        along[:, :] = 0.0
        for i in range(size):
            k = p * size + i
            for t in range(4):
                weight, tap = row_weights[k, t], row_taps[k, t]
                for c in range(n_cols):
                    along[c, i] += weight * coefficients[tap, c]
        for q in range(n_phase):
            for j in range(size):
                m = q * size + j
                a0, a1, a2, a3 = along[col_taps[m, 0]], along[col_taps[m, 1]], along[col_taps[m, 2]], along[col_taps[m, 3]]
                w0, w1, w2, w3 = col_weights[m, 0], col_weights[m, 1], col_weights[m, 2], col_weights[m, 3]
                for i in range(size):
                    block[j, i] = w0 * a0[i] + w1 * a1[i] + w2 * a2[i] + w3 * a3[i]
            for i in range(size):
                for j in range(size):
                    value = scale * block[j, i]
                    out[p, q, i, j] = value - placed[p, q, i, j] if subtract else value
