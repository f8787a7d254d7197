"""Picklable ``(Y, X, C)`` window readers of scans: :class:`ArrayReader` over numpy / zarr
arrays and :class:`TiffLevelReader` over one level of a TIFF file.

A TIFF reader pickles without its open file and reopens it by path in each worker process (a
tifffile zarr store cannot be pickled); the open handle is cached per process (path, mtime,
series, level; the 8 most recent). Windows of tiled levels are decoded tile by tile in the
reading thread (:mod:`tilefcn.tiffwindows`); others go through tifffile's zarr store. Errors
of a corrupt file are one ``ValueError("cannot read PATH: reason")``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import tifffile
import zarr
from dask.base import tokenize

from tilefcn.tiffwindows import TileWindows

__all__ = ["ArrayReader", "TiffLevelReader", "axes_letters", "cannot_read", "quiet_tifffile",
           "tiff_axes"]


def _take(arr: Any, axes: str, ky: slice, kx: slice) -> np.ndarray:
    """Read window ``(ky, kx)`` of ``arr`` (axes y, x, c; others have size 1) as (h, w, C)."""
    idx = tuple(ky if a == "y" else kx if a == "x" else slice(None) if a == "c" else 0
                for a in axes)
    out = np.asarray(arr[idx])
    kept = [a for a in axes if a in "yxc"]
    if "c" not in kept:
        out, kept = out[..., None], [*kept, "c"]
    return np.ascontiguousarray(out.transpose([kept.index(a) for a in "yxc"]))


class _Open:
    """An opened level: array and axes; ``closer`` runs when the last reference goes."""

    __slots__ = ("array", "axes", "windows", "__weakref__")

    def __init__(self, array: Any, axes: str, closer: Any = None, windows: Any = None) -> None:
        self.array, self.axes, self.windows = array, axes, windows
        if closer is not None:
            weakref.finalize(self, closer)


_CACHE: dict[tuple, _Open] = {}
_CACHE_LOCK = threading.Lock()


def _cached(key: tuple, opener: Any) -> _Open:
    """Per-process cache of opened TIFF levels (the 8 most recent keys)."""
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    value = opener()
    with _CACHE_LOCK:
        value = _CACHE.setdefault(key, value)
        while len(_CACHE) > 8:
            _CACHE.pop(next(iter(_CACHE)))
    return value


class ArrayReader:
    """Picklable (Y, X, C) window reader over a numpy or zarr array with axes ``axes``.

    ``reader[slice_y, slice_x]`` (optionally ``, slice_c``) returns an (h, w, C) ndarray.
    """

    ndim = 3

    def __init__(self, array: Any, axes: str) -> None:
        self.array, self.axes = array, axes
        self._setup(array)

    def _setup(self, array: Any) -> None:
        shape = dict(zip(self.axes, array.shape, strict=True))
        self.shape = (int(shape["y"]), int(shape["x"]), int(shape.get("c", 1)))
        self.dtype = np.dtype(array.dtype)

    def _array(self) -> Any:
        return self.array

    def __getitem__(self, key: Any) -> np.ndarray:
        key = (key if isinstance(key, tuple) else (key,)) + (slice(None),) * 2
        if not all(isinstance(k, slice) for k in key[:3]) or len(key) > 5:
            raise IndexError(f"{type(self).__name__} takes (slice_y, slice_x[, slice_c])")
        return _take(self._array(), self.axes, key[0], key[1])[:, :, key[2]]

    def __dask_tokenize__(self) -> Any:
        return ("ArrayReader", self.axes, tokenize(self.array))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


class TiffLevelReader(ArrayReader):
    """Window reader for one level of one series of a TIFF file, reopened by path.

    Pickles without its open file; each process opens the file once (cached by path, mtime,
    series and level) and reads only the tiles a window touches, through tifffile's zarr store.
    """

    def __init__(self, path: str | os.PathLike, series: int = 0, level: int = 0) -> None:
        self.path, self.series, self.level = os.fspath(path), int(series), int(level)
        self.mtime = os.stat(self.path).st_mtime_ns
        self.axes = self._handle().axes
        self._setup(self._array())

    def _handle(self) -> _Open:
        handle = self.__dict__.get("_h")
        if handle is None:
            handle = self._h = _cached(self.__dask_tokenize__(), self._open)
        return handle

    def _array(self) -> Any:
        return self._handle().array

    def _open(self) -> _Open:
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"no such file: {self.path}")
        if os.stat(self.path).st_mtime_ns != self.mtime:  # new offsets: refuse to misread
            raise ValueError(f"cannot read {self.path}: file changed since it was opened")
        try:
            with quiet_tifffile():
                tif = tifffile.TiffFile(self.path)
            try:
                level = tif.series[self.series].levels[self.level]
                axes = tiff_axes(level, self.path)
                store = tif.aszarr(series=self.series, level=self.level)
                windows = TileWindows(level.pages[0]) if TileWindows.supports(level) else None
                return _Open(zarr.open_array(store, mode="r", zarr_format=2), axes, tif.close,
                             windows)
            except BaseException:
                tif.close()
                raise
        except Exception as exc:
            raise cannot_read(self.path, exc) from exc

    def __getitem__(self, key: Any) -> np.ndarray:
        windows = self._handle().windows  # tiles decoded in this thread: reads scale
        if windows is not None and isinstance(key, tuple) and len(key) in (2, 3) and all(
                isinstance(k, slice) and k.step in (None, 1) for k in key[:2]):
            try:
                out = windows.read(key[0], key[1])
            except Exception as exc:  # a corrupt tile, table or file: one clear error
                raise cannot_read(self.path, exc) from exc
            return out if len(key) == 2 else out[:, :, key[2]]
        try:
            return super().__getitem__(key)
        except (IndexError, OSError, ValueError):
            raise
        except Exception as exc:  # decoder errors of a corrupt tile
            raise cannot_read(self.path, exc) from exc

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_h"}

    def __dask_tokenize__(self) -> Any:
        return ("tiff", self.path, self.mtime, self.series, self.level)


def cannot_read(path: str, exc: BaseException) -> ValueError:
    """``ValueError("cannot read <path>: <first line of the reason>")``."""
    if str(exc).startswith("cannot read"):
        return exc if isinstance(exc, ValueError) else ValueError(str(exc))
    lines = str(exc).strip().splitlines()
    return ValueError(f"cannot read {path}: {lines[0] if lines else type(exc).__name__}")


@contextlib.contextmanager
def quiet_tifffile() -> Iterator[None]:
    """Silence tifffile's logged warnings about corrupt tags while opening a file."""
    log = logging.getLogger("tifffile")
    drop = logging.Filter("\0")  # matches no logger name: drops every record
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def tiff_axes(series: Any, path: str) -> str:
    """Letters y, x, c, o for the axes of a (squeezed) tifffile series: YX, YXC or CYX."""
    names = [a.lower() if a in "YX" else "c" if n > 1 else "o"
             for a, n in zip(series.axes, series.shape, strict=True)]
    if names.count("c") > 1:
        raise ValueError(f"cannot read {path}: unsupported axes {series.axes!r} {series.shape}")
    return axes_letters(names, series.shape, path)


def axes_letters(names: Any, shape: tuple[int, ...], where: str) -> str:
    """Axis names → letters y, x, c, or o (another axis, which must have size 1)."""
    names = [str(n).lower() for n in names]
    out = "".join(n if n in ("y", "x", "c") else "o" for n in names)
    if len(names) != len(shape) or "y" not in out or "x" not in out or any(
            a == "o" and n > 1 for a, n in zip(out, shape, strict=True)):
        raise ValueError(f"cannot read {where}: unsupported axes {names} for shape {shape}")
    return out
