"""GeoTIFF heatmaps as Cloud-Optimized GeoTIFFs (COG), written chunk by chunk through rasterio.

:class:`CogSink` has the sink interface of :mod:`tilefcn.sinks` (open / which chunks are done /
write chunk / finish). Heatmap chunks are written as they are computed, each as a window of
a tiled, sparse, lightly compressed GTiff ``<out>.tiles.partial`` (one GDAL dataset, one
writer: a lock serialises the writes of the threads that compute the chunks; chunks computed
on ``distributed`` workers are gathered to the client in a bounded window,
:func:`tilefcn.gather.gather_into`). :meth:`CogSink.finish` lets GDAL's COG driver build the
overviews (``AVERAGE``, NaN ignored) and copy everything, block by block, into
``<out>.partial`` (tiled, DEFLATE or ZSTD with a predictor, overviews after the full
resolution, COG layout), which is then renamed to ``<out>``. Memory stays that of a few
blocks plus GDAL's block cache (``GDAL_CACHEMAX``); no full-width strip and no whole heatmap
is ever held.

Resuming (a job's sink, opened with its ``identity``): every :data:`CHECKPOINT_S` seconds, and
when a run stops on an error or an interruption, the intermediate tiles are closed (GDAL
writes their directory) and ``<out>.tiles.partial.json`` records the job's identity and the
tiles written; ``resume=True`` reopens them and :meth:`CogSink.done` lists those tiles, so a
killed run loses at most the tiles of the last :data:`CHECKPOINT_S` seconds. Tiles without a
checkpoint are computed again. The output path itself is only replaced by :meth:`finish`.
(:mod:`tilefcn.checkpoint`: the files and their record.)

Georeference (GDAL geotransform ``X = a + b·col + c·row``, ``Y = d + e·col + f·row``, pixel is
area): for a scan geotransform ``(a, b, c, d, e, f)`` and a model of stride ``s``, offset ``o``,
receptive field ``r`` (per axis), heatmap pixel ``(i, j)`` covers scan pixels starting at
``row = t_y + s_y·i``, ``col = t_x + s_x·j`` with ``t = o + (r - s)/2``, so the heatmap's
geotransform is ``(a + b·t_x + c·t_y, b·s_x, c·s_y, d + e·t_x + f·t_y, e·s_x, f·s_y)``
(rotation terms kept; :func:`tilefcn.heatmap_coords.heatmap_geotransform`). The CRS is the
input's own (WKT, so any CRS, EPSG code or not). A scan without georeference gets a COG
without CRS whose transform maps heatmap pixels onto scan pixels (``a = d = 0``,
``b = f = 1``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tilefcn.checkpoint import check_resumable, journal_path, read_journal, write_journal
from tilefcn.crs import quiet_rasterio, rasterio_crs, source_crs
from tilefcn.identity import identity_mismatch
from tilefcn.plan import Tile
from tilefcn.write import encode_block

__all__ = ["CHECKPOINT_S", "COMPRESSIONS", "GEOTIFF_DTYPES", "PIXEL_GEOTRANSFORM", "CogSink",
           "check_geotiff_dtype", "source_crs", "write_geotiff"]

#: Stored dtypes of a GeoTIFF heatmap (GDAL < 3.11 has no float16; uint8 = round(p · 255)).
GEOTIFF_DTYPES = ("float32", "uint8")

#: Compressions of the final COG (each with GDAL's predictor: 3 for floats, 2 for uint8).
COMPRESSIONS = ("deflate", "zstd")

#: Edge of the COG's tiles and of its smallest overview (GDAL's COG default).
BLOCKSIZE = 512

#: GDAL's block cache (MB) while a COG is written and built: memory stays bounded whatever
#: the heatmap size (measured, 5 × 4096² float32: peak RSS 116 MB writing, 162 MB building).
CACHE_MB = 256

#: Geotransform of scan pixels (``X = col``, ``Y = row``): the frame of non-georeferenced scans.
PIXEL_GEOTRANSFORM = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

#: Intermediate tiles: compressed fast (ZSTD level 1), rewritten by the COG driver anyway.
_INTERMEDIATE = {"compress": "zstd", "zstd_level": 1}

#: Seconds between checkpoints of a job's intermediate tiles (see the module doc; one costs a
#: close and a reopen of the dataset: 1–2 ms each measured, a 1024² stride-8 heatmap).
CHECKPOINT_S = 30.0


def check_geotiff_dtype(dtype: str) -> str:
    """``dtype`` if a GeoTIFF heatmap can be stored as it (:data:`GEOTIFF_DTYPES`)."""
    if dtype not in GEOTIFF_DTYPES:
        raise ValueError(f"--dtype {dtype} is for OME-Zarr outputs; GeoTIFFs are "
                         f"{' or '.join(GEOTIFF_DTYPES)} (GDAL here has no float16)")
    return dtype


def _block_edge(chunks: tuple[int, int]) -> int:
    """Intermediate tile edge: the largest of 512…16 that divides both chunk edges (so each
    chunk covers whole tiles), else 256 (chunks then share tiles, rewritten by GDAL)."""
    return next((b for b in (512, 256, 128, 64, 32, 16)
                 if chunks[0] % b == 0 and chunks[1] % b == 0), 256)


@dataclass
class CogSink:
    """Writes ``(C, h, w)`` heatmap blocks into a COG at ``path`` (see the module docstring).

    Open with :meth:`open`; call it as ``sink(tile, block)`` (a :data:`tilefcn.sinks.Sink`)
    from any thread of this process; :meth:`finish` (or :meth:`abort`) once at the end.
    """

    path: Path
    shape: tuple[int, int, int]
    dtype: str
    options: dict
    identity: dict | None = None  # a job's: checkpoints and resuming (module doc)
    _resumed: frozenset = frozenset()  # tiles an earlier run checkpointed
    _written: set = field(default_factory=set, repr=False)  # tile indices, resumed included
    _checkpoint_at: float = 0.0
    _dataset: Any = field(default=None, repr=False)
    _env: Any = field(default=None, repr=False)  # GDAL_CACHEMAX = CACHE_MB while open
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike, *, shape: tuple[int, int, int],
             chunks: tuple[int, int], geotransform: tuple[float, ...] | None,
             crs: str | None, classes: list[str] | None = None,
             description: dict | None = None, dtype: str = "float32",
             compress: str = "deflate", blocksize: int | None = None,
             identity: dict | None = None, resume: bool = False) -> CogSink:
        """Create the intermediate tiles of a COG heatmap ``shape = (C, H, W)``.

        ``identity`` (a job's, :func:`tilefcn.identity.job_identity`): checkpoint the tiles
        written and keep them when the run stops early; with ``resume`` continue the ones an
        interrupted run of this same job checkpointed (another job's: ``ValueError``; none:
        a fresh start).

        ``geotransform`` (6 GDAL numbers) and ``crs`` (WKT/``EPSG:n``/PROJ) are stored as
        given; ``classes`` name the bands; ``description`` is stored as JSON under
        ``tilefcn`` in the TIFF ImageDescription (how :func:`tilefcn.write.check_output`
        recognises its own outputs). ``blocksize`` (default :data:`BLOCKSIZE`, ≥ 128) is the
        COG's tile edge; overviews halve down to one tile. Nothing at ``path`` is touched
        before :meth:`finish`.
        """
        import rasterio
        from affine import Affine

        p, blocksize = Path(path), blocksize or BLOCKSIZE
        check_geotiff_dtype(dtype)
        if compress not in COMPRESSIONS:
            raise ValueError(f"compress must be one of {', '.join(COMPRESSIONS)}, "
                             f"got {compress!r}")
        if blocksize < 128 or blocksize % 16:
            raise ValueError(f"blocksize must be a multiple of 16, at least 128, got "
                             f"{blocksize}")
        c, h, w = (int(v) for v in shape)
        if min(c, h, w) < 1:
            raise ValueError(f"heatmap must be (C, H, W), got shape {shape}")
        if geotransform is not None and len(geotransform) != 6:
            raise ValueError(f"geotransform must have 6 numbers, got {geotransform!r}")
        rio_crs = rasterio_crs(crs)
        edge = _block_edge(chunks)
        profile = {"driver": "GTiff", "width": w, "height": h, "count": c, "dtype": dtype,
                   "nodata": float("nan") if dtype == "float32" else None, "tiled": True,
                   "blockxsize": edge, "blockysize": edge, "interleave": "pixel",
                   "sparse_ok": True, "bigtiff": "if_safer", **_INTERMEDIATE}
        if rio_crs is not None:
            profile["crs"] = rio_crs
        if geotransform is not None:
            profile["transform"] = Affine.from_gdal(*(float(v) for v in geotransform))
        record = read_journal(p) if resume and identity is not None else None
        if record is not None and (why := identity_mismatch(record.get("identity"),
                                                            identity)):
            raise ValueError(f"cannot resume {p}: {why}")
        sink = cls(p, (c, h, w), dtype, {"compress": compress, "blocksize": blocksize},
                   identity)
        sink._env = rasterio.Env(GDAL_CACHEMAX=CACHE_MB)
        sink._env.__enter__()
        try:
            with quiet_rasterio():
                if record is not None:
                    try:
                        sink._dataset = rasterio.open(sink.tiles_path, "r+")
                        sink._dataset.read(1, window=((0, 1), (0, 1)))  # its directory
                    except Exception:  # noqa: BLE001 - killed while GDAL wrote it: afresh
                        if sink._dataset is not None:
                            sink._dataset.close()
                        sink._dataset, record = None, None
                if record is not None:
                    check_resumable(sink._dataset, p, profile)
                    sink._resumed = frozenset(tuple(t) for t in record["done"])
                    sink._written = set(sink._resumed)
                else:
                    journal_path(p).unlink(missing_ok=True)
                    sink.tiles_path.unlink(missing_ok=True)  # GDAL would open a stale one
                    sink._dataset = rasterio.open(sink.tiles_path, "w", **profile)
        except BaseException:
            sink._close()
            if record is None:
                sink._remove()
            raise
        sink._checkpoint_at = time.monotonic() + CHECKPOINT_S
        if record is not None:
            return sink
        ds = sink._dataset
        if isinstance(classes, list) and len(classes) == c:
            for band, name in enumerate(classes, 1):
                ds.set_band_description(band, str(name))
        ds.update_tags(TIFFTAG_IMAGEDESCRIPTION=json.dumps({"tilefcn": description or {}}),
                       AREA_OR_POINT="Area")
        return sink

    @property
    def tiles_path(self) -> Path:
        return self.path.with_name(self.path.name + ".tiles.partial")

    @property
    def partial_path(self) -> Path:
        return self.path.with_name(self.path.name + ".partial")

    def done(self) -> set[tuple[int, int]]:
        """Tiles (indices) an interrupted run of this job checkpointed, kept by ``resume``."""
        return set(self._resumed)

    def __call__(self, tile: Tile, block: np.ndarray) -> None:
        """Write one block ``(C, h, w)`` at the tile's output window (checkpointed every
        :data:`CHECKPOINT_S` seconds when the sink has a job identity)."""
        self.write(tile.y.out_start, tile.x.out_start, block)
        with self._lock:
            self._written.add(tuple(tile.index))
            if self.identity is not None and time.monotonic() >= self._checkpoint_at:
                self._checkpoint()

    def _checkpoint(self) -> None:
        """(Lock held.) Close the intermediate tiles so that GDAL writes their directory,
        record the tiles written, reopen them."""
        import rasterio

        if self._dataset is None:
            return
        self._dataset.close()
        self._dataset = None
        self._write_journal()
        with quiet_rasterio():
            self._dataset = rasterio.open(self.tiles_path, "r+")
        self._checkpoint_at = time.monotonic() + CHECKPOINT_S

    def _write_journal(self) -> None:
        write_journal(self.path, self.identity, self._written)

    def write_nodata(self, tiles: Iterable[Tile]) -> None:
        """Write NaN over ``tiles`` (those a mask leaves out): GDAL does not reliably fill
        the unwritten part of a pixel-interleaved tile with nodata in every band."""
        tiles = list(tiles)
        if tiles and self.dtype != "float32":
            raise ValueError(f"a {self.dtype} GeoTIFF cannot hold NaN (masked tiles)")
        for tile in tiles:
            self(tile, np.full((self.shape[0], *tile.out_shape), np.nan, np.float32))

    def write(self, y0: int, x0: int, block: np.ndarray) -> None:
        """Write ``block`` ``(C, h, w)`` with its top-left heatmap pixel at ``(y0, x0)``."""
        from rasterio.windows import Window

        block = encode_block(np.asarray(block), self.dtype)
        c, h, w = self.shape
        if block.ndim != 3 or block.shape[0] != c or y0 < 0 or x0 < 0 or \
                y0 + block.shape[1] > h or x0 + block.shape[2] > w:
            raise ValueError(f"block of shape {block.shape} at ({y0}, {x0}) does not fit a "
                             f"heatmap of shape {self.shape}")
        with self._lock:
            if self._dataset is None:
                raise ValueError(f"{self.path}: the GeoTIFF sink is closed")
            self._dataset.write(block, window=Window(x0, y0, block.shape[2], block.shape[1]))

    def finish(self) -> None:
        """Build overviews and the COG layout into ``<path>.partial``, rename it to ``path``
        (replacing an older output only now), and delete the intermediate tiles."""
        import rasterio
        import rasterio.shutil

        if self._dataset is None:
            raise ValueError(f"{self.path}: the GeoTIFF sink is closed")
        try:
            self._close()
            compress = self.options["compress"]
            with quiet_rasterio(), rasterio.Env(GDAL_NUM_THREADS="1", GDAL_CACHEMAX=CACHE_MB):
                rasterio.shutil.copy(
                    self.tiles_path, self.partial_path, driver="COG",
                    compress=compress.upper(),
                    **({"level": 6} if compress == "deflate" else {"level": 9}),
                    predictor="YES", blocksize=self.options["blocksize"],
                    overviews="AUTO", overview_resampling="AVERAGE", bigtiff="IF_SAFER")
            os.replace(self.partial_path, self.path)
        except BaseException:
            self.partial_path.unlink(missing_ok=True)
            self._keep_or_remove()
            raise
        self._remove()

    def abort(self) -> None:
        """Close what was written so far: a job's tiles are kept for ``resume`` (with their
        record), anything else deleted; the output path is left as it was."""
        try:
            self._close()
        finally:
            self.partial_path.unlink(missing_ok=True)
            self._keep_or_remove()

    def _keep_or_remove(self) -> None:
        if self.identity is not None and self._written and self.tiles_path.is_file():
            try:
                self._write_journal()
                return
            except OSError:  # e.g. the disk is full: give the space back instead
                pass
        self._remove()

    def _close(self) -> None:
        """Close the intermediate tiles (written to disk) and leave the GDAL cache setting."""
        with self._lock:
            dataset, self._dataset, env, self._env = self._dataset, None, self._env, None
        try:
            if dataset is not None:
                dataset.close()
        finally:
            if env is not None:
                env.__exit__(None, None, None)

    def _remove(self) -> None:
        self.tiles_path.unlink(missing_ok=True)
        self.partial_path.unlink(missing_ok=True)
        journal_path(self.path).unlink(missing_ok=True)

    def __reduce__(self) -> Any:
        raise TypeError("a CogSink writes from the process that opened it; gather blocks "
                        "to it (tilefcn.gather.gather_into) instead of sending it to workers")


def write_geotiff(path: str | os.PathLike, heatmap: Any, *,
                  geotransform: tuple[float, ...] | None, crs: str | None,
                  blocksize: int | None = None, description: dict | None = None,
                  dtype: str = "float32", compress: str = "deflate",
                  progress: Callable[[int], None] | None = None) -> None:
    """Write a ``(C, H, W)`` heatmap (numpy or dask array) as a COG, one dask chunk at a time.

    Bands are the C classes (named by ``description["classes"]`` when it has C names); nodata
    NaN (float32). ``progress(n)`` receives the heatmap pixels (H×W units) of each chunk
    written. An existing non-tilefcn file at ``path`` is refused; an interruption leaves
    ``path`` as it was and no partial files.
    """
    import dask.array as da

    from tilefcn.write import is_tilefcn_output

    p = Path(path)
    heat = heatmap if isinstance(heatmap, da.Array) else da.asarray(heatmap)
    if heat.ndim != 3 or min(heat.shape) < 1:
        raise ValueError(f"heatmap must be (C, H, W), got shape {heat.shape}")
    if (p.exists() or p.is_symlink()) and not is_tilefcn_output(p):
        raise ValueError(f"refusing to overwrite {p}: not a tilefcn output")
    heat = heat.rechunk({0: -1})
    description = dict(description or {})
    sink = CogSink.open(p, shape=heat.shape, chunks=(heat.chunks[1][0], heat.chunks[2][0]),
                        geotransform=geotransform, crs=crs,
                        classes=description.get("classes"), description=description,
                        dtype=dtype, compress=compress, blocksize=blocksize)
    try:
        ys, xs = np.cumsum((0, *heat.chunks[1])), np.cumsum((0, *heat.chunks[2]))
        for iy in range(len(heat.chunks[1])):
            for ix in range(len(heat.chunks[2])):
                block = np.asarray(heat.blocks[0, iy, ix].compute())
                sink.write(int(ys[iy]), int(xs[ix]), block)
                if progress is not None:
                    progress(block.shape[1] * block.shape[2])
        sink.finish()
    except BaseException:
        sink.abort()
        raise
