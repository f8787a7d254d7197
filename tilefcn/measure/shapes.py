"""What a network accepts and returns: input channels, accepted sizes, output shapes, and its
ATen graph (torch.export with dynamic height and width).

Shape questions are answered by forwards on the ``meta`` device (no memory, no compute);
modules that cannot move there (TorchScript) run for real on small inputs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings

import torch
from torch import nn

from tilefcn.geometry import Geometry

_SIZES = (64, 128, 256, 512, 1024)
_CHANNELS = range(1, 17)


class _Found(Exception):
    def __init__(self, wanted: int, seen: int) -> None:
        self.wanted, self.seen = wanted, seen


def _quiet_call(fn, x: torch.Tensor):
    with torch.inference_mode(), quiet_torch():
        return fn(x)


def run_or_none(fn, x: torch.Tensor) -> torch.Tensor | None:
    """``fn(x)`` quietly, in inference mode; None where the network refuses the input."""
    try:
        return _quiet_call(fn, x)
    except Exception:  # noqa: BLE001 - any failure means "not accepted"
        return None


def on_meta(module: nn.Module) -> nn.Module | None:
    """A ``meta``-device copy of ``module`` (its weights are not copied first), or None where
    it cannot move there."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            for p in module.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in module.buffers()})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # TorchScript modules: nn.Module._apply reads each parameter's .grad
            warnings.filterwarnings("ignore", "The .grad attribute of a Tensor", UserWarning)
            return copy.deepcopy(module, memo).to("meta")
    except Exception:  # noqa: BLE001 - TorchScript and exotic modules: answer by real forwards
        return None


def _dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of the module's first parameter (float32 when it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def try_shape(module: nn.Module, c: int, hw: tuple[int, int], meta: bool = True):
    """The output shape on a ``(1, c, *hw)`` input, or None if the network refuses it."""
    dtype = _dtype(module)
    x = torch.empty(1, c, *hw, device="meta", dtype=dtype) if meta else \
        torch.zeros(1, c, *hw, dtype=dtype)
    out = run_or_none(module, x)
    if out is None:
        return None
    return tuple(out.shape) if isinstance(out, torch.Tensor) else ()


