"""Empirical proof of a geometry: tiled == whole image on random inputs, before any scan runs.

The model runs on random images of two sizes (height ≠ width), as a whole and window by window
through the real tiling plan (:func:`tilefcn.plan.plan_tiles`, then :func:`~tilefcn.plan.
sub_windows`) at two tile sizes whose seams fall at different places. Any difference beyond
float rounding (float64: 1e-9 relative; float32 models: 1e-4) means the geometry or the model's
translation equivariance is not what tiling needs, and the model is refused.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tilefcn.geometry import Geometry, ceil_to
from tilefcn.measure.shapes import copy_module, run_or_none
from tilefcn.plan import plan_tiles, sub_windows


def runnable(module: nn.Module) -> tuple[nn.Module, torch.dtype]:
    """An eval-mode float64 copy of ``module`` where it converts, else a float32 one."""
    fn = copy_module(module)
    with contextlib.suppress(NotImplementedError, AttributeError):
        fn.eval()
    if not isinstance(fn, torch.jit.ScriptModule):
        with contextlib.suppress(Exception):
            return fn.to(torch.float64), torch.float64
    return fn, torch.float32


def _sizes(geometry: Geometry, example: int) -> list[tuple[int, int]]:
    """Image sizes: the same length as ``example`` modulo the alignment, at least a few tiles
    long; height and width differ."""
    out = []
    for ax in (0, 1):
        a, r = geometry.alignment[ax], geometry.receptive_field[ax]
        want = 2 * (r + abs(geometry.offset[ax]) + geometry.border[ax]) + 3 * a + \
            geometry.min_input[ax]
        out.append(example + ceil_to(max(0, want - example), a) + ax * a)
    return [tuple(out), (out[0] + 1, out[1] + 3)]


def _tiled(fn, x: torch.Tensor, geometry: Geometry, whole: torch.Tensor, tile,
           sub) -> torch.Tensor:
    hw, out_hw = tuple(x.shape[-2:]), tuple(whole.shape[-2:])
    plan = plan_tiles(geometry, hw, out_hw, tile)
    out = torch.full_like(whole, float("nan"))
    for t in plan.tiles():
        win = x[..., t.y.read, t.x.read]
        for sy in sub_windows(geometry, 0, t.y, hw[0], sub[0]):
            for sx in sub_windows(geometry, 1, t.x, hw[1], sub[1]):
                y = run_or_none(fn, win[..., sy.read, sx.read])
                block = None if y is None else y[..., sy.crop, sx.crop]
                if block is None or tuple(block.shape[-2:]) != (sy.out_len, sx.out_len):
                    rows = (t.y.read_start + sy.read_start, t.y.read_start + sy.read_stop)
                    cols = (t.x.read_start + sx.read_start, t.x.read_start + sx.read_stop)
                    raise ValueError(f"the model gives no {sy.out_len}x{sx.out_len} outputs on "
                                     f"the input window of rows {rows} and columns {cols} "
                                     f"(of {hw[0]}x{hw[1]})")
                out[..., sy.out, sx.out] = block
    return out


def verify_tiling(module: nn.Module, geometry: Geometry, in_channels: int,
                  example: int) -> None:
    """Raise ``ValueError`` unless tiling ``module`` with ``geometry`` equals the whole-image
    output on random inputs. ``example`` is an input side the network accepts."""
    fn, dtype = runnable(module)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    gen = torch.Generator().manual_seed(5)
    tried = 0
    for hw in _sizes(geometry, example):
        x = torch.randn(1, in_channels, *hw, dtype=dtype, generator=gen)
        whole = run_or_none(fn, x)
        if whole is None:
            continue
        tried += 1
        scale = tol * (1 + float(whole.abs().max()))
        ay, ax = geometry.alignment
        tiles = [(ceil_to(max(ay, hw[0] // 3), ay), ceil_to(max(ax, hw[1] // 3), ax)),
                 (ceil_to(max(ay, hw[0] // 4 + 1), ay), ceil_to(max(ax, hw[1] // 2), ax))]
        # second tiling: a few sub-tiles per tile, seams at other places
        subs = [(10**6, 10**6), (ceil_to(max(2, tiles[1][0] // 3), ay),
                                 ceil_to(max(2, tiles[1][1] // 3), ax))]
        for tile, sub in zip(tiles, subs, strict=True):
            tiled = _tiled(fn, x, geometry, whole, tile, sub)
            err = float((tiled - whole).abs().nan_to_num(float("inf")).max())
            if not err <= scale:
                raise ValueError(f"tiled output differs from the whole-image output by {err:.3g}"
                                 f" on a random {hw[0]}x{hw[1]} input (tiles {tile[0]} px)")
    if not tried:
        raise ValueError("the model refuses the random test images of the tiling check")
