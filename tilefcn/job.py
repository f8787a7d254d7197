"""Running a prediction into a heatmap file: OME-Zarr (chunk by chunk, resumable) or GeoTIFF.

Each task computes one heatmap chunk and writes it straight into the store, so no chunk is
held longer than its own task and nothing is gathered in memory. The store's
``tilefcn.status`` attribute is ``running`` until every chunk is written and the pyramid is
built, then ``complete``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from tilefcn import __version__
from tilefcn.geometry import Geometry
from tilefcn.graph import Prediction, plan_prediction
from tilefcn.read import Scan, ScanInfo
from tilefcn.write import (
    check_output,
    create_ome_zarr,
    finish_ome_zarr,
    write_geotiff,
    written_chunks,
)

Progress = Callable[[int, int], None]  # (tiles done so far, tiles in total)


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What a run did: where the heatmap is, its shape, and how fast it went."""

    out: str
    shape: tuple[int, int, int]
    tiles: int
    tiles_skipped: int
    seconds: float
    megapixels: float
    tiles_masked: int = 0

    @property
    def mp_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else float("inf")


def default_output(source: str) -> Path:
    """``<stem>.heatmap.zarr`` next to the input (stem without ``.ome``)."""
    path = Path(source)
    stem = path.name.split(".")[0] or path.stem
    return path.with_name(f"{stem}.heatmap.zarr")


def heatmap_transform(geometry: Geometry, axis: int) -> tuple[float, float]:
    """Scale and translation from heatmap pixel index to scan pixel-centre coordinates.

    Output ``i`` sees input rows ``[o + s·i, o + s·i + r)``, centred on ``o + s·i + (r-1)/2``:
    scale ``s``, translation ``o + (r - 1)/2`` (scan pixels; × µm/px for physical units).
    """
    return float(geometry.stride[axis]), geometry.centre(axis)


def heatmap_geotransform(info: ScanInfo, geometry: Geometry) -> tuple[float, ...] | None:
    """GDAL geotransform of the heatmap (pixel-is-area): its pixel ``i`` spans scan area
    coordinates ``[o + r/2 - s/2 + s·i, … + s)`` (the receptive field's centre ± s/2)."""
    if info.geotransform is None:
        return None
    x0, px_w, rot_x, y0, rot_y, px_h = info.geotransform
    (sy, ty), (sx, tx) = heatmap_transform(geometry, 0), heatmap_transform(geometry, 1)
    left, top = tx + 0.5 - sx / 2, ty + 0.5 - sy / 2
    return (x0 + px_w * left, px_w * sx, rot_x, y0 + px_h * top, rot_y, px_h * sy)


def _attrs(prediction: Prediction) -> dict[str, Any]:
    info, model = prediction.scan.info, prediction.model
    return {
        "version": __version__,
        "model": {"name": model.name, "sha256": model.sha256, "spec": model.spec},
        "geometry": model.geometry.to_dict(),
        "source": info.to_dict(),
        "classes": list(model.classes),
        "tile": [prediction.plan.chunks[0][0], prediction.plan.chunks[1][0]],
        "masked_tiles": len(prediction.masked),
    }


def _write_block(array: Any, block: Any, window: tuple[slice, slice]) -> int:
    array[(slice(None), *window)] = block
    return 1


def _write_tasks(prediction: Prediction, array: Any, skip: set) -> list[Delayed]:
    name = "tilefcn-write-" + prediction.name.rsplit("-", 1)[-1]
    array_d = dask.delayed(array, name=f"{name}-store", traverse=False)
    layer = {(name, *t.index): (_write_block, array_d.key, prediction.task(t), t.out)
             for t in prediction.plan.tiles() if t.index not in skip}
    graph = HighLevelGraph.from_collections(
        name, layer, dependencies=[*prediction.dependencies, array_d])
    return [Delayed(key, graph, layer=name) for key in layer]


SCHEDULER_TIMEOUT = "30s"


@contextlib.contextmanager
def _executor(scheduler: str | None, workers: int) -> Iterator[Any]:
    """A connected ``distributed.Client`` (also dask's default while open), or local threads."""
    if not scheduler:
        with dask.config.set(scheduler="threads", num_workers=workers):
            yield None
        return
    from distributed import Client

    try:
        client = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from None
    with client:
        yield client


def _compute(tasks: list[Delayed], client: Any, *, progress: Progress | None, total: int,
             done: int) -> None:
    """Compute ``tasks`` on ``client``'s cluster, or on the local threaded scheduler."""
    if client is not None:
        from distributed import as_completed

        futures = client.compute(tasks)
        for _ in as_completed(futures):
            done += 1
            if progress:
                progress(done, total)
        client.gather(futures)
        return
    from dask.callbacks import Callback

    names = {t.key[0] for t in tasks}

    class _Tick(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):  # noqa: ANN001
            nonlocal done
            if isinstance(key, tuple) and key[0] in names:
                done += 1
                if progress:
                    progress(done, total)

    with _Tick():
        dask.compute(*tasks)


