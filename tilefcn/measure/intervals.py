"""Interval arithmetic of one axis, shared by the analytic pass and the probe (pure numpy).

A back-map takes the inclusive index interval ``[lo, hi]`` of a layer's outputs (numpy arrays,
one interval per queried output) to the interval of its input that they read, the image taken
as infinite. An empty interval is ``[BIG, -BIG]``.

* conv / pool (kernel k, stride s, padding p, dilation d): ``[s*lo - p, s*hi - p + d*(k-1)]``
* transposed conv / unpooling: each ``i`` with ``s*i - p + t*d`` in ``[lo, hi]``, a tap ``t < k``
* resize ×f, ``align_corners=False`` (source ``(i + .5)/f - .5``): nearest ``[lo//f, hi//f]``,
  bilinear ``[floor(src(lo)), ceil(src(hi))]``, bicubic one more tap each side; ÷m
  (``f = 1/m``, any mode): ``[m*lo, m*hi + m-1]`` (it keeps ``floor(n/m)`` outputs)
* crop ``x[a:n-b:c]``: the valid window ``[c*lo, c*hi + a + b]`` (a tile's crop of its own
  window keeps output ``i`` only if the rows a whole-image crop cuts lie inside the window);
  padding t in front: ``[lo - t, hi - t]``
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import numpy as np

from tilefcn.geometry import Geometry

BIG = 1 << 40
Map = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def window(k: int, s: int, p: int, d: int) -> Map:
    return lambda lo, hi: (s * lo - p, s * hi - p + d * (k - 1))


def shift(a: int, step: int = 1) -> Map:
    return lambda lo, hi: (a + step * lo, a + step * hi)


IDENTITY = shift(0)


def upsample(f: int, bilinear: bool) -> Map:
    if bilinear:
        return lambda lo, hi: ((2 * lo + 1 - f) // (2 * f), -((f - 1 - 2 * hi) // (2 * f)))
    return lambda lo, hi: (lo // f, hi // f)


def resize(f: Fraction, mode: str) -> Map:
    """Back-map of an ``align_corners=False`` resize by ``f`` (an integer or ``1/m``)."""
    if f.denominator == 1:
        f = int(f)
        if mode == "bilinear":
            return upsample(f, True)
        if mode == "bicubic":
            return lambda lo, hi: ((2 * lo + 1 - f) // (2 * f) - 1,
                                   (2 * hi + 1 - f) // (2 * f) + 2)
        return upsample(f, False)
    m = f.denominator  # ÷m keeps floor(n/m) outputs: output i exists once m*i + m-1 does
    return window(m, m, 0, 1)


def transposed(k: int, s: int, p: int, d: int) -> Map:
    def back(lo, hi):
        a = np.stack([-((t * d - lo - p) // s) for t in range(k)])
        b = np.stack([(hi + p - t * d) // s for t in range(k)])
        return np.where(a <= b, a, BIG).min(0), np.where(a <= b, b, -BIG).max(0)
    return back


def cover(idx, lo, hi, period: int) -> tuple[Fraction, int, int]:
    """``(stride, offset, receptive_field)``: the tight cover of outputs ``idx`` (2 periods).

    ``stride = (start(i+P) - start(i)) / P``, ``offset = min(start(i) - stride*i)``,
    ``receptive_field = max(end(i) - stride*i) - offset``.
    """
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


def to_geometry(covers: list[tuple[Fraction, int, int]], align, **extra) -> Geometry:
    """The :class:`Geometry` of per-axis covers; raises if a stride is not an integer."""
    if any(c[0].denominator != 1 for c in covers):
        raise ValueError(f"the output stride {[str(c[0]) for c in covers]} is not an integer")
    return Geometry(tuple(c[2] for c in covers), tuple(int(c[0]) for c in covers),
                    tuple(c[1] for c in covers), tuple(align), **extra)