def _first_consumer(meta: nn.Module) -> int | None:
    """Channels the first layer with ``in_channels`` that runs wants, scaled back to the
    model's input (a 1-channel probe: a PixelUnshuffle(2) in front shows 4 channels)."""
    def first(layer, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            raise _Found(layer.in_channels, x.shape[1])

    hooks = [m.register_forward_pre_hook(first) for m in meta.modules()
             if isinstance(getattr(m, "in_channels", None), int) and m is not meta]
    try:
        for size in _SIZES[:2]:
            try:
                with torch.inference_mode():
                    meta(torch.empty(1, 1, size, size, device="meta"))
            except _Found as hit:
                for h in hooks:
                    h.remove()
                hooks = []
                # the layer's own channel count first (a 1-channel probe may broadcast against
                # a per-channel buffer), then scaled back (a space-to-depth stem in front)
                scaled = [hit.wanted // hit.seen] if hit.wanted % hit.seen == 0 else []
                for c in dict.fromkeys([hit.wanted, *scaled]):
                    if any(try_shape(meta, c, (n, n)) is not None for n in _SIZES[:3]):
                        return c
                return None
            except Exception:  # noqa: BLE001, S112 - a size it refuses: try the next one
                continue
    finally:
        for h in hooks:
            h.remove()
    return None


def in_channels_of(module: nn.Module, guess: int | None = None) -> int:
    """Input channels, read from the first layer that consumes channels *when it runs*
    (PixelUnshuffle in front, heads registered before the stem), else by trying 1..16."""
    meta = on_meta(module)
    if meta is not None and (found := _first_consumer(meta)) is not None:
        return found
    tries = [(meta, True)] if meta is not None else []
    for fn, is_meta in [*tries, (module, False)]:  # real forwards: data-dependent code
        sizes = _SIZES[:3] if is_meta else _SIZES[:1]
        for c in dict.fromkeys(([guess] if guess else []) + list(_CHANNELS)):
            if any(try_shape(fn, c, (s, s), is_meta) is not None for s in sizes):
                return c
    raise ValueError("cannot tell how many input channels the model takes (none of 1-16 "
                     "runs): pass in_channels")


def accepted_size(module: nn.Module, c: int, at_least: int = 64,
                  period: int = 64) -> tuple[int, tuple]:
    """The smallest side ``n >= at_least`` the network accepts, and its output shape."""
    meta = on_meta(module)
    tries = [(meta, True, period)] if meta is not None else []
    for fn, is_meta, span in [*tries, (module, False, period if meta is None else 4)]:
        some = None
        for base in (at_least, *[s for s in _SIZES if s > at_least]):
            for n in range(base, base + span):
                shape = try_shape(fn, c, (n, n), is_meta)
                if shape is not None and len(shape) == 4 and min(shape[2:]) >= 2:
                    return n, shape
                some = some or (shape is not None and len(shape) == 4 and (n, shape))
            if some:  # accepted, but 1 output only (a global pool): the analysis names it
                return some
            if not is_meta and meta is not None:  # the fallback: one base size only
                break
    fn, is_meta = (meta, True) if meta is not None else (module, False)
    for n in range(8, at_least):  # a layer fixed to a small size: the analysis names it
        shape = try_shape(fn, c, (n, n), is_meta)
        if shape is not None and len(shape) == 4:
            return n, shape
    raise ValueError("the model accepts no square input of 8-1100 px that gives (N, C, H, W) "
                     "outputs of at least 2x2")


def copy_module(module: nn.Module) -> nn.Module:
    """``copy.deepcopy`` without the FutureWarning torch's treespecs raise when an exported
    program's module is copied."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(module)


@contextlib.contextmanager
def quiet_torch():
    """No warnings, stderr or torch log lines (export's and load's tracebacks, sympy's failed
    simplifications) while torch.export works: tilefcn reports failures in one line."""
    logs = [logging.getLogger(n) for n in ("torch.fx.experimental.symbolic_shapes",
                                           "torch._export", "torch.export")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def export_program(module: nn.Module, c: int, size: int,
                   oblivious: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of a copy of ``module`` with dynamic height and width.

    ``oblivious`` traces size-obliviously (for programs that will run): no guard that holds
    only at the example's size (a U-Net's skip crop is a no-op at even sizes; traced plainly,
    the program refuses odd ones). Crop sizes then become opaque symbols, so the analytic
    pass reads a plainly traced program.
    """
    auto = torch.export.Dim.AUTO
    x = torch.zeros(1, c, size, size)
    with quiet_torch(), torch.fx.experimental._config.patch(backed_size_oblivious=oblivious):
        return torch.export.export(copy_module(module), (x,),
                                   dynamic_shapes=({2: auto, 3: auto},), strict=False)


def output_shape(module: nn.Module, in_channels: int, hw: tuple[int, int],
                 geometry: Geometry | None = None) -> tuple[int, int, int]:
    """``(C, H', W')`` of ``module`` on a ``(1, in_channels, *hw)`` input: the network's own
    size arithmetic, from a forward on the ``meta`` device (no memory, no compute).

    Modules that cannot move to ``meta`` (TorchScript) run for real on a small input of the
    same size modulo the alignment ``A``: shifting the input length by ``A`` shifts the output
    length by exactly ``A / stride`` (each layer's floor arithmetic is periodic in its stride).
    Raises ``ValueError`` when the network does not accept an input of that size.
    """
    meta = on_meta(module)
    if meta is not None:
        try:
            with torch.inference_mode():
                shape = tuple(meta(torch.empty(1, in_channels, *hw, device="meta")).shape)
        except Exception as exc:  # noqa: BLE001 - the network's own refusal of this size
            raise ValueError(f"the model does not accept a {hw[0]}x{hw[1]} input with "
                             f"{in_channels} channel(s): {str(exc).splitlines()[0][:200]}"
                             ) from None
    elif geometry is None:
        raise ValueError("cannot compute the output shape of this model without its geometry")
    else:
        shape = _output_shape_by_period(module, in_channels, hw, geometry)
    if len(shape) != 4:
        raise ValueError(f"the model returns a {len(shape)}-D tensor on a 4-D input; a fully "
                         "convolutional model returns (N, classes, H, W)")
    return tuple(int(v) for v in shape[1:])


def _output_shape_by_period(module: nn.Module, in_channels: int, hw: tuple[int, int],
                            geometry: Geometry) -> tuple[int, ...]:
    small, periods = [], []
    for axis, length in enumerate(hw):
        a = geometry.alignment[axis]
        base = length % a + a * (1 + (geometry.receptive_field[axis] + abs(
            geometry.offset[axis]) + geometry.min_input[axis]) // a)
        small.append(min(length, base))
        periods.append((length - small[-1]) // geometry.stride[axis])
    try:
        out = _quiet_call(module, torch.zeros(1, in_channels, *small))
    except Exception as exc:  # noqa: BLE001 - the network's own refusal of this size
        raise ValueError(f"the model does not accept a {hw[0]}x{hw[1]} input: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    return (*out.shape[:2], out.shape[2] + periods[0], out.shape[3] + periods[1])
