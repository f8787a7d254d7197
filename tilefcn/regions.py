"""Class regions of a heatmap (OME-Zarr or COG) as GeoJSON polygons (QuPath annotations,
QGIS layers).

A heatmap pixel belongs to class ``c`` when ``c`` is its argmax (NaN pixels belong to none),
or, with a ``threshold`` ``t``, when ``p_c ≥ t`` (classes may then overlap). Regions are
4-connected sets of such pixels, vectorised block by block (``rasterio.features.shapes``) in
heatmap pixel-corner coordinates, where every vertex is an integer and unions are exact.

Seams: a piece touching an inner block edge may continue in a neighbour. Blocks are taken a
row at a time; pieces touching a seam are grouped (a union-find: two pieces sharing a boundary
segment are one region) with each other and with the *front*, the pieces of the row above on
its bottom edge. A region none of whose pieces reaches the current row's bottom edge is final:
its pieces are united once (``shapely.union_all``) and written out. Memory is one block plus
the pieces of the regions still open, never the whole heatmap; a region crossing any number of
seams comes out as one polygon (holes kept).

Coordinates (pixel ``k`` covers ``[k, k+1)``): heatmap pixel-corner ``u`` of pyramid level
``L`` is heatmap level-0 corner ``2^L·u``, which is scan corner
``x = o + (r - s)/2 + s·2^L·u`` at the run's scan level (``o + (r-1)/2 + 0.5`` is the
receptive field's centre, ``± s/2`` the pixel's extent;
:func:`tilefcn.heatmap_coords.heatmap_transform`), and level-0 scan pixel ``d·k·x`` for the
level's downsample ``d`` and the area-averaging factor ``k`` of an ``--mpp`` between levels
(QuPath's image coordinates).
With ``crs`` the scan coordinates go through the scan's geotransform instead
(``X = x0 + pw·x + rx·y``, ``Y = y0 + ry·x + ph·y``) and the file gets a ``crs`` member.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from tilefcn.geometry import Geometry
from tilefcn.viewers import class_colour

__all__ = ["RegionExport", "export_geojson", "pixel_transform"]

GEOJSON_SUFFIXES = (".geojson", ".json")
BLOCK_PX = 1024  # default block edge (heatmap pixels, rounded to whole store chunks)


@dataclass(frozen=True, slots=True)
class RegionExport:
    """What an export wrote: the file, polygons per class, and the coordinate system."""

    out: str
    polygons: dict[str, int]
    crs: str | None
    level: int


def _open_heatmap(path: Path, level: int) -> tuple[Any, dict]:
    """Level ``level`` of a finished heatmap (OME-Zarr or COG) and the run's attributes."""
    from tilefcn.heatmaps import open_heatmap

    heatmap = open_heatmap(path)
    return heatmap.level(level), heatmap.attrs


def pixel_transform(attrs: dict, level: int = 0, *, crs: bool = False) -> tuple[float, ...]:
    """Affine ``(a, b, c, d, e, f)``: heatmap level-``level`` pixel corner ``(u, v)`` →
    ``(a·u + b·v + c, d·u + e·v + f)`` in level-0 scan pixels, or in CRS units (``crs``)."""
    geometry = Geometry.from_dict(attrs["geometry"])
    source = attrs.get("source") or {}
    f = 2.0**level
    (sy, sx) = geometry.stride
    ty, tx = geometry.centre(0) + 0.5 - sy / 2, geometry.centre(1) + 0.5 - sx / 2
    if not crs:
        downsamples, lv = source.get("downsamples") or [1.0], int(source.get("level") or 0)
        d = float(downsamples[lv]) if lv < len(downsamples) else 1.0
        d *= int(source.get("factor") or 1)  # --mpp between levels: area-averaged × factor
        return (sx * f * d, 0.0, tx * d, 0.0, sy * f * d, ty * d)
    if source.get("geotransform") is None or not source.get("crs"):
        raise ValueError("--crs needs a georeferenced scan; this heatmap's scan has no "
                         "CRS/geotransform (coordinates are scan pixels without --crs)")
    x0, pw, rx, y0, ry, ph = (float(v) for v in source["geotransform"])
    # scan (x, y) = (sx·f·u + tx, sy·f·v + ty), then the geotransform
    return (pw * sx * f, rx * sy * f, x0 + pw * tx + rx * ty,
            ry * sx * f, ph * sy * f, y0 + ry * tx + ph * ty)


