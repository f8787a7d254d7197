"""Measure a model's :class:`~tilefcn.geometry.Geometry` empirically, by gradient probing.

The support of the input gradient of a single output is the set of input pixels it reads. Over
``2P`` consecutive outputs (``P = alignment / stride`` phases) the supports give the same
``(stride, offset, receptive_field)`` cover as the analytic pass of :mod:`tilefcn.measure`
(:func:`cover`), which this module cross-checks (:func:`cross_check`) and stands in for where
``torch.fx`` cannot trace a model (:func:`fallback`).

Traceable models are probed linearised (:func:`linearised`): no activations, max → sum pooling,
positive weights, input ones, so that no tap can cancel. Other models run as they are (float64,
eval mode, union over random inputs).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tilefcn.geometry import Geometry

__all__ = ["probe_geometry"]

BIG = 1 << 40  # an empty interval is [BIG, -BIG]
FCN_HINT = ("the model is not fully convolutional; use tilefcn.convolutionalize(...) to turn a "
            "patch classifier into an FCN")
_SIZES = (64, 128, 256, 512, 1024, 2048)


def cover(idx, lo, hi, period: int) -> tuple[Fraction, int, int]:
    """``(stride, offset, receptive_field)``: the tight cover of outputs ``idx`` (2 periods)."""
    ok = lo <= hi
    if not ok.any():
        raise ValueError("the model's output does not depend on its input")
    both = ok[period:] & ok[:-period]
    steps = {Fraction(int(d), period) for d in np.concatenate(
        [(lo[period:] - lo[:-period])[both], (hi[period:] - hi[:-period])[both]])}
    if len(steps) != 1:
        raise ValueError(f"the dependency of consecutive outputs does not repeat every {period} "
                         "outputs: the model is not translation-invariant")
    s = steps.pop()
    if s.denominator != 1:
        return s, 0, 0
    start = int((lo - int(s) * idx)[ok].min())
    return s, start, int((hi + 1 - int(s) * idx)[ok].max()) - start


def to_geometry(covers: list[tuple[Fraction, int, int]], align) -> Geometry:
    """The :class:`Geometry` of per-axis covers; raises if a stride is not an integer."""
    if any(c[0].denominator != 1 for c in covers):
        raise ValueError(f"the output stride {[str(c[0]) for c in covers]} is not an integer")
    return Geometry(tuple(c[2] for c in covers), tuple(int(c[0]) for c in covers),
                    tuple(c[1] for c in covers), tuple(align))


# --------------------------------------------------------------------------- linearisation


def _sum_pool(x, k, s, p, d, ceil_mode):
    """Linear stand-in for max pooling: the same windows and output size, every tap counted."""
    if d == (1, 1):
        return F.avg_pool2d(x, k, s, p, ceil_mode, True)
    oh, ow = F.max_pool2d(x.detach()[:, :1], k, s, p, d, ceil_mode).shape[-2:]
    x = F.pad(x, (p[1], p[1] + s[1], p[0], p[0] + s[0]))
    w = x.new_ones(x.shape[1], 1, *k)
    return F.conv2d(x, w, stride=s, dilation=d, groups=x.shape[1])[..., :oh, :ow]


def _lin_sum(*xs):
    return sum(xs[1:], xs[0])


def linearised(an) -> tuple[nn.Module, torch.dtype]:
    """Copy of the traced model of analysis ``an`` without activations/BN, max → sum pooling,
    conv weights ``|w| + 0.05`` (then normalised), biases 0, other tensors ``|t| + 0.05``;
    float32 unless gradients could underflow it."""
    lin = copy.deepcopy(an.gm).eval().requires_grad_(False)
    nodes = {n.name: n for n in lin.graph.nodes}
    for node in list(lin.graph.nodes):
        if node.name not in an.lin:
            continue
        how, srcs, *extra = an.lin[node.name]
        srcs = tuple(nodes[n] for n in srcs)
        with lin.graph.inserting_after(node):
            if how == "pool":
                new = lin.graph.call_function(_sum_pool, (*srcs, *extra))
            else:  # a nonlinear pointwise op: the sum of its inputs
                new = srcs[0] if len(srcs) == 1 else lin.graph.call_function(_lin_sum, srcs)
        node.replace_all_uses_with(new)
        lin.graph.erase_node(node)
        nodes[node.name] = new
    lin.graph.eliminate_dead_code()
    lin.recompile()
    for t in [*lin.parameters(), *lin.buffers()]:
        if t.is_floating_point():
            t.abs_().add_(0.05)
    for m in lin.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out = 1 if m.transposed else 0
            m.weight.div_(m.weight.sum([d for d in range(4) if d != out], keepdim=True))
            if m.bias is not None:
                m.bias.zero_()
    dtype = torch.float32 if an.shrink < 30 else torch.float64
    return lin.to(dtype), dtype


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


def _support_set(fn, c, h, pts, dtype, rand: bool, gen) -> np.ndarray | None:
    """Linear model: one batch of ones. As is: batch 1 each, union over two random inputs."""
    if not rand:
        return _supports(fn, torch.ones(len(pts), c, h, h, dtype=dtype), pts)
    runs = [_supports(fn, torch.randn(1, c, h, h, dtype=dtype, generator=gen), [p])
            for _ in range(2) for p in pts]
    if any(r is None for r in runs):
        return None
    a, b = np.concatenate(runs[:len(pts)]), np.concatenate(runs[len(pts):])
    return np.where(np.arange(4) % 2 == 0, np.minimum(a, b), np.maximum(a, b))


def _probe_covers(fn, c: int, stride, align, h: int, dtype, rand: bool, start=None,
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
            got = _support_set(fn, c, h, pts, dtype, rand, gen)
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
        got = _support_set(fn, c, h, pts, f64, True, gen)
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
    covers = _probe_covers(fn, c, stride, align, h, f64, True)
    if [cv[0] for cv in covers] != stride:
        raise ValueError(f"inconsistent stride: gradient supports say {covers}, output sizes "
                         f"say {stride}")
    return to_geometry(covers, align)


def fallback(model: nn.Module, c: int, why: Exception) -> Geometry:
    """Geometry of a model ``torch.fx`` cannot trace (``why``), probed as it is."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(f"layer '{name}' ({type(m).__name__}) uses batch statistics "
                             f"(training mode; call model.eval() first): {FCN_HINT}")
    fn = copy.deepcopy(model)
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
        raise ValueError(f"{exc} (measured empirically: {why})") from None


