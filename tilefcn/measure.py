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

The result is cross-checked, and models ``torch.fx`` cannot trace are measured, by the gradient
probe of :mod:`tilefcn.probe`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from functools import partial

import numpy as np
from torch import fx, nn

from tilefcn.geometry import Geometry
from tilefcn.probe import BIG, FCN_HINT, cover, cross_check, fallback, probe_geometry, to_geometry

__all__ = ["measure_geometry", "probe_geometry"]

Map = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
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
        return np.where(a <= b, a, BIG).min(0), np.where(a <= b, b, -BIG).max(0)
    return back


def _two(v) -> tuple:
    if isinstance(v, (tuple, list)):
        return (v[0], v[0]) if len(v) == 1 else (v[-2], v[-1])
    return (v, v)


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.kwargs.get(name, node.args[i] if len(node.args) > i else default)


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

    def _nonlocal(self, node: fx.Node, why: str, hint: str = FCN_HINT) -> ValueError:
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
                l2, h2 = np.where(empty, BIG, l2), np.where(empty, -BIG, h2)
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
            covers.append(cover(idx, *self.interval(ax, idx), period))
        return to_geometry(covers, align)


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
        return fallback(model, in_channels, exc)
    geo = an.geometry()
    if verify:
        cross_check(an, geo, in_channels)
    return geo