def _blocks(n: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _class_masks(block: np.ndarray, classes: list[int], threshold: float | None
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """``(class, pixels of that class)`` for one ``(C, h, w)`` probability block."""
    if threshold is not None:
        for c in classes:
            yield c, np.nan_to_num(block[c], nan=-np.inf) >= threshold
        return
    nan = np.isnan(block).all(axis=0)
    labels = np.argmax(np.nan_to_num(block, nan=-np.inf), axis=0)
    for c in classes:
        yield c, (labels == c) & ~nan


def _pieces(mask: np.ndarray, y0: int, x0: int) -> Iterator[Any]:
    """4-connected regions of ``mask`` as shapely polygons in heatmap pixel corners."""
    import shapely.geometry
    from affine import Affine
    from rasterio.features import shapes

    if not mask.any():
        return
    for geom, _ in shapes(mask.view(np.uint8), mask=mask, connectivity=4,
                          transform=Affine.translation(x0, y0)):
        yield shapely.geometry.shape(geom)


def _polygons(geom: Any) -> list[Any]:
    """The polygons of a (multi)polygon or geometry collection."""
    if geom.is_empty:
        return []
    if geom.geom_type == "Polygon":
        return [geom]
    return [g for part in geom.geoms for g in _polygons(part)]


class _Writer:
    """Streams Features into an open GeoJSON file; counts polygons per class."""

    def __init__(self, fh: TextIO, names: list[str], transform: tuple[float, ...]) -> None:
        self.fh, self.names, self.transform = fh, names, transform
        self.counts = dict.fromkeys(names, 0)
        self.first = True

    def __call__(self, c: int, polygon: Any) -> None:
        import shapely
        import shapely.affinity
        import shapely.geometry

        a, b, xoff, d, e, yoff = self.transform
        polygon = shapely.simplify(polygon, 0.0)  # drop collinear vertices left by unions
        polygon = shapely.affinity.affine_transform(polygon, [a, b, d, e, xoff, yoff])
        properties = {"objectType": "annotation", "isLocked": False,
                      "classification": {"name": self.names[c], "color": list(class_colour(c))}}
        # GEOS writes the geometry's JSON itself: no Python tuple per vertex (a region that
        # spans the slide has millions)
        self.fh.write(("" if self.first else ",\n") + '{"type": "Feature", "geometry": '
                      + shapely.to_geojson(polygon) + ', "properties": '
                      + json.dumps(properties) + "}")
        self.first = False
        self.counts[self.names[c]] += 1


class _Seams:
    """The open regions of one class: pieces that touch a seam, grouped with a union-find
    where two pieces sharing a boundary segment (4-connectivity; a shared corner is not
    enough) are one region. A region is united once, when it is closed, so the cost is
    ``O(n log n)`` in its vertices however many block rows it spans."""

    def __init__(self) -> None:
        self.pieces: dict[int, Any] = {}
        self.parent: dict[int, int] = {}
        self.front: list[int] = []  # pieces on the bottom edge of the last block row
        self.next_id = 0

    def add(self, piece: Any) -> int:
        self.pieces[self.next_id] = piece
        self.parent[self.next_id] = self.next_id
        self.next_id += 1
        return self.next_id - 1

    def root(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, row: list[int]) -> None:
        """Group this row's pieces with each other and with the front above them."""
        import shapely

        ids = self.front + row
        if len(row) == 0 or len(ids) < 2:
            return
        geoms = np.array([self.pieces[i] for i in ids], dtype=object)
        a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
        keep = (a < b) & (b >= len(self.front))  # pairs with a piece of this row
        a, b = a[keep], b[keep]
        shared = shapely.length(shapely.intersection(geoms[a], geoms[b])) > 0
        for i, j in zip(a[shared], b[shared], strict=True):
            ri, rj = self.root(ids[i]), self.root(ids[j])
            if ri != rj:
                self.parent[rj] = ri

    def close(self, front: list[int]) -> Iterator[Any]:
        """Make ``front`` the new front; yield the regions with no piece on it (united)."""
        import shapely

        self.front = front
        open_roots = {self.root(i) for i in front}
        closed: dict[int, list[int]] = {}
        for i in self.pieces:
            r = self.root(i)
            if r not in open_roots:
                closed.setdefault(r, []).append(i)
        for members in closed.values():
            geom = shapely.union_all([self.pieces[i] for i in members])
            for i in members:
                del self.pieces[i], self.parent[i]
            yield from _polygons(geom)


def _vectorise(array: Any, scale: float, classes: list[int], threshold: float | None,
               block: int, emit: _Writer) -> None:
    """Vectorise ``array`` ``(C, H, W)`` block row by block row, merging across seams."""
    _, height, width = array.shape
    seams = {c: _Seams() for c in classes}
    for y0, y1 in _blocks(height, block):
        row: dict[int, list[int]] = {c: [] for c in classes}
        bottom: dict[int, list[int]] = {c: [] for c in classes}
        for x0, x1 in _blocks(width, block):
            data = np.asarray(array[:, y0:y1, x0:x1], dtype=np.float32) / scale
            for c, mask in _class_masks(data, classes, threshold):
                for piece in _pieces(mask, y0, x0):
                    minx, miny, maxx, maxy = piece.bounds
                    on_bottom = maxy == y1 and y1 < height
                    if ((minx == x0 and x0 > 0) or (maxx == x1 and x1 < width)
                            or (miny == y0 and y0 > 0) or on_bottom):
                        i = seams[c].add(piece)
                        row[c].append(i)
                        if on_bottom:
                            bottom[c].append(i)  # may continue in the next block row
                    else:
                        emit(c, piece)
        for c in classes:
            seams[c].join(row[c])
            for polygon in seams[c].close(bottom[c]):
                emit(c, polygon)


def export_geojson(heatmap: str | os.PathLike, out: str | os.PathLike, *,
                   classes: list[str] | None = None, threshold: float | None = None,
                   crs: bool = False, level: int = 0, block: int | None = None,
                   overwrite: bool = False) -> RegionExport:
    """Write the regions of ``classes`` (default: all) of a ``heatmap`` (OME-Zarr or COG,
    :func:`tilefcn.heatmaps.open_heatmap`) to ``out``.

    ``threshold`` (in ``(0, 1]``): a class's region is ``p ≥ threshold``; None: its argmax
    pixels. Coordinates are level-0 scan pixels, or the scan's CRS with ``crs``. ``level``
    vectorises a coarser pyramid level (fewer vertices). ``block``: block edge in heatmap
    pixels (default ≈ 1024, whole store chunks). The file is written to ``<out>.partial``
    and renamed when complete; an existing ``out`` is refused unless ``overwrite``.
    """
    from tilefcn.write import decode_scale

    src, dst = Path(heatmap), Path(out)
    if dst.suffix.lower() not in GEOJSON_SUFFIXES:
        raise ValueError(f"GeoJSON output must end in .geojson or .json, got {dst}")
    if dst.is_dir():
        raise ValueError(f"GeoJSON output is a folder: {dst}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"output exists: {dst} (use --overwrite)")
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"--threshold must be in (0, 1], got {threshold}")
    if level < 0:
        raise ValueError(f"--level must be >= 0, got {level}")
    array, attrs = _open_heatmap(src, level)
    names = [str(c) for c in attrs.get("classes") or [f"class{i}" for i in range(array.shape[0])]]
    wanted = classes or names
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise ValueError(f"unknown class {unknown[0]!r}; this heatmap has {', '.join(names)}")
    if block is not None and block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    chunk = int(array.chunks[1])
    block = block or chunk * max(1, BLOCK_PX // chunk)
    transform = pixel_transform(attrs, level, crs=crs)
    crs_name = (attrs.get("source") or {}).get("crs") if crs else None
    head: dict[str, Any] = {"type": "FeatureCollection"}
    if crs_name:
        kind, _, code = str(crs_name).partition(":")
        head["crs"] = {"type": "name", "properties": {
            "name": f"urn:ogc:def:crs:{kind.upper()}::{code}" if code else str(crs_name)}}
    partial = dst.with_name(dst.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as fh:
            fh.write(json.dumps(head)[:-1] + ', "features": [\n')
            writer = _Writer(fh, names, transform)
            _vectorise(array, decode_scale(str(array.dtype)), [names.index(c) for c in wanted],
                       threshold, block, writer)
            fh.write("\n]}\n")
        os.replace(partial, dst)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return RegionExport(str(dst), {c: writer.counts[c] for c in wanted}, crs_name, level)
