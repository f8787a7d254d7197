"""Sample grids: window checks, the 8-px node grid of smooth fields, its interpolation at the
samples, and rendering a block in cache-sized pieces."""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable

import numpy as np

from tilefcn.synthetic.noise import _A, _F32

_G, _C = 8, 16  # node grid step of smooth fields; nucleus cell (two grids, half a cell apart)
_PH, _PW = 256, 256  # pixels are made in pieces that stay in cache


def _window(seed: int, y0: int, x0: int, h: int, w: int, shape: tuple[int, int]) -> tuple:
    """Checked seed, shape and the coordinates of a window."""
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be two positive ints, got {shape!r}")
    seed, shape = operator.index(seed), (operator.index(shape[0]), operator.index(shape[1]))
    if h < 1 or w < 1 or y0 < 0 or x0 < 0 or y0 + h > shape[0] or x0 + w > shape[1]:
        raise ValueError(f"window ({y0}, {x0}, {h}, {w}) is not inside an image of shape {shape}")
    return seed, shape, np.arange(y0, y0 + h), np.arange(x0, x0 + w)


def _base_cell(shape: tuple[int, int]) -> float:
    """Largest feature scale of the regions: about a quarter of the image, a power of two."""
    return float(2 ** round(math.log2(min(max(max(shape) / 4, 512), 8192))))


def _sample_grid(shape: tuple[int, int]) -> tuple[_A, ...]:
    """About 256 × 256 nodes spread over the image, for calibrating thresholds."""
    return tuple(np.unique(np.linspace(0, s - 1, 256) // _G * _G) for s in shape)


def _nodes(coords: _A, q: int) -> tuple[_A, int | None]:
    """Nodes serving ``coords`` (step q) and the first one's index; sparse samples: themselves."""
    if q >= 8:
        return coords.astype(np.float64), None
    n0 = (int(coords[0]) - _C) // _G
    return np.arange(n0, (int(coords[-1]) + _C) // _G + 2) * float(_G), n0


def _upsample(g: _A, ys: _A, xs: _A, q: int, n0: tuple) -> _A:
    """Node fields interpolated at the samples: x pass on node rows, then y pass by broadcast.
    At full resolution rows are evaluated in pairs (row y takes the value of row y - y % 2)."""
    if n0[0] is None:
        return g
    tx, ix = (xs % _G).astype(_F32) / _G, xs // _G - n0[1]
    a = g.take(ix, -1) * (1 - tx) + g.take(ix + 1, -1) * tx
    qy = max(q, 2)
    r, k0, k1 = _G // qy, int(ys[0]) // _G - n0[0], int(ys[-1]) // _G - n0[0] + 1
    ty = ((int(ys[0]) % q + qy * np.arange(r)) / _G).astype(_F32)[:, None]
    out = a[..., k0:k1, None, :] * (1 - ty) + a[..., k0 + 1:k1 + 1, None, :] * ty
    out = out.reshape(*out.shape[:-3], (k1 - k0) * r, len(xs))
    out, s = np.repeat(out, 2, axis=-2) if q == 1 else out, int(ys[0]) % _G // q
    return out[..., s:s + len(ys), :]


def _render(pixels: Callable, fields: Callable, ys: _A, xs: _A, q: int, channels: int,
            dtype: type) -> tuple[_A | None, _A]:
    """Image (None without channels) and labels at the grid ys × xs (step q): node fields once
    per block, pixels in cache-sized pieces."""
    (ny, n0y), (nx, n0x) = _nodes(ys, q), _nodes(xs, q)
    f = fields(ny, nx)
    img = np.empty((len(ys), len(xs), channels), dtype) if channels else None
    label = np.empty((len(ys), len(xs)), np.uint8)
    for y, x in itertools.product(range(0, len(ys), _PH), range(0, len(xs), _PW)):
        sy, sx = slice(y, y + _PH), slice(x, x + _PW)
        (py, my), (px, mx) = _nodes(ys[sy], q), _nodes(xs[sx], q)
        ry = sy if my is None else slice(my - n0y, my - n0y + len(py))
        rx = sx if mx is None else slice(mx - n0x, mx - n0x + len(px))
        pixels(ys[sy], xs[sx], q, f[:, ry, rx], (my, mx), None if img is None else img[sy, sx],
               label[sy, sx])
    return img, label