# --------------------------------------------------------------------------- traced models


def cross_check(an, geo: Geometry, c: int) -> None:
    """Probe the linearised copy of analysis ``an`` where ``geo`` says (then, on a mismatch,
    robustly in float64), and shift its input by the alignment; raise RuntimeError on any
    disagreement."""
    fn, dtype = linearised(an)
    period = math.lcm(*(a // s for a, s in zip(geo.alignment, geo.stride, strict=True)))
    start = [-((o - 4) // s) for s, o in zip(geo.stride, geo.offset, strict=True)]
    grid = math.lcm(*geo.alignment)
    h = -(-max(o + s * (i + 2 * period - 1) + r + 4 for i, s, o, r in zip(
        start, geo.stride, geo.offset, geo.receptive_field, strict=True)) // grid) * grid
    want = list(zip(geo.stride, geo.offset, geo.receptive_field, strict=True))
    for dt, strict in ((dtype, False), (torch.float64, True)):
        got = _probe_covers(fn.to(dt), c, geo.stride, geo.alignment, h, dt, False,
                            None if strict else start, strict)
        if got == want:
            break
    else:
        raise RuntimeError(f"bug in tilefcn's geometry analysis: analytic (stride, offset, "
                           f"receptive_field) {want} disagrees with the gradient probe "
                           f"{[tuple(map(int, g)) for g in got]} (verify=False skips this check)")
    x = torch.randn(1, c, 2 * h + 2 * grid, 2 * h + 2 * grid, dtype=dt,
                    generator=torch.Generator().manual_seed(3))
    for ax, (s, o, a) in enumerate(zip(geo.stride, geo.offset, geo.alignment, strict=True)):
        if not _shift_ok(fn, x, a, s, ax, -(-max(0, -o) // s) + 1,
                         1e-9 if dt == torch.float64 else 1e-4):
            raise RuntimeError(f"bug in tilefcn's geometry analysis: shifting the input by the "
                               f"alignment {a} does not shift the output by {a // s} (axis {ax})")


def probe_geometry(model: nn.Module, in_channels: int = 3) -> Geometry:
    """Geometry from the gradient supports of single outputs (no analytic back-maps).

    Traceable models are probed linearised (no activations, max → sum pooling, positive
    weights, input ones); stride and alignment come from the downsampling factors. Other models
    run as they are (float64, eval mode, union over random inputs); their alignment is the
    smallest ``stride * 2**k`` (at most 64) by which shifting the input shifts the output exactly.
    """
    from tilefcn.measure import _Analysis, _Unsupported  # measure imports this module

    try:
        an = _Analysis(model)
    except _Unsupported as exc:
        return fallback(model, in_channels, exc)
    stride, align = an.grid()
    fn, dtype = linearised(an)
    return to_geometry(_probe_covers(fn, in_channels, stride, align, 64, dtype, False), align)
