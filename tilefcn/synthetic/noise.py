"""Seeded integer hashes of coordinates and fractal value noise built on them."""

from __future__ import annotations

import functools

import numpy as np

_F32, _A = np.float32, np.ndarray


@functools.cache
def _key(seed: int, stream: int) -> int:
    """32-bit key of a (seed, stream) pair."""
    return int(np.random.SeedSequence([seed % 2**64, stream]).generate_state(1)[0])


def _hash(key: int, ys: _A, xs: _A) -> _A:
    """uint32 hash of (key, y, x) on the grid ys × xs of integer coordinates: rows and columns
    are hashed apart (lowbias32), their xor gets one more multiply-xorshift round."""
    v = []
    for c, k in ((ys, key), (xs, 0x85EBCA77)):
        v.append(c.astype(np.int64).astype(np.uint32) * np.uint32(0x9E3779B1) ^ np.uint32(k))
        for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, 1)):
            v[-1] ^= v[-1] >> np.uint32(shift)
            v[-1] *= np.uint32(factor)
    h = v[0][:, None] ^ v[1]
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    return h


def _unit(h: _A, shift: int = 8, bits: int = 24) -> _A:
    """Bits ``[shift, shift + bits)`` of a hash as float32 in [0, 1)."""
    v = (h >> np.uint32(shift)) & np.uint32((1 << bits) - 1) if bits < 32 - shift else h >> shift
    return v.astype(_F32) * _F32(2.0**-bits)


def _fbm(key: int, ys: _A, xs: _A, cell: float, octaves: int) -> _A:
    """Fractal value noise in [0, 1] on the grid ys × xs (smoothstep-bilinear hashed lattices)."""
    total, norm = np.zeros((len(ys), len(xs)), _F32), 0.0
    for o in range(octaves):
        axes = []
        for c in (ys, xs):
            f = c / (cell / 2**o)
            k = np.floor(f)
            t = (f - k).astype(_F32)
            axes.append((np.arange(k.min(), k.max() + 2), (k - k.min()).astype(np.intp),
                         t * t * (3 - 2 * t)))
        (ny, iy, ty), (nx, ix, tx) = axes
        g = _unit(_hash((key + o) & 0xFFFFFFFF, ny, nx))
        a = g.take(iy, 0) * (1 - ty)[:, None] + g.take(iy + 1, 0) * ty[:, None]
        total += (a.take(ix, 1) * (1 - tx) + a.take(ix + 1, 1) * tx) * _F32(0.5**o)
        norm += 0.5**o
    return total / _F32(norm)
