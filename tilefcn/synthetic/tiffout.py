"""Streaming tiled TIFF output: tiles rendered in threads, compression options, atomic writes,
label masks, and the `SyntheticScan` record the writers return."""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from tilefcn.synthetic.noise import _A

_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class SyntheticScan:
    """A written synthetic scan: image and label mask paths, class names, shape, µm per pixel."""

    image: Path
    mask: Path
    classes: tuple[str, ...]
    shape: tuple[int, int]
    mpp: float | None


def _tiles(render: Callable[[_A, _A], _A], shape: tuple[int, int], tile: int) -> Iterator[_A]:
    """Tiles in row-major order; blocks of one tile row × ~2048 px are rendered in threads."""
    workers, bw = _CPUS, tile * max(1, 2048 // tile)
    jobs = ((np.arange(y, min(y + tile, shape[0])), np.arange(x, min(x + bw, shape[1])))
            for y in range(0, shape[0], tile) for x in range(0, shape[1], bw))
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(render, *j) for j in itertools.islice(jobs, 2 * workers))
        while pending:
            block = pending.popleft().result()
            if (job := next(jobs, None)) is not None:
                pending.append(pool.submit(render, *job))
            yield from (block[:, x:x + tile] for x in range(0, block.shape[1], tile))


def _write(path: Path, pages: list[tuple[Iterator[_A], dict]], **options: object) -> None:
    """Write pages to ``<path>.partial``, then move it into place. tifffile's read-ahead of tiles
    for its encoder threads is capped (its default of 512 MB would dominate memory)."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with tifffile.TiffWriter(tmp, **options) as tif:
            for data, kwargs in pages:
                tif.write(data, maxworkers=_CPUS, buffersize=2**25, **kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _options(tile: int, compression: str | None) -> dict:
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if compression not in ("jpeg", "zlib", None):
        raise ValueError(f"compression must be 'jpeg', 'zlib' or None, got {compression!r}")
    if compression == "jpeg":
        return {"compression": "jpeg", "compressionargs": {"level": 90}, "tile": (tile, tile)}
    return {"compression": compression, "predictor": compression == "zlib", "tile": (tile, tile),
            "compressionargs": {"level": 1} if compression else {}}  # zlib: speed over size


def _mask(image: Path, path: str | os.PathLike | None, render: Callable, shape: tuple[int, int],
          tile: int, classes: tuple, **kwargs: object) -> Path:
    """Write labels as a tiled zlib TIFF (default ``<stem>.mask.tif`` next to the image)."""
    stem = image.name.removesuffix(".tiff").removesuffix(".tif").removesuffix(".ome")
    path = Path(path) if path is not None else image.with_name(stem + ".mask.tif")
    page = {"shape": shape, "dtype": np.uint8, "photometric": "minisblack", **kwargs,
            "metadata": {"classes": list(classes)}, **_options(tile, "zlib"), "predictor": False}
    _write(path, [(_tiles(render, shape, tile), page)], bigtiff=shape[0] * shape[1] > 2**31)
    return path
