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
from tilefcn.runtime.cache import ModelRef, get_engine
from tilefcn.runtime.engine import stream_tiles
from tilefcn.write import encode_block

Sink = Callable[[Tile, np.ndarray], Any]


@dataclass
class ZarrSink:
    """Writes blocks into a zarr array ``(C, H_out, W_out)`` at each tile's output window."""

    array: Any
    dtype: str = "float32"

    def __call__(self, tile: Tile, block: np.ndarray) -> None:
        self.array[(slice(None), *tile.out)] = encode_block(block, self.dtype)


def read_window(reader: Any, window: tuple[slice, slice]) -> np.ndarray:
    """Read one ``(h, w, C)`` window from a scan reader (runs inside a task)."""
    return np.asarray(reader[window])


def write_group(ref: ModelRef, reader: Any, sink: Sink, tiles: list[Tile],
                image_shape: tuple[int, int], sub_tile: int | None = None) -> int:
    """Task: read, run and write ``tiles`` with the stages overlapping; returns tiles done."""
    return stream_tiles(get_engine(ref), tiles, lambda t: read_window(reader, t.read), sink,
                        image_shape=image_shape, sub_tile=sub_tile or ref.sub_tile)


def write_block(sink: Sink, block: np.ndarray, tile: Tile) -> int:
    """Task: write one block already computed by its own task; returns 1."""
    sink(tile, block)
    return 1
