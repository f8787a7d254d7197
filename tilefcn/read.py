"""Open a scan as a lazy ``(Y, X, C)`` dask array plus its metadata (:class:`ScanInfo`).

Sources: TIFF-family files (OME-TIFF, SVS / generic pyramidal TIFF, tiled or striped TIFF,
GeoTIFF), zarr / OME-Zarr stores, numpy, zarr and dask arrays. Files are read window by window
through ``tifffile`` → zarr; nothing reads the whole image, not even for metadata. The window
readers (:mod:`tilefcn.readers`) are picklable: they reopen the file by path in each worker
process (a tifffile zarr store cannot be pickled) and cache the open handle per process.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr
from dask.base import tokenize

from tilefcn import scanmeta
from tilefcn.readers import (
    ArrayReader,
    TiffLevelReader,
    axes_letters,
    cannot_read,
    quiet_tifffile,
    tiff_axes,
)
from tilefcn.resample import at_resolution

__all__ = ["ArrayReader", "Scan", "ScanInfo", "TiffLevelReader", "open_scan", "thumbnail",
           "tiff_description"]

CHUNK = 2048


@dataclass(frozen=True, slots=True)
class ScanInfo:
    """Metadata of the chosen level of a scan (all sizes ``(y, x)``)."""

    source: str
    shape: tuple[int, int, int]
    dtype: str
    level: int
    levels: tuple[tuple[int, int], ...]
    downsamples: tuple[float, ...]
    mpp: tuple[float, float] | None
    tile: tuple[int, int] | None
    crs: str | None
    geotransform: tuple[float, ...] | None
    nodata: float | None = None  # GDAL_NODATA of a GeoTIFF (tilefcn.bands)
    factor: int = 1  # ``level`` area-averaged by this (--mpp between levels, tilefcn.resample);
    #                  shape, mpp and geotransform are those after it

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dict (tuples become lists; a NaN nodata becomes "nan")."""
        data = json.loads(json.dumps(asdict(self)))
        if self.nodata is not None and self.nodata != self.nodata:  # strict JSON has no NaN
            data["nodata"] = "nan"
        return data


@dataclass(frozen=True)
class Scan:
    """A lazy scan: ``array`` (Y, X, C), its ``info`` and a picklable window ``reader``."""

    array: da.Array
    info: ScanInfo
    reader: Any | None


# --------------------------------------------------------------------------- TIFF files


def _check_extent(series: Any, path: str) -> None:
    """Raise if any strip/tile of the level lies beyond the end of the file (truncation)."""
    size = os.path.getsize(path)
    for page in filter(None, series.pages):
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=False)]
        if ends and max(ends) > size:
            raise ValueError(f"cannot read {path}: file is truncated")


def _tiff_meta(path: str) -> dict[str, Any]:
    """Levels, pixel size, georeference and native tiles of series 0 (metadata only)."""
    with quiet_tifffile(), tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ValueError("no image series")
        series = tif.series[0]
        yx, tiles = [], []
        for lv in series.levels:
            axes = tiff_axes(lv, path)
            yx.append((lv.shape[axes.index("y")], lv.shape[axes.index("x")]))
            key = lv.keyframe
            tiles.append((key.tilelength, key.tilewidth) if key.is_tiled
                         else (min(key.rowsperstrip or yx[-1][0], yx[-1][0]), yx[-1][1]))
            _check_extent(lv, path)
        mpps = scanmeta.per_level_mpp(scanmeta.tiff_mpp(tif, series.keyframe), yx)
        crs, gt0 = scanmeta.tiff_georef(series.keyframe)
        nodata = scanmeta.tiff_nodata(series.keyframe)
    return {"yx": yx, "tiles": tiles, "mpps": mpps, "crs": crs, "gt0": gt0, "nodata": nodata}


#: Largest image tilefcn opens (px): 2**40, a 1-megapixel-squared scan (the largest slides
#: are ~2·10^10 px); a header declaring more is corrupt or hostile.
MAX_PIXELS = 2**40


