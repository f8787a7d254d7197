"""Seeded synthetic scans: brightfield whole slides and 4-band satellite scenes.

Every pixel is a pure function of ``(seed, shape, y, x)``: smooth fields are fractal value noise
on hashed lattices, evaluated on a global 8-px node grid and interpolated; texture is an integer
hash of the coordinates; nuclei sit on two jittered 16-px grids whose cells decide everything from
their own hash. So any window can be made alone, output does not depend on the tile size, and
writers stream tiles to tifffile (peak memory independent of the image size). Class thresholds
are calibrated per ``(seed, shape)`` on a coarse sample. Slides are pyramidal OME-TIFFs with the
reduced levels as SubIFDs (tifffile's pyramid pattern; OpenSlide only sees levels in top-level
pages), drawn at subsampled coordinates with damped texture: they look right but are not exact
averages of level 0. Pen marks and bubbles are artefacts, labelled background.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import os
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

SLIDE_CLASSES = ("background", "tissue", "dense")
SCENE_CLASSES = ("water", "vegetation", "soil", "built", "cloud")

_G, _C = 8, 16  # node grid step of smooth fields; nucleus cell (two grids, half a cell apart)
_PH, _PW = 256, 256  # pixels are made in pieces that stay in cache
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_F32, _A = np.float32, np.ndarray
_HEMA = np.array([0.650, 0.704, 0.286])  # Ruifrok-Johnston optical densities of H and E
_EOSIN = np.array([0.072, 0.990, 0.105])
_GLASS = np.array([0.030, 0.036, 0.026])
_INKS = np.array([[1.1, 0.5, 0.15], [0.9, 0.25, 0.85], [1.3, 1.3, 1.2]], _F32)  # blue, green, black
# reflectance x 10000 in bands B, G, R, NIR of water, vegetation, soil, built, cloud
_SPECTRA = np.array([[450, 600, 400, 150], [350, 650, 380, 3800], [1100, 1500, 2000, 2600],
                     [1500, 1600, 1700, 2000], [7600, 7700, 7800, 8000]], _F32)
# scene label from bits water 1, built 2, vegetated 4, cloud 8 (cloud > water > built > green)
_SCENE_CODE = np.array([4 if i & 8 else 0 if i & 1 else 3 if i & 2 else 1 if i & 4 else 2
                        for i in range(16)], np.uint8)


@dataclass(frozen=True)
class SyntheticScan:
    """A written synthetic scan: image and label mask paths, class names, shape, µm per pixel."""

    image: Path
    mask: Path
    classes: tuple[str, ...]
    shape: tuple[int, int]
    mpp: float | None


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


# --- slide --------------------------------------------------------------------------------

def _slide_fields(seed: int, shape: tuple[int, int], ys: _A, xs: _A) -> _A:
    """Smooth fields tissue (fading out near the border) and dense on the grid ys × xs."""
    base, margin = _base_cell(shape), 0.08 * min(shape)
    by = np.clip(1 - np.minimum(ys, shape[0] - 1 - ys) / margin, 0, 1).astype(_F32)
    bx = np.clip(1 - np.minimum(xs, shape[1] - 1 - xs) / margin, 0, 1).astype(_F32)
    tissue = _fbm(_key(seed, 1), ys, xs, base, 5) - 0.5 * np.maximum(by[:, None], bx[None, :])
    return np.stack([tissue, _fbm(_key(seed, 2), ys, xs, base / 2, 3)])


@functools.lru_cache(maxsize=64)
def _slide_setup(seed: int, shape: tuple[int, int]) -> tuple:
    """Thresholds on fields 0 and 1 (~40 % tissue, ~30 % of it dense), fibre cycles per pixel
    along y and x, pen strokes and bubbles of a slide."""
    f = _slide_fields(seed, shape, *_sample_grid(shape))
    t = float(np.quantile(f[0], 0.6))
    inner = f[0] > t + 0.02
    share = 0.3 * (f[0] > t).sum() / max(int(inner.sum()), 1)
    d = float(np.quantile(f[1][inner], 1 - min(share, 1.0))) if inner.any() else 2.0
    rng, side = np.random.default_rng(_key(seed, 99)), min(shape)
    pens = [(*(rng.uniform(0.2, 0.8, 2) * shape), rng.uniform(0, np.pi),
             side * rng.uniform(0.3, 0.6), side * rng.uniform(0.01, 0.04),
             side * rng.uniform(0.15, 0.3), max(6.0, 0.012 * side), _INKS[rng.integers(3)])
            for _ in range(rng.integers(1, 4))]
    bubbles = [(*(rng.uniform(0.2, 0.8, 2) * shape), side * rng.uniform(0.05, 0.12))
               for _ in range(rng.integers(1, 3))]
    angle = rng.uniform(0, np.pi)
    return t, d, (np.sin(angle) / 11, np.cos(angle) / 11), pens, bubbles


@functools.cache
def _palette() -> _A:
    """RGB of (hematoxylin 0..127, eosin 0..63, glass 0..7) in steps of 0.02 / 0.02 / 0.003 OD."""
    h, e, g = np.meshgrid(np.arange(128) / 50, np.arange(64) / 50, np.arange(8) * 0.003,
                          indexing="ij")
    od = _GLASS + g[..., None] + h[..., None] * _HEMA + e[..., None] * _EOSIN
    return np.round(255 * np.exp(-od)).astype(np.uint8).reshape(-1, 3)


def _nuclei(seed: int, ys: _A, xs: _A, q: int, f: _A, n0: tuple, t: float, d: float) -> _A | None:
    """Nuclei coverage in [0, 1]: sparse and small in tissue, crowded and big in dense regions.
    A cell holds at most one nucleus, inside it; presence, radius and place come from the
    cell's hash and the fields at the cell centre (a node of the field grid)."""
    out = None
    for g, off in enumerate((0, _C // 2)):
        y0, x0 = int(ys[0]) - off, int(xs[0]) - off  # samples sit at y0 % q + q * i in a cell
        ky = np.arange(y0 // _C, (int(ys[-1]) - off) // _C + 1)
        kx = np.arange(x0 // _C, (int(xs[-1]) - off) // _C + 1)
        cy, cx = (off + _C // 2 + _C * ky) // _G - n0[0], (off + _C // 2 + _C * kx) // _G - n0[1]
        tc, dc = f[0].take(cy, 0).take(cx, 1), f[1].take(cy, 0).take(cx, 1)
        h = _hash(_key(seed, 10 + g), ky, kx)
        dense = (dc > d) & (tc > t + 0.02)
        present = (tc > t) & (_unit(h, 0, 8) < np.where(dense, 0.9, 0.25))
        if not present.any():
            continue
        r = (np.where(dense, 4.0, 2.5) + np.where(dense, 2.5, 1.5) * _unit(h, 8, 8)).astype(_F32)
        span, k, m = _C - 1 - 2 * r, _F32(0.5) / r, _C // q  # ~1 px soft edge
        ly, lx = (np.arange(o % q, _C, q, dtype=_F32) for o in (y0, x0))
        dy2 = (ly[None, :, None] - (r + 0.5 + span * _unit(h, 16, 8))[:, None]) ** 2
        dx2 = (lx - (r + 0.5 + span * _unit(h, 24, 8))[..., None]) ** 2
        a = (np.where(present, r * r, -1e4).astype(_F32)[..., None] - dx2) * k[..., None] + 0.5
        v = a[:, None] - (dy2 * k[:, None])[..., None]  # (cell row, row, cell column, column)
        np.clip(v, 0, 1, out=v)
        v = v.reshape(len(ky) * m, -1)[y0 % _C // q:][:len(ys), x0 % _C // q:][:, :len(xs)]
        out = v if out is None else np.maximum(out, v)
    return out


def _slide_pixels(seed: int, s: tuple, ys: _A, xs: _A, q: int, f: _A, n0: tuple, img: _A | None,
                  label: _A) -> None:
    """Fill RGB (unless None) and labels of a piece from its node fields ``f``."""
    t, d = _F32(s[0]), _F32(s[1])
    if f[0].max() < t - 1e-4:  # no tissue: interpolation cannot exceed the nodes
        label[...] = 0
        if img is not None:
            _palette().take(_hash(_key(seed, 5), ys, xs) >> np.uint32(29), 0, img, "clip")
        return
    tis, dns = _upsample(f, ys, xs, q, n0)
    dense = (dns > d) & (tis > t + _F32(0.02))
    np.add((tis > t).view(np.uint8), dense, out=label)
    if img is None:
        return
    hsh, dense = _hash(_key(seed, 5), ys, xs), dense.astype(_F32)
    noise = (hsh & np.uint32(0xFFFF)).astype(_F32)
    noise *= _F32(0.3 / q / 65536)  # multiplicative stain noise, damped on reduced levels
    noise += _F32(0.85)
    stain = dns * _F32(0.4) + _F32(0.8)
    alpha = np.clip((tis - t) * _F32(300), _F32(0), _F32(1)) * stain
    ph = tis * _F32(4) + dns  # fibres: parabolic bumps of a warped phase
    ph += np.asarray(ys * s[2][0] % 1, _F32)[:, None] + np.asarray(xs * s[2][1] % 1, _F32)
    ph -= np.floor(ph)
    ph *= 1 - ph
    ph *= ph
    ph = ph if q == 1 else _F32(1 / 30) + (ph - _F32(1 / 30)) / q  # mean 1/30
    eos = (ph * _F32(300) + _F32(11)) * alpha  # eosin in palette steps of 0.02 OD
    eos *= (1 - dense * _F32(0.4)) * noise
    hema = (dense * _F32(11) + _F32(3)) * alpha  # hematoxylin in palette steps
    # mean coverage on coarse levels; by construction hema < 128 and eos < 64 palette steps
    nuc = (tis > t) * (dense * _F32(0.5) + _F32(0.06)) if q > 2 else _nuclei(seed, ys, xs, q, f,
                                                                            n0, t, d)
    if nuc is not None:
        hema += nuc * alpha * noise * (dense * _F32(25) + _F32(45))  # alpha: none on glass
    idx = hema.astype(np.int32)
    idx <<= 6
    idx += eos.astype(np.int32)
    idx <<= 3
    idx += hsh >> np.uint32(29)  # glass noise
    _palette().take(idx, 0, img, "clip")


def _artefacts(s: tuple, ys: _A, xs: _A, pen: bool, bubbles: bool) -> Iterator[tuple[_A, _A]]:
    """(pen alpha, ink) and (bubble interior, rim) pairs overlapping the grid ys × xs."""
    def near(cy: float, cx: float, reach: float) -> tuple[_A, _A] | None:
        if ys[0] - reach <= cy <= ys[-1] + reach and xs[0] - reach <= cx <= xs[-1] + reach:
            return (ys - cy).astype(_F32)[:, None], (xs - cx).astype(_F32)
        return None

    for cy, cx, th, length, amp, wave, width, ink in s[3] if pen else ():
        if (off := near(cy, cx, length / 2 + amp + width)) is not None:
            (dy, dx), (sin, cos) = off, (_F32(np.sin(th)), _F32(np.cos(th)))
            u, v = dy * sin + dx * cos, dy * cos - dx * sin
            dist = np.maximum(np.abs(v - _F32(amp) * np.sin(u * _F32(2 * np.pi / wave))),
                              np.abs(u) - _F32(length / 2))
            yield np.clip((width / 2 - dist) / 1.5, 0, 1), ink
    for cy, cx, rad in s[4] if bubbles else ():
        if (off := near(cy, cx, rad)) is not None:
            dist = np.sqrt(off[0] * off[0] + off[1] * off[1])
            yield dist < rad, np.clip(1 - np.abs(dist - rad + 4) / 3, 0, 1)


def _slide_block(seed: int, shape: tuple[int, int], ys: _A, xs: _A, q: int = 1, pen: bool = False,
                 bubbles: bool = False, rgb: bool = True) -> tuple[_A | None, _A]:
    """RGB uint8 (or None) and labels of the slide at the sample grid ys × xs (step q)."""
    s = _slide_setup(seed, shape)
    img, label = _render(functools.partial(_slide_pixels, seed, s),
                         functools.partial(_slide_fields, seed, shape), ys, xs, q, 3 * rgb,
                         np.uint8)
    for a, b in _artefacts(s, ys, xs, pen, bubbles):  # pens darken, bubbles wash out
        label[a > 0.5 if b.ndim == 1 else a] = 0
        for c in range(3) if rgb else ():
            v = img[..., c].astype(_F32)
            v = v * np.exp(-a * b[c]) if b.ndim == 1 else np.where(a, 255 - (255 - v) * 0.45, v)
            img[..., c] = v if b.ndim == 1 else v * (1 - 0.4 * b)
    return img, label


# --- scene --------------------------------------------------------------------------------

def _scene_fields(seed: int, shape: tuple[int, int], ys: _A, xs: _A) -> _A:
    """Smooth fields elevation, greenness, urban, cloud, brightness on the grid ys × xs."""
    b = _base_cell(shape)
    specs = ((b, 5), (b / 2, 4), (b / 2, 3), (b, 6), (128.0, 2))
    return np.stack([_fbm(_key(seed, 21 + i), ys, xs, c, n) for i, (c, n) in enumerate(specs)])


@functools.lru_cache(maxsize=64)
def _scene_setup(seed: int, shape: tuple[int, int]) -> tuple[float, ...]:
    """Thresholds: ~14 % water, ~12 % of land built, ~55 % of the rest vegetated, ~8 % cloud."""
    f = _scene_fields(seed, shape, *_sample_grid(shape))
    w = float(np.quantile(f[0], 0.14))
    u = float(np.quantile(f[2][f[0] >= w], 0.88))
    v = float(np.quantile(f[1][(f[0] >= w) & (f[2] <= u)], 0.45))
    return w, u, v, float(np.quantile(f[3], 0.92)) - 0.03


def _scene_pixels(seed: int, s: tuple, ys: _A, xs: _A, q: int, f: _A, n0: tuple, img: _A | None,
                  label: _A) -> None:
    """Fill bands (unless None) and labels of a piece; cloud is labelled where opaque."""
    elev, green, urban, cloud, bright = _upsample(f, ys, xs, q, n0)
    alpha = np.clip((cloud - _F32(s[3])) / _F32(0.06), 0, 1)
    code = (elev < s[0]).view(np.uint8) | ((urban > s[1]).view(np.uint8) << 1)
    code |= (green > s[2]).view(np.uint8) << 2
    code |= (alpha > 0.5).view(np.uint8) << 3
    _SCENE_CODE.take(code, out=label, mode="clip")
    if img is None:
        return
    ground = _SCENE_CODE.take(code & 7)
    parcel = _unit(_hash(_key(seed, 26), ys // 48, xs // 48)) - _F32(0.5)  # fields
    mod = bright * _F32(0.2) + _F32(0.9) + (ground != 0) * _F32(0.35) * parcel
    if (built := ground == 3).any():  # roofs on an 8-px block grid, 2-px streets
        roof = _unit(_hash(_key(seed, 27), ys // 8, xs // 8))
        roof[((ys % 8) < 2)[:, None] | ((xs % 8) < 2)[None, :]] = -0.05
        mod += built * (_F32(0.75) + roof - mod)
    mod *= (_unit(_hash(_key(seed, 28), ys, xs)) * _F32(0.06) + _F32(0.97)) * (1 - alpha)
    alpha *= cloud * _F32(0.2) + _F32(0.9)
    for b in range(4):
        img[..., b] = np.clip(_SPECTRA[:4, b].take(ground) * mod + _SPECTRA[4, b] * alpha + 0.5,
                              0, 10000)


def _scene_block(seed: int, shape: tuple[int, int], ys: _A, xs: _A, bands: bool = True
                 ) -> tuple[_A | None, _A]:
    """uint16 B, G, R, NIR (or None) and labels of the scene at the grid ys × xs."""
    return _render(functools.partial(_scene_pixels, seed, _scene_setup(seed, shape)),
                   functools.partial(_scene_fields, seed, shape), ys, xs, 1, 4 * bands, np.uint16)


# --- public API ---------------------------------------------------------------------------

def _window(seed: int, y0: int, x0: int, h: int, w: int, shape: tuple[int, int]) -> tuple:
    """Checked seed, shape and the coordinates of a window."""
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be two positive ints, got {shape!r}")
    seed, shape = operator.index(seed), (operator.index(shape[0]), operator.index(shape[1]))
    if h < 1 or w < 1 or y0 < 0 or x0 < 0 or y0 + h > shape[0] or x0 + w > shape[1]:
        raise ValueError(f"window ({y0}, {x0}, {h}, {w}) is not inside an image of shape {shape}")
    return seed, shape, np.arange(y0, y0 + h), np.arange(x0, x0 + w)


def slide_tile(seed: int, y0: int, x0: int, h: int, w: int, *, shape: tuple[int, int],
               pen: bool = False, bubbles: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 ``(h, w, 3)`` and labels uint8 ``(h, w)`` of a window of a synthetic slide."""
    return _slide_block(*_window(seed, y0, x0, h, w, shape), 1, pen, bubbles)


def scene_tile(seed: int, y0: int, x0: int, h: int, w: int, *, shape: tuple[int, int]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Bands B, G, R, NIR uint16 ``(h, w, 4)`` and labels uint8 ``(h, w)`` of a scene window."""
    return _scene_block(*_window(seed, y0, x0, h, w, shape))


def _tiles(render: Callable[[_A, _A], _A], shape: tuple[int, int], tile: int) -> Iterator[_A]:
    """Tiles in row-major order; blocks of one tile row × ~2048 px are rendered in threads."""
    workers, bw = _CPUS, tile * max(1, 2048 // tile)
    jobs = ((np.arange(y, min(y + tile, shape[0])), np.arange(x, min(x + bw, shape[1])))
            for y in range(0, shape[0], tile) for x in range(0, shape[1], bw))
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(render, *j) for j in itertools.islice(jobs, 2 * workers))
        while pending:
            block = pending.popleft().result()
            if (job := next(jobs, None)) is not None:
                pending.append(pool.submit(render, *job))
            yield from (block[:, x:x + tile] for x in range(0, block.shape[1], tile))


def _write(path: Path, pages: list[tuple[Iterator[_A], dict]], **options: object) -> None:
    """Write pages to ``<path>.partial``, then move it into place. tifffile's read-ahead of tiles
    for its encoder threads is capped (its default of 512 MB would dominate memory)."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with tifffile.TiffWriter(tmp, **options) as tif:
            for data, kwargs in pages:
                tif.write(data, maxworkers=_CPUS, buffersize=2**25, **kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _options(tile: int, compression: str | None) -> dict:
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if compression not in ("jpeg", "zlib", None):
        raise ValueError(f"compression must be 'jpeg', 'zlib' or None, got {compression!r}")
    if compression == "jpeg":
        return {"compression": "jpeg", "compressionargs": {"level": 90}, "tile": (tile, tile)}
    return {"compression": compression, "predictor": compression == "zlib", "tile": (tile, tile),
            "compressionargs": {"level": 1} if compression else {}}  # zlib: speed over size


def _mask(image: Path, path: str | os.PathLike | None, render: Callable, shape: tuple[int, int],
          tile: int, classes: tuple, **kwargs: object) -> Path:
    """Write labels as a tiled zlib TIFF (default ``<stem>.mask.tif`` next to the image)."""
    stem = image.name.removesuffix(".tiff").removesuffix(".tif").removesuffix(".ome")
    path = Path(path) if path is not None else image.with_name(stem + ".mask.tif")
    page = {"shape": shape, "dtype": np.uint8, "photometric": "minisblack", **kwargs,
            "metadata": {"classes": list(classes)}, **_options(tile, "zlib"), "predictor": False}
    _write(path, [(_tiles(render, shape, tile), page)], bigtiff=shape[0] * shape[1] > 2**31)
    return path


def write_slide(path: str | os.PathLike, shape: tuple[int, int] = (4096, 4096), *, seed: int = 0,
                mpp: float | None = 0.25, compression: str | None = "jpeg", tile: int = 256,
                levels: int | None = None, pen: bool = False, bubbles: bool = False,
                mask_path: str | os.PathLike | None = None) -> SyntheticScan:
    """Write a synthetic H&E-like slide as pyramidal tiled OME-TIFF plus a label mask TIFF.

    Levels (default: halve until the largest side is below 1024 px) are SubIFDs of the first
    page. Labels 0 background (glass, pen, bubbles), 1 tissue, 2 dense; the mask defaults to
    ``<stem>.mask.tif`` next to the image.
    """
    seed, shape, _, _ = _window(seed, 0, 0, 1, 1, shape)
    path, options = Path(path), _options(tile, compression)
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp must be positive or None, got {mpp!r}")
    levels = max(1, math.floor(math.log2(max(shape) / 1024)) + 2) if levels is None else levels
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    name = f"tilefcn synthetic slide, seed {seed}, shape {shape}"  # UUID from it: same bytes
    meta = {"axes": "YXS", "Name": name, "UUID": str(uuid.uuid5(uuid.NAMESPACE_URL, name))}
    if mpp is not None:
        meta |= {"PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp,
                 "PhysicalSizeYUnit": "µm"}
    res = [{} if mpp is None else {"resolution": (1e4 / (mpp * 2**lv),) * 2,
                                   "resolutionunit": "CENTIMETER"} for lv in range(levels)]
    pages = []
    for lv, q in ((lv, 2**lv) for lv in range(levels)):
        def render(ys: _A, xs: _A, q: int = q) -> _A:
            return _slide_block(seed, shape, ys * q + q // 2, xs * q + q // 2, q, pen, bubbles)[0]

        lshape = (-(-shape[0] // q), -(-shape[1] // q))
        kwargs = {"shape": (*lshape, 3), "dtype": np.uint8, "photometric": "rgb", **options,
                  **res[lv], **({"subifds": levels - 1, "metadata": meta} if lv == 0
                                else {"subfiletype": 1})}
        pages.append((_tiles(render, lshape, tile), kwargs))
    _write(path, pages, bigtiff=True, ome=True)
    mask = _mask(path, mask_path, lambda ys, xs: _slide_block(seed, shape, ys, xs, 1, pen, bubbles,
                                                              False)[1], shape, tile, SLIDE_CLASSES,
                 **res[0])
    return SyntheticScan(path, mask, SLIDE_CLASSES, shape, mpp)


def write_scene(path: str | os.PathLike, shape: tuple[int, int] = (2048, 2048), *, seed: int = 0,
                pixel_size: float = 10.0, origin: tuple[float, float] = (500000.0, 4600000.0),
                epsg: int = 32633, compression: str | None = "zlib", tile: int = 256,
                mask_path: str | os.PathLike | None = None) -> SyntheticScan:
    """Write a synthetic 4-band (B, G, R, NIR) uint16 scene as tiled GeoTIFF plus a label mask.

    ``origin`` is (x, y) of the top-left corner in CRS ``epsg``; ``pixel_size`` in CRS units.
    GeoKeys: projected model, pixel is area, ProjectedCSType ``epsg``, linear unit metre.
    """
    seed, shape, _, _ = _window(seed, 0, 0, 1, 1, shape)
    path, options = Path(path), _options(tile, compression)
    if compression == "jpeg":
        raise ValueError("JPEG cannot store uint16 scenes; use 'zlib' or None")
    if not pixel_size > 0:
        raise ValueError(f"pixel_size must be positive, got {pixel_size!r}")
    keys = (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, operator.index(epsg),
            3076, 0, 1, 9001)
    tags = [(33550, "d", 3, (float(pixel_size), float(pixel_size), 0.0), True),
            (33922, "d", 6, (0.0, 0.0, 0.0, float(origin[0]), float(origin[1]), 0.0), True),
            (34735, "H", len(keys), keys, True)]
    names = "".join(f'<Item name="DESCRIPTION" sample="{i}" role="description">{b}</Item>'
                    for i, b in enumerate(("B", "G", "R", "NIR")))
    page = {"shape": (*shape, 4), "dtype": np.uint16, "photometric": "minisblack",
            "planarconfig": "contig", "metadata": None, **options,
            "extratags": [*tags, (42112, "s", 0, f"<GDALMetadata>{names}</GDALMetadata>", True)]}
    data = _tiles(lambda ys, xs: _scene_block(seed, shape, ys, xs)[0], shape, tile)
    _write(path, [(data, page)], bigtiff=shape[0] * shape[1] * 8 > 2**31)
    mask = _mask(path, mask_path, lambda ys, xs: _scene_block(seed, shape, ys, xs, False)[1],
                 shape, tile, SCENE_CLASSES, extratags=tags)
    return SyntheticScan(path, mask, SCENE_CLASSES, shape, None)
