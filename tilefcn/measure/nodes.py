"""Reading ATen graph nodes: arguments by schema name, sizes as sympy expressions of the
program's size symbols, output shapes (pure helpers of :mod:`tilefcn.measure.aten`)."""

from __future__ import annotations

import sympy
import torch
from torch import fx


class Unsupported(Exception):
    """An operation the analytic pass does not model: measure by the probe, then verify."""


def bind(node: fx.Node) -> dict:
    """Arguments of an OpOverload call by schema name, defaults filled in."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def size_expr(value):
    """A sympy expression for an int, SymInt or the fx node that computes one."""
    if isinstance(value, fx.Node):
        value = value.meta.get("val")
    if isinstance(value, torch.SymInt):
        return sympy.sympify(value.node.expr)
    if isinstance(value, (int, float)):
        return sympy.Integer(int(value)) if float(value).is_integer() else sympy.Float(value)
    raise Unsupported(f"cannot read the size {value!r}")


def size_int(value) -> int | None:
    e = sympy.simplify(size_expr(value))
    return int(e) if e.is_number and e == int(e) else None


def pair_of(v, n: int = 2) -> tuple:
    if isinstance(v, (tuple, list)):
        return tuple(v) * n if len(v) == 1 else tuple(v[-2:])
    return (v,) * n


def flatten_args(args) -> list:
    out = []
    for a in args:
        out.extend(flatten_args(a) if isinstance(a, (tuple, list)) else [a])
    return out


def periodic_values(exprs, base: int = 1024, span: int = 128):
    """``(P, values...)``: sympy expressions of the size symbols sampled at ``span`` sizes
    from ``base``; ``P`` is the least period (<= 64) they all repeat with, or None."""
    symbols = set().union(*(e.free_symbols for e in exprs))
    if not symbols:
        return (1, *([int(e)] for e in exprs))
    samples = [[int(sympy.floor(e.subs(dict.fromkeys(symbols, v)))) for v in
                range(base, base + span)] for e in exprs]
    for period in range(1, 65):
        if all(vals[i] == vals[i + period] for vals in samples for i in range(span - period)):
            return (period, *samples)
    return (None, *samples)


def node_shape(node: fx.Node) -> tuple:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        val = val[0]
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()
