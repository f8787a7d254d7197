"""The engine that runs a model over tiles on one worker.

One tile (:meth:`Engine.run_tile`): the tile's window is split into halo'd sub-windows
(:func:`tilefcn.plan.sub_windows`); sub-windows of equal shape are stacked into batches of up
to ``batch`` (never padded: border windows of another shape run on their own, so results stay
exact); each batch goes up as raw pixels, is scaled, run and cropped on the device, and comes
back through the device's transfer lane (:mod:`tilefcn.runtime.device`). Every sub-result is
checked against the shape the geometry promises (dask does not check block shapes).

Many tiles (:func:`stream_tiles`): a staged pipeline — reads run ahead of the device on a
thread pool through a bounded queue (``prefetch`` windows in memory at most), the device stage
runs tiles in order, and writes run on a thread of their own. Decode, compute and write
overlap; memory is bounded by ``prefetch`` + 2 tiles.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tilefcn.modelio import Model
from tilefcn.plan import AxisWindow, SubTilePlan, Tile, plan_sub_tiles
from tilefcn.runtime.device import autocast, lane_for
from tilefcn.runtime.scaling import scale_batch, scale_input, scale_tensor

DEFAULT_SUB_TILE = {"cpu": 256, "cuda": 1024}
#: Sub-tile edges ``--backend auto`` measures on the CPU (with each backend) when none is
#: given; the fastest pair is used. Halo'd sub-tiles trade the halo's recomputation (less
#: with larger ones) against cache locality (measured, 2 threads × 1 thread, 2048-px tiles:
#: ``tissue`` ONNX Runtime 33.8 / 36.5 / 40.5 MP/s, channels_last 19.7 / 25.3 / 15.3; the
#: near-free stride-8 model ONNX Runtime 677 / 772 / 563).
SUB_TILE_CANDIDATES = (256, 512, 1024)
DEFAULT_BATCH = {"cpu": 1, "cuda": 8}
_TORCH_DTYPES = (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64)


@dataclass
class Engine:
    """A model ready on a device with a backend: ``run_tile`` turns windows into blocks."""

    model: Model
    runner: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    backend: str
    precision: str = "fp32"
    batch: int = 1
    choice: dict = field(default_factory=dict)  # what --backend auto measured (attrs, -v)
    sub_tile: int | None = None  # the edge chosen for this model (None: the device default)

    def _batches(self, pairs: list[tuple[AxisWindow, AxisWindow]]) -> list[list]:
        groups: dict[tuple[int, int], list] = collections.defaultdict(list)
        for sy, sx in pairs:
            groups[(sy.read_stop - sy.read_start, sx.read_stop - sx.read_start)].append(
                (sy, sx))
        return [items[i:i + self.batch] for items in groups.values()
                for i in range(0, len(items), self.batch)]

    def _prepare(self, lane: Any, stack: np.ndarray) -> torch.Tensor:
        """Raw ``(B, h, w, C)`` pixels → scaled float32 ``(B, C, h, w)`` on the device (a
        host lane: one numpy pass, :func:`scale_batch`; a device lane: raw pixels go up and
        are scaled there, unless torch has no such dtype)."""
        channels_last = getattr(self.runner, "channels_last", False)
        if lane.on_host:
            return lane.upload(scale_batch(stack, self.model.scaling,
                                           channels_last=channels_last))
        if stack.dtype.type in _TORCH_DTYPES:
            return scale_tensor(lane.upload(stack), stack.dtype, self.model.scaling,
                                channels_last=channels_last)
        x = np.ascontiguousarray(scale_input(stack, self.model.scaling).transpose(0, 3, 1, 2))
        return lane.upload(x)

    @property
    def lane(self) -> Any:
        return lane_for(self.device)

    def sub_tile_for(self, sub_tile: int | None) -> int:
        """The sub-tile edge this engine uses: ``sub_tile``, else the one chosen when it was
        built (:data:`SUB_TILE_CANDIDATES`), else the device's default."""
        return sub_tile or self.sub_tile or DEFAULT_SUB_TILE.get(self.device.type, 256)

    def sub_plan(self, tile: Tile, image_shape: tuple[int, int], sub_tile: int | None,
                 footprint: Any = None) -> SubTilePlan:
        """The tile's sub-windows and those a ``footprint`` (:class:`tilefcn.mask.Footprint`)
        keeps: a sub-window whose outputs' receptive fields hold no foreground is skipped."""
        keep = footprint.has_foreground if footprint is not None and \
            footprint.foreground is not None else None
        return plan_sub_tiles(self.model.geometry, tile, image_shape,
                              self.sub_tile_for(sub_tile), keep)

    def run_tile(self, window: np.ndarray, y: AxisWindow, x: AxisWindow,
                 image_shape: tuple[int, int], sub_tile: int | None = None,
                 out_dtype: str = "float32", footprint: Any = None,
                 sub_plan: SubTilePlan | None = None) -> np.ndarray:
        """Heatmap block ``(C, y.out_len, x.out_len)`` for one tile of the plan.

        ``window`` holds input rows ``y.read`` × cols ``x.read`` (channels last).
        ``out_dtype``: float32, or the output's float16/uint8 encoding done on the device
        (:func:`encode_tensor`; half or a quarter of the bytes to download and to write).
        ``footprint`` (:class:`tilefcn.mask.Footprint`): sub-windows without foreground are
        not run (NaN; ``window`` need only hold the kept ones' pixels, see
        :meth:`SubTilePlan.reads`), and outputs whose receptive-field centre is nodata are
        NaN. ``sub_plan``: the :meth:`sub_plan` already made for this tile.
        """
        expected_read = (y.read_stop - y.read_start, x.read_stop - x.read_start)
        if window.shape[:2] != expected_read:
            raise RuntimeError(f"read {window.shape[:2]} input pixels for a window of "
                               f"{expected_read}")
        geometry, classes = self.model.geometry, len(self.model.classes)
        plan = sub_plan or self.sub_plan(Tile((0, 0), y, x), image_shape, sub_tile, footprint)
        nodata = None if footprint is None else footprint.nodata
        if (nodata is not None or not plan.complete) and out_dtype == "uint8":
            raise ValueError("uint8 output cannot hold the NaN of masked or nodata outputs; "
                             "use float16 or float32")
        out = np.empty((classes, y.out_len, x.out_len), np.dtype(out_dtype)) if plan.complete \
            else np.full((classes, y.out_len, x.out_len), np.nan, np.dtype(out_dtype))
        lane, pending = self.lane, []
        with lane.stream(), autocast(self.device, self.precision):
            for items in self._batches(plan.kept()):
                stack = (window[items[0][0].read, items[0][1].read][None] if len(items) == 1
                         else np.stack([window[sy.read, sx.read] for sy, sx in items]))
                result = self.runner(self._prepare(lane, stack))
                for k, (sy, sx) in enumerate(items):
                    block = result[k, :, sy.crop, sx.crop]
                    want = (classes, sy.out_len, sx.out_len)
                    if tuple(block.shape) != want:
                        raise RuntimeError(
                            f"model output {tuple(result.shape[1:])} on an input window of "
                            f"{stack.shape[1:3]} px cannot be cropped to {want}: the model's "
                            f"geometry {geometry} is wrong")
                    pending.append((sy, sx, lane.download(encode_tensor(block, out_dtype))))
        for sy, sx, handle in pending:  # downloads were queued; wait for each in turn
            out[:, sy.out_start - y.out_start:sy.out_stop - y.out_start,
                sx.out_start - x.out_start:sx.out_stop - x.out_start] = lane.fetch(handle)
        if nodata is not None:
            out[:, nodata_centres(window, y, x, geometry, image_shape, nodata)] = np.nan
        return out


