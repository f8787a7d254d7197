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
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MPP_TOLERANCE", "Resolution", "ResolutionWarning", "describe_resolution",
           "level_geotransform", "mpp_mismatch", "ngff_mpp", "per_level_mpp", "select_level",
           "tiff_georef", "tiff_mpp", "tiff_nodata"]

GDAL_NODATA = 42113  # TIFF tag: the nodata value as ASCII text

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


def tiff_nodata(page: Any) -> float | None:
    """The nodata value of a GeoTIFF page (GDAL_NODATA tag 42113, ASCII), or None."""
    tag = page.tags.get(GDAL_NODATA)
    if tag is None:
        return None
    text = tag.value.decode(errors="replace") if isinstance(tag.value, bytes) else str(tag.value)
    try:
        return float(text.strip().strip("\x00"))
    except ValueError:
        return None


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


#: A pyramid level whose pixel size is within this fraction of the one asked for is read as is.
MPP_TOLERANCE = 0.10


@dataclass(frozen=True, slots=True)
class Resolution:
    """What to read: pyramid ``level``, area-averaged by an integer ``factor`` (1: as is)."""

    level: int
    factor: int = 1


def select_level(where: str, yx: list, mpps: list, level: int | None,
                 mpp: float | None) -> Resolution:
    """Pyramid ``level`` (default 0) as is, or the resolution to read for ``mpp`` µm/px.

    For ``mpp`` (pixel size ``m_i`` of level ``i``: the mean of its y and x µm/px):

    1. the level nearest ``mpp`` (log scale) among those with ``|m_i − mpp| ≤ 10 % · mpp``;
    2. otherwise a level ``i`` finer than ``mpp`` area-averaged by the integer factor
       ``k ∈ {⌊mpp/m_i⌋, ⌈mpp/m_i⌉}``, or a level as is (``k = 1``): of these the one whose
       ``k · m_i`` is nearest ``mpp`` (log scale); among those within 1 % of the nearest, the
       coarsest level (fewest pixels read), so 1.5 µm/px from levels 0.25 / 0.5 / 1.0 is
       level 1 × 3, not level 0 × 6;
    3. ``mpp`` finer than level 0 by more than 10 %: ``ValueError`` (tilefcn never upsamples).

    ``yx`` and ``mpps`` are the sizes and pixel sizes of the levels of ``where``.
    """
    if level is not None and mpp is not None:
        raise ValueError("give either level or mpp, not both")
    if mpp is not None:
        if mpps[0] is None:
            raise ValueError(f"no pixel size in {where}: cannot select a level by mpp "
                             "(use --level)")
        if not mpp > 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        return _resolution_for(where, [sum(m) / 2 for m in mpps], float(mpp))
    level = 0 if level is None else level
    if not isinstance(level, (int, np.integer)) or not 0 <= level < len(yx):
        avail = ", ".join(f"{i} ({y}x{x})" for i, (y, x) in enumerate(yx))
        raise ValueError(f"level {level} not in {where}; available levels: {avail}")
    return Resolution(int(level))


def _resolution_for(where: str, sizes: list[float], mpp: float) -> Resolution:
    """:func:`select_level`'s rules 1–3 for level pixel sizes ``sizes`` (µm/px)."""
    def error(i: int, k: int) -> float:
        return abs(math.log(k * sizes[i] / mpp))

    close = [i for i, m in enumerate(sizes) if abs(m - mpp) <= MPP_TOLERANCE * mpp]
    if close:
        return Resolution(min(close, key=lambda i: error(i, 1)))
    finer = [i for i, m in enumerate(sizes) if m < mpp]
    if not finer:
        raise ValueError(f"{where} has no level as fine as {mpp:g} µm/px (finest: "
                         f"{min(sizes):.3g} µm/px at level {sizes.index(min(sizes))}); "
                         "tilefcn does not upsample")
    options = {Resolution(i, k) for i in finer
               for k in (max(1, math.floor(mpp / sizes[i])), math.ceil(mpp / sizes[i]))}
    options |= {Resolution(i) for i in range(len(sizes))}
    best = min(error(r.level, r.factor) for r in options)
    near = [r for r in options if error(r.level, r.factor) <= best + math.log(1.01)]
    return min(near, key=lambda r: (-r.level, r.factor))


class ResolutionWarning(UserWarning):
    """A scan read at a pixel size more than 10 % away from the one its model was trained at."""


def describe_resolution(level: int, mpp: tuple[float, float] | None, factor: int = 1, *,
                        geotransform: tuple[float, ...] | None = None,
                        crs: str | None = None) -> str:
    """``"level L (X µm/px[, downsampled ×k from Y])"`` for a scan read at pyramid level
    ``level``, area-averaged by ``factor``, with µm/px ``mpp`` after that; without µm/px, a
    georeferenced scan's pixel in CRS units (``√(b² + e²)`` down, ``√(a² + d²)`` across, for
    the GDAL geotransform ``(x0, a, b, y0, d, e)``), else "pixel size unknown"."""
    if mpp is None and geotransform is not None:
        _, a, b, _, d, e = geotransform[:6]
        name = crs if crs and len(crs) <= 32 else "its CRS" if crs else "map"
        size = f"{_size((math.hypot(b, e), math.hypot(a, d)))} {name} units/px"
    elif mpp is None:
        size = "pixel size unknown"
    else:
        size = f"{_size(mpp)} µm/px"
        if factor > 1:
            size += f", downsampled ×{factor} from {_size((mpp[0] / factor, mpp[1] / factor))}"
    return f"level {level} ({size})"


def _size(mpp: tuple[float, float]) -> str:
    """µm/px to 3 significant digits: one number when y and x print the same."""
    y, x = f"{mpp[0]:.3g}", f"{mpp[1]:.3g}"
    return y if y == x else f"{y}×{x}"


def mpp_mismatch(scan_mpp: tuple[float, float] | None, model_mpp: float | None,
                 model: str) -> str | None:
    """A one-line warning when the scan's µm/px (mean of y, x) differs from ``model_mpp`` by
    more than :data:`MPP_TOLERANCE` (relative to the model's); ``None`` when within it or
    either is unknown."""
    if scan_mpp is None or not isinstance(model_mpp, (int, float)) or not model_mpp > 0:
        return None
    size = sum(scan_mpp) / 2
    if abs(size - model_mpp) <= MPP_TOLERANCE * model_mpp:
        return None
    return (f"the scan is read at {size:.3g} µm/px but model {model!r} was trained at "
            f"{model_mpp:.3g} µm/px ({size / model_mpp:.2g}×); pass --mpp {model_mpp:g} to "
            "read it at the model's resolution")
