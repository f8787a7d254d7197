"""The analytic pass: receptive field, stride, offset and alignment from torch.export's ATen graph.

Per axis, an interval of output indices is carried back through the graph to the input rows it
reads (:mod:`tilefcn.measure.intervals`); where paths merge (skips, concatenation) the hull is
taken. Every tensor carries its downsampling factor (input pixels per feature pixel, a Fraction)
and where its two spatial axes are (permutes move them). Symbolic sizes (the program is exported
with dynamic height and width) show which crops and resizes follow the input's size.

Ops are either modelled (convolutions, pools, unpooling, resizes by an integer factor, pads,
crops, pixel (un)shuffle, layout ops, pointwise ops by their ``pointwise`` tag, reductions over
channels), refused with the node named (global pooling, spatial reductions and normalisation,
attention, fully connected layers over positions, ``roll``/``flip``, fixed-size or shape-computed
crops and resizes, positional tensors, random ops, training-mode layers), or unknown: then
:class:`Unsupported` is raised and the caller falls back to probing plus verification.
"""

from __future__ import annotations

import math
import operator
from fractions import Fraction

import numpy as np
import torch
from torch import fx

from tilefcn.geometry import Geometry
from tilefcn.measure.intervals import (
    BIG,
    IDENTITY,
    cover,
    to_geometry,
    upsample,
    window,
)
from tilefcn.measure.nodes import (
    Unsupported,
    bind,
    flatten_args,
    node_shape,
    pair_of,
    size_expr,
)
from tilefcn.measure.spatial_ops import Grid, SpatialOps

FCN_HINT = ("the model is not fully convolutional; use tilefcn.convolutionalize(...) to turn a "
            "patch classifier into an FCN")


_IDENT = {"clone", "alias", "detach", "contiguous", "_to_copy", "to", "type_as",
          "lift_fresh_copy", "expand", "zeros_like", "ones_like", "full_like", "empty_like",
          "_native_batch_norm_legit_no_training", "channel_shuffle", "native_channel_shuffle",
          "hardtanh", "prelu", "_prelu_kernel", "log_sigmoid_forward", "threshold"}
_REFUSE = {
    "rot90": "rotates the image",
    "grid_sampler_2d": "samples at computed coordinates", "grid_sampler": "samples at computed "
    "coordinates", "affine_grid_generator": "samples at computed coordinates",
    "scaled_dot_product_attention": "mixes all positions (attention)",
    "_native_multi_head_attention": "mixes all positions (attention)",
    "group_norm": "normalises over the whole image", "native_group_norm": "normalises over the "
    "whole image",
    "_native_batch_norm_legit": "uses batch statistics (training mode; call model.eval() first)",
    "bernoulli": "is random", "rand_like": "is random", "randn_like": "is random",
    "normal": "is random", "native_dropout": "is random (dropout in training mode)",
    "circular_pad2d": "wraps around the image (circular padding)",
}
_ADAPTIVE = "pools over the whole image"