def nodata_centres(window: np.ndarray, y: AxisWindow, x: AxisWindow, geometry: Any,
                   image_shape: tuple[int, int], nodata: float) -> np.ndarray:
    """Boolean ``(y.out_len, x.out_len)``: outputs whose receptive-field centre pixel is
    nodata (every band equal to ``nodata``).

    Output ``i`` is centred on input row ``floor(centre2/2) + s·i`` (:meth:`Geometry.centre`;
    the lower of two middle rows for an even receptive field), clamped into the image;
    ``window`` holds rows ``y.read`` × cols ``x.read``.
    """
    from tilefcn.bands import nodata_pixels

    def rows(axis: int, w: AxisWindow) -> np.ndarray:
        centre = geometry.centre2[axis] // 2 + geometry.stride[axis] * np.arange(
            w.out_start, w.out_stop)
        inside = np.clip(centre, 0, image_shape[axis] - 1) - w.read_start
        return np.clip(inside, 0, w.read_stop - w.read_start - 1)

    return nodata_pixels(window[np.ix_(rows(0, y), rows(1, x))], nodata)


def encode_tensor(block: torch.Tensor, dtype: str) -> torch.Tensor:
    """The output encoding of :func:`tilefcn.write.encode_block`, in torch: float32, float16,
    or uint8 ``round(clip(p, 0, 1) · 255)`` (NaN refused), in the same float32 op order."""
    block = block.float()
    if dtype == "float32":
        return block
    if dtype == "float16":
        return block.to(torch.float16)
    if dtype == "uint8":
        if bool(torch.isnan(block).any()):
            raise ValueError("uint8 output cannot hold NaN (the model returned NaN); "
                             "use float16 or float32")
        return torch.round(block.clamp(0, 1) * 255).to(torch.uint8)
    raise ValueError(f"unknown output dtype {dtype!r}")