def _open_tiff(path: str, level: int | None, mpp: float | None, chunk: int) -> Scan:
    try:
        meta = _tiff_meta(path)
    except Exception as exc:
        raise cannot_read(path, exc) from exc
    yx = meta["yx"]
    if max(y * x for y, x in yx) > MAX_PIXELS:
        y, x = max(yx, key=lambda v: v[0] * v[1])
        raise ValueError(f"cannot read {path}: it declares an image of {y}x{x} px, more than "
                         f"the {MAX_PIXELS:.2g} px tilefcn reads (corrupt header?)")
    chosen = scanmeta.select_level(path, yx, meta["mpps"], level, mpp)
    reader = TiffLevelReader(path, 0, chosen.level)
    geot = scanmeta.level_geotransform(meta["gt0"], yx, chosen.level)
    return _make_scan(path, reader, chosen, yx, meta["mpps"], meta["tiles"][chosen.level],
                      meta["crs"], geot, chunk, nodata=meta["nodata"])


# --------------------------------------------------------------------------- zarr, arrays


def _open_zarr_path(path: str, level: int | None, mpp: float | None, chunk: int) -> Scan:
    try:
        node = zarr.open(os.path.abspath(path), mode="r")  # absolute: pickled to workers
        if isinstance(node, zarr.Array):
            arrays, axes, mpps = [node], _array_axes(node, path), [None]
        else:
            ms = (dict(node.attrs).get("ome") or dict(node.attrs)).get("multiscales")
            if not ms:
                raise ValueError(f"cannot read {path}: zarr group without multiscales metadata")
            arrays = [node[d["path"]] for d in ms[0]["datasets"]]
            axes_md = ms[0].get("axes", list("tczyx"))
            names = [a["name"] if isinstance(a, dict) else a for a in axes_md]
            units = [a.get("unit") if isinstance(a, dict) else None for a in axes_md]
            axes = axes_letters(names, arrays[0].shape, path)
            mpps = [scanmeta.ngff_mpp(d, names, units) for d in ms[0]["datasets"]]
    except Exception as exc:
        raise cannot_read(path, exc) from exc
    yx = [(a.shape[axes.index("y")], a.shape[axes.index("x")]) for a in arrays]
    mpps = [None] * len(mpps) if None in mpps else mpps
    chosen = scanmeta.select_level(path, yx, mpps, level, mpp)
    ch = arrays[chosen.level].chunks
    tile = (ch[axes.index("y")], ch[axes.index("x")])
    reader = ArrayReader(arrays[chosen.level], axes)  # zarr arrays pickle as store path + metadata
    return _make_scan(path, reader, chosen, yx, mpps, tile, None, None, chunk)


def _array_axes(arr: Any, where: str) -> str:
    names = getattr(getattr(arr, "metadata", None), "dimension_names", None)
    if names and all(names):
        return axes_letters(names, arr.shape, where)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected a (Y, X) or (Y, X, C) array, got shape {tuple(arr.shape)}")
    return "yxc"[: arr.ndim]


# --------------------------------------------------------------------------- common


