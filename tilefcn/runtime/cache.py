"""The worker-side model cache: what a task carries (:class:`ModelRef`) and what each process
builds from it once (:func:`get_engine`): the device resolved *here*, the model loaded and
copied onto it, the backend chosen or verified, all cached by model fingerprint, device,
backend and precision, with a bounded cache (a long-lived worker sees many models).
"""

from __future__ import annotations

import os
import pickle
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tilefcn.geometry import Geometry
from tilefcn.measure.shapes import copy_module
from tilefcn.modelio import Model, as_eval, load_model
from tilefcn.plan import AxisWindow, axis_window, output_chunk_len
from tilefcn.runtime.backends import CHOICES, build_runner
from tilefcn.runtime.device import (
    check_device_name,
    check_precision,
    exact_math,
    resolve_device,
)
from tilefcn.runtime.engine import DEFAULT_BATCH, DEFAULT_SUB_TILE, Engine
from tilefcn.runtime.select import ATOL, Choice, choose_backend, rss_mb

CACHE_MAX = 8


@dataclass
class ModelRef:
    """What a dask task carries to find its model: a token into the per-process cache, how to
    reload it (``spec``) and, for in-memory modules only, the :class:`Model` itself.

    ``device`` is the *requested* device (``auto``, ``cpu``, ``cuda``, ``cuda:N``): it is
    resolved on the worker that runs the model. Pickling drops the model when a ``spec`` can
    reload it (ExportedPrograms cannot be pickled), so workers load each model once.
    """

    token: str
    spec: str | None
    device: str
    torch_threads: int | None
    model: Model | None = None
    geometry: Geometry | None = None
    backend: str = "auto"
    precision: str = "fp32"
    batch: int | None = None
    sub_tile: int | None = None
    #: ``((sub_tile, every sub-window shape of the plan with it), …)`` per candidate edge
    #: (backend checks; with several, ``--backend auto`` measures each edge)
    shapes: tuple = ()
    choice: dict | None = field(default=None, compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.spec is not None:
            state["model"] = None
        elif self.model is not None:  # the user's own in-memory module, shipped by value
            import cloudpickle

            try:
                state["model"] = cloudpickle.dumps(self.model)
            except Exception as exc:  # noqa: BLE001 - any pickling failure means the same
                raise TypeError(
                    f"model {self.model.name!r} cannot be sent to worker processes ({exc}); "
                    "save it (tilefcn.save_bundle, or torch.export.save for an ExportedProgram) "
                    "and pass the path instead") from None
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state.get("model"), bytes):
            state["model"] = pickle.loads(state["model"])
        self.__dict__.update(state)


def make_ref(model: Model, device: str = "auto", torch_threads: int | None = None, *,
             backend: str = "auto", precision: str = "fp32", batch: int | None = None,
             sub_tile: int | None = None, shapes: dict | None = None,
             local: bool = True) -> ModelRef:
    """A :class:`ModelRef` for ``model``.

    ``local``: the model runs in this process (threaded scheduler), so the device is resolved
    and the engine built here at once (errors surface before any compute, and the backend
    choice is known for the output's attributes). For a cluster only the spelling of the
    options is checked here: workers resolve ``device="cuda"`` on their own GPUs.
    ``shapes``: ``{sub_tile: the sub-window shapes the plan runs with it}``
    (:func:`tilefcn.plan.sub_window_shapes`) for each candidate sub-tile edge: a backend other
    than eager torch is used only if it matches torch on every shape of its edge; with several
    edges (and ``sub_tile`` None) ``--backend auto`` measures each and keeps the fastest.
    ``torch_threads`` None means 1 on CPU (:func:`get_engine`): one torch thread per dask
    thread (DESIGN §5).
    """
    check_device_name(device)
    check_precision(precision)
    if backend not in CHOICES:
        raise ValueError(f"unknown backend {backend!r} (use {', '.join(CHOICES)})")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int)
                              or batch < 1):
        raise ValueError(f"batch must be a positive whole number, got {batch!r}")
    ref = ModelRef(f"{model.fingerprint or model.sha256}:{model.spec}", model.spec,
                   str(device), torch_threads, model, model.geometry, backend, precision,
                   batch, sub_tile,
                   tuple(sorted((int(k), frozenset(v)) for k, v in (shapes or {}).items())))
    if local:
        ref.choice = get_engine(ref).choice
    return ref


