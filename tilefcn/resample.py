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
Fine pixels are read in strips of output rows, so memory stays bounded by the window.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["STRIP_BYTES", "DownsampledReader", "area_downsample"]

#: Fine pixels read per strip (bytes of the float64 sums' input, at most about this much).
STRIP_BYTES = 64 << 20


def area_downsample(block: np.ndarray, factor: int, dtype: Any) -> np.ndarray:
    """Means of ``factor²`` blocks of ``block`` ``(k·h, k·w, C)`` as ``(h, w, C)`` of
    ``dtype`` (integers rounded half to even)."""
    kh, kw, c = block.shape
    h, w = kh // factor, kw // factor
    means = block[:h * factor, :w * factor].reshape(h, factor, w, factor, c).mean(
        axis=(1, 3), dtype=np.float64)
    dtype = np.dtype(dtype)
    if dtype.kind in "biu":
        info = np.iinfo(dtype) if dtype.kind != "b" else None
        means = np.rint(means)
        if info is not None:
            means = np.clip(means, info.min, info.max)
    return means.astype(dtype)


class DownsampledReader:
    """Picklable ``(Y, X, C)`` window reader: ``base`` (a finer level's reader) area-averaged
    by the integer ``factor`` (see the module doc for alignment, borders and rounding)."""

    ndim = 3

    def __init__(self, base: Any, factor: int) -> None:
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 2:
            raise ValueError(f"downsampling factor must be a whole number >= 2, got {factor!r}")
        height, width, channels = base.shape
        if height < factor or width < factor:
            raise ValueError(f"cannot downsample a {height}x{width} image by {factor}")
        self.base, self.factor = base, int(factor)
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
            out[r - y0:r1 - y0] = area_downsample(fine, k, self.dtype)
        return out[:, :, key[2]]

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return ("downsampled", tokenize(self.base), self.factor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r}, factor={self.factor})"


def at_resolution(resolution: Any, reader: Any, mpps: list, geotransform: Any,
                  tile: Any) -> tuple:
    """``(level, factor, reader, mpp, geotransform, tile)`` of a scan read at ``resolution``
    (a :class:`tilefcn.scanmeta.Resolution` or a level number) from ``reader`` of that level:
    with a factor ``k > 1`` the reader is a :class:`DownsampledReader`, µm/px and the
    geotransform's pixel sizes are ``k`` times the level's, and there is no native tile."""
    level = getattr(resolution, "level", resolution)
    k = getattr(resolution, "factor", 1)
    mpp = mpps[level]
    if k == 1:
        return level, 1, reader, mpp, geotransform, tile
    mpp = None if mpp is None else (mpp[0] * k, mpp[1] * k)
    if geotransform is not None:  # (x0, px_w, rot_x, y0, rot_y, px_h): origin unchanged
        geotransform = tuple(v if i % 3 == 0 else v * k for i, v in enumerate(geotransform))
    return level, k, DownsampledReader(reader, k), mpp, geotransform, None
