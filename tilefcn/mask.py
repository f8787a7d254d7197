"""What to compute (``--mask``, nodata): a low-resolution foreground and the :class:`Footprint`
that answers "does this input window hold foreground?" for tiles and sub-tiles.

Masks are reduced with **max-pooling**, never by striding: a low-resolution pixel is
foreground when any pixel under it is, so thin tissue is never dropped. The level read is the
smallest pyramid level whose larger side is at least :data:`MAX_SIDE` (or the scan's own), then
max-pooled by ``f = ceil(side / MAX_SIDE)`` in dask blocks (bounded memory).

``auto``: brightfield slides (3 bands, uint8/uint16, not georeferenced, no nodata) — tissue by
:mod:`tilefcn.tissue`; other scans — pixels that are not nodata (every band equal to the nodata
value; 0 when the scan has none). A path: a mask image at any resolution (it spans the scan),
non-zero = compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from tilefcn.bands import nodata_pixels, select_bands
from tilefcn.read import Scan, open_scan

__all__ = ["Footprint", "brightfield", "foreground_mask", "max_pool"]

MAX_SIDE = 1024  # px: 8 scan px per mask px on an 8192² slide, 32 per 256-px sub-tile


@dataclass(frozen=True, eq=False)
class Footprint:
    """Which input pixels count as foreground, and which value is nodata.

    ``foreground`` (None: everywhere) is a boolean grid over the scan: its pixel ``(i, j)``
    covers image rows ``[i·scale_y, (i+1)·scale_y)`` and columns ``[j·scale_x, (j+1)·scale_x)``.
    A query widens the window by ``margin`` image pixels per side (slack for pyramid levels
    whose sizes were rounded). ``nodata``: outputs whose receptive-field centre is nodata
    are NaN (see :func:`tilefcn.runtime.engine.nodata_centres`).
    """

    image_shape: tuple[int, int]
    foreground: np.ndarray | None = None
    scale: tuple[float, float] = (1.0, 1.0)
    margin: float = 0.0
    nodata: float | None = None

    def has_foreground(self, ys: tuple[int, int], xs: tuple[int, int]) -> bool:
        """Whether image rows ``[ys)`` × columns ``[xs)`` (unclipped) hold any foreground."""
        (h, w), mask = self.image_shape, self.foreground
        y0, y1, x0, x1 = max(0, ys[0]), min(h, ys[1]), max(0, xs[0]), min(w, xs[1])
        if y0 >= y1 or x0 >= x1:
            return False  # outputs that see only the network's padding
        if mask is None:
            return True
        (sy, sx), m = self.scale, self.margin
        i0, i1 = max(0, math.floor((y0 - m) / sy)), min(mask.shape[0], math.ceil((y1 + m) / sy))
        j0, j1 = max(0, math.floor((x0 - m) / sx)), min(mask.shape[1], math.ceil((x1 + m) / sx))
        return bool(mask[i0:i1, j0:j1].any())

    @property
    def masks(self) -> bool:
        """Whether anything is skipped or set to NaN at all."""
        return self.foreground is not None or self.nodata is not None

    @property
    def fraction(self) -> float:
        """Share of the low-resolution grid that is foreground (1 without a mask)."""
        return 1.0 if self.foreground is None else float(self.foreground.mean())

    def __dask_tokenize__(self) -> Any:
        import hashlib

        mask = b"" if self.foreground is None else np.packbits(self.foreground).tobytes()
        return ("Footprint", self.image_shape, hashlib.sha256(mask).hexdigest(),
                None if self.foreground is None else self.foreground.shape, self.scale,
                self.margin, None if self.nodata is None else repr(self.nodata))


def _pool(block: np.ndarray, factor: int) -> np.ndarray:
    """Max over ``factor``² pixels of a ``(h, w, K)`` block (edges padded with −inf)."""
    if factor == 1:
        return block
    h, w, k = block.shape
    ph, pw = -(-h // factor) * factor, -(-w // factor) * factor
    if (ph, pw) != (h, w):
        block = np.pad(block, ((0, ph - h), (0, pw - w), (0, 0)), constant_values=-np.inf)
    return block.reshape(ph // factor, factor, pw // factor, factor, k).max(axis=(1, 3))


def max_pool(array: da.Array, factor: int,
             features: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``features`` of each ``(h, w, C)`` block of ``array`` (→ ``(h, w, K)`` float32),
    max-pooled by ``factor``: ``(ceil(H/f), ceil(W/f), K)``, computed block by block."""
    edge = max(factor, (2048 // factor) * factor)  # blocks hold whole pooling cells
    array = array.rechunk((edge, edge, -1))
    k = features(np.zeros((1, 1, array.shape[2]), array.dtype)).shape[-1]
    chunks = tuple(tuple(-(-c // factor) for c in cs) for cs in array.chunks[:2])
    pooled = array.map_blocks(lambda b: _pool(features(b).astype(np.float32), factor),
                              chunks=(*chunks, (k,)), dtype=np.float32,
                              meta=np.empty((0, 0, 0), np.float32))
    return np.asarray(pooled.compute())


def _level_for(scan: Scan, max_side: int) -> tuple[Scan, int]:
    """The level to read a mask from (smallest one at least ``max_side``, never finer than the
    scan's own) and its pooling factor."""
    info = scan.info
    if not info.source.startswith("<") and len(info.levels) > 1:
        coarser = [i for i in range(info.level, len(info.levels))
                   if max(info.levels[i]) >= max_side]
        pick = coarser[-1] if coarser else info.level
        if pick != info.level:
            scan = open_scan(info.source, level=pick)
    return scan, max(1, -(-max(scan.info.shape[:2]) // max_side))


def _footprint(image: Scan, level: Scan, factor: int, grid: np.ndarray,
               nodata: float | None) -> Footprint:
    """A footprint whose ``grid`` is ``level`` max-pooled by ``factor``, over ``image``."""
    (h, w), (lh, lw) = image.info.shape[:2], level.info.shape[:2]
    ry, rx = h / lh, w / lw
    margin = 0.0 if (ry, rx) == (1.0, 1.0) else max(ry, rx)
    return Footprint((h, w), grid, (factor * ry, factor * rx), margin, nodata)


def brightfield(scan: Scan, nodata: float | None) -> bool:
    """Whether ``--mask auto`` looks for tissue (see module doc) rather than nodata."""
    info = scan.info
    return (info.shape[2] == 3 and info.dtype in ("uint8", "uint16") and nodata is None
            and info.crs is None and info.geotransform is None)


def foreground_mask(scan: Scan, spec: str | Path | None, nodata: float | None = None,
                    bands: tuple[int, ...] | None = None,
                    max_side: int = MAX_SIDE) -> Footprint:
    """The :class:`Footprint` for ``spec`` (None/``"none"``: everything, ``"auto"``, or a mask
    image path) on ``scan`` (bands already selected with ``bands``), with ``nodata``."""
    height, width = scan.info.shape[:2]
    if spec is None or str(spec) == "none":
        return Footprint((height, width), None, nodata=nodata)
    if str(spec) == "auto":
        level, factor = _level_for(scan, max_side)
        if level is not scan:
            level = select_bands(level, bands)
        if brightfield(scan, nodata):
            from tilefcn.tissue import brightfield_features, tissue_from_features

            grid = tissue_from_features(max_pool(level.array, factor, brightfield_features))
        else:
            value = 0.0 if nodata is None else nodata
            grid = max_pool(level.array, factor, lambda b: ~nodata_pixels(b, value)[..., None])
            grid = grid[..., 0] > 0
        return _footprint(scan, level, factor, grid, nodata)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path} (--mask)")
    level, factor = _level_for(open_scan(path), max_side)
    grid = max_pool(level.array, factor, lambda b: np.any(b != 0, axis=-1)[..., None])
    return _footprint(scan, level, factor, grid[..., 0] > 0, nodata)
