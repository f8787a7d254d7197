"""Band selection (``--bands 4,3,2,8``) and nodata (``--nodata V`` or the file's GDAL_NODATA).

Bands are 1-based on the command line, as in GDAL; :func:`select_bands` picks and orders them
(0-based) for the model, lazily: the reader still decodes every band of a chunky TIFF and drops
the others. A pixel is *nodata* when every selected band equals the nodata value (NaN matches
NaN); :func:`resolve_nodata` says which value applies.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from tilefcn.read import Scan

__all__ = ["BandReader", "nodata_pixels", "parse_bands", "parse_nodata", "resolve_nodata",
           "select_bands", "with_nodata"]


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """``"4,3,2,8"`` (1-based) → ``(3, 2, 1, 7)`` (0-based); None or ``""`` → None (all)."""
    if text is None or not str(text).strip():
        return None
    try:
        bands = tuple(int(part) - 1 for part in str(text).split(","))
    except ValueError:
        raise ValueError(f"--bands takes 1-based band numbers separated by commas, such as "
                         f"4,3,2,8; got {text!r}") from None
    if min(bands) < 0:
        raise ValueError(f"--bands are numbered from 1, got {text!r}")
    return bands


def parse_nodata(value: Any) -> float | str | None:
    """A nodata option: None (use the file's own), ``"none"`` (ignore the file's), or a number
    (``nan`` allowed)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "none":
        return "none"
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--nodata takes a number, nan or none; got {value!r}") from None


def resolve_nodata(scan: Scan, nodata: float | str | None) -> float | None:
    """The nodata value that applies: ``nodata`` if a number, none for ``"none"``, else the
    scan's own (``ScanInfo.nodata``, from a GeoTIFF's GDAL_NODATA tag)."""
    if nodata == "none":
        return None
    if nodata is None:
        nodata = getattr(scan.info, "nodata", None)
        if nodata is None:
            return None
    value = float(nodata)
    if not math.isnan(value) and np.dtype(scan.info.dtype).kind in "iub":
        info = np.iinfo(scan.info.dtype) if np.dtype(scan.info.dtype).kind != "b" else None
        if info is not None and not (info.min <= value <= info.max and value == int(value)):
            raise ValueError(f"nodata {value:g} cannot occur in {scan.info.dtype} pixels")
    return value


def with_nodata(scan: Scan, nodata: float | None) -> Scan:
    """``scan`` whose on-the-fly downsampling (``--mpp`` between levels) leaves ``nodata``
    out of its means (:mod:`tilefcn.resample`); ``scan`` itself when it is not downsampled
    or already does. Call it before :func:`select_bands`."""
    from tilefcn.read import reader_array
    from tilefcn.resample import DownsampledReader

    reader = scan.reader
    if not isinstance(reader, DownsampledReader) or repr(reader.nodata) == repr(
            None if nodata is None else float(nodata)):
        return scan
    reader = DownsampledReader(reader.base, reader.factor, nodata)
    array = reader_array(reader, (scan.array.chunks[0][0], scan.array.chunks[1][0]))
    return Scan(array=array, info=scan.info, reader=reader)


def nodata_pixels(pixels: np.ndarray, nodata: float) -> np.ndarray:
    """Boolean ``(…)`` of the pixels ``(…, C)`` whose every band equals ``nodata``."""
    if math.isnan(nodata):
        return np.isnan(pixels).all(axis=-1) if pixels.dtype.kind == "f" else \
            np.zeros(pixels.shape[:-1], bool)
    return (pixels == nodata).all(axis=-1)


class BandReader:
    """Picklable window reader returning the bands ``bands`` (0-based, in that order) of
    ``reader``: ``reader[ys, xs]`` → ``(h, w, len(bands))``."""

    ndim = 3

    def __init__(self, reader: Any, bands: tuple[int, ...]) -> None:
        self.reader, self.bands = reader, tuple(int(b) for b in bands)
        self.shape = (*reader.shape[:2], len(self.bands))
        self.dtype = reader.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        pixels = np.asarray(self.reader[key[:2]])[:, :, list(self.bands)]
        return pixels if len(key) < 3 else pixels[:, :, key[2]]

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return ("BandReader", tokenize(self.reader), self.bands)

    def __repr__(self) -> str:
        return f"BandReader({self.reader!r}, bands={self.bands})"


def select_bands(scan: Scan, bands: tuple[int, ...] | None) -> Scan:
    """``scan`` with only ``bands`` (0-based, in that order); None keeps the scan as it is."""
    if bands is None:
        return scan
    channels = scan.info.shape[2]
    if max(bands) >= channels:
        raise ValueError(f"--bands {','.join(str(b + 1) for b in bands)}: "
                         f"{scan.info.source} has {channels} band(s)")
    array = scan.array[:, :, list(bands)]
    reader = None if scan.reader is None else BandReader(scan.reader, bands)
    info = dataclasses.replace(scan.info, shape=(*scan.info.shape[:2], len(bands)))
    return Scan(array=array, info=info, reader=reader)
