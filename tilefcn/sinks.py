"""Where computed heatmap blocks go, and the tasks that send them there.

A sink is a callable ``sink(tile, block)`` that stores one ``(C, h, w)`` float32 block at the
tile's place. :class:`ZarrSink` writes OME-Zarr level 0 (encoded to the output dtype);
[pipelines] adds more. :func:`write_group` is the task that streams a group of tiles through
a worker's engine (read-ahead → device → writer thread, :func:`tilefcn.runtime.stream_tiles`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tilefcn.plan import Tile
from tilefcn.pyramid import level1_block
from tilefcn.runtime.cache import ModelRef, get_engine
from tilefcn.runtime.engine import stream_tiles
from tilefcn.write import encode_block

Sink = Callable[[Tile, np.ndarray], Any]


@dataclass
class ZarrSink:
    """Writes blocks into a zarr array ``(C, H_out, W_out)`` at each tile's output window,
    and, with ``level1`` (pyramid level 1 chunked at half the level-0 chunks), the block's
    2×2 mean there too — level 0 is then never read back for the pyramid."""

    array: Any
    dtype: str = "float32"
    level1: Any = None

    def __call__(self, tile: Tile, block: np.ndarray) -> None:
        block = encode_block(block, self.dtype)
        self.array[(slice(None), *tile.out)] = block
        if self.level1 is not None:
            half = level1_block(block, self.dtype)
            y0, x0 = tile.y.out_start // 2, tile.x.out_start // 2
            self.level1[:, y0:y0 + half.shape[1], x0:x0 + half.shape[2]] = half


def read_window(reader: Any, window: tuple[slice, slice]) -> np.ndarray:
    """Read one ``(h, w, C)`` window from a scan reader (runs inside a task)."""
    return np.asarray(reader[window])


def write_group(ref: ModelRef, reader: Any, sink: Sink, tiles: list[Tile],
                image_shape: tuple[int, int], sub_tile: int | None = None,
                footprint: Any = None) -> int:
    """Task: read, run and write ``tiles`` with the stages overlapping; returns tiles done.

    With a ``footprint`` (:class:`tilefcn.mask.Footprint`) a sub-tile without foreground is
    neither read nor run (its outputs are NaN), and nodata-centred outputs are NaN.
    """
    return stream_tiles(get_engine(ref), tiles, lambda t: read_window(reader, t.read), sink,
                        image_shape=image_shape, sub_tile=sub_tile or ref.sub_tile,
                        out_dtype=getattr(sink, "dtype", "float32"), footprint=footprint,
                        read_region=lambda ys, xs: read_window(reader, (ys, xs)))


def write_block(sink: Sink, block: np.ndarray, tile: Tile) -> int:
    """Task: write one block already computed by its own task; returns 1."""
    sink(tile, block)
    return 1
