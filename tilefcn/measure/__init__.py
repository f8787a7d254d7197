"""Measuring a model's :class:`~tilefcn.geometry.Geometry`: proven, never guessed.

1. The analytic pass (:mod:`.aten`) over the model's ATen graph — the program of a ``.pt2``
   file, or ``torch.export`` of an ``nn.Module`` with dynamic height and width. Non-local and
   non-equivariant ops are refused there, naming the op and its layer.
2. Where that graph cannot be had or holds ops the pass does not model (TorchScript, modules
   torch.export cannot capture), the gradient probe (:mod:`.probe`) measures the model as is.
3. The tiling check (:mod:`.verify`): tiled == whole image on random inputs. Always run on a
   probed geometry (a failure refuses the model, naming what the pass could not model); run on
   an analytic one unless ``verify=False``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._sympy.numbers import int_oo

from tilefcn.geometry import Geometry
from tilefcn.measure.aten import FCN_HINT, Analysis, Unsupported
from tilefcn.measure.probe import fallback, probe_geometry
from tilefcn.measure.shapes import accepted_size, export_program, in_channels_of, output_shape
from tilefcn.measure.verify import verify_tiling

__all__ = ["Measurement", "in_channels_of", "measure", "measure_geometry", "output_shape",
           "probe_geometry", "refuse_training_mode"]

_LARGEST_WINDOW = 4096  # px: tiles (<= 2048) plus halo stay below this
_TRAIN_ONLY = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
               nn.modules.dropout._DropoutNd)


@dataclass(frozen=True, slots=True)
class Measurement:
    """A geometry and how it was obtained (``method``: ``analytic`` or ``probe``)."""

    geometry: Geometry
    method: str
    seconds: float
    verified: bool
    note: str = ""


def refuse_training_mode(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first layer whose output depends on training mode
    (BatchNorm / InstanceNorm statistics, dropout) and that is in training mode."""
    for name, m in model.named_modules():
        if isinstance(m, _TRAIN_ONLY) and m.training and not (
                isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0):
            what = "is random" if isinstance(m, nn.modules.dropout._DropoutNd) else \
                "uses batch statistics"
            raise ValueError(f"layer '{name or type(m).__name__}' ({type(m).__name__}) {what} in "
                             "training mode: call model.eval() first")


def _data_dependent(exc: Exception) -> str:
    """A one-line refusal for a model whose control flow depends on the image's values."""
    lines = [v.strip() for v in str(exc).splitlines()]
    where = next((f" ({lines[i + 1]!r} in {v.rsplit(' in ', 1)[-1]}, line "
                  f"{v.split(', line ')[1].split(',')[0]})" for i, v in enumerate(lines[:-1])
                  if v.startswith("File ") and ", line " in v and " in " in v), "")
    return (f"the model's control flow depends on the image's values (a data-dependent "
            f"branch{where}): tiles would take different branches than the whole image; "
            "remove the branch or compute it per pixel")


def refuse_size_guards(program: torch.export.ExportedProgram) -> None:
    """Raise ``ValueError`` where exporting with free height and width found the model
    branching on its input's size: an upper bound below :data:`_LARGEST_WINDOW` (tiles and the
    whole image would run different code). Larger bounds (a program's own ``Dim(max=4096)``)
    are taken as the sizes it was made for; a branch above them is not seen."""
    names = {}
    for node in program.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.dim() == 4:
            for axis, size in zip(("height", "width"), val.shape[2:], strict=True):
                if isinstance(size, torch.SymInt):
                    names.update({str(v): axis for v in size.node.expr.free_symbols})
    for sym, vr in program.range_constraints.items():
        if vr.upper is not int_oo and vr.upper < _LARGEST_WINDOW:
            raise ValueError(f"the model branches on its input's size (torch.export found it "
                             f"only valid for {names.get(str(sym), 'a size')} {sym} <= "
                             f"{vr.upper}): tiles and the whole "
                             "image would take different branches; remove the size-dependent "
                             "branch")


def measure(model: nn.Module | torch.export.ExportedProgram, in_channels: int = 3, *,
            verify: bool = True, runtime: nn.Module | None = None) -> Measurement:
    """Geometry of ``model`` (see the module doc); ``runtime`` is the module that will run
    (an ExportedProgram's ``.module()``), used by the tiling check."""
    t0 = time.perf_counter()
    program, why, example = None, None, None
    if isinstance(model, torch.export.ExportedProgram):
        program = model
        runtime = runtime if runtime is not None else model.module()
    else:
        refuse_training_mode(model)
        runtime = model if runtime is None else runtime
        example, _ = accepted_size(runtime, in_channels)
        if isinstance(model, torch.jit.ScriptModule):
            why = "TorchScript has no ATen program to analyse"
        else:
            try:
                program = export_program(model, in_channels, example)
            except Exception as exc:  # noqa: BLE001 - any export failure: probe instead
                if "data-dependent" in str(exc):
                    raise ValueError(_data_dependent(exc)) from None
                why = f"torch.export cannot capture it ({type(exc).__name__}: " \
                      f"{str(exc).splitlines()[0][:160] if str(exc) else ''})"
            else:
                refuse_size_guards(program)
    geo = None
    if program is not None:
        try:
            geo = Analysis(program).geometry()
        except Unsupported as exc:
            why = str(exc)
    if example is None:
        example, _ = accepted_size(runtime, in_channels, max(64, geo.min_input[0]) if geo else 64)
    method = "analytic" if geo is not None else "probe"
    if geo is None:
        geo = fallback(runtime, in_channels, why)
    if verify or method == "probe":
        try:
            verify_tiling(runtime, geo, in_channels, example)
        except ValueError as exc:
            if method == "probe":
                raise ValueError(f"{exc}: the model is not translation-equivariant, or its "
                                 f"geometry cannot be proven ({why})") from None
            raise ValueError(f"{exc}: the model is not translation-equivariant (or this is a "
                             "bug in tilefcn's geometry analysis; please report it)") from None
    return Measurement(geo, method, time.perf_counter() - t0, verify or method == "probe",
                       why or "")


def measure_geometry(model: nn.Module, in_channels: int = 3, *, verify: bool = True) -> Geometry:
    """Exact :class:`Geometry` of ``model``: analytic over its ATen graph, or probed and then
    verified by tiling where no graph can be analysed.

    Raises ``ValueError`` naming the layer or op for non-local or non-equivariant models
    (global pooling, attention, instance/group/layer norm over space, BatchNorm or dropout in
    training mode, flatten / linear over positions, ``roll``, shape-computed crops) and for
    output strides that are not integers. ``verify`` also checks an analytic result by tiling.
    """
    return measure(model, in_channels, verify=verify).geometry


__all__ += ["FCN_HINT"]
