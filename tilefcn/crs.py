"""Coordinate reference systems through rasterio: an input's CRS as WKT, a user's CRS
(WKT, ``EPSG:n``, PROJ string) checked, and rasterio's warning about files without one
silenced (a plain slide's heatmap has no CRS)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def source_crs(source: str | os.PathLike | None, fallback: str | None) -> str | None:
    """The CRS of a georeferenced input file as WKT (as GDAL reads it, EPSG or not), else
    ``fallback`` (e.g. ``ScanInfo.crs``); None when neither knows one."""
    import rasterio
    from rasterio.errors import RasterioError

    if source is not None and Path(source).is_file():
        try:
            with quiet_rasterio(), rasterio.open(source) as src:
                if src.crs is not None:
                    return src.crs.to_wkt()
        except RasterioError:
            pass
    return fallback


@contextlib.contextmanager
def quiet_rasterio() -> Iterator[None]:
    """Hide rasterio's NotGeoreferencedWarning (a plain slide heatmap has no CRS)."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def rasterio_crs(crs: str | None) -> Any:
    """``crs`` (WKT, ``EPSG:n``, PROJ string, …) as a rasterio CRS; ``ValueError`` if invalid."""
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    if crs is None:
        return None
    try:
        return CRS.from_user_input(crs)
    except CRSError as exc:
        raise ValueError(f"not a coordinate reference system: {crs!r} ({exc})") from None
