"""The numpy ↔ torch boundary: input scaling, devices, the per-process model cache, and
running a model over one tile in halo'd sub-tiles.

Sub-tiles of ~256 px are 2.5–3× faster on CPU than one large forward (DESIGN §5, caches).
The CUDA path (``device="cuda"``) is written but only exercised on machines with a GPU.
"""

from __future__ import annotations

import pickle
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tilefcn.geometry import Geometry
from tilefcn.measure.shapes import copy_module
from tilefcn.modelio import Model, Scaling, as_eval, load_model
from tilefcn.plan import AxisWindow, sub_windows

DEFAULT_SUB_TILE_CPU = 256
DEFAULT_SUB_TILE_CUDA = 1024


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; also ``cpu``, ``cuda``, ``cuda:N``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r} (use auto, cpu, cuda or cuda:N)")
    return resolved


def scale_input(window: np.ndarray, scaling: Scaling) -> np.ndarray:
    """Float32 ``(h, w, C)``: ``x / divisor`` (``"dtype"`` = the integer dtype's maximum,
    floats unchanged), then ``(x - mean) / std`` per channel when the model has them."""
    x = window.astype(np.float32, copy=True)
    if scaling.divisor == "dtype":
        if np.issubdtype(window.dtype, np.integer):
            x /= np.float32(np.iinfo(window.dtype).max)
    elif scaling.divisor not in (None, 1, 1.0):
        x /= np.float32(scaling.divisor)
    if scaling.mean is not None:
        x -= np.asarray(scaling.mean, np.float32)
    if scaling.std is not None:
        x /= np.asarray(scaling.std, np.float32)
    return x


@dataclass
class ModelRef:
    """What a dask task carries to find its model: a token into the per-process cache, how to
    reload it (``spec``) and, for in-memory modules only, the :class:`Model` itself.

    Pickling drops the model when a ``spec`` can reload it (ExportedPrograms cannot be
    pickled), so workers load each model once and keep it.
    """

    token: str
    spec: str | None
    device: str
    torch_threads: int | None
    model: Model | None = None
    geometry: Geometry | None = None

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


_CACHE: dict[tuple[str, str], tuple[Model, nn.Module]] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_MAX = 8


def make_ref(model: Model, device: str = "auto", torch_threads: int | None = None) -> ModelRef:
    """A :class:`ModelRef` for ``model``; this process's cache is filled at once.

    ``torch_threads`` defaults to 1 on CPU: dask runs one task per core, and torch threads on
    top of that oversubscribe the cores (DESIGN §5: 2 dask threads × 1 torch thread is best).
    """
    resolved = str(resolve_device(device))
    if torch_threads is None and resolved == "cpu":
        torch_threads = 1
    ref = ModelRef(f"{model.fingerprint or model.sha256}:{model.spec}", model.spec, resolved,
                   torch_threads, model, model.geometry)
    get_model(ref)
    return ref


def get_model(ref: ModelRef) -> tuple[Model, nn.Module]:
    """The cached ``(Model, module on device, eval, channels_last)`` for ``ref``."""
    key = (ref.token, ref.device)
    with _CACHE_LOCK:
        if key not in _CACHE:
            model = ref.model or load_model(ref.spec, geometry=ref.geometry)
            module = as_eval(copy_module(model.module)).to(ref.device)
            module = module.to(memory_format=torch.channels_last)
            if len(_CACHE) >= _CACHE_MAX:  # bounded: a long-lived worker sees many models
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = (model, module)
        return _CACHE[key]


def forward(module: nn.Module, window: np.ndarray, scaling: Scaling,
            device: torch.device) -> torch.Tensor:
    """Run ``module`` on one ``(h, w, C)`` window; returns ``(C, h', w')`` on ``device``."""
    x = torch.from_numpy(scale_input(window, scaling)).permute(2, 0, 1).unsqueeze(0)
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return module(x)[0]


def run_tile(ref: ModelRef, window: np.ndarray, y: AxisWindow, x: AxisWindow,
             image_shape: tuple[int, int], sub_tile: int | None = None) -> np.ndarray:
    """Heatmap block ``(C, y.out_len, x.out_len)`` float32 for one tile of the plan.

    ``window`` holds input rows ``y.read`` × cols ``x.read`` (channels last). The tile is
    processed in sub-tiles of about ``sub_tile`` input pixels, each with its own halo, and
    every sub-result is checked against the shape the geometry promises (dask does not
    check block shapes; a wrong halo would silently shift the heatmap).
    """
    model, module = get_model(ref)
    device = torch.device(ref.device)
    if ref.torch_threads and torch.get_num_threads() != ref.torch_threads:
        torch.set_num_threads(ref.torch_threads)  # process-wide: one torch thread per dask one
    if window.shape[:2] != (y.read_stop - y.read_start, x.read_stop - x.read_start):
        raise RuntimeError(f"read {window.shape[:2]} input pixels for a window of "
                           f"{(y.read_stop - y.read_start, x.read_stop - x.read_start)}")
    if sub_tile is None:
        sub_tile = DEFAULT_SUB_TILE_CUDA if device.type == "cuda" else DEFAULT_SUB_TILE_CPU
    geometry = model.geometry
    rows = sub_windows(geometry, 0, y, image_shape[0], sub_tile)
    cols = sub_windows(geometry, 1, x, image_shape[1], sub_tile)
    out = np.empty((len(model.classes), y.out_len, x.out_len), np.float32)
    for sy in rows:
        for sx in cols:
            result = forward(module, window[sy.read, sx.read], model.scaling, device)
            block = result[:, sy.crop, sx.crop]
            expected = (len(model.classes), sy.out_len, sx.out_len)
            if tuple(block.shape) != expected:
                raise RuntimeError(
                    f"model output {tuple(result.shape)} on an input window of "
                    f"{(sy.read_stop - sy.read_start, sx.read_stop - sx.read_start)} px cannot "
                    f"be cropped to {expected}: the model's geometry {geometry} is wrong")
            out[:, sy.out_start - y.out_start:sy.out_stop - y.out_start,
                sx.out_start - x.out_start:sx.out_stop - x.out_start] = block.float().cpu()
    return out
