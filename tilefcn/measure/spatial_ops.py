"""The analytic pass's spatial ops: how convolutions, unpooling, resizes, pads, crops and
layout ops map output rows back to input rows (:mod:`tilefcn.measure.intervals`) and move a
tensor's image axes.

:class:`SpatialOps` is a mixin of :class:`tilefcn.measure.aten.Analysis`: its methods read
and extend the analysis's state (``kind``, ``unpool``, ``pads``, ``periods``) and raise
through its ``label`` / ``refuse``. Each returns the op's back-maps and downsampling factor
(crops and pads: also the maps to the pixels actually used), or a new :class:`Grid`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from fractions import Fraction

import sympy
from torch import fx

from tilefcn.measure.intervals import IDENTITY, resize, shift, transposed, window
from tilefcn.measure.nodes import (
    Unsupported,
    node_shape,
    pair_of,
    periodic_values,
    size_expr,
    size_int,
)


@dataclass(frozen=True, slots=True)
class Grid:
    """A tensor on the image grid: downsampling factor and positions of the (y, x) axes."""

    factor: tuple[Fraction, Fraction]
    axes: tuple[int, int]


class SpatialOps:
    """Back-maps of the spatial ops (mixed into :class:`tilefcn.measure.aten.Analysis`)."""

    def _at_end(self, node: fx.Node, g: Grid, nd: int) -> None:
        if g.axes != (nd - 2, nd - 1):
            raise Unsupported(f"{self.label(node)} acts on non-spatial dimensions")

    def _conv(self, node: fx.Node, name: str, a: dict, g: Grid, nd: int):
        self._at_end(node, g, nd)
        if self.kind.get(a["weight"]) != "const":
            raise Unsupported(f"{self.label(node)} has input-dependent weights")
        k = pair_of(tuple(node_shape(a["weight"]))[-2:])
        s, d = pair_of(a.get("stride", 1)), pair_of(a.get("dilation", 1))
        pad = a.get("padding", 0)
        if isinstance(pad, str):
            pad = (0, 0) if pad == "valid" else tuple(di * (ki - 1) // 2 for ki, di in zip(
                k, d, strict=True))
        p = pair_of(pad)
        if any(isinstance(v, fx.Node) for v in (*k, *s, *p, *d)):
            raise Unsupported(f"{self.label(node)} has input-dependent parameters")
        if name == "conv_transpose2d" or a.get("transposed"):
            maps = tuple(transposed(*v) for v in zip(k, s, p, d, strict=True))
            return maps, tuple(Fraction(1, v) for v in s)
        maps = tuple(window(*v) for v in zip(k, s, p, d, strict=True))
        return maps, tuple(Fraction(v) for v in s)

    def _unpool(self, node: fx.Node, a: dict, g: Grid, src: fx.Node, nd: int):
        self._at_end(node, g, nd)
        pool = a["indices"]
        while pool.target is operator.getitem:
            pool = pool.args[0]
        if pool not in self.unpool or self.kind[src] != self.kind[a["indices"]]:
            raise Unsupported(f"{self.label(node)}: indices not from a max pool")
        k, s, p, d = self.unpool[pool]
        size = a.get("output_size")
        before = node_shape(pool.args[0])[-2:]
        if size and any(sympy.simplify(size_expr(v) - size_expr(w)) != 0
                        for v, w in zip(size, before, strict=True)):
            raise self.refuse(node, "unpools to a size that is not its pooling layer's input")
        maps = tuple(transposed(*v) for v in zip(k, s, p, d, strict=True))
        return maps, tuple(Fraction(1, v) for v in s)

    def _resize(self, node: fx.Node, name: str, a: dict, g: Grid, src: fx.Node, nd: int):
        self._at_end(node, g, nd)
        if a.get("align_corners") and "bilinear" in name:
            raise self.refuse(node, "uses align_corners=True (not translation-invariant)",
                              "use align_corners=False")
        size, scales = a.get("output_size"), a.get("scale_factors")
        if scales is None and ("scales_h" in a):
            scales = [a.get("scales_h"), a.get("scales_w")]
            scales = None if None in scales else scales
        if size:
            ins = node_shape(src)[-2:]
            f = [sympy.nsimplify(sympy.simplify(size_expr(o) / size_expr(i)))
                 for o, i in zip(size, ins, strict=True)]
        else:
            f = [sympy.nsimplify(v) for v in pair_of(scales)]
        f = [Fraction(int(v.p), int(v.q)) if v.is_Rational and v > 0 else None for v in f]
        if None in f or any(v.numerator != 1 and v.denominator != 1 for v in f) or (
                "bicubic" in name and any(v < 1 for v in f)):
            raise self.refuse(node, "resizes to a size that is not an integer multiple or "
                              "fraction of its input (size= fixed or computed from another "
                              "tensor)", "use an integer scale_factor instead")
        mode = next(m for m in ("nearest_exact", "bilinear", "bicubic", "nearest") if m in name)
        return tuple(resize(v, mode) for v in f), tuple(1 / v for v in f)

    def _pad(self, node: fx.Node, name: str, a: dict, g: Grid, nd: int):
        self._at_end(node, g, nd)
        pad = list(a.get("pad", a.get("padding")))
        mode = {"reflection_pad2d": "reflect", "replication_pad2d": "replicate"}.get(
            name, a.get("mode", "constant"))
        if mode == "circular":
            raise self.refuse(node, "wraps around the image (circular padding)")
        pad = [size_int(v) if isinstance(v, fx.Node) else v for v in pad]
        if None in pad or len(pad) % 2:
            raise Unsupported(f"{self.label(node)} pads by an input-dependent amount")
        left, right, top, bottom = (pad + [0, 0, 0, 0])[:4]
        if mode != "constant":
            self.pads.append((node.args[0], (max(top, bottom, 0), max(left, right, 0))))
        # a negative pad crops: like a valid window over what it cuts (see _slice)
        return (tuple(shift(-t) if t >= 0 and b >= 0 else window(1 + max(0, -t) + max(0, -b),
                                                                     1, max(0, t), 1)
                      for t, b in ((top, bottom), (left, right))), (Fraction(1), Fraction(1)),
                (shift(-top), shift(-left)))

    def _slice(self, node: fx.Node, name: str, a: dict, g: Grid, src: fx.Node, nd: int):
        """A crop ``x[a : n-b : c]``: back-map ``[c*lo, c*hi + a + b]`` (see intervals).

        ``a`` and the rows ``b`` cut at the end may follow the input's size only periodically
        (a crop to a multiple, or to the size of a skip): they are read off at many sizes,
        must repeat with a period ``P``, and the alignment becomes a multiple of ``P`` so that
        every tile's window crops like the whole image.
        """
        dim = a.get("dim", 0) % nd
        if dim not in g.axes:
            return g if name != "select" else self._after_removal(node, g, dim, nd)
        if name == "select":
            raise self.refuse(node, "picks a single row or column of the image")
        step = 1 if name == "narrow" else (a.get("step", 1) or 1)
        if not isinstance(step, int) or step < 1:
            raise self.refuse(node, "crops with a step computed from the input's size",
                              "crop a constant number of rows off each side")
        in_len, out_len = size_expr(node_shape(src)[dim]), size_expr(node_shape(node)[dim])
        if any(str(v).startswith("u") for v in (in_len + out_len).free_symbols):
            raise Unsupported(f"{self.label(node)} crops to a size torch.export left opaque")
        if out_len.is_number and not in_len.is_number:
            raise self.refuse(node, "crops to a fixed size (not translation-invariant)",
                              "crop a constant number of rows off each side")
        start = size_expr(a.get("start") or 0)
        if start.is_number and int(start) < 0:
            start = in_len + start
        cut = in_len - 1 - step * (out_len - 1)  # a + b: rows before the first, after the last
        period, starts, cuts = periodic_values((start, cut))
        if period is None or min(starts) < 0 or min(cuts) < 0:
            raise self.refuse(node, "crops to a size or at a position computed from the "
                              "input's shape (not translation-invariant)", "crop a constant "
                              "number of rows off each side")
        ax = g.axes.index(dim)
        if period > 1:
            self.periods.append((ax, g.factor[ax] * period))
        maps, scale = [IDENTITY, IDENTITY], [Fraction(1), Fraction(1)]
        position = list(maps)
        maps[ax] = window(max(cuts) + 1, step, 0, 1)
        position[ax] = shift(min(starts), step)
        scale[ax] = Fraction(step)
        return tuple(maps), tuple(scale), tuple(position)

    def _after_removal(self, node: fx.Node, g: Grid, dims, nd: int) -> Grid:
        out_nd = len(node_shape(node))
        if out_nd == nd:
            return g
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        dims = [d % nd for d in dims]
        return Grid(g.factor, tuple(p - sum(d < p for d in dims) for p in g.axes))

    def _layout(self, node: fx.Node, name: str, a: dict, g: Grid, src: fx.Node, nd: int):
        ins, outs = node_shape(src), node_shape(node)
        if name in ("permute", "transpose", "t"):
            if name == "permute":
                dims = [d % nd for d in a["dims"]]
                axes = (dims.index(g.axes[0]), dims.index(g.axes[1]))
            else:
                d0, d1 = (a.get("dim0", 0) % nd, a.get("dim1", 1) % nd)
                swap = {d0: d1, d1: d0}
                axes = tuple(swap.get(p, p) for p in g.axes)
            if axes[0] > axes[1]:  # rows become columns: probe (and verify) instead
                raise Unsupported(f"{self.label(node)} swaps the image's rows and columns")
            return Grid(g.factor, axes)
        if name in ("split", "split_with_sizes", "chunk", "unbind"):
            if a.get("dim", 0) % nd in g.axes:
                return None
            return g if name != "unbind" else self._after_removal(node, g, a.get("dim", 0), nd)
        if name == "repeat":
            reps = list(a["repeats"])[-nd:]
            return None if any(reps[p] != 1 for p in g.axes) else g
        if name == "expand_as":
            return g
        # view / reshape / (un)squeeze / (un)flatten: the spatial axes must survive as they are
        ay, ax = g.axes
        if ax != ay + 1:
            return None
        for py in range(len(outs) - 1):
            same = [sympy.simplify(size_expr(outs[py + i]) - size_expr(ins[ay + i])) == 0
                    for i in (0, 1)]
            if all(same) and sympy.simplify(math.prod(map(size_expr, outs[:py] or [1])) -
                                            math.prod(map(size_expr, ins[:ay] or [1]))) == 0:
                return Grid(g.factor, (py, py + 1))
        raise self.refuse(node, "reshapes or flattens the spatial dimensions (mixes all "
                          "positions)")
