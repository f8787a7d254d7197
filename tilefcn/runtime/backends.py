"""Backends: what runs the network on a scaled float32 batch ``(B, C, h, w)``.

* ``torch`` — eager PyTorch, NCHW (``torch``) or channels_last (``torch-cl``) memory format.
* ``compile`` — ``torch.compile(dynamic=True)`` of the channels_last module.
* ``onnxruntime`` — the module exported to ONNX (dynamic batch, height and width) and run by
  ONNX Runtime's CPU provider with one intra-op thread per dask thread. CPU only.

Each runner is built once per worker process (see :mod:`tilefcn.runtime.cache`) and must be
verified against eager torch before use (:mod:`tilefcn.runtime.select`).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tilefcn.measure.shapes import copy_module, quiet_torch

#: What ``--backend`` accepts; ``auto`` measures the installed ones and keeps the fastest exact.
CHOICES = ("auto", "torch", "compile", "onnxruntime")
#: The concrete runners ``auto`` chooses among (``torch`` means the faster memory format).
CANDIDATES = ("torch", "torch-cl", "onnxruntime", "compile")


def installed(name: str) -> bool:
    """Whether backend ``name`` can run here (ONNX Runtime needs its package and onnx)."""
    if name == "onnxruntime":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            return False
    return True


@dataclass
class TorchRunner:
    module: nn.Module
    name: str = "torch"

    @property
    def channels_last(self) -> bool:
        """Whether the module takes channels_last memory (so inputs arrive laid out so)."""
        return self.name != "torch"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self.name == "torch":
                return self.module(x.contiguous())
            return self.module(x.contiguous(memory_format=torch.channels_last))


@dataclass
class OrtRunner:
    session: Any
    name: str = "onnxruntime"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {"x": x.contiguous().numpy()})
        return torch.from_numpy(out)


def _onnx_session(module: nn.Module, in_channels: int, example: int, threads: int) -> Any:
    import onnxruntime as ort

    buffer = io.BytesIO()
    with quiet_torch(), warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):  # the exporter prints failed graphs
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, in_channels, example, example),), buffer,
                          input_names=["x"], output_names=["y"], opset_version=17,
                          dynamic_axes={"x": {0: "b", 2: "h", 3: "w"},
                                        "y": {0: "b", 2: "oh", 3: "ow"}}, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def build_runner(name: str, module: nn.Module, device: torch.device, *, in_channels: int,
                 example: int, threads: int = 1) -> TorchRunner | OrtRunner:
    """A runner of backend ``name`` for an eval-mode ``module`` already on ``device``.

    ``example`` is an input edge the module accepts (the export traces at that size, with
    height and width dynamic). Raises ``ValueError`` naming the backend when it cannot run
    this model here.
    """
    if name == "torch":
        return TorchRunner(module, "torch")
    if name == "torch-cl":
        return TorchRunner(copy_module(module).to(memory_format=torch.channels_last), "torch-cl")
    if name == "compile":
        compiled = torch.compile(copy_module(module).to(memory_format=torch.channels_last),
                                 dynamic=True)
        return TorchRunner(compiled, "compile")  # type: ignore[arg-type]
    if name == "onnxruntime":
        if device.type != "cpu":
            raise ValueError("backend 'onnxruntime' runs on the CPU only here (use torch)")
        if not installed(name):
            raise ValueError("backend 'onnxruntime' needs `pip install onnxruntime onnx`")
        try:
            return OrtRunner(_onnx_session(module, in_channels, example, threads))
        except Exception as exc:  # noqa: BLE001 - any export/session failure means the same
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ValueError(f"backend 'onnxruntime' cannot run this model: {first}") from None
    raise ValueError(f"unknown backend {name!r} (use {', '.join(CHOICES)})")
