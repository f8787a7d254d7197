"""Synthetic H&E-like slides: tissue and dense fields, stain palette, nuclei, fibres, pen marks
and bubbles; windows (`slide_tile`) and the pyramidal OME-TIFF writer (`write_slide`)."""

from __future__ import annotations

import functools
import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tilefcn.synthetic.grid import _C, _G, _base_cell, _render, _sample_grid, _upsample, _window
from tilefcn.synthetic.noise import _A, _F32, _fbm, _hash, _key, _unit
from tilefcn.synthetic.tiffout import SyntheticScan, _mask, _options, _tiles, _write

SLIDE_CLASSES = ("background", "tissue", "dense")

_HEMA = np.array([0.650, 0.704, 0.286])  # Ruifrok-Johnston optical densities of H and E
_EOSIN = np.array([0.072, 0.990, 0.105])
_GLASS = np.array([0.030, 0.036, 0.026])
_INKS = np.array([[1.1, 0.5, 0.15], [0.9, 0.25, 0.85], [1.3, 1.3, 1.2]], _F32)  # blue, green, black


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


def slide_tile(seed: int, y0: int, x0: int, h: int, w: int, *, shape: tuple[int, int],
               pen: bool = False, bubbles: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 ``(h, w, 3)`` and labels uint8 ``(h, w)`` of a window of a synthetic slide."""
    return _slide_block(*_window(seed, y0, x0, h, w, shape), 1, pen, bubbles)


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
