"""Building the dask graph: read → plan → infer, returning a lazy heatmap.

The graph maps over the *output* chunk grid: each task reads its own input window, halo
included, straight from the scan (no halo exchange between chunks, no rechunk), so tasks are
independent, which suits resuming and process workers. The scan reader and the model
reference are one graph key each, shipped to a worker once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph

from tilefcn.measure.shapes import output_shape
from tilefcn.modelio import Model, load_model
from tilefcn.plan import (
    Tile,
    TilePlan,
    default_tile,
    plan_tiles,
    sub_window_shapes,
    tiles_without_foreground,
)
from tilefcn.read import Scan, open_scan
from tilefcn.runtime.cache import ModelRef, make_ref, run_tile
from tilefcn.runtime.device import resolve_device
from tilefcn.runtime.engine import DEFAULT_SUB_TILE, SUB_TILE_CANDIDATES
from tilefcn.sinks import read_window, write_block, write_group


def nan_block(classes: int, height: int, width: int) -> np.ndarray:
    """The heatmap block of a tile that was not computed: NaN."""
    return np.full((classes, height, width), np.nan, np.float32)


@dataclass(frozen=True)
class Prediction:
    """A planned prediction: the scan, the model, the tile plan and the graph pieces."""

    scan: Scan
    model: Model
    plan: TilePlan
    ref: ModelRef
    name: str
    sub_tile: int | None
    dependencies: tuple
    windows: dict
    masked: frozenset = frozenset()
    footprint: Any = None  # tilefcn.mask.Footprint when it masks anything (else None)
    footprint_key: str | None = None

    def task(self, tile: Tile) -> tuple:
        """The raw dask task computing ``tile``'s heatmap block ``(C, h, w)`` (all NaN for a
        tile the mask leaves out: nothing is read or run for it)."""
        if tile.index in self.masked:
            return (nan_block, self.classes, *tile.out_shape)
        return (run_tile, self.ref_key, self.windows[tile.index], tile.y, tile.x,
                self.plan.image_shape, self.sub_tile, self.footprint_key)

    @property
    def ref_key(self) -> str:
        return self.dependencies[0].key

    def write_layer(self, sink_key: str, skip: set, group: int,
                    name: str) -> tuple[dict, dict]:
        """Raw graph layer writing every tile not in ``skip`` through the sink at
        ``sink_key``; returns ``(layer, {tile index: key of the task that writes it})``.

        With a scan reader, ``group`` consecutive tiles (row-major) share one task that
        streams them through the engine (reads run ahead of the model); without one (an
        in-memory or dask array) each tile is its own task.
        """
        todo = [t for t in self.plan.tiles() if t.index not in skip]
        layer: dict = {}
        writer: dict = {}
        if self.scan.reader is None:
            for t in todo:
                layer[(name, *t.index)] = (write_block, sink_key, self.task(t), t)
                writer[t.index] = (name, *t.index)
            return layer, writer
        reader_key = self.dependencies[1].key
        for k in range(0, len(todo), group):
            tiles = todo[k:k + group]
            key = (name, k // group)
            layer[key] = (write_group, self.ref_key, reader_key, sink_key, tiles,
                          self.plan.image_shape, self.sub_tile, self.footprint_key)
            writer.update({t.index: key for t in tiles})
        return layer, writer

    @property
    def classes(self) -> int:
        return len(self.model.classes)

    @property
    def heatmap(self) -> da.Array:
        """Lazy ``(C, H_out, W_out)`` float32 heatmap, chunked like the plan."""
        layer = {(self.name, 0, *t.index): self.task(t) for t in self.plan.tiles()}
        graph = HighLevelGraph.from_collections(self.name, layer,
                                                dependencies=list(self.dependencies))
        chunks = ((self.classes,), *self.plan.chunks)
        return da.Array(graph, self.name, chunks, dtype=np.float32,
                        meta=np.empty((0, 0, 0), np.float32))


def _positive_int(name: str, value: Any) -> int | None:
    """``value`` as a positive int (None stays None); ``ValueError`` for anything else."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or \
            value < 1:
        raise ValueError(f"{name} must be a positive whole number of pixels, got {value!r}")
    return int(value)


