"""Where heatmap pixels lie on the scan: pixel-centre scale and translation per axis, and
the GDAL geotransform of a heatmap of a georeferenced scan (pure arithmetic on
:class:`tilefcn.geometry.Geometry`; the writers record these in OME-Zarr and GeoTIFF)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tilefcn.geometry import Geometry

if TYPE_CHECKING:
    from tilefcn.read import ScanInfo


def heatmap_transform(geometry: Geometry, axis: int) -> tuple[float, float]:
    """Scale and translation from heatmap pixel index to scan pixel-centre coordinates.

    Output ``i`` sees input rows ``[o + s·i, o + s·i + r)``, centred on ``o + s·i + (r-1)/2``:
    scale ``s``, translation ``o + (r - 1)/2`` (scan pixels; × µm/px for physical units).
    """
    return float(geometry.stride[axis]), geometry.centre(axis)


def heatmap_geotransform(info: ScanInfo, geometry: Geometry,
                         scan: tuple[float, ...] | None = None) -> tuple[float, ...] | None:
    """GDAL geotransform of the heatmap (pixel-is-area) from the scan's ``(a, b, c, d, e, f)``
    (``scan``, default ``info.geotransform``; ``X = a + b·col + c·row``, ``Y = d + e·col +
    f·row``): heatmap pixel ``(i, j)`` spans scan area rows ``[t_y + s_y·i, … + s_y)``, columns
    ``[t_x + s_x·j, … + s_x)`` with ``t = o + r/2 - s/2`` (the receptive field's centre ±
    s/2), so it is ``(a + b·t_x + c·t_y, b·s_x, c·s_y, d + e·t_x + f·t_y, e·s_x, f·s_y)``."""
    scan = info.geotransform if scan is None else scan
    if scan is None:
        return None
    a, b, c, d, e, f = (float(v) for v in scan)
    (sy, ty), (sx, tx) = heatmap_transform(geometry, 0), heatmap_transform(geometry, 1)
    left, top = tx + 0.5 - sx / 2, ty + 0.5 - sy / 2
    return (a + b * left + c * top, b * sx, c * sy, d + e * left + f * top, e * sx, f * sy)