_CACHE: dict[tuple, Engine] = {}
_LOCK = threading.Lock()


def interior_window(geometry: Geometry, sub_tile: int) -> tuple[tuple[int, int], int]:
    """Input shape of an interior sub-window of ``sub_tile`` px, and the input pixels its
    outputs cover (``out_len · stride`` per axis)."""
    shape, covered = [], 1
    for axis in (0, 1):
        step = output_chunk_len(geometry, axis, sub_tile)
        far = (step * 8 + 8) * geometry.stride[axis] + sum(geometry.halo(axis)) * 2 + sub_tile
        w: AxisWindow = axis_window(geometry, axis, step * 4, step * 5, far)
        shape.append(w.read_stop - w.read_start)
        covered *= step * geometry.stride[axis]
    return (shape[0], shape[1]), covered


def _smaller_window(geometry: Geometry, window: tuple[int, int]) -> tuple[int, int]:
    """A second, non-square shape for checking a backend off the traced size."""
    out = []
    for axis, edge in enumerate(window):
        a = geometry.alignment[axis]
        least = max(geometry.min_input[axis], geometry.border[axis], 1)
        out.append(max(least, edge - a * max(1, (edge // 3) // a) * (axis + 1)))
    return out[0], out[1]


def _verify(runner, reference, in_channels: int, shapes: list[tuple[int, int]],
            name: str, batch: int = 1) -> float:
    """Max error of ``runner`` vs eager torch on random inputs of ``shapes`` (the first one
    also as a batch of ``min(batch, 2)``); ValueError when any exceeds
    ``ATOL · max(1, |ref|)``, the output shapes differ or the backend fails."""
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for k, shape in enumerate(shapes):
        x = torch.rand(min(batch, 2) if k == 0 else 1, in_channels, *shape, generator=gen)
        want = reference(x).float()
        try:
            got = runner(x).float()
        except Exception as exc:  # noqa: BLE001 - a backend failing on a shape is refused
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ValueError(f"backend {name!r} fails on a {shape[0]}x{shape[1]} window of "
                             f"this model: {first} (use --backend torch)") from None
        if got.shape != want.shape:
            raise ValueError(f"backend {name!r} gives output {tuple(got.shape)} where torch "
                             f"gives {tuple(want.shape)} for this model (use --backend torch)")
        err = float((got.cpu() - want.cpu()).abs().max())
        if err > ATOL * max(1.0, float(want.abs().max())):
            raise ValueError(f"backend {name!r} differs from torch by {err:.2g} on this model "
                             "(more than 1e-5; use --backend torch)")
        worst = max(worst, err)
    return worst


def _takes_batches(reference, in_channels: int, shape: tuple[int, int],
                   device: torch.device) -> bool:
    """Whether the model runs a batch of 2 windows (exported programs may be specialised to
    a batch of 1)."""
    try:
        reference(torch.zeros(2, in_channels, *shape, device=device))
        return True
    except Exception:  # noqa: BLE001 - any failure: run windows one at a time
        return False


def working_memory_mb() -> float:
    """The memory the model's sub-tiles may take in this process, all threads together: a
    quarter of the machine's physical memory (4 GB where it cannot be read)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 4 / 2**20
    except (ValueError, OSError, AttributeError):
        return 4096.0


def _candidates(ref: ModelRef, geometry: Geometry, device: torch.device,
                auto: bool) -> dict[int, list]:
    """``{sub_tile: sorted shapes to check}``: ``ref.sub_tile`` alone when given, every edge
    the plan listed for ``--backend auto``, else this device's default (a plan made for
    another device kind lists none of its shapes: an interior and a smaller window are
    checked instead)."""
    planned = dict(ref.shapes)
    if ref.sub_tile:
        edges = [ref.sub_tile]
    elif auto and planned:
        edges = sorted(planned)
    else:
        edges = [DEFAULT_SUB_TILE.get(device.type, 256)]
    out = {}
    for edge in edges:
        window = interior_window(geometry, edge)[0]
        out[edge] = sorted(planned.get(edge) or {window, _smaller_window(geometry, window)})
    return out


def _build(ref: ModelRef, device: torch.device) -> Engine:
    exact_math()
    model = ref.model or load_model(ref.spec, geometry=ref.geometry)
    module = as_eval(copy_module(model.module)).to(device)
    auto = ref.backend == "auto" and device.type == "cpu" and ref.precision == "fp32"
    candidates = _candidates(ref, model.geometry, device, auto)
    channels = model.in_channels
    batch = ref.batch or DEFAULT_BATCH.get(device.type, 1)
    smallest = min(min(shapes) for shapes in candidates.values())
    first = interior_window(model.geometry, min(candidates))[0]
    reference = build_runner("torch", module, device, in_channels=channels, example=first[0])
    if batch > 1 and not _takes_batches(reference, channels, smallest, device):
        batch = 1  # e.g. an ExportedProgram specialised to batch 1: one window per call
    threads = ref.torch_threads or 1  # one intra-op thread per dask thread by default
    errors: dict = {}

    measured_runners: dict = {}  # built while measuring (one torch thread), reused

    def checked(name: str, edge: int):
        window = interior_window(model.geometry, edge)[0]
        runner = (measured_runners.get(name) if threads == 1 else None) or build_runner(
            name, module, device, in_channels=channels, example=window[0], threads=threads)
        if name not in ("torch", "torch-cl"):  # another implementation: check every shape
            errors[name] = _verify(runner, reference, channels, candidates[edge], name, batch)
        return runner

    if auto:
        measured, too_large = {}, {}
        budget = working_memory_mb() / max(1, (os.cpu_count() or 1) // threads)
        baseline = rss_mb()
        for edge in candidates:  # ascending: memory grows with the edge
            window, covered = interior_window(model.geometry, edge)
            m = choose_backend(ref.token, module, in_channels=channels, window=window,
                               out_pixels=covered, runners=measured_runners,
                               baseline_mb=baseline, scaling=model.scaling)
            if measured and m.peak_mb is not None and m.peak_mb > budget:
                too_large[edge] = (f"needs ≈ {m.peak_mb:.0f} MB per thread, over "
                                   f"{budget:.0f} MB (a quarter of the memory per thread)")
                break
            measured[edge] = m
        candidates = {e: v for e, v in candidates.items() if e in measured}
        ranked = sorted(((rate, name, edge) for edge, m in measured.items()
                         for name, rate in m.rates.items()), reverse=True)
        rejected: dict = {}
        for _, name, edge in ranked:
            try:
                runner = checked(name, edge)
                break
            except ValueError as exc:
                rejected[name] = str(exc)
        else:
            edge = min(candidates)
            name, runner = "torch-cl", checked("torch-cl", edge)
        m = measured[edge]
        choice = Choice(name, m.rates, {**m.errors, **errors},
                        all(x.cached for x in measured.values()), rejected,
                        edge if ref.sub_tile is None else None,
                        {e: x.rates for e, x in measured.items()}, m.peak_mb, too_large)
    else:
        edge = next(iter(candidates))
        name = "torch-cl" if ref.backend in ("auto", "torch") else ref.backend
        runner = checked(name, edge)  # asked for by name: exact on every shape, or refused
        choice = Choice(name, {}, errors)
    return Engine(model, runner, device, name, ref.precision, batch, choice.to_dict(),
                  edge if ref.sub_tile is None else None)


def get_engine(ref: ModelRef) -> Engine:
    """This process's :class:`Engine` for ``ref`` (built on first use, then cached)."""
    device = resolve_device(ref.device)
    key = (ref.token, str(device), ref.backend, ref.precision, ref.batch, ref.sub_tile,
           hash(ref.shapes))
    with _LOCK:
        engine = _CACHE.get(key)
        if engine is None:
            engine = _build(ref, device)
            if len(_CACHE) >= CACHE_MAX:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = engine
    threads = ref.torch_threads or 1
    if device.type == "cpu" and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)  # process-wide: one torch thread per dask thread
    return engine


def cached_engines() -> int:
    """How many engines this process holds (for tests and worker reports)."""
    return len(_CACHE)


def run_tile(ref: ModelRef, window: np.ndarray, y: AxisWindow, x: AxisWindow,
             image_shape: tuple[int, int], sub_tile: int | None = None,
             footprint: Any = None) -> np.ndarray:
    """Task entry: heatmap block ``(C, y.out_len, x.out_len)`` float32 for one tile
    (``footprint``: see :meth:`tilefcn.runtime.engine.Engine.run_tile`)."""
    return get_engine(ref).run_tile(window, y, x, image_shape, sub_tile or ref.sub_tile,
                                    footprint=footprint)
