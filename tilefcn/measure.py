"""Measure a model's :class:`~tilefcn.geometry.Geometry` (see that module for the convention).

Analytic pass (primary): per axis, an interval of output indices ``[lo, hi]`` is carried back
through the ``torch.fx`` graph to the input rows it reads, the image taken as infinite (no
clipping); where paths merge (skip connections) the hull is taken:

* conv / pool (kernel k, stride s, padding p, dilation d): ``[s*lo - p, s*hi - p + d*(k-1)]``
* transposed conv: every ``i`` with ``s*i - p + t*d`` in ``[lo, hi]`` for a tap ``t < k``
* nearest ×f: ``[lo//f, hi//f]``; bilinear ×f, ``align_corners=False``:
  ``[floor((lo+.5)/f - .5), ceil((hi+.5)/f - .5)]``
* crop ``x[..., a::c]``: ``[a + c*lo, a + c*hi]``; padding t in front: ``[lo - t, hi - t]``
* pointwise ops, channel concatenation: identity.

Over ``2P`` consecutive outputs (``P = alignment / stride`` phases): ``stride = (start(i+P) -
start(i)) / P``, ``offset = min(start(i) - stride*i)``, ``receptive_field = max(end(i) -
stride*i) - offset``. ``alignment`` = lcm of the numerators of every tensor's downsampling
factor (input pixels per feature pixel, a Fraction carried forward through the graph).

Probe (cross-check and fallback): the support of the input gradient of single outputs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Callable
from fractions import Fraction
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from tilefcn.geometry import Geometry

__all__ = ["measure_geometry", "probe_geometry"]

Map = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
_BIG = 1 << 40  # an empty interval is [_BIG, -_BIG]
_SIZES = (64, 128, 256, 512, 1024, 2048)
_FCN = ("the model is not fully convolutional; use tilefcn.convolutionalize(...) to turn a patch "
        "classifier into an FCN")
_ACT = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
        nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
        nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Softmax2d,
        nn.LocalResponseNorm)
_LINEAR = (nn.Identity, nn.modules.dropout._DropoutNd, nn.ChannelShuffle)
_NONLOCAL = (
    ((nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd),
     "pools over the whole image"),
    ((nn.GroupNorm, nn.LayerNorm, nn.RMSNorm), "normalises over the whole image"),
    ((nn.Flatten, nn.Linear, nn.Bilinear), "flattens or mixes all positions (fully connected)"),
    ((nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
      nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.RNNBase),
     "mixes all positions (attention / recurrence)"),
    ((nn.CircularPad2d,), "wraps around the image (circular padding)"),
)
_NL_NAMES = {name: why for names, why in (
    ("adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d "
     "adaptive_max_pool2d adaptive_max_pool3d adaptive_max_pool2d_with_indices",
     "pools over the whole image"),
    ("layer_norm group_norm instance_norm rms_norm", "normalises over the whole image"),
    ("linear bilinear flatten matmul bmm baddbmm", "flattens or mixes all positions"),
    ("scaled_dot_product_attention multi_head_attention_forward", "mixes all positions"),
) for name in names.split()}
_PW_LINEAR = set("add sub mul div truediv neg pos iadd isub imul itruediv dropout dropout1d "
                 "dropout2d dropout3d alpha_dropout feature_alpha_dropout contiguous clone float "
                 "double half to type_as detach channel_shuffle".split())
_PW_ACT = set("maximum minimum clamp clip clamp_min clamp_max relu relu6 leaky_relu gelu silu mish "
              "elu selu celu hardswish hardsigmoid hardtanh softplus softsign sigmoid tanh exp log "
              "abs sqrt rsqrt square erf reciprocal prelu threshold logsigmoid hardshrink "
              "softshrink tanhshrink pow where local_response_norm".split())
_REDUCE = set("mean sum amax amin max min std var prod logsumexp norm median nanmean nansum "
              "argmax argmin count_nonzero all any".split())


class _Unsupported(Exception):
    """An operation the analytic pass does not model: fall back to the probe."""


def _window(k: int, s: int, p: int, d: int) -> Map:
    return lambda lo, hi: (s * lo - p, s * hi - p + d * (k - 1))


def _shift(a: int, step: int = 1) -> Map:
    return lambda lo, hi: (a + step * lo, a + step * hi)


def _upsample(f: int, bilinear: bool) -> Map:
    if bilinear:
        return lambda lo, hi: ((2 * lo + 1 - f) // (2 * f), -((f - 1 - 2 * hi) // (2 * f)))
    return lambda lo, hi: (lo // f, hi // f)


def _tconv(k: int, s: int, p: int, d: int) -> Map:
    def back(lo, hi):
        a = np.stack([-((t * d - lo - p) // s) for t in range(k)])
        b = np.stack([(hi + p - t * d) // s for t in range(k)])
        return np.where(a <= b, a, _BIG).min(0), np.where(a <= b, b, -_BIG).max(0)
    return back


def _two(v) -> tuple:
    if isinstance(v, (tuple, list)):
        return (v[0], v[0]) if len(v) == 1 else (v[-2], v[-1])
    return (v, v)


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.kwargs.get(name, node.args[i] if len(node.args) > i else default)


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


class _Tracer(fx.Tracer):
    """Records on every node the qualified name of the module whose forward created it."""

    tf_scope: tuple[str, ...] = ()

    def call_module(self, m, forward, args, kwargs):
        outer, self.tf_scope = self.tf_scope, (*self.tf_scope, self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.tf_scope = outer

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["tilefcn_scope"] = self.tf_scope[-1] if self.tf_scope else ""
        return node


class _Analysis:
    """Per-node downsampling factor and back-maps of a traced model (the analytic pass)."""

    def __init__(self, model: nn.Module) -> None:
        tracer = _Tracer()
        if tracer.is_leaf_module(model, ""):  # a bare layer, e.g. nn.Conv2d: keep it a module
            model = nn.Sequential(model)
        try:
            self.gm = fx.GraphModule(model, tracer.trace(model))
        except Exception as exc:
            raise _Unsupported(f"torch.fx cannot trace it ({type(exc).__name__}: {exc})") from exc
        self.kind: dict[fx.Node, object] = {}  # (Fraction, Fraction) | "shape" | "const"
        self.back: dict[fx.Node, list[tuple[fx.Node, tuple[Map, Map]]]] = {}
        self.lin: dict[str, tuple] = {}  # node name -> how to linearise it for the probe
        self.crops: dict[fx.Node, str] = {}  # node -> the name of a crop upstream of it
        self.input = self.output = None
        self.shrink = 0.0  # log10 bound on how small a linearised gradient can get
        for node in self.gm.graph.nodes:
            self._visit(node)

    def _label(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"layer '{node.target}' ({type(self.gm.get_submodule(node.target)).__name__})"
        scope = node.meta.get("tilefcn_scope")
        return f"operation '{node.name}'" + (f" in layer '{scope}'" if scope else "")

    def _nonlocal(self, node: fx.Node, why: str, hint: str = _FCN) -> ValueError:
        return ValueError(f"{self._label(node)} {why}: {hint}")

    def _visit(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "output"):
            if node.op == "placeholder":
                self.kind[node] = "const" if self.input else (Fraction(1), Fraction(1))
                self.input = self.input or node
            elif not isinstance(out := node.args[0], fx.Node) or \
                    not isinstance(self.kind[out], tuple):
                raise ValueError("the model must return a single (N, C, H, W) tensor")
            else:
                self.output = out
            return
        ins = node.all_input_nodes
        tracked = [n for n in ins if isinstance(self.kind[n], tuple)]
        if not tracked:
            self.kind[node] = "shape" if any(self.kind[n] == "shape" for n in ins) else "const"
            return
        if crop := next((self.crops[n] for n in tracked if n in self.crops), None):
            self.crops[node] = crop  # downstream of a crop, where no layer may pad any more
        if node.op == "call_module":
            spec = self._module_spec(node, self.gm.get_submodule(node.target))
        else:
            name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
            spec = self._function_spec(node, name.strip("_"))
        if spec is None:
            raise _Unsupported(f"{self._label(node)} ({node.target}) is not modelled")
        if spec in ("shape", "const"):
            self.kind[node] = spec
        elif spec[0] == "pw":
            factors = {self.kind[n] for n in tracked}
            if len(factors) > 1 or any(self.kind[n] == "shape" for n in ins):
                raise _Unsupported(f"{self._label(node)} mixes tensors of different grids")
            self.kind[node] = factors.pop()
            self.back[node] = [(n, (_shift(0), _shift(0))) for n in tracked]
            if spec[1]:
                self.lin[node.name] = ("act", [n.name for n in tracked])
        else:
            maps, scale, lin, pads, crops = self._geometric(node, *spec)
            if pads and crop:
                raise self._nonlocal(node, f"pads after the crop '{crop}': a tile would see "
                                     "padding where the whole image has data", "crop after "
                                     "the padded layers, or use unpadded layers after a crop")
            if any(n is not tracked[0] and self.kind[n] != "const" for n in ins):
                raise _Unsupported(f"{self._label(node)} takes two input-dependent tensors")
            self.kind[node] = tuple(f * s for f, s in zip(self.kind[tracked[0]], scale,
                                                             strict=True))
            self.back[node] = [(tracked[0], maps)]
            if crops:
                self.crops[node] = node.name
            if lin:
                self.lin[node.name] = ("pool", [tracked[0].name], *lin)

    def _softmax(self, node: fx.Node, dim) -> tuple:
        if (1 if dim is None else dim % 4) != 1:
            raise self._nonlocal(node, "normalises over the spatial dimensions")
        return ("pw", "act")

    def _module_spec(self, node: fx.Node, m: nn.Module):
        for types, why in _NONLOCAL:
            if isinstance(m, types):
                raise self._nonlocal(node, why)
        bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
        if bn or isinstance(m, nn.modules.instancenorm._InstanceNorm):
            if m.training or m.running_mean is None:
                raise self._nonlocal(node, "uses batch statistics (training mode; call "
                                     "model.eval() first)" if bn else "normalises over the image")
            return ("pw", "act")
        if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            return self._softmax(node, m.dim)
        if isinstance(m, _ACT + _LINEAR):
            return ("pw", None if isinstance(m, _LINEAR) else "act")
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if m.padding_mode == "circular":
                raise self._nonlocal(node, "wraps around the image (circular padding)")
            return ("tconv" if m.transposed else "conv", m.kernel_size, m.stride, m.padding,
                    m.dilation)
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d)):
            mp = isinstance(m, nn.MaxPool2d)
            return None if mp and m.return_indices else (
                "pool", m.kernel_size, m.stride, getattr(m, "padding", 0),
                m.dilation if mp else 1, m.ceil_mode, mp)
        if isinstance(m, nn.Upsample):
            return ("up", m.size, m.scale_factor, m.mode, m.align_corners)
        if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d, nn.modules.padding._ReflectionPadNd,
                          nn.modules.padding._ReplicationPadNd)) and len(m.padding) == 4:
            return ("pad", m.padding, "constant")
        return None

    def _function_spec(self, node: fx.Node, name: str):
        a = partial(_arg, node)
        if name in ("size", "shape") or (name == "getattr" and node.args[1] == "shape"):
            return "shape"
        if name in ("getattr", "dim", "ndimension"):
            return "const"
        if name in _NL_NAMES:
            raise self._nonlocal(node, _NL_NAMES[name])
        if name in _PW_LINEAR or (name in ("cat", "concat", "concatenate") and
                                  a(1, "dim", 0) % 4 < 2):
            return ("pw", None)
        if name in _PW_ACT or (name in ("max", "min") and isinstance(a(1, "other"), fx.Node)):
            return ("pw", "act")
        if name == "batch_norm":
            if a(5, "training", False):
                raise self._nonlocal(node, "uses batch statistics (training mode)")
            return ("pw", "act")
        if name in ("softmax", "log_softmax", "softmin", "normalize"):
            return self._softmax(node, a(2 if name == "normalize" else 1, "dim", 1))
        if name in _REDUCE:
            dim = a(2 if name == "norm" else 1, "dim")
            if {d % 4 for d in ((dim,) if isinstance(dim, int) else dim or (2,))} & {2, 3}:
                raise self._nonlocal(node, f"reduces over the spatial dimensions ({name})")
            return None
        if name == "getitem":
            return ("slice", node.args[1])
        if name in ("max_pool2d", "avg_pool2d"):
            mp = name == "max_pool2d"
            return None if mp and a(6, "return_indices", False) else (
                "pool", a(1, "kernel_size"), a(2, "stride"), a(3, "padding", 0),
                a(4, "dilation", 1) if mp else 1, a(5 if mp else 4, "ceil_mode", False), mp)
        if name in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"):
            mode = {"upsample_nearest": "nearest", "upsample_bilinear": "bilinear"}.get(
                name, a(3, "mode", "nearest"))
            align = True if name == "upsample_bilinear" else a(4, "align_corners")
            return ("up", a(1, "size"), a(2, "scale_factor"), mode, align)
        if name == "pad":
            return ("pad", (*a(1, "pad"), 0, 0)[:4], a(2, "mode", "constant"))
        return None

    def _geometric(self, node: fx.Node, what: str, *p) -> tuple:
        """``((map_y, map_x), (scale_y, scale_x), linearisation, pads, crops)`` of one layer."""
        if what == "up" and p[0] is not None:
            raise self._nonlocal(node, "resizes to a fixed size= (not translation-invariant)",
                                 "use an integer scale_factor instead")
        if what == "up" and p[3] and p[2] != "nearest":
            raise self._nonlocal(node, "uses align_corners=True (not translation-invariant)",
                                 "use align_corners=False")
        bad: list[fx.Node] = []
        fx.node.map_arg(p, bad.append)
        if bad:
            raise _Unsupported(f"{self._label(node)} has input-dependent parameters")
        if what in ("conv", "tconv", "pool"):
            k, s, pad, d = _two(p[0]), _two(p[1] or p[0]), p[2], _two(p[3])
            if isinstance(pad, str):
                pad = (0, 0) if pad == "valid" else tuple(di * (ki - 1) // 2 for ki, di in zip(
                    k, d, strict=True))
            self.shrink += math.log10(max(k) + 1)
            maps = tuple((_tconv if what == "tconv" else _window)(*v) for v in zip(
                k, s, _two(pad), d, strict=True))
            scale = tuple(Fraction(1, v) if what == "tconv" else Fraction(v) for v in s)
            zero = np.zeros(1, dtype=np.int64)
            pads = any(m(zero, zero)[0][0] < 0 for m in maps) or (what == "pool" and p[4])
            lin = (k, s, _two(pad), d, p[4]) if what == "pool" and p[5] else None
            return maps, scale, lin, pads, False
        if what == "up":
            f, mode = _two(p[1]), p[2]
            if any(not isinstance(v, (int, float)) or v != int(v) or v < 1 for v in f) or \
                    mode not in ("nearest", "nearest-exact", "bilinear"):
                raise _Unsupported(f"{self._label(node)}: {mode} by {p[1]} is not modelled")
            self.shrink += math.log10(2 * max(f))
            return (tuple(_upsample(int(v), mode == "bilinear") for v in f),
                    tuple(Fraction(1, int(v)) for v in f), None, mode == "bilinear", False)
        if what == "pad":  # (left, right, top, bottom)
            if p[1] == "circular":
                raise self._nonlocal(node, "wraps around the image (circular padding)")
            return ((_shift(-p[0][2]), _shift(-p[0][0])), (1, 1), None, max(p[0]) > 0,
                    min(p[0]) < 0)
        idx = p[0] if isinstance(p[0], tuple) else (p[0],)  # what == "slice"
        if Ellipsis in idx:
            at = idx.index(Ellipsis)
            idx = idx[:at] + (slice(None),) * (5 - len(idx)) + idx[at + 1:]
        idx = idx + (slice(None),) * (4 - len(idx))
        if len(idx) != 4 or not all(isinstance(v, slice) for v in idx) or \
                any((v.step or 1) < 1 for v in idx[2:]):
            raise _Unsupported(f"{self._label(node)} indexes other than by slicing")
        if any((v.start or 0) < 0 or (v.stop or -1) >= 0 for v in idx[2:]):
            raise self._nonlocal(node, "crops relative to the image end or to a fixed size",
                                 "crop a constant number of rows off each side")
        return (tuple(_shift(v.start or 0, v.step or 1) for v in idx[2:]),
                tuple(Fraction(v.step or 1) for v in idx[2:]), None, False,
                any(v.start or v.stop for v in idx[2:]))

    # -- results -------------------------------------------------------------------------
    def interval(self, axis: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Input rows ``[lo, hi]`` (inclusive; hull over all paths) each output index reads."""
        need = {self.output: (idx.copy(), idx.copy())}
        for node in reversed(self.gm.graph.nodes):
            if node not in need or node is self.input:
                continue
            lo, hi = need.pop(node)
            for src, maps in self.back.get(node, ()):
                l2, h2 = maps[axis](lo, hi)
                empty = (lo > hi) | (l2 > h2)
                l2, h2 = np.where(empty, _BIG, l2), np.where(empty, -_BIG, h2)
                if src in need:
                    l2, h2 = np.minimum(need[src][0], l2), np.maximum(need[src][1], h2)
                need[src] = (l2, h2)
        if self.input not in need:
            raise ValueError("the model's output does not depend on its input")
        return need[self.input]

    def grid(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Output stride and alignment, from the downsampling factors carried forward."""
        for s in self.kind[self.output]:
            if s.denominator != 1 or s < 1:
                raise ValueError(f"the output stride is {s} input pixels per output pixel; it "
                                 "must be an integer >= 1")
        factors = [f for f in self.kind.values() if isinstance(f, tuple)]
        return (tuple(int(s) for s in self.kind[self.output]),
                tuple(math.lcm(*(f[ax].numerator for f in factors)) for ax in (0, 1)))

    def geometry(self) -> Geometry:
        stride, align = self.grid()
        covers = []
        for ax in (0, 1):
            period = align[ax] // stride[ax]
            idx = period * 10**6 + np.arange(2 * period, dtype=np.int64)
            covers.append(_cover(idx, *self.interval(ax, idx), period))
        return _geometry(covers, align)

    def linearised(self) -> tuple[nn.Module, torch.dtype]:
        """Copy without activations/BN, max → sum pooling, conv weights ``|w| + 0.05`` (then
        normalised), biases 0, other tensors ``|t| + 0.05``; float32 unless gradients could
        underflow it."""
        lin = copy.deepcopy(self.gm).eval().requires_grad_(False)
        nodes = {n.name: n for n in lin.graph.nodes}
        for node in list(lin.graph.nodes):
            if node.name not in self.lin:
                continue
            how, srcs, *extra = self.lin[node.name]
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
        dtype = torch.float32 if self.shrink < 30 else torch.float64
        return lin.to(dtype), dtype


def _cover(idx, lo, hi, period: int) -> tuple[Fraction, int, int]:
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


def _geometry(covers: list[tuple[Fraction, int, int]], align) -> Geometry:
    if any(c[0].denominator != 1 for c in covers):
        raise ValueError(f"the output stride {[str(c[0]) for c in covers]} is not an integer")
    return Geometry(tuple(c[2] for c in covers), tuple(int(c[0]) for c in covers),
                    tuple(c[1] for c in covers), tuple(align))


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
    out = np.tile(np.array([_BIG, -_BIG, _BIG, -_BIG]), (len(pts), 1))
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
                    return [_cover(i0[ax] + np.arange(2 * period), got[:, 2 * ax],
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
        lo = np.where(ok, got[:, 0::2], _BIG).min(0)
        if ((lo == 0) & (np.where(ok, got[:, 1::2], -_BIG).max(0) == h - 1)).any():
            whole += 1
            if whole == 2:
                raise ValueError("one output depends on the whole input at two input sizes: the "
                                 f"model is not local; {_FCN}")
        elif _clear(got, h, True):
            break
    else:
        raise ValueError(f"cannot measure the geometry: outputs still depend on the border of a "
                         f"{_SIZES[-1]}-px input (receptive field too large, or not local)")
    y2 = _quiet(fn, torch.zeros(1, c, h + 256, h + 256, dtype=f64))
    if y2 is None or min(y2.shape[2] - o[0], y2.shape[3] - o[1]) < 1:
        raise ValueError(f"the output does not grow with the input: {_FCN}")
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
    return _geometry(covers, align)


def _fallback(model: nn.Module, c: int, why: Exception) -> Geometry:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(f"layer '{name}' ({type(m).__name__}) uses batch statistics "
                             f"(training mode; call model.eval() first): {_FCN}")
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


def _verify(an: _Analysis, geo: Geometry, c: int) -> None:
    """Probe the linearised copy where ``geo`` says (then, on a mismatch, robustly in float64),
    and shift its input by the alignment; raise RuntimeError on any disagreement."""
    fn, dtype = an.linearised()
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
    try:
        an = _Analysis(model)
    except _Unsupported as exc:
        return _fallback(model, in_channels, exc)
    stride, align = an.grid()
    fn, dtype = an.linearised()
    return _geometry(_probe_covers(fn, in_channels, stride, align, 64, dtype, False), align)


def measure_geometry(model: nn.Module, in_channels: int = 3, *, verify: bool = True) -> Geometry:
    """Exact :class:`Geometry` of ``model``: analytic, or probed where torch.fx cannot trace it.

    Raises ``ValueError`` naming the layer for non-local models (global pooling, attention,
    instance/group/layer norm, BatchNorm in training mode, flatten / linear) and for output
    strides that are not integers. With ``verify``, the analytic result is cross-checked with the
    gradient probe on a linearised copy; a disagreement raises ``RuntimeError`` (a bug here).
    """
    try:
        an = _Analysis(model)
    except _Unsupported as exc:
        return _fallback(model, in_channels, exc)
    geo = an.geometry()
    if verify:
        _verify(an, geo, in_channels)
    return geo