def _write_tiff(prediction: Prediction, out: Path, progress: Progress | None) -> int:
    """Stream the heatmap into a GeoTIFF (row strips of chunks); returns 0 tiles skipped."""
    tiles = prediction.plan.grid[0] * prediction.plan.grid[1]
    pixels, written = prediction.plan.out_shape[0] * prediction.plan.out_shape[1], 0

    def strip_done(n: int) -> None:  # strips of pixels → tiles-equivalent for the bar
        nonlocal written
        written += n
        if progress:
            progress(round(tiles * written / pixels), tiles)

    strip_done(0)
    info = prediction.scan.info
    write_geotiff(out, prediction.heatmap,
                  geotransform=heatmap_geotransform(info, prediction.model.geometry),
                  crs=info.crs, description=_attrs(prediction), progress=strip_done)
    return 0


def _write_zarr(prediction: Prediction, out: Path, mode: str, client: Any,
                progress: Progress | None) -> int:
    """Write every missing chunk of an OME-Zarr heatmap, then its pyramid; returns how many
    chunks a resumed store already had."""
    info, geometry = prediction.scan.info, prediction.model.geometry
    (sy, ty), (sx, tx) = heatmap_transform(geometry, 0), heatmap_transform(geometry, 1)
    unit, (my, mx) = ("micrometer", info.mpp) if info.mpp else (None, (1.0, 1.0))
    array = create_ome_zarr(
        out, shape=(prediction.classes, *prediction.plan.out_shape),
        chunks=(prediction.plan.chunks[0][0], prediction.plan.chunks[1][0]),
        scale=(sy * my, sx * mx), translation=(ty * my, tx * mx), unit=unit,
        attrs=_attrs(prediction), mode=mode)
    resumed = written_chunks(array) if mode == "resume" else set()
    skip = resumed | prediction.masked  # masked tiles stay NaN, the store's fill value
    tiles = prediction.plan.grid[0] * prediction.plan.grid[1]
    if progress:
        progress(len(skip), tiles)
    _compute(_write_tasks(prediction, array, skip), client, progress=progress, total=tiles,
             done=len(skip))
    finish_ome_zarr(out)
    return len(resumed - prediction.masked)


def run(image: Any, model: Any = "tissue", out: str | os.PathLike | None = None, *,
        tile: int | None = None, level: int | None = None, mpp: float | None = None,
        device: str = "auto", workers: int | None = None, scheduler: str | None = None,
        overwrite: bool = False, resume: bool = False, sub_tile: int | None = None,
        mask: str | None = None, progress: Progress | None = None) -> RunSummary:
    """Predict ``image`` with ``model`` and write the heatmap to ``out`` (``.zarr`` or ``.tif``).

    An existing output is refused unless ``overwrite`` or ``resume`` (OME-Zarr only: the
    chunks already written are kept and only the missing ones computed). ``mask`` (``"auto"``
    or a mask image) leaves tiles without foreground uncomputed (NaN).
    """
    if out is None:
        source = str(image.info.source if isinstance(image, Scan) else image)
        if not isinstance(image, (str, os.PathLike, Scan)) or source.startswith("<"):
            raise ValueError("an output path is needed when the image is not a file")
        out = default_output(source)
    out = Path(out)
    mode = check_output(out, overwrite=overwrite, resume=resume)
    workers = workers or os.cpu_count() or 1
    threads = None if scheduler else max(1, (os.cpu_count() or 1) // workers)
    prediction = plan_prediction(image, model, tile=tile, device=device, level=level, mpp=mpp,
                                 sub_tile=sub_tile, torch_threads=threads, mask=mask)
    start = time.perf_counter()
    with _executor(scheduler, workers) as client:  # connect before writing anything
        if out.suffix.lower() in (".tif", ".tiff"):
            skipped = _write_tiff(prediction, out, progress)
        else:
            skipped = _write_zarr(prediction, out, mode, client, progress)
    seconds = time.perf_counter() - start
    tiles = prediction.plan.grid[0] * prediction.plan.grid[1]
    height, width = prediction.plan.image_shape
    computed = 1.0 - (skipped + len(prediction.masked)) / tiles
    return RunSummary(str(out), (prediction.classes, *prediction.plan.out_shape), tiles,
                      skipped, seconds, height * width * computed / 1e6,
                      len(prediction.masked))