Read = Callable[[Tile], np.ndarray]
ReadRegion = Callable[[slice, slice], np.ndarray]  # image rows, cols → (h, w, C) pixels
Write = Callable[[Tile, np.ndarray], Any]


@dataclass
class StageTimes:
    """When each stage ran, per tile index (seconds, ``time.perf_counter``)."""

    read: dict = None  # type: ignore[assignment]
    compute: dict = None  # type: ignore[assignment]
    write: dict = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.read, self.compute, self.write = {}, {}, {}


def stream_tiles(engine: Engine, tiles: Iterable[Tile], read: Read, write: Write, *,
                 image_shape: tuple[int, int], sub_tile: int | None = None,
                 prefetch: int = 2, times: StageTimes | None = None,
                 out_dtype: str = "float32", footprint: Any = None,
                 read_region: ReadRegion | None = None) -> int:
    """Run ``tiles`` through read → device → write with the stages overlapping.

    At most ``prefetch`` windows are read ahead of the device (a bounded queue), and at most
    one block waits for the writer while the next tile computes. Returns tiles written.
    An error in any stage stops the stream and is raised here.

    ``footprint`` (:class:`tilefcn.mask.Footprint`): sub-tiles without foreground are not
    run, and with ``read_region`` not read either: only the rectangles their kept
    neighbours need (:meth:`tilefcn.plan.SubTilePlan.reads`); the rest of the window is 0.
    """
    tiles = list(tiles)
    if not tiles:
        return 0
    times = times or StageTimes()

    def sub_plan(tile: Tile) -> SubTilePlan | None:
        if footprint is None or footprint.foreground is None:
            return None
        return engine.sub_plan(tile, image_shape, sub_tile, footprint)

    def timed_read(tile: Tile, plan: SubTilePlan | None) -> np.ndarray:
        start = time.perf_counter()
        if plan is None or plan.complete or read_region is None:
            window = read(tile)
        else:
            window = read_kept(read_region, tile, plan)
        times.read[tile.index] = (start, time.perf_counter())
        return window

    def timed_write(tile: Tile, block: np.ndarray) -> None:
        start = time.perf_counter()
        write(tile, block)
        times.write[tile.index] = (start, time.perf_counter())

    readers = ThreadPoolExecutor(max(1, prefetch), thread_name_prefix="tilefcn-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="tilefcn-write")
    queue: collections.deque[tuple[Tile, SubTilePlan | None, Future]] = collections.deque()
    last_write: Future | None = None
    todo = iter(tiles)

    def submit(tile: Tile) -> None:
        plan = sub_plan(tile)
        queue.append((tile, plan, readers.submit(timed_read, tile, plan)))

    try:
        for tile in todo:
            submit(tile)
            if len(queue) >= prefetch:
                break
        while queue:
            tile, plan, future = queue.popleft()
            window = future.result()
            nxt = next(todo, None)
            if nxt is not None:
                submit(nxt)
            start = time.perf_counter()
            block = engine.run_tile(window, tile.y, tile.x, image_shape, sub_tile, out_dtype,
                                    footprint, plan)
            times.compute[tile.index] = (start, time.perf_counter())
            del window
            if last_write is not None:
                last_write.result()  # one block in the writer's hands at a time
            last_write = writer.submit(timed_write, tile, block)
        if last_write is not None:
            last_write.result()
    finally:
        for _, _, future in queue:
            future.cancel()
        readers.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)
    return len(tiles)




def read_kept(read_region: ReadRegion, tile: Tile, plan: SubTilePlan) -> np.ndarray:
    """The tile's window with only the pixels its kept sub-windows need read (zeros
    elsewhere; ``(h, w, 1)`` zeros when none is kept)."""
    shape = (tile.y.read_stop - tile.y.read_start, tile.x.read_stop - tile.x.read_start)
    window = None
    for ys, xs in plan.reads():
        part = np.asarray(read_region(slice(tile.y.read_start + ys.start,
                                            tile.y.read_start + ys.stop),
                                      slice(tile.x.read_start + xs.start,
                                            tile.x.read_start + xs.stop)))
        if window is None:
            window = np.zeros((*shape, part.shape[2]), part.dtype)
        window[ys, xs] = part
    return np.zeros((*shape, 1), np.uint8) if window is None else window