def plan_prediction(image: Any, model: Any, *, tile: int | None = None, device: str = "auto",
                    level: int | None = None, mpp: float | None = None,
                    sub_tile: int | None = None, torch_threads: int | None = None,
                    mask: str | None = None, backend: str = "auto", precision: str = "fp32",
                    batch: int | None = None, local: bool = True, bands: Any = None,
                    nodata: Any = None) -> Prediction:
    """Open the scan, load the model, check they fit, and plan the tiles (nothing computed).

    ``mask``: ``None``/``"none"`` computes every tile; ``"auto"`` or a mask image path skips
    tiles and sub-tiles whose receptive fields hold no foreground (see :mod:`tilefcn.mask`);
    their outputs are NaN. ``bands``: 1-based band numbers (``"4,3,2,8"`` or a sequence) the
    model gets, in that order. ``nodata``: a value, ``"none"``, or None for the scan's own
    (GDAL_NODATA); outputs whose receptive-field centre is nodata are NaN.
    ``local``: the graph runs in this process, so the engine (device, backend) is prepared
    here; for a cluster each worker prepares its own (:mod:`tilefcn.runtime.cache`).
    """
    tile = _positive_int("tile", tile)
    sub_tile = _positive_int("sub_tile", sub_tile)
    from tilefcn.bands import parse_bands, parse_nodata, resolve_nodata, select_bands, with_nodata
    from tilefcn.mask import foreground_mask

    scan = image if isinstance(image, Scan) else open_scan(image, level=level, mpp=mpp)
    bands = parse_bands(bands if bands is None or isinstance(bands, str) else
                        ",".join(str(int(b)) for b in bands))
    nodata = resolve_nodata(scan, parse_nodata(nodata))
    scan = select_bands(with_nodata(scan, nodata), bands)
    model = load_model(model)
    height, width, channels = scan.info.shape
    if channels != model.in_channels:
        raise ValueError(f"{scan.info.source} has {channels} channel(s) but model "
                         f"{model.name!r} expects {model.in_channels}")
    out = output_shape(model.module, channels, (height, width), model.geometry)
    if len(model.classes) != out[0]:
        raise ValueError(f"model {model.name!r} outputs {out[0]} channels but names "
                         f"{len(model.classes)} classes")
    tile = tile or default_tile((height, width), os.cpu_count() or 1)
    plan = plan_tiles(model.geometry, (height, width), out[1:], tile)
    footprint = foreground_mask(scan, mask, nodata, bands)
    masked: frozenset = frozenset()
    if footprint.foreground is not None:
        masked = tiles_without_foreground(model.geometry, plan, footprint.has_foreground)
    batch = _positive_int("batch", batch)
    kind = resolve_device(device).type if local else \
        ("cuda" if str(device).startswith("cuda") else "cpu")
    if sub_tile:
        edges: tuple = (sub_tile,)
    elif kind == "cpu" and backend == "auto" and precision == "fp32" and \
            footprint.foreground is None:  # masks skip at the finest default grain
        # edges below the tile, and the first one not (all larger ones run the same)
        edges = tuple(e for i, e in enumerate(SUB_TILE_CANDIDATES)
                      if i == 0 or SUB_TILE_CANDIDATES[i - 1] < tile)
    else:
        edges = (DEFAULT_SUB_TILE[kind],)
    shapes = {edge: sub_window_shapes(model.geometry, plan, edge) for edge in edges}
    ref = make_ref(model, device, torch_threads, backend=backend, precision=precision,
                   batch=batch, sub_tile=sub_tile, shapes=shapes, local=local)
    footprint = footprint if footprint.masks else None
    token = dask.base.tokenize(scan.array.name, ref.token, plan, ref.device, backend,
                               precision, batch, sub_tile, sorted(masked), footprint)
    ref_d = dask.delayed(ref, name=f"tilefcn-model-{token}", traverse=False)
    dependencies: list = [ref_d]
    windows: dict = {}  # how each computed tile gets its input window (masked tiles: none)
    if scan.reader is not None:
        reader_d = dask.delayed(scan.reader, name=f"tilefcn-scan-{token}",
                                traverse=False)
        dependencies.append(reader_d)
    for t in plan.tiles():
        if t.index in masked:
            continue
        if scan.reader is not None:
            windows[t.index] = (read_window, reader_d.key, t.read)
        else:
            window = scan.array[t.read].rechunk(-1)
            dependencies.append(window)
            windows[t.index] = (window.name, 0, 0, 0)
    footprint_key = None
    if footprint is not None:  # one graph key, shipped to each worker once
        footprint_d = dask.delayed(footprint, name=f"tilefcn-footprint-{token}",
                                   traverse=False)
        dependencies.append(footprint_d)
        footprint_key = footprint_d.key
    return Prediction(scan, model, plan, ref, f"tilefcn-predict-{token}", sub_tile,
                      tuple(dependencies), windows, masked, footprint, footprint_key)