def _chunk(tile: int | None, target: int) -> int:
    """Chunk edge: ~``target`` rounded down to a multiple of the native tile edge."""
    if not tile or tile > 2 * target:
        return target
    return max(1, target // tile) * tile


def _check_pixels(where: str, dtype: Any) -> None:
    """Refuse pixels that are not numbers a model can read (complex, strings, objects…)."""
    if np.dtype(dtype).kind not in "biuf":
        raise ValueError(f"cannot read {where}: unsupported pixel type {np.dtype(dtype)} "
                         "(expected integer, floating-point or bool pixels)")


def reader_array(reader: Any, chunks: tuple[int, int]) -> da.Array:
    """The lazy ``(Y, X, C)`` dask array of a window ``reader``, chunked ``chunks`` (y, x)."""
    return da.from_array(reader, chunks=(*chunks, reader.shape[2]),
                         meta=np.empty((0, 0, 0), reader.dtype),
                         name=f"read-{tokenize(reader, *chunks)}")


def _make_scan(source: str, reader: Any, level: int | scanmeta.Resolution, yx: list,
               mpps: list, tile: tuple[int, int] | None, crs: str | None, geot: Any,
               chunk: int, nodata: float | None = None) -> Scan:
    _check_pixels(source, reader.dtype)
    level, factor, reader, mpp, geot, tile = at_resolution(level, reader, mpps, geot, tile,
                                                           nodata)
    cy, cx = (_chunk(t, chunk) for t in (tile or (None, None)))
    array = reader_array(reader, (cy, cx))
    info = ScanInfo(
        source=source, shape=reader.shape, dtype=reader.dtype.name, level=level,
        levels=tuple((int(y), int(x)) for y, x in yx),
        downsamples=tuple(yx[0][0] / y for y, _ in yx),
        mpp=None if mpp is None else tuple(float(v) for v in mpp),
        tile=None if tile is None else (int(tile[0]), int(tile[1])), crs=crs, geotransform=geot,
        nodata=nodata, factor=factor)
    return Scan(array=array, info=info, reader=reader)


def open_scan(source: Any, *, level: int | None = None, mpp: float | None = None,
              chunk: int = CHUNK) -> Scan:
    """Open a scan lazily.

    Parameters
    ----------
    source
        Path to a TIFF-family file or a ``.zarr`` / OME-Zarr store, or a numpy, zarr or dask
        array ``(Y, X)`` or ``(Y, X, C)``.
    level
        Pyramid level (default 0).
    mpp
        Read at this many µm per pixel: a level within 10 % of it, else a finer level
        area-averaged by an integer factor (:func:`tilefcn.scanmeta.select_level`,
        :mod:`tilefcn.resample`).
    chunk
        Target dask chunk edge; rounded down to a multiple of the file's native tile.

    Returns
    -------
    Scan
        ``array`` (Y, X, C) lazy dask array, ``info``, and a picklable window ``reader``
        (``None`` for dask inputs, whose chunks are kept).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no such file: {path}")
        if path.suffix.lower() == ".zarr" or any(
                (path / m).exists() for m in ("zarr.json", ".zarray", ".zgroup")):
            return _open_zarr_path(str(path), level, mpp, chunk)
        if path.is_dir():
            raise ValueError(f"cannot read {path}: a directory, not an image or a zarr store")
        return _open_tiff(str(path), level, mpp, chunk)
    if not isinstance(source, (np.ndarray, zarr.Array, da.Array)):
        raise TypeError(f"cannot open {type(source).__name__} as a scan: expected a path, "
                        "or a numpy, zarr or dask array")
    name = f"<{type(source).__module__.split('.')[0]} array>"
    axes = _array_axes(source, name)
    yx = [(int(source.shape[axes.index("y")]), int(source.shape[axes.index("x")]))]
    scanmeta.select_level(name, yx, [None], level, mpp)
    if isinstance(source, da.Array):
        _check_pixels(name, source.dtype)
        array = source if source.ndim == 3 else source[..., None]
        info = ScanInfo(name, tuple(int(s) for s in array.shape), array.dtype.name, 0,
                        tuple(yx), (1.0,), None, array.chunksize[:2], None, None)
        return Scan(array=array, info=info, reader=None)
    tile = getattr(source, "chunks", None) if isinstance(source, zarr.Array) else None
    tile = tile and (tile[axes.index("y")], tile[axes.index("x")])
    return _make_scan(name, ArrayReader(source, axes), 0, yx, [None], tile, None, None, chunk)


def thumbnail(scan: Scan, max_side: int) -> np.ndarray:
    """``(y, x, C)`` view of ``scan`` whose larger side is at most ``max_side``, read from the
    smallest pyramid level that is at least that large (reopened by path) with a stride, or a
    level between ``max_side/2`` and ``max_side`` as it is; never more than one level."""
    levels, base = scan.info.levels, scan
    if not scan.info.source.startswith("<") and len(levels) > 1:
        large = [i for i, (h, w) in enumerate(levels) if max(h, w) > max_side]
        pick = large[-1] if large else len(levels) - 1
        if pick + 1 < len(levels) and 2 * max(levels[pick + 1]) > max_side:
            pick += 1
        base = open_scan(scan.info.source, level=pick)
    step = -(-max(base.info.shape[:2]) // max_side)
    return np.asarray(base.array[::step, ::step].compute())


def tiff_description(path: str | os.PathLike) -> str | None:
    """ImageDescription of the first page of a TIFF file (None if absent or unreadable)."""
    try:
        with quiet_tifffile(), tifffile.TiffFile(path) as tif:
            return tif.pages.first.description or None
    except Exception:
        return None
