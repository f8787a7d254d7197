"""Devices: choosing one (on the worker that runs the model), exact float32 maths, reduced
precision, and the host ↔ device transfer seam.

Everything CUDA-specific lives in :class:`CudaLane` and :func:`exact_math`; the CPU path uses
:class:`HostLane`, which has the same methods, so the engine around them is the same code on
both and is exercised by the CPU tests. The engine's device-side branch (raw pixels up, scaled
there; ``on_host = False``) runs in the CPU tests through a stand-in lane with CudaLane's
contract. The CUDA lines themselves are only run on machines with a GPU.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import numpy as np
import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_REDUCED = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; also ``cpu``, ``cuda``, ``cuda:N``.

    Called where the model runs (each worker process), so ``"cuda"`` asked for on a CPU-only
    client resolves on the GPU workers.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r} (use auto, cpu, cuda or cuda:N)")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    return resolved


def check_device_name(device: str) -> str:
    """Validate the spelling of ``device`` without needing the device here."""
    if str(device) != "auto":
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError):
            kind = None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
    return str(device)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def exact_math() -> None:
    """fp32 means fp32: TF32 off for cuDNN convolutions and matmuls (PyTorch turns it on for
    convolutions by default, which breaks the 1e-5 invariant on Ampere and newer GPUs)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 for ``--precision``; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_REDUCED[precision])


class HostLane:
    """CPU transfers: zero-copy views; ``fetch`` returns the numpy result.

    ``on_host``: the engine scales raw pixels on the host (one numpy pass) before ``upload``;
    a device lane (``on_host = False``) is handed raw pixels and they are scaled there.
    """

    device = torch.device("cpu")
    on_host = True

    def upload(self, batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(batch)

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        yield

    def download(self, result: torch.Tensor) -> object:
        return result

    def fetch(self, handle: object) -> np.ndarray:
        return handle.numpy()  # type: ignore[union-attr]


class CudaLane:  # GPU only: not run by the CPU tests
    """One per worker thread: its own CUDA stream, uploads of uint8 batches from pinned host
    memory (non-blocking), downloads into pinned buffers, synchronised by events."""

    on_host = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device=device)

    def upload(self, batch: np.ndarray) -> torch.Tensor:
        pinned = torch.from_numpy(np.ascontiguousarray(batch)).pin_memory()
        with torch.cuda.stream(self._stream):
            return pinned.to(self.device, non_blocking=True)

    def stream(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self._stream)

    def download(self, result: torch.Tensor) -> object:
        host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
        with torch.cuda.stream(self._stream):
            host.copy_(result, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        return host, done

    def fetch(self, handle: object) -> np.ndarray:
        host, done = handle  # type: ignore[misc]
        done.synchronize()
        return host.numpy()


_LANES = threading.local()


def lane_for(device: torch.device) -> HostLane | CudaLane:
    """This thread's transfer lane for ``device`` (a CUDA stream per thread and device)."""
    if device.type != "cuda":
        return HostLane()
    lanes = getattr(_LANES, "lanes", None)
    if lanes is None:
        lanes = _LANES.lanes = {}
    if device not in lanes:
        lanes[device] = CudaLane(device)
    return lanes[device]


def worker_gpu() -> str | None:
    """The GPU this process was given (``CUDA_VISIBLE_DEVICES``), for reports."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")
