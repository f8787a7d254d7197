"""On-the-fly integer downsampling of a scan level (``--mpp`` between pyramid levels).

:class:`DownsampledReader` wraps a window reader of a finer level and area-averages ``k×k``
blocks: output pixel ``(i, j)`` is the mean of fine pixels ``[k·i, k·i + k) × [k·j, k·j + k)``,
so output window ``[y0, y1) × [x0, x1)`` reads fine rows ``[k·y0, k·y1)`` and columns
``[k·x0, k·x1)`` — aligned with the whole downsampled image, hence exact for the model run on
it. The output has ``⌊H/k⌋ × ⌊W/k⌋`` pixels: a trailing partial block (the last ``H mod k``
rows / ``W mod k`` columns) is dropped, as pyvips' ``shrink`` and OpenSlide's levels do, so
every output pixel is the mean of exactly ``k²`` real pixels. Integer pixels are rounded to
the nearest value (half to even, ``numpy.rint``) and keep their dtype, so the model's dtype
scaling (``uint8 / 255``) is unchanged; float pixels are averaged in float64 and cast back.
With a nodata value (the GeoTIFF's GDAL_NODATA, or ``--nodata``), each band averages only its
fine values that are not nodata (NaN matches NaN), as GDAL's ``average`` resampling does: an
output band none of whose ``k²`` values is valid is nodata, so a scene's nodata border stays
nodata instead of darkening the pixels next to it. (A rounded integer mean can equal the
nodata value by chance, as in GDAL.)
Fine pixels are read in strips of output rows, so memory stays bounded by the window.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["STRIP_BYTES", "DownsampledReader", "area_downsample"]

#: Fine pixels read per strip (bytes of the float64 sums' input, at most about this much).
STRIP_BYTES = 64 << 20


def _nodata_values(blocks: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """Boolean like ``blocks``: values equal to ``nodata`` (None when none can be)."""
    if nodata is None or (math.isnan(nodata) and blocks.dtype.kind != "f"):
        return None
    return np.isnan(blocks) if math.isnan(nodata) else blocks == nodata


def area_downsample(block: np.ndarray, factor: int, dtype: Any,
                    nodata: float | None = None) -> np.ndarray:
    """Means of ``factor²`` blocks of ``block`` ``(k·h, k·w, C)`` as ``(h, w, C)`` of
    ``dtype`` (integers rounded half to even); with ``nodata``, per band the mean of the
    values that are not nodata, ``nodata`` where there is none."""
    kh, kw, c = block.shape
    h, w = kh // factor, kw // factor
    blocks = block[:h * factor, :w * factor].reshape(h, factor, w, factor, c)
    missing = _nodata_values(blocks, nodata)
    if missing is None or not missing.any():
        means = blocks.mean(axis=(1, 3), dtype=np.float64)
    else:
        counts = (~missing).sum(axis=(1, 3))
        sums = np.where(missing, 0, blocks).sum(axis=(1, 3), dtype=np.float64)
        means = np.full(sums.shape, nodata, np.float64)
        np.divide(sums, counts, out=means, where=counts > 0)
    dtype = np.dtype(dtype)
    if dtype.kind in "biu":
        info = np.iinfo(dtype) if dtype.kind != "b" else None
        means = np.rint(means)
        if info is not None:
            means = np.clip(means, info.min, info.max)
    return means.astype(dtype)


class DownsampledReader:
    """Picklable ``(Y, X, C)`` window reader: ``base`` (a finer level's reader) area-averaged
    by the integer ``factor``, leaving ``nodata`` out of the means (see the module doc for
    alignment, borders, rounding and nodata)."""

    ndim = 3

    def __init__(self, base: Any, factor: int, nodata: float | None = None) -> None:
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 2:
            raise ValueError(f"downsampling factor must be a whole number >= 2, got {factor!r}")
        height, width, channels = base.shape
        if height < factor or width < factor:
            raise ValueError(f"cannot downsample a {height}x{width} image by {factor}")
        self.base, self.factor = base, int(factor)
        self.nodata = None if nodata is None else float(nodata)
        self.shape = (height // self.factor, width // self.factor, channels)
        self.dtype = np.dtype(base.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = (key if isinstance(key, tuple) else (key,)) + (slice(None),) * 2
        if len(key) > 5 or not all(isinstance(k, slice) and k.step in (None, 1)
                                   for k in key[:2]) or not isinstance(key[2], slice):
            raise IndexError(f"{type(self).__name__} takes (slice_y, slice_x[, slice_c]) "
                             "without steps")
        (y0, y1, _), (x0, x1, _) = (k.indices(n) for k, n in zip(key[:2], self.shape,
                                                                   strict=False))
        y1, x1, k = max(y0, y1), max(x0, x1), self.factor
        out = np.empty((y1 - y0, x1 - x0, self.shape[2]), self.dtype)
        row_bytes = max(1, k * k * (x1 - x0) * self.shape[2] * self.dtype.itemsize)
        rows = max(1, STRIP_BYTES // row_bytes)
        for r in range(y0, y1, rows):
            r1 = min(y1, r + rows)
            fine = np.asarray(self.base[k * r:k * r1, k * x0:k * x1])
            out[r - y0:r1 - y0] = area_downsample(fine, k, self.dtype, self.nodata)
        return out[:, :, key[2]]

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return ("downsampled", tokenize(self.base), self.factor, repr(self.nodata))

    def __repr__(self) -> str:
        nodata = "" if self.nodata is None else f", nodata={self.nodata!r}"
        return f"{type(self).__name__}({self.base!r}, factor={self.factor}{nodata})"


def at_resolution(resolution: Any, reader: Any, mpps: list, geotransform: Any,
                  tile: Any, nodata: float | None = None) -> tuple:
    """``(level, factor, reader, mpp, geotransform, tile)`` of a scan read at ``resolution``
    (a :class:`tilefcn.scanmeta.Resolution` or a level number) from ``reader`` of that level:
    with a factor ``k > 1`` the reader is a :class:`DownsampledReader` (leaving ``nodata``
    out of its means), µm/px and the
    geotransform's pixel sizes are ``k`` times the level's, and there is no native tile."""
    level = getattr(resolution, "level", resolution)
    k = getattr(resolution, "factor", 1)
    mpp = mpps[level]
    if k == 1:
        return level, 1, reader, mpp, geotransform, tile
    mpp = None if mpp is None else (mpp[0] * k, mpp[1] * k)
    if geotransform is not None:  # (x0, px_w, rot_x, y0, rot_y, px_h): origin unchanged
        geotransform = tuple(v if i % 3 == 0 else v * k for i, v in enumerate(geotransform))
    return level, k, DownsampledReader(reader, k, nodata), mpp, geotransform, None
