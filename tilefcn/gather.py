"""Blocks computed on ``distributed`` workers, gathered into a sink in this process.

A sink that cannot travel to the workers (:class:`tilefcn.cog.CogSink`: one GDAL dataset, one
writer) gets its blocks from tasks that return them (:func:`compute_group`), at most a
bounded window of groups in flight, so memory stays that of ``group · window`` blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from tilefcn.plan import Tile

__all__ = ["compute_group", "gather_into"]


class _BlockList(list):
    """A sink that keeps ``(tile, block)`` pairs (for a task whose result is its blocks)."""

    def __init__(self, dtype: str) -> None:
        super().__init__()
        self.dtype = dtype

    def __call__(self, tile: Tile, block: np.ndarray) -> None:
        self.append((tile, np.asarray(block)))


def compute_group(ref: Any, reader: Any, tiles: list[Tile], image_shape: tuple[int, int],
                  sub_tile: int | None, dtype: str,
                  footprint: Any = None) -> list[tuple[Tile, np.ndarray]]:
    """Task on a worker: the encoded blocks of ``tiles``, streamed through its engine
    (``footprint``: the prediction's :class:`tilefcn.mask.Footprint`, when it has one)."""
    from tilefcn.sinks import write_group

    blocks = _BlockList(dtype)
    write_group(ref, reader, blocks, tiles, image_shape, sub_tile,
                *(() if footprint is None else (footprint,)))
    return list(blocks)


def gather_into(sink: Any, prediction: Any, client: Any, *, group: int, window: int,
                progress: Callable[[int, int], None] | None = None,
                resources: dict | None = None, skip: set | None = None) -> int:
    """Compute the tiles of ``prediction`` not in ``skip`` (default: the masked ones) on
    ``client``'s workers in groups of ``group`` tiles, at most ``window`` groups in flight
    (so at most ``group · window`` blocks wait for this process), and write each block into
    ``sink`` here, as it arrives. ``resources`` (e.g. ``{"GPU": 1}``) go with each task.
    Returns the tiles written."""
    from distributed import as_completed

    plan = prediction.plan
    skip = set(prediction.masked) if skip is None else set(skip)
    todo = [t for t in plan.tiles() if t.index not in skip]
    groups: Iterator[list[Tile]] = (todo[k:k + group] for k in range(0, len(todo), group))
    footprint = getattr(prediction, "footprint", None)
    ref, reader, footprint = client.scatter([prediction.ref, prediction.scan.reader,
                                             footprint], broadcast=True, hash=False)
    total, done = len(plan.tiles()), len(skip)

    def submit(tiles: list[Tile]) -> Any:
        return client.submit(compute_group, ref, reader, tiles, plan.image_shape,
                             prediction.sub_tile, sink.dtype, footprint, pure=False,
                             resources=resources)

    running = as_completed([submit(g) for _, g in zip(range(max(1, window)), groups,
                                                      strict=False)])
    for future in running:
        for tile, block in future.result():
            sink(tile, block)
            done += 1
        future.release()
        if progress:
            progress(done, total)
        nxt = next(groups, None)
        if nxt is not None:
            running.add(submit(nxt))
    return done - len(skip)