class Analysis(SpatialOps):
    """Per-node grids and back-maps of an ExportedProgram (the analytic pass)."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        self.program, self.graph = program, program.graph
        users = [s.arg.name for s in program.graph_signature.input_specs
                 if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
        self.kind: dict[fx.Node, object] = {}  # Grid | "shape" | "const"
        self.back: dict[fx.Node, list[tuple[fx.Node, tuple]]] = {}
        self.pads: list[tuple[fx.Node, tuple[int, int]]] = []  # reflect/replicate: rows read
        self.unpool: dict[fx.Node, tuple] = {}
        self.position: dict[fx.Node, tuple] = {}  # crops: maps to the pixels actually used
        self.periods: list[tuple[int, Fraction]] = []  # (axis, input px) crops repeat with
        self.input = self.output = None
        for node in self.graph.nodes:
            if node.op == "placeholder":
                if node.name in users and self.input is None and len(node_shape(node)) == 4:
                    self.input = node
                    self.kind[node] = Grid((Fraction(1), Fraction(1)), (2, 3))
                    self._require_dynamic(node)
                else:
                    self.kind[node] = "const"
            elif node.op == "output":
                outs = [a for a in fx.node.map_arg(node.args[0], lambda n: n)
                        ] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
                if len(outs) != 1 or not isinstance(self.kind.get(outs[0]), Grid):
                    raise ValueError("the model must return a single (N, C, H, W) tensor")
                self.output = outs[0]
                if len(node_shape(self.output)) != 4 or self.kind[self.output].axes != (2, 3):
                    raise ValueError("the model must return a single (N, C, H, W) tensor")
            elif node.op == "call_function":
                self._visit(node)
            else:
                self.kind[node] = "const"
        if self.input is None:
            raise ValueError("the model takes no (N, C, H, W) image tensor")

    def _require_dynamic(self, node: fx.Node) -> None:
        """A program whose height or width torch.export fixed holds the size as constants: its
        shape arithmetic cannot be read (the probe measures it instead)."""
        static = [int(e) for e in map(size_expr, node_shape(node)[2:]) if e.is_number]
        if not static:
            return
        culprit = next((n for n in self.graph.nodes if n.op == "call_function" and any(
            isinstance(v, int) and not isinstance(v, bool) and v in static
            for v in flatten_args(n.args)) and not str(n.target).startswith("aten.conv")), None)
        where = f" ({self.label(culprit)} uses it)" if culprit is not None else ""
        raise Unsupported(f"torch.export fixed the input size at {'x'.join(map(str, static))}"
                          f"{where}: the model computes with its input's size")

    # -- labels and refusals -----------------------------------------------------------------
    def label(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        layer = ""
        if stack:
            path, cls = list(stack.values())[-1]
            name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
            layer = f" in layer '{path}' ({name.strip(chr(39))})" if path else ""
        op = getattr(node.target, "overloadpacket", node.target)
        return f"operation '{getattr(op, '__name__', str(op)).strip('_')}'{layer}"

    def refuse(self, node: fx.Node, why: str, hint: str = FCN_HINT) -> ValueError:
        return ValueError(f"{self.label(node)} {why}: {hint}")

    # -- the forward pass over the graph -----------------------------------------------------
    def _visit(self, node: fx.Node) -> None:
        ins = node.all_input_nodes
        grids = [n for n in ins if isinstance(self.kind.get(n), Grid)]
        if not isinstance(node.target, torch._ops.OpOverload):
            if node.target is operator.getitem and grids:
                self.kind[node] = self.kind[grids[0]]
                self.back[node] = [(grids[0], (IDENTITY, IDENTITY))]
                return
            if grids:
                raise Unsupported(f"{self.label(node)} is not modelled")
            self.kind[node] = "shape" if any(self.kind.get(n) == "shape" for n in ins) or (
                isinstance(node.meta.get("val"), torch.SymInt)) else "const"
            return
        packet = node.target.overloadpacket.__name__
        name = packet if packet in _REFUSE or packet in _IDENT else packet.strip("_")
        if name in ("sym_size", "sym_numel", "sym_stride", "sym_storage_offset"):
            self.kind[node] = "shape"
            return
        if not grids:
            shaped = any(self.kind.get(n) == "shape" for n in ins)
            self.kind[node] = "shape" if shaped else "const"
            return
        if any(self.kind.get(n) == "shape" for n in ins if isinstance(
                n.meta.get("val"), torch.Tensor)):
            raise self.refuse(node, "mixes in a tensor computed from the input's size "
                              "(positional, not translation-invariant)",
                              "remove coordinate/positional inputs")
        if len({self.kind[n] for n in grids}) > 1 and name not in ("max_unpool2d",):
            raise Unsupported(f"{self.label(node)} mixes tensors of different grids")
        src = grids[0]
        g: Grid = self.kind[src]
        spec = self._spec(node, name, bind(node), g, src)
        if spec is None:
            raise Unsupported(f"{self.label(node)} is not modelled")
        if isinstance(spec, Grid):  # layout op or pointwise: identity maps
            self.kind[node] = spec
            self.back[node] = [(n, (IDENTITY, IDENTITY)) for n in grids]
            return
        maps, scale, *position = spec
        if position:
            self.position[node] = position[0]
        self.kind[node] = Grid(tuple(f * s for f, s in zip(g.factor, scale, strict=True)), g.axes)
        self.back[node] = [(n, maps) for n in grids]

    def _spatial(self, g: Grid, dims, ndim: int) -> bool:
        if dims is None or dims == [] or dims == ():
            return True
        dims = [dims] if isinstance(dims, int) else dims
        return bool({d % ndim for d in dims} & set(g.axes))

    def _spec(self, node: fx.Node, name: str, a: dict, g: Grid, src: fx.Node):
        """A :class:`Grid` (identity maps), ``(maps, scale, pads, crops)``, or None."""
        nd = len(node_shape(src))
        if name in _REFUSE:
            raise self.refuse(node, _REFUSE[name])
        if name == "roll":
            if self._spatial(g, a.get("dims"), nd):
                raise self.refuse(node, "wraps around the image (torch.roll)")
            return g
        if name == "instance_norm":
            if a.get("use_input_stats", True):
                raise self.refuse(node, "normalises over the whole image")
            return g
        if "adaptive" in name:
            raise self.refuse(node, _ADAPTIVE)
        if name in _IDENT:
            return g
        if name in ("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"):
            if a.get("train"):
                raise self.refuse(node, "is random (dropout in training mode; call model.eval() "
                                  "first)")
            return g
        if name in ("batch_norm", "native_batch_norm"):
            if a.get("training"):
                raise self.refuse(node, "uses batch statistics (training mode; call model.eval()"
                                  " first)")
            return g
        if name == "layer_norm" or name == "native_layer_norm" or name == "rms_norm":
            k = len(a["normalized_shape"])
            if set(range(nd - k, nd)) & set(g.axes):
                raise self.refuse(node, "normalises over the whole image")
            return g
        if name == "linear":
            if nd - 1 in g.axes:
                raise self.refuse(node, "mixes all positions (fully connected)")
            return g
        if name in ("matmul", "mm", "bmm", "baddbmm", "addmm", "einsum", "bilinear"):
            others = [n for n in node.all_input_nodes if n is not src]
            if all(self.kind.get(n) == "const" for n in others):
                if name == "einsum" and (out := self._einsum(node, a, g, src)) is not None:
                    return out
                if name == "matmul" and nd - 1 not in g.axes and (
                        src is a["self"] and len(node_shape(a["other"])) >= 2):
                    return g  # rows of the image tensor times a constant matrix
            raise self.refuse(node, "mixes all positions (matrix product over positions: "
                              "attention or a fully connected layer)")
        if torch.Tag.pointwise in node.target.tags:
            if any(self.kind.get(n) == "shape" for n in node.all_input_nodes):
                raise self.refuse(node, "uses the input's size as a value (sym_size: not "
                                  "translation-invariant)", "do not compute with x.shape")
            return g
        if name in ("softmax", "log_softmax", "softmin"):
            if self._spatial(g, a.get("dim"), nd):
                raise self.refuse(node, "normalises over the spatial dimensions")
            return g
        if name in ("conv2d", "convolution", "conv_transpose2d", "cudnn_convolution"):
            return self._conv(node, name, a, g, nd)
        if name in ("max_pool2d", "max_pool2d_with_indices", "avg_pool2d"):
            self._at_end(node, g, nd)
            k = pair_of(a["kernel_size"])
            s = pair_of(a["stride"]) if a.get("stride") else k
            p, d = pair_of(a.get("padding", 0)), pair_of(a.get("dilation", 1))
            if name == "max_pool2d_with_indices":
                self.unpool[node] = (k, s, p, d)
            maps = tuple(window(*v) for v in zip(k, s, p, d, strict=True))
            return maps, tuple(Fraction(v) for v in s)
        if name == "max_unpool2d":
            return self._unpool(node, a, g, src, nd)
        if name in ("upsample_nearest2d", "upsample_nearest_exact2d", "upsample_bilinear2d",
                    "upsample_bicubic2d"):
            return self._resize(node, name, a, g, src, nd)
        if name in ("pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d"):
            return self._pad(node, name, a, g, nd)
        if name in ("slice", "narrow", "select"):
            return self._slice(node, name, a, g, src, nd)
        if name == "pixel_unshuffle" or name == "pixel_shuffle":
            self._at_end(node, g, nd)
            r = int(a["downscale_factor" if name == "pixel_unshuffle" else "upscale_factor"])
            if name == "pixel_unshuffle":
                return (window(r, r, 0, 1),) * 2, (Fraction(r),) * 2
            return (upsample(r, False),) * 2, (Fraction(1, r),) * 2
        if name == "cat" or name == "concat":
            dim = a.get("dim", 0) % nd
            return None if dim in g.axes else g
        if name in ("permute", "transpose", "t", "view", "reshape", "unsafe_view", "unsqueeze",
                    "squeeze", "flatten", "unflatten", "expand_as", "split", "split_with_sizes",
                    "chunk", "unbind", "repeat"):
            return self._layout(node, name, a, g, src, nd)
        if name == "flip":
            if self._spatial(g, a.get("dims"), nd):  # flip-conv-flip is equivariant: probe it
                raise Unsupported(f"{self.label(node)} mirrors the image (torch.flip)")
            return g
        if "dim" in a or name in ("mean", "sum", "amax", "amin", "max", "min", "std", "var",
                                  "prod", "norm", "logsumexp", "any", "all", "argmax", "argmin"):
            if self._spatial(g, a.get("dim"), nd):
                raise self.refuse(node, f"reduces over the spatial dimensions ({name})")
            return self._after_removal(node, g, a.get("dim"), nd)
        return None

    def _einsum(self, node: fx.Node, a: dict, g: Grid, src: fx.Node) -> Grid | None:
        """An einsum that keeps the image tensor's two spatial letters (in order) and
        contracts or multiplies only its other letters with constant tensors."""
        lhs, _, out = a["equation"].replace(" ", "").partition("->")
        terms = lhs.split(",")
        tensors = list(a["tensors"])
        if not out or "." in lhs or len(terms) != len(tensors):
            return None
        mine = terms[tensors.index(src)]
        ys, xs = mine[g.axes[0]], mine[g.axes[1]]
        others = "".join(t for t, n in zip(terms, tensors, strict=True) if n is not src)
        if ys in others or xs in others or ys not in out or xs not in out or \
                out.index(ys) > out.index(xs):
            return None
        return Grid(g.factor, (out.index(ys), out.index(xs)))

    # -- results -----------------------------------------------------------------------------
    def interval(self, axis: int, idx: np.ndarray, start: fx.Node | None = None,
                 position: bool = False):
        """Input rows ``[lo, hi]`` (inclusive; hull over all paths) that ``idx`` of the output
        (or of node ``start``) read; ``position``: the rows they are computed from (crops
        as the shift they are, not as the valid window a tile must hold)."""
        first = self.output if start is None else start
        need = {first: (idx.copy(), idx.copy())}
        for node in reversed(self.graph.nodes):
            if node not in need or node is self.input:
                continue
            lo, hi = need.pop(node)
            for src, maps in self.back.get(node, ()):
                if position and node in self.position:
                    maps = self.position[node]
                l2, h2 = maps[axis](lo, hi)
                empty = (lo > hi) | (l2 > h2)
                l2, h2 = np.where(empty, BIG, l2), np.where(empty, -BIG, h2)
                if src in need:
                    l2, h2 = np.minimum(need[src][0], l2), np.maximum(need[src][1], h2)
                need[src] = (l2, h2)
        if self.input not in need:
            if start is not None:
                return np.full_like(idx, BIG), np.full_like(idx, -BIG)
            raise ValueError("the model's output does not depend on its input")
        return need[self.input]

    def grid(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Output stride and alignment (lcm of every tensor's downsampling numerators)."""
        for s in self.kind[self.output].factor:
            if s.denominator != 1 or s < 1:
                raise ValueError(f"the output stride is {s} input pixels per output pixel; it "
                                 "must be an integer >= 1")
        factors = [k.factor for k in self.kind.values() if isinstance(k, Grid)]
        return (tuple(int(s) for s in self.kind[self.output].factor),
                tuple(math.lcm(*(f[ax].numerator for f in factors),
                               *(p.numerator for a, p in self.periods if a == ax))
                      for ax in (0, 1)))

    def border(self, align: tuple[int, int]) -> tuple[int, int]:
        """Rows from a true border that reflect/replicate pads read, plus one alignment."""
        reach = [0, 0]
        for node, amounts in self.pads:
            for ax in (0, 1):
                _, hi = self.interval(ax, np.array([amounts[ax]]), node)
                if hi[0] > -BIG:
                    reach[ax] = max(reach[ax], int(hi[0]) + 1 + align[ax])
        return tuple(reach)

    def min_input(self) -> tuple[int, int]:
        """The program's smallest accepted height and width (its dynamic-shape ranges)."""
        out = []
        for size in node_shape(self.input)[2:]:
            lo = 1
            if isinstance(size, torch.SymInt):
                expr = size_expr(size)
                subs = {}
                for sym in expr.free_symbols:
                    vr = self.program.range_constraints.get(sym)
                    subs[sym] = int(vr.lower) if vr is not None and vr.lower.is_finite else 1
                lo = max(1, int(expr.subs(subs)))
            out.append(lo)
        return tuple(out)

    def geometry(self) -> Geometry:
        stride, align = self.grid()
        covers, centre2 = [], []
        for ax in (0, 1):
            period = align[ax] // stride[ax]
            idx = period * 10**6 + np.arange(2 * period, dtype=np.int64)
            covers.append(cover(idx, *self.interval(ax, idx), period))
            _, o, r = cover(idx, *self.interval(ax, idx, position=True), period)
            centre2.append(2 * o + r - 1)
        return to_geometry(covers, align, min_input=self.min_input(), border=self.border(align),
                           centre2=tuple(centre2))
