"""Measure a model's :class:`~tilefcn.geometry.Geometry` empirically, by gradient probing.

Used only where the analytic pass of :mod:`tilefcn.measure.aten` cannot run (TorchScript,
modules torch.export cannot capture, unmodelled ops); its result is then verified by tiling
(:mod:`tilefcn.measure.verify`) before any scan is run, or the model is refused.

The support of the input gradient of a single output is the set of input pixels it reads; the
model runs as it is (float64 where it can, eval mode), the support taken as the union over
several random inputs (ReLU and max-pool gates hide taps on any one input). Over ``2P``
consecutive outputs (``P = alignment / stride`` phases) the supports give the
``(stride, offset, receptive_field)`` cover of :func:`tilefcn.measure.intervals.cover`.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import torch
from torch import nn

from tilefcn.geometry import Geometry
from tilefcn.measure.aten import FCN_HINT
from tilefcn.measure.intervals import BIG, cover, to_geometry
from tilefcn.measure.shapes import copy_module

__all__ = ["probe_geometry"]

_SIZES = (64, 128, 256, 512, 1024, 2048)
_RUNS = 4  # random inputs whose supports are united


# --------------------------------------------------------------------------- gradient supports


def _quiet(fn, x: torch.Tensor, grad: bool = False) -> torch.Tensor | None:
    """``fn(x)``, or None if it fails (the traceback fx prints on failures is silenced)."""
    try:
        with torch.set_grad_enabled(grad), contextlib.redirect_stderr(io.StringIO()):
            return fn(x)
    except Exception:
        return None


def _supports(fn, x: torch.Tensor, pts: list[tuple[int, int]]) -> np.ndarray | None:
    """Per image b: rows ``[lo, hi]`` and columns of the input-gradient support of output
    ``pts[b]`` (all channels, random positive weights); None if an output does not exist."""
    x = x.detach().requires_grad_(True)
    y = _quiet(fn, x, grad=True)
    if y is None or any(not (0 <= i < y.shape[2] and 0 <= j < y.shape[3]) for i, j in pts):
        return None
    w = torch.rand(y.shape[1], generator=torch.Generator().manual_seed(0)).to(y.dtype) + 0.5
    total = sum(y[b, :, i, j] @ w for b, (i, j) in enumerate(pts))
    out = np.tile(np.array([BIG, -BIG, BIG, -BIG]), (len(pts), 1))
    if total.requires_grad:
        nz = torch.autograd.grad(total, x)[0].ne(0).any(1)
        for b in range(len(pts)):
            for ax, m in enumerate((nz[b].any(1), nz[b].any(0))):
                if (hit := np.flatnonzero(m.numpy())).size:
                    out[b, 2 * ax: 2 * ax + 2] = hit[0], hit[-1]
    return out


def _clear(got: np.ndarray, h: int, strict: bool) -> bool:
    """Whether every support stays off the border (``strict``: by half its own width)."""
    lo, hi = got[:, 0::2], got[:, 1::2]
    m = np.maximum(1, (hi - lo + 1) // 2) if strict else 1
    return bool(((lo > hi) | ((lo >= m) & (hi <= h - 1 - m))).all())


def _support_set(fn, c, h, pts, dtype, gen) -> np.ndarray | None:
    """Supports of outputs ``pts`` (one random image each), united over :data:`_RUNS` runs."""
    runs = [_supports(fn, torch.randn(len(pts), c, h, h, dtype=dtype, generator=gen), pts)
            for _ in range(_RUNS)]
    if any(r is None for r in runs):
        return None
    lo, hi = np.minimum.reduce(runs), np.maximum.reduce(runs)
    return np.where(np.arange(4) % 2 == 0, lo, hi)


def _probe_covers(fn, c: int, stride, align, h: int, dtype, start=None,
                  strict: bool = True) -> list:
    """Covers (per axis) of 2P consecutive diagonal outputs from ``start`` (else centred); the
    input grows until their supports stay clear of its border and repeat with the period."""
    period = math.lcm(*(a // s for a, s in zip(align, stride, strict=True)))
    gen = torch.Generator().manual_seed(1)
    while True:
        y = _quiet(fn, torch.zeros(1, c, h, h, dtype=dtype)) if start is None else None
        i0 = start or ([(n - 2 * period) // 2 for n in y.shape[-2:]] if y is not None else [-1])
        if min(i0) >= 0:
            pts = [(i0[0] + k, i0[1] + k) for k in range(2 * period)]
            got = _support_set(fn, c, h, pts, dtype, gen)
            if got is not None and _clear(got, h, strict):
                with contextlib.suppress(ValueError):  # clipped by the border after all
                    return [cover(i0[ax] + np.arange(2 * period), got[:, 2 * ax],
                                  got[:, 2 * ax + 1], period) for ax in (0, 1)]
        if h >= _SIZES[-1]:
            raise ValueError(f"cannot measure the geometry: outputs still depend on the border "
                             f"of a {h}-px input (receptive field too large, or not local)")
        h, start = h * 2, None


def _shift_ok(fn, x: torch.Tensor, a: int, s: int, axis: int, k0: int, tol: float) -> bool:
    """Whether cropping ``a`` input rows off the front shifts outputs from ``k0`` on by ``a/s``."""
    y, z = _quiet(fn, x), _quiet(fn, x.narrow(2 + axis, a, x.shape[2 + axis] - a))
    if y is None or z is None or y.shape[3 - axis] != z.shape[3 - axis]:
        return False
    n = min(y.shape[2 + axis] - a // s, z.shape[2 + axis]) - k0
    if n < 1:
        return False
    diff = (y.narrow(2 + axis, a // s + k0, n) - z.narrow(2 + axis, k0, n)).abs().max()
    return bool(diff <= tol * (1 + y.abs().max()))


# --------------------------------------------------------------------------- models run as is


def _discover(fn, c: int, f64: torch.dtype = torch.float64) -> Geometry:
    """Geometry of a model run as is (float64, or float32 for TorchScript, which cannot be
    converted): an input size whose centre outputs' supports stay clear of the border, stride
    from output sizes, alignment by shifting the input, covers."""
    gen, whole = torch.Generator().manual_seed(2), 0
    tol = 1e-9 if f64 == torch.float64 else 1e-5
    for h in _SIZES:
        if (y := _quiet(fn, torch.zeros(1, c, h, h, dtype=f64))) is None:
            continue
        o = y.shape[-2:]
        pts = [(min(o[0] // 2 + k, o[0] - 1), min(o[1] // 2 + k, o[1] - 1)) for k in range(4)]
        got = _support_set(fn, c, h, pts, f64, gen)
        ok = got[:, 0::2] <= got[:, 1::2]
        if not ok.any():
            raise ValueError("the model's output does not depend on its input")
        lo = np.where(ok, got[:, 0::2], BIG).min(0)
        if ((lo == 0) & (np.where(ok, got[:, 1::2], -BIG).max(0) == h - 1)).any():
            whole += 1
            if whole == 2:
                raise ValueError("one output depends on the whole input at two input sizes: the "
                                 f"model is not local; {FCN_HINT}")
        elif _clear(got, h, True):
            break
    else:
        raise ValueError(f"cannot measure the geometry: outputs still depend on the border of a "
                         f"{_SIZES[-1]}-px input (receptive field too large, or not local)")
    y2 = _quiet(fn, torch.zeros(1, c, h + 256, h + 256, dtype=f64))
    if y2 is None or min(y2.shape[2] - o[0], y2.shape[3] - o[1]) < 1:
        raise ValueError(f"the output does not grow with the input: {FCN_HINT}")
    stride = [max(1, round(256 / (y2.shape[2 + ax] - o[ax]))) for ax in (0, 1)]
    x = torch.randn(1, c, h + 256, h + 256, dtype=f64, generator=gen)
    align = []
    for ax, s in enumerate(stride):
        k0 = -(-(max(0, pts[0][ax] * s - int(lo[ax])) + 64) // s) + 1
        cands = [s << k for k in range(7) if s << k <= max(64, s)]
        align.append(next((a for a in cands if _shift_ok(fn, x, a, s, ax, k0, tol)), 0))
        if not align[-1]:
            raise ValueError("the output does not shift with the input on any grid up to 64 "
                             "px: the model is not translation-invariant")
    covers = _probe_covers(fn, c, stride, align, h, f64)
    if [cv[0] for cv in covers] != stride:
        raise ValueError(f"inconsistent stride: gradient supports say {covers}, output sizes "
                         f"say {stride}")
    return to_geometry(covers, align)


def fallback(model: nn.Module, c: int, why: Exception | None) -> Geometry:
    """Geometry of a model ``torch.fx`` cannot trace (``why``), probed as it is."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(f"layer '{name}' ({type(m).__name__}) uses batch statistics "
                             f"(training mode; call model.eval() first): {FCN_HINT}")
    fn = copy_module(model)
    with contextlib.suppress(NotImplementedError):  # ExportedProgram.module() has no eval()
        fn.eval()
    dtype = torch.float64
    if isinstance(fn, torch.jit.ScriptModule):  # refuses .double() and requires_grad_()
        dtype = torch.float32
    else:
        fn = fn.double().requires_grad_(False)
    try:
        return _discover(fn, c, dtype)
    except ValueError as exc:
        raise ValueError(f"{exc} (measured empirically{': ' + str(why) if why else ''})"
                         ) from None


def probe_geometry(model: nn.Module, in_channels: int = 3) -> Geometry:
    """Geometry from the gradient supports of single outputs of ``model`` run as it is
    (float64, eval mode, union over random inputs); alignment is the smallest
    ``stride * 2**k`` (at most 64) by which shifting the input shifts the output exactly.
    Not proven: :func:`tilefcn.measure.measure_geometry` verifies it by tiling."""
    return fallback(model, in_channels, None)
