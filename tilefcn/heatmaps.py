"""A finished tilefcn heatmap opened for reading, whichever format it was written in.

:func:`open_heatmap` reads an OME-Zarr store (levels are its ``multiscales`` datasets) or a
tilefcn Cloud-Optimized GeoTIFF (level 0 and its overviews, read window by window through
rasterio), with the run's ``tilefcn`` attributes (the zarr group's, or the JSON in the TIFF
description). Each level is an array-like ``(C, H, W)`` with ``shape``, ``dtype``, ``chunks``
and basic slicing, so :mod:`tilefcn.preview` and :mod:`tilefcn.regions` need not know which.

Levels: OME-Zarr level ``L`` holds ``⌈H/2^L⌉ × ⌈W/2^L⌉`` NaN-aware 2×2 means
(:mod:`tilefcn.pyramid`); a COG's overview ``L`` is GDAL's ``AVERAGE`` (NaN ignored) by
``2^L``, the same size, whose values agree with the zarr pyramid's where ``2^L`` divides the
level-0 size (elsewhere GDAL spreads the last partial block over the row).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CogLevel", "Heatmap", "open_heatmap"]

_TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class Heatmap:
    """A finished heatmap: where it is, the run's ``attrs`` and its levels (0 first)."""

    path: Path
    attrs: dict
    levels: tuple

    def level(self, index: int) -> Any:
        """Level ``index`` (``ValueError`` naming the levels there are when absent)."""
        if not 0 <= index < len(self.levels):
            raise ValueError(f"--level {index} is not in the heatmap (levels 0.."
                             f"{len(self.levels) - 1})")
        return self.levels[index]


class CogLevel:
    """Level ``index`` of a COG heatmap (0: full resolution, ``k``: overview ``k``) as a
    read-only ``(C, H, W)`` array: ``level[:, y0:y1, x0:x1]`` reads that window."""

    def __init__(self, path: Path, index: int) -> None:
        import rasterio

        self.path, self.index = path, index
        with rasterio.open(path, **self._options()) as src:
            self.shape = (src.count, src.height, src.width)
            self.dtype = np.dtype(src.dtypes[0])
            ys, xs = src.block_shapes[0]
        self.chunks = (self.shape[0], ys, xs)

    def _options(self) -> dict:
        return {} if self.index == 0 else {"overview_level": self.index - 1}

    def __getitem__(self, key: Any) -> np.ndarray:
        import rasterio
        from rasterio.windows import Window

        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        if len(key) != 3 or not all(isinstance(k, slice) and k.step in (None, 1) for k in key):
            raise IndexError("a COG heatmap level takes [c, y0:y1, x0:x1] slices")
        (c0, c1, _), (y0, y1, _), (x0, x1, _) = (k.indices(n) for k, n in
                                                 zip(key, self.shape, strict=True))
        y1, x1 = max(y0, y1), max(x0, x1)
        if y1 == y0 or x1 == x0 or c1 <= c0:
            return np.empty((max(0, c1 - c0), y1 - y0, x1 - x0), self.dtype)
        with rasterio.open(self.path, **self._options()) as src:
            return src.read(list(range(c0 + 1, c1 + 1)),
                            window=Window(x0, y0, x1 - x0, y1 - y0))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:, :, :]
        return whole if dtype is None else whole.astype(dtype)


def open_heatmap(path: str | os.PathLike) -> Heatmap:
    """Open a finished tilefcn heatmap (OME-Zarr ``.zarr`` or GeoTIFF ``.tif``); one-line
    ``FileNotFoundError`` / ``ValueError`` for anything else or an unfinished store."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such heatmap: {p}")
    if p.is_dir():
        return _open_zarr(p)
    if p.suffix.lower() in _TIFF_SUFFIXES:
        return _open_cog(p)
    raise ValueError(f"not a tilefcn heatmap: {p} (an OME-Zarr .zarr or a GeoTIFF .tif)")


def _open_zarr(p: Path) -> Heatmap:
    import zarr

    try:
        group = zarr.open_group(str(p), mode="r")
        attrs = dict(group.attrs["tilefcn"])
        paths = [d["path"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]]
        levels = tuple(group[name] for name in paths)
    except Exception as exc:  # noqa: BLE001 - any unreadable store is one line
        raise ValueError(f"not a tilefcn OME-Zarr heatmap: {p}") from exc
    if attrs.get("status") != "complete":
        raise ValueError(f"heatmap {p} is not complete (status {attrs.get('status')!r}); "
                         "finish it with `tilefcn run … --resume`")
    return Heatmap(p, attrs, levels)


def _open_cog(p: Path) -> Heatmap:
    import rasterio
    from rasterio.errors import RasterioError

    from tilefcn.read import tiff_description

    try:
        attrs = json.loads(tiff_description(p) or "")["tilefcn"]
        with rasterio.open(p) as src:
            overviews = len(src.overviews(1))
        levels = tuple(CogLevel(p, i) for i in range(overviews + 1))
    except (ValueError, TypeError, KeyError, RasterioError) as exc:
        raise ValueError(f"not a tilefcn GeoTIFF heatmap: {p}") from exc
    if not isinstance(attrs, dict) or "geometry" not in attrs:
        raise ValueError(f"not a tilefcn GeoTIFF heatmap: {p}")
    return Heatmap(p, attrs, levels)