def predict(image: Any, model: Any, *, tile: int | None = None, device: str = "auto",
            level: int | None = None, mpp: float | None = None, sub_tile: int | None = None,
            torch_threads: int | None = None, mask: str | None = None, backend: str = "auto",
            precision: str = "fp32", batch: int | None = None, bands: Any = None,
            nodata: Any = None) -> da.Array:
    """Lazy heatmap ``(C, H_out, W_out)`` float32 equal to ``model(whole image)``.

    Parameters
    ----------
    image : path, numpy array ``(Y, X)``/``(Y, X, C)``, zarr array or dask array
        The scan; integer inputs are scaled by their dtype's maximum unless the model says
        otherwise.
    model : built-in name, bundle directory, ``.pt2``/TorchScript file, or ``nn.Module``
    tile : chunk edge in input pixels (rounded up to the model's alignment); default 2048,
        smaller for scans with fewer than 4 chunks per core.
    device : ``"auto"`` (cuda when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    level, mpp : pyramid level, or the level nearest ``mpp`` µm/px.
    sub_tile : edge of the sub-tiles each task loops over (default: on CPU with
        ``backend="auto"`` the fastest of 256 / 512 / 1024 px measured with each backend, 256
        with a mask; 1024 on CUDA).
    mask : ``"auto"`` or a mask image path: tiles and sub-tiles whose receptive fields hold
        no foreground are neither read nor computed (NaN).
    bands : 1-based bands for the model, in order (``"4,3,2,8"`` or ``[4, 3, 2, 8]``).
    nodata : nodata value (default: the file's GDAL_NODATA; ``"none"`` ignores it): outputs
        whose receptive-field centre is nodata are NaN.
    torch_threads : torch threads in each worker process while tasks run (default 1 on CPU:
        one per dask thread).
    backend : ``"auto"`` (measure the installed CPU backends, keep those within 1e-5 of
        torch, use the fastest), ``"torch"``, ``"compile"`` or ``"onnxruntime"``.
    precision : ``"fp32"`` (exact, TF32 off), or ``"bf16"``/``"fp16"`` autocast (not exact).
    batch : sub-tiles of equal shape run together (default 1 on CPU, 8 on CUDA).

    The engine is prepared in this process; under a ``distributed`` client, tasks prepare it
    on each worker instead (``device="cuda"`` then resolves on the GPU workers).
    """
    local = _default_client() is None
    return plan_prediction(image, model, tile=tile, device=device, level=level, mpp=mpp,
                           sub_tile=sub_tile, torch_threads=torch_threads, mask=mask,
                           backend=backend, precision=precision, batch=batch,
                           local=local, bands=bands, nodata=nodata).heatmap


def _default_client() -> Any:
    """The ``distributed`` client that dask would use now, or None."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None
