"""Synthetic 4-band satellite scenes: elevation, greenness, urban, cloud and brightness fields,
land-cover spectra, parcels and roofs; windows (`scene_tile`) and the GeoTIFF writer
(`write_scene`)."""

from __future__ import annotations

import functools
import operator
import os
from pathlib import Path

import numpy as np

from tilefcn.synthetic.grid import _base_cell, _render, _sample_grid, _upsample, _window
from tilefcn.synthetic.noise import _A, _F32, _fbm, _hash, _key, _unit
from tilefcn.synthetic.tiffout import SyntheticScan, _mask, _options, _tiles, _write

SCENE_CLASSES = ("water", "vegetation", "soil", "built", "cloud")

# reflectance x 10000 in bands B, G, R, NIR of water, vegetation, soil, built, cloud
_SPECTRA = np.array([[450, 600, 400, 150], [350, 650, 380, 3800], [1100, 1500, 2000, 2600],
                     [1500, 1600, 1700, 2000], [7600, 7700, 7800, 8000]], _F32)
# scene label from bits water 1, built 2, vegetated 4, cloud 8 (cloud > water > built > green)
_SCENE_CODE = np.array([4 if i & 8 else 0 if i & 1 else 3 if i & 2 else 1 if i & 4 else 2
                        for i in range(16)], np.uint8)


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


def scene_tile(seed: int, y0: int, x0: int, h: int, w: int, *, shape: tuple[int, int]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Bands B, G, R, NIR uint16 ``(h, w, 4)`` and labels uint8 ``(h, w)`` of a scene window."""
    return _scene_block(*_window(seed, y0, x0, h, w, shape))


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
