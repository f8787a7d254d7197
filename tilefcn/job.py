"""Running a prediction into a heatmap file: OME-Zarr (chunk by chunk, resumable) or GeoTIFF.

Each task computes one heatmap chunk and writes it straight into the store, so no chunk is
held longer than its own task and nothing is gathered in memory. The store's
``tilefcn.status`` attribute is ``running`` until every chunk is written and the pyramid is
built, then ``complete``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.threaded
import zarr
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from tilefcn import __version__
from tilefcn.checkpoint import cog_identity, read_journal
from tilefcn.cluster import executor, has_gpu_workers
from tilefcn.cog import (
    PIXEL_GEOTRANSFORM,
    CogSink,
    check_geotiff_dtype,
    source_crs,
)
from tilefcn.gather import gather_into
from tilefcn.graph import Prediction, plan_prediction
from tilefcn.heatmap_coords import heatmap_geotransform, heatmap_transform
from tilefcn.identity import identity_mismatch, job_identity
from tilefcn.pyramid import create_levels, plan_levels, pyramid_layer
from tilefcn.read import Scan
from tilefcn.scanmeta import ResolutionWarning, describe_resolution, mpp_mismatch
from tilefcn.sinks import ZarrSink
from tilefcn.write import (
    check_dtype,
    check_output,
    create_ome_zarr,
    finish_ome_zarr,
    open_for_writing,
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
    backend: str = "auto"
    backend_choice: dict | None = None
    already_complete: bool = False  # skip_complete found this job's output complete
    resolution: str = ""  # "level L (X µm/px[, downsampled ×k from Y])" (scanmeta)

    @property
    def mp_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else float("inf")


def default_output(source: str) -> Path:
    """``<stem>.heatmap.zarr`` next to the input (stem without ``.ome``)."""
    path = Path(source)
    stem = path.name.split(".")[0] or path.stem
    return path.with_name(f"{stem}.heatmap.zarr")


def _attrs(prediction: Prediction, options: dict | None = None) -> dict[str, Any]:
    info, model, ref = prediction.scan.info, prediction.model, prediction.ref
    job = {"device": ref.device, "backend": ref.backend, "precision": ref.precision,
           "batch": ref.batch, "sub_tile": ref.sub_tile, **(options or {})}
    if ref.choice:
        job["backend_choice"] = ref.choice
    return {
        "version": __version__,
        "model": {"name": model.name, "sha256": model.sha256, "spec": model.spec},
        "geometry": model.geometry.to_dict(),
        "source": info.to_dict(),
        "classes": list(model.classes),
        "tile": [prediction.plan.chunks[0][0], prediction.plan.chunks[1][0]],
        "masked_tiles": len(prediction.masked),
        "job": job,
        "identity": job_identity(prediction, dtype=job.get("dtype", "float32")),
    }


def _record_workers(prediction: Prediction, out: Path, client: Any) -> None:
    """What each worker chose (device, backend, measured rates) into ``tilefcn.job.workers``;
    the first worker's choice becomes the run's (for ``--verbose``)."""
    from tilefcn.runtime.plugin import worker_report

    reports = client.run(worker_report)
    group = zarr.open_group(out, mode="r+", zarr_format=3)
    attrs = dict(group.attrs["tilefcn"])
    attrs["job"] = {**attrs.get("job", {}), "workers": {
        address: {k: r.get(k) for k in ("device", "backend", "gpu")}
        for address, r in sorted(reports.items())}}
    choices = [r["choice"] for _, r in sorted(reports.items()) if r.get("choice")]
    if choices and not prediction.ref.choice:
        prediction.ref.choice = attrs["job"]["backend_choice"] = choices[0]
    group.attrs["tilefcn"] = attrs


def _group_size(tiles: int, workers: int) -> int:
    """Tiles per write task: enough tasks to keep every worker busy (≥ 4 each), at most 8."""
    return max(1, min(8, tiles // (4 * max(1, workers))))


def _zarr_graph(prediction: Prediction, out: Path, array: Any, dtype: str, skip: set,
                workers: int, gpu_resources: bool) -> tuple[HighLevelGraph, list, list, int]:
    """The write tasks (level 0) and the pyramid tasks built from them, in one graph (the
    pyramid's empty arrays are created in the store here).

    Returns ``(graph, write keys, pyramid keys, pyramid levels)``. With ``gpu_resources``
    the write tasks carry ``resources={"GPU": 1}`` (one model per GPU on a
    ``--resources GPU=1`` fleet).
    """
    token = prediction.name.rsplit("-", 1)[-1]
    name = f"tilefcn-write-{token}"
    chunks = array.chunks[1:]
    half = chunks[0] % 2 == 0 and chunks[1] % 2 == 0  # level 1 written with level 0
    levels = plan_levels(array.shape, chunks, half_first=half)
    create_levels(out, levels, dtype)
    level1 = open_for_writing(out, "1") if half and levels else None
    sink_d = dask.delayed(ZarrSink(array, dtype, level1), name=f"{name}-sink", traverse=False)
    todo = prediction.plan.grid[0] * prediction.plan.grid[1] - len(skip)
    layer, writer = prediction.write_layer(sink_d.key, skip, _group_size(todo, workers), name)
    annotations = {"resources": {"GPU": 1}} if gpu_resources else {}
    with dask.annotate(**annotations):
        graph = HighLevelGraph.from_collections(
            name, layer, dependencies=[*prediction.dependencies, sink_d])
    pyramid, pyramid_keys = pyramid_layer(str(out), levels, chunks, prediction.plan.grid,
                                          writer, f"tilefcn-pyramid-{token}", dtype,
                                          level1=writer if level1 is not None else None)
    layers = {**graph.layers, f"tilefcn-pyramid-{token}": MaterializedLayer(pyramid)}
    deps = {**graph.dependencies, f"tilefcn-pyramid-{token}": {name}}
    return HighLevelGraph(layers, deps), list(layer), pyramid_keys, len(levels)


def _compute(graph: HighLevelGraph, keys: list, client: Any, *, counted: list, workers: int,
             progress: Progress | None, total: int, done: int) -> None:
    """Compute ``keys`` of ``graph`` on ``client``'s cluster or the local threads; the
    results of ``counted`` keys are tiles done, reported to ``progress``."""
    counted_set = set(counted)
    if client is not None:
        from distributed import as_completed

        futures = client.get(graph, keys, sync=False)
        for future in as_completed(futures):
            if future.key in counted_set:
                done += future.result()
                if progress:
                    progress(done, total)
        client.gather(futures)
        return
    from dask.callbacks import Callback

    class _Tick(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):  # noqa: ANN001
            nonlocal done
            if key in counted_set:
                done += result
                if progress:
                    progress(done, total)

    with _Tick():
        dask.threaded.get(dict(graph), keys, num_workers=workers)


def _write_tiff(prediction: Prediction, out: Path, client: Any, dtype: str,
                progress: Progress | None, workers: int, mode: str = "new") -> int:
    """Write the heatmap tile by tile into a Cloud-Optimized GeoTIFF (:class:`CogSink`): by
    this process's threads through the graph (one locked writer), or gathered from a
    cluster's workers at most ``2 · workers`` groups at a time. With ``mode="resume"`` the
    tiles an interrupted run of this job checkpointed are kept; returns how many.

    Georeferenced scans give the scan's CRS (WKT) and the heatmap's geotransform; others a
    COG without CRS whose transform maps heatmap pixels onto scan pixels."""
    info, geometry, plan = prediction.scan.info, prediction.model.geometry, prediction.plan
    georef = info.geotransform is not None
    sink = CogSink.open(
        out, shape=(prediction.classes, *plan.out_shape),
        chunks=(plan.chunks[0][0], plan.chunks[1][0]),
        geotransform=heatmap_geotransform(info, geometry,
                                          None if georef else PIXEL_GEOTRANSFORM),
        crs=source_crs(info.source, info.crs) if georef or info.crs else None,
        classes=list(prediction.model.classes),
        description=_attrs(prediction, {"dtype": dtype}), dtype=dtype,
        identity=job_identity(prediction, dtype=dtype), resume=mode == "resume")
    resumed = sink.done()
    skip = resumed | set(prediction.masked)
    tiles = plan.grid[0] * plan.grid[1]
    group = _group_size(tiles - len(skip), workers)
    try:
        sink.write_nodata(plan.tile(*index) for index in sorted(prediction.masked - resumed))
        if progress:
            progress(len(skip), tiles)
        if client is not None and prediction.scan.reader is not None:
            from tilefcn.runtime.plugin import RuntimePlugin

            client.register_plugin(RuntimePlugin(prediction.ref))
            gpu = str(prediction.ref.device).startswith("cuda") and has_gpu_workers(client)
            gather_into(sink, prediction, client, group=group, window=2 * workers,
                        progress=progress, resources={"GPU": 1} if gpu else None, skip=skip)
        else:
            name = f"tilefcn-cog-{prediction.name.rsplit('-', 1)[-1]}"
            sink_d = dask.delayed(sink, name=f"{name}-sink", traverse=False)
            layer, _ = prediction.write_layer(sink_d.key, skip, group, name)
            graph = HighLevelGraph.from_collections(
                name, layer, dependencies=[*prediction.dependencies, sink_d])
            _compute(graph, list(layer), None, counted=list(layer), workers=workers,
                     progress=progress, total=tiles, done=len(skip))
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    return len(resumed - prediction.masked)


def _write_zarr(prediction: Prediction, out: Path, mode: str, client: Any, options: dict,
                progress: Progress | None, workers: int) -> int:
    """Write every missing chunk of an OME-Zarr heatmap and its pyramid (tasks on the
    workers), then mark it complete; returns how many chunks a resumed store already had."""
    info, geometry = prediction.scan.info, prediction.model.geometry
    (sy, ty), (sx, tx) = heatmap_transform(geometry, 0), heatmap_transform(geometry, 1)
    unit, (my, mx) = ("micrometer", info.mpp) if info.mpp else (None, (1.0, 1.0))
    dtype = options["dtype"]
    if client is not None:  # every worker loads the model onto its own device first: an
        from tilefcn.runtime.plugin import RuntimePlugin  # error there leaves no output

        client.register_plugin(RuntimePlugin(prediction.ref))
    array = create_ome_zarr(
        out, shape=(prediction.classes, *prediction.plan.out_shape),
        chunks=(prediction.plan.chunks[0][0], prediction.plan.chunks[1][0]),
        scale=(sy * my, sx * mx), translation=(ty * my, tx * mx), unit=unit,
        attrs=_attrs(prediction, options), mode=mode, dtype=dtype)
    resumed = written_chunks(array) if mode == "resume" else set()
    skip = resumed | prediction.masked  # masked tiles stay NaN, the store's fill value
    tiles = prediction.plan.grid[0] * prediction.plan.grid[1]
    if progress:
        progress(len(skip), tiles)
    gpu = str(prediction.ref.device).startswith("cuda") and has_gpu_workers(client)
    graph, writes, pyramid, levels = _zarr_graph(prediction, out, array, dtype, skip, workers,
                                                 gpu)
    _compute(graph, writes + pyramid, client, counted=writes, workers=workers,
             progress=progress, total=tiles, done=len(skip))
    if client is not None:
        _record_workers(prediction, out, client)
    finish_ome_zarr(out, levels=levels)
    return len(resumed - prediction.masked)


def _complete_same_job(out: Path, prediction: Prediction, dtype: str) -> bool:
    """Whether the store at ``out`` is ``complete`` and was written by this very job (same
    identity record: source, model, plan, options); reads its attributes only."""
    try:
        attrs = dict(zarr.open_group(out, mode="r", zarr_format=3).attrs).get("tilefcn", {})
    except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError):
        return False
    return (isinstance(attrs, dict) and attrs.get("status") == "complete" and
            identity_mismatch(attrs.get("identity"),
                              job_identity(prediction, dtype=dtype)) is None)


def _complete_same_cog(out: Path, prediction: Prediction, dtype: str) -> bool:
    """With ``--resume`` on a GeoTIFF and no interrupted run to continue: whether ``out`` is
    this very job's finished COG (``ValueError`` when it is another job's)."""
    if read_journal(out) is not None or not out.is_file():
        return False
    why = identity_mismatch(cog_identity(out), job_identity(prediction, dtype=dtype))
    if why:
        raise ValueError(f"cannot resume {out}: {why}")
    return True


def run(image: Any, model: Any = "tissue", out: str | os.PathLike | None = None, *,
        tile: int | None = None, level: int | None = None, mpp: float | None = None,
        device: str = "auto", workers: int | None = None, scheduler: str | None = None,
        gpus: int | None = None, overwrite: bool = False, resume: bool = False,
        sub_tile: int | None = None, mask: str | None = None, backend: str = "auto",
        precision: str = "fp32", batch: int | None = None, dtype: str = "float32",
        progress: Progress | None = None, skip_complete: bool = False,
        warn: Callable[[str], None] | None = None, bands: Any = None,
        nodata: Any = None) -> RunSummary:
    """Predict ``image`` with ``model`` and write the heatmap to ``out`` (``.zarr`` or ``.tif``).

    An existing output is refused unless ``overwrite`` or ``resume`` (the chunks already
    written are kept and only the missing ones computed: an OME-Zarr's own, a GeoTIFF's
    checkpointed beside it, :mod:`tilefcn.cog`; this job's finished GeoTIFF is left as it
    is, ``already_complete``). ``mask`` (``"auto"``
    or a mask image) leaves tiles without foreground uncomputed (NaN). ``dtype``
    (OME-Zarr): ``float32`` (default), ``float16`` or ``uint8`` (``round(p · 255)``, no NaN,
    so no mask). ``backend``/``precision``/``batch``: see :func:`tilefcn.predict`.
    ``scheduler`` (an address) or ``gpus`` (a local cluster, one process per GPU) run the
    tasks on ``distributed`` workers, each preparing its own device and model (``scheduler``
    may also be a connected ``Client``, left open). ``skip_complete`` (with ``resume``): an
    output already ``complete`` for this same job is left as it is (``already_complete``).
    ``bands`` (1-based, ``"4,3,2,8"``) and ``nodata`` (a value, ``"none"``, default the
    file's GDAL_NODATA): see :func:`tilefcn.predict`.
    A scan read more than 10 % away from the model's training µm/px (its card's ``mpp``) is
    reported through ``warn`` (default: a :class:`~tilefcn.scanmeta.ResolutionWarning`)
    before anything is computed.
    """
    if out is None:
        source = str(image.info.source if isinstance(image, Scan) else image)
        if not isinstance(image, (str, os.PathLike, Scan)) or source.startswith("<"):
            raise ValueError("an output path is needed when the image is not a file")
        out = default_output(source)
    out = Path(out)
    check_dtype(dtype)
    tiff = out.suffix.lower() in (".tif", ".tiff")
    if tiff:
        check_geotiff_dtype(dtype)
    if dtype == "uint8" and mask not in (None, "none"):
        raise ValueError("--dtype uint8 cannot store the NaN of masked tiles; use float16")
    if scheduler and gpus:
        raise ValueError("give a scheduler address or --gpus, not both")
    mode = check_output(out, overwrite=overwrite, resume=resume)
    workers = workers or os.cpu_count() or 1
    distributed = bool(scheduler or gpus)
    threads = None if distributed else max(1, (os.cpu_count() or 1) // workers)
    prediction = plan_prediction(image, model, tile=tile, device=device, level=level, mpp=mpp,
                                 sub_tile=sub_tile, torch_threads=threads, mask=mask,
                                 backend=backend, precision=precision, batch=batch,
                                 local=not distributed, bands=bands, nodata=nodata)
    if dtype == "uint8" and prediction.footprint is not None:
        raise ValueError("--dtype uint8 cannot store the NaN of nodata outputs; use float16 "
                         "(or --nodata none)")
    info = prediction.scan.info
    resolution = describe_resolution(info.level, info.mpp, info.factor,
                                     geotransform=info.geotransform, crs=info.crs)
    mismatch = mpp_mismatch(info.mpp, prediction.model.card.get("mpp"), prediction.model.name)
    if mismatch:
        (warn or _resolution_warning)(mismatch)
    if mode == "resume" and (_complete_same_cog(out, prediction, dtype) if tiff else
                             skip_complete and _complete_same_job(out, prediction, dtype)):
        tiles = prediction.plan.grid[0] * prediction.plan.grid[1]
        return RunSummary(str(out), (prediction.classes, *prediction.plan.out_shape), tiles,
                          tiles, 0.0, 0.0, len(prediction.masked), already_complete=True,
                          resolution=resolution)
    start = time.perf_counter()
    with executor(scheduler, workers, gpus) as client:  # connect before writing anything
        if client is not None:
            workers = max(1, sum(w.get("nthreads", 1) for w in
                                 client.scheduler_info().get("workers", {}).values()))
        if tiff:
            skipped = _write_tiff(prediction, out, client, dtype, progress, workers, mode)
        else:
            skipped = _write_zarr(prediction, out, mode, client, {"dtype": dtype}, progress,
                                  workers)
    seconds = time.perf_counter() - start
    tiles = prediction.plan.grid[0] * prediction.plan.grid[1]
    height, width = prediction.plan.image_shape
    computed = 1.0 - (skipped + len(prediction.masked)) / tiles
    return RunSummary(str(out), (prediction.classes, *prediction.plan.out_shape), tiles,
                      skipped, seconds, height * width * computed / 1e6,
                      len(prediction.masked),
                      (prediction.ref.choice or {}).get("backend", prediction.ref.backend),
                      prediction.ref.choice, resolution=resolution)


def _resolution_warning(message: str) -> None:
    warnings.warn(message, ResolutionWarning, stacklevel=3)
