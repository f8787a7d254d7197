"""Pixel size and georeference of a scan, from TIFF tags and NGFF (OME-Zarr) metadata.

Pure functions of already-parsed metadata (tifffile objects, NGFF dicts), and the choice of a
pyramid level by pixel size; opening files is :mod:`tilefcn.read`'s. Pixel sizes are µm per
pixel ``(y, x)``; georeference is an ``"EPSG:n"`` CRS and a GDAL geotransform.
"""

from __future__ import annotations

import contextlib
import math
import re
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np

__all__ = ["level_geotransform", "ngff_mpp", "per_level_mpp", "select_level",
           "tiff_georef", "tiff_mpp"]

_UNIT_TO_UM = {"micrometer": 1.0, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nanometer": 1e-3,
               "nm": 1e-3, "millimeter": 1e3, "mm": 1e3, "centimeter": 1e4, "cm": 1e4,
               "meter": 1e6, "m": 1e6}


def tiff_mpp(tif: Any, page: Any) -> tuple[float, float] | None:
    """µm/px (y, x) at level 0: OME-XML, Aperio ``MPP = x``, or CENTIMETER resolution tags."""
    if tif.is_ome:
        with contextlib.suppress(ET.ParseError, TypeError, ValueError, KeyError, StopIteration):
            px = next(e for e in ET.fromstring(tif.ome_metadata).iter()
                      if e.tag.split("}")[-1] == "Pixels")
            mpp = [float(px.get(f"PhysicalSize{a}")) * _UNIT_TO_UM[px.get(
                f"PhysicalSize{a}Unit", "µm")] for a in "YX"]
            if min(mpp) > 0:
                return mpp[0], mpp[1]
    match = re.search(r"\bMPP\s*=\s*([0-9.]+(?:[eE][-+]?\d+)?)", page.description or "")
    if match and float(match.group(1)) > 0:
        return float(match.group(1)), float(match.group(1))
    tags = page.tags  # only CENTIMETER units: INCH/NONE hold 72-dpi-style defaults
    if tags.valueof(296) != 3 or 282 not in tags or 283 not in tags:
        return None
    res = [n / d if d else 0.0 for n, d in (tags.valueof(283), tags.valueof(282))]
    return (1e4 / res[0], 1e4 / res[1]) if min(res) > 0 else None


def tiff_georef(page: Any) -> tuple[str | None, tuple[float, ...] | None]:
    """CRS ("EPSG:n") and GDAL geotransform of level 0 from GeoTIFF tags."""
    if not page.is_geotiff:
        return None, None
    tags = page.geotiff_tags or {}
    crs = None
    for key in ("ProjectedCSTypeGeoKey", "GeographicTypeGeoKey"):
        with contextlib.suppress(TypeError, ValueError):
            code = int(tags.get(key))
            if 0 < code < 32767:
                crs = f"EPSG:{code}"
                break
    gt = None
    if "ModelTransformation" in tags:
        m = np.asarray(tags["ModelTransformation"], dtype=float).reshape(4, 4)
        gt = (m[0, 3], m[0, 0], m[0, 1], m[1, 3], m[1, 0], m[1, 1])
    elif "ModelPixelScale" in tags and "ModelTiepoint" in tags:
        sx, sy = tags["ModelPixelScale"][:2]
        tp = np.asarray(tags["ModelTiepoint"], dtype=float).reshape(-1, 6)[0]
        gt = (tp[3] - tp[0] * sx, sx, 0.0, tp[4] + tp[1] * sy, 0.0, -sy)
    if gt is not None and int(tags.get("GTRasterTypeGeoKey", 1) or 1) == 2:  # PixelIsPoint
        gt = (gt[0] - 0.5 * gt[1] - 0.5 * gt[2], *gt[1:3], gt[3] - 0.5 * gt[4] - 0.5 * gt[5],
              *gt[4:])
    return crs, None if gt is None else tuple(float(v) for v in gt)


def ngff_mpp(dataset: dict, names: list[str], units: list[Any]) -> tuple[float, float] | None:
    """µm/px (y, x) from an NGFF dataset's scale transformation and the axes' units."""
    scale = next((t["scale"] for t in dataset.get("coordinateTransformations", [])
                  if t.get("type") == "scale"), None)
    iy, ix = names.index("y"), names.index("x")
    if scale is None or units[iy] not in _UNIT_TO_UM or units[ix] not in _UNIT_TO_UM:
        return None
    return float(scale[iy]) * _UNIT_TO_UM[units[iy]], float(scale[ix]) * _UNIT_TO_UM[units[ix]]


def per_level_mpp(mpp0: tuple[float, float] | None, yx: list[tuple[int, int]]) -> list:
    """µm/px (y, x) of each pyramid level of sizes ``yx``, from level 0's (or all None)."""
    if mpp0 is None:
        return [None] * len(yx)
    return [(mpp0[0] * yx[0][0] / y, mpp0[1] * yx[0][1] / x) for y, x in yx]


def level_geotransform(gt0: tuple[float, ...] | None, yx: list[tuple[int, int]],
                       level: int) -> tuple[float, ...] | None:
    """Level 0's geotransform ``gt0`` scaled to pyramid level ``level`` of sizes ``yx``."""
    dy, dx = yx[0][0] / yx[level][0], yx[0][1] / yx[level][1]
    return None if gt0 is None else (gt0[0], gt0[1] * dx, gt0[2] * dy, gt0[3], gt0[4] * dx,
                                     gt0[5] * dy)


def select_level(where: str, yx: list, mpps: list, level: int | None, mpp: float | None) -> int:
    """Pyramid level ``level`` (default 0), or the one whose µm/px is nearest ``mpp`` (log scale);
    ``yx`` and ``mpps`` are the sizes and pixel sizes of the levels of ``where``."""
    if level is not None and mpp is not None:
        raise ValueError("give either level or mpp, not both")
    if mpp is not None:
        if mpps[0] is None:
            raise ValueError(f"no pixel size in {where}: cannot select a level by mpp")
        if not mpp > 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        return min(range(len(yx)), key=lambda i: abs(math.log(sum(mpps[i]) / 2 / mpp)))
    level = 0 if level is None else level
    if not isinstance(level, (int, np.integer)) or not 0 <= level < len(yx):
        avail = ", ".join(f"{i} ({y}x{x})" for i, (y, x) in enumerate(yx))
        raise ValueError(f"level {level} not in {where}; available levels: {avail}")
    return int(level)
