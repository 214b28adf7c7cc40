"""Drawing a strip of a realistic image: PRF-core and galaxy stamps, then FFT-convolved wings.

Stamps are placed as in the ideal field (every pixel sums its sources one by one in source
order, `np.add.at`). Where two PRFs mix (IRAC rolls), a source's stamp is the weighted sum
of the two tables' stamps. The wings of every source, and the whole PRF of the faint sources
below the catalogue limit, are added by FFT convolution of images of point fluxes (each spread
bilinearly over its four nearest pixels) with the band's kernels. The convolution runs on
blocks of `FFT_BLOCK_ROWS` rows fixed on the image, never on the strips, so the result of a
pixel does not depend on how the image is cut into strips.
"""

import numpy as np
from scipy import fft

FFT_BLOCK_ROWS = 256
RENDER_BATCH_STAMP_PIXELS = 2**16

_KERNEL_SPECTRA = {}


def _add_stamps(padded, padded_width, margin, start_row, tables, x, y, flux, weight):
    """Add the sources' stamps from ``tables`` (mixed by ``weight``, the first table's share)."""
    half_size = tables[0].half_size
    offsets = np.arange(-half_size, half_size + 1)
    stencil = (offsets[:, None] * padded_width + offsets[None, :]).ravel()
    batch = max(1, RENDER_BATCH_STAMP_PIXELS // stencil.size)
    for first in range(0, len(x), batch):
        x_batch, y_batch = x[first : first + batch], y[first : first + batch]
        col = np.rint(x_batch).astype(np.intp)
        row = np.rint(y_batch).astype(np.intp)
        f = flux[first : first + batch, None, None]
        if len(tables) == 1:
            stamps = tables[0].stamps_for(x_batch - col, y_batch - row) * f
        else:
            w = weight[first : first + batch, None, None]
            stamps = (tables[0].stamps_for(x_batch - col, y_batch - row) * (w * f)
                      + tables[1].stamps_for(x_batch - col, y_batch - row) * ((1 - w) * f))
        index = ((row - start_row + margin) * padded_width + col + margin)[:, None] + stencil
        np.add.at(padded, index.ravel(), stamps.ravel())


def _deposit(canvas, origin_row, origin_col, x, y, flux):
    """Spread point fluxes bilinearly over their four nearest pixels of ``canvas``."""
    height, width = canvas.shape
    x0 = np.floor(x).astype(np.intp)
    y0 = np.floor(y).astype(np.intp)
    fx, fy = x - x0, y - y0
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            r = y0 + dy - origin_row
            c = x0 + dx - origin_col
            ok = (r >= 0) & (r < height) & (c >= 0) & (c < width)
            np.add.at(canvas, (r[ok], c[ok]), (flux * wx * wy)[ok])


def _pad_to_half(kernel, half):
    """``kernel`` padded with zeros to ``2 * half + 1`` pixels a side."""
    pad = half - kernel.shape[0] // 2
    return np.pad(kernel, pad) if pad > 0 else kernel


def _spectrum(key, kernel, shape):
    """The kernel's spectrum at FFT ``shape``, kept for the band being drawn (about 30 MB each for
    a full-COSMOS IRAC block)."""
    model_key, _ = key
    if any(cached[0][0] != model_key for cached in _KERNEL_SPECTRA):
        _KERNEL_SPECTRA.clear()
    cache_key = (key, shape)
    if cache_key not in _KERNEL_SPECTRA:
        _KERNEL_SPECTRA[cache_key] = fft.rfft2(kernel, shape)
    return _KERNEL_SPECTRA[cache_key]


def fft_block(model, model_key, block_start, block_stop, width, bright, faint):
    """Wings of the ``bright`` sources and whole PRFs of the ``faint`` ones on rows
    ``block_start:block_stop``.

    Parameters
    ----------
    bright, faint : tuple of ndarray
        ``(x, y, flux, weight)`` of the sources (weight: the first PRF's share).
    """
    k = model.fft_half_size
    canvas_shape = (block_stop - block_start + 2 * k, width + 2 * k)
    shape = tuple(fft.next_fast_len(n + 2 * k, real=True) for n in canvas_shape)
    # (kernel name, kernel, sources, their fluxes): the wings of the catalogue-level sources,
    # and each PRF component whole for the faint ones, weighted by its share.
    terms = []
    if model.wing is not None and bright[0].size:
        terms.append(("wing", model.wing, bright, bright[2]))
    if faint[0].size:
        for c, kernel in enumerate(model.full):
            share = faint[3] if c == 0 else 1.0 - faint[3]
            terms.append((f"full{c}", kernel, faint, faint[2] * share))
    total = None
    for name, kernel, sources, flux in terms:
        canvas = np.zeros(canvas_shape)
        _deposit(canvas, block_start - k, -k, sources[0], sources[1], flux)
        product = fft.rfft2(canvas, shape) * _spectrum((model_key, name), _pad_to_half(kernel, k), shape)
        total = product if total is None else total + product
    if total is None:
        return np.zeros((block_stop - block_start, width))
    full = fft.irfft2(total, shape)
    return full[2 * k : 2 * k + block_stop - block_start, 2 * k : 2 * k + width]


def render_rows(model, model_key, start_row, stop_row, height, width, bright, size_bin, size_frac, faint):
    """Rows ``start_row:stop_row`` of a realistic image (``start_row`` on an FFT block boundary).

    Parameters
    ----------
    model : BandModel
    model_key : hashable
        Names ``model`` for the cache of kernel spectra.
    height, width : int
        The image's shape.
    bright : tuple of ndarray
        ``(x, y, flux, weight)`` of the catalogue-level sources near the strip, in source order.
    size_bin, size_frac : ndarray
        Their galaxy table below their size (-1: point sources) and their position towards the
        next table, in log radius (`_sources.galaxy_sizes`).
    faint : tuple of ndarray
        ``(x, y, flux, weight)`` of the faint sources near the strip.
    """
    x, y, flux, weight = bright
    half = model.stamp_half_size
    margin = 2 * half
    padded_width = width + 2 * margin
    padded = np.zeros((stop_row - start_row + 2 * margin) * padded_width)
    col, row = np.rint(x), np.rint(y)
    near = (col > -half - 1) & (col < width + half) & (row >= start_row - half) & (row < stop_row + half)
    bins = np.unique(size_bin[near])
    for b in bins:
        chosen = near & (size_bin == b)
        if b < 0:
            _add_stamps(padded, padded_width, margin, start_row, model.components, x[chosen], y[chosen], flux[chosen],
                        weight[chosen])
            continue
        # A disc between two tabulated radii is both, weighted linearly in log radius: within
        # second order in their spacing of the disc between them.
        for table, share in ((b, 1.0 - size_frac), (b + 1, size_frac)):
            drawn = chosen & (share > 0)
            if drawn.any():
                _add_stamps(padded, padded_width, margin, start_row, [galaxies[table] for galaxies in model.galaxies],
                            x[drawn], y[drawn], flux[drawn] * share[drawn], weight[drawn])
    rows = padded.reshape(-1, padded_width)[margin : margin + stop_row - start_row, margin : margin + width]
    if model.wing is None and faint[0].size == 0:
        return rows
    k = model.fft_half_size
    for block_start in range(start_row, stop_row, FFT_BLOCK_ROWS):
        block_stop = min(block_start + FFT_BLOCK_ROWS, height)

        def reaching(sources):
            yy = sources[1]
            keep = (yy >= block_start - k - 1) & (yy < block_stop + k)
            return tuple(a[keep] for a in sources)

        rows[block_start - start_row : block_stop - start_row] += fft_block(
            model, model_key, block_start, block_stop, width, reaching(bright), reaching(faint))
    return rows
