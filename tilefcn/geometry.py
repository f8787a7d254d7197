"""Geometry of a fully convolutional network: receptive field, stride, offset, alignment.

Pure integer arithmetic, no torch. Measuring a model lives in :mod:`tilefcn.measure`.

Convention (per axis, input pixel indices are integers, pixel ``k`` covers ``[k, k+1)``)::

    output i depends only on input rows [offset + stride*i, offset + stride*i + receptive_field)

``offset`` may be negative (the network pads). ``alignment`` is the grid on which a tile's
origin must sit so that every intermediate feature map of the tile lines up with the
whole-image one; it equals ``stride`` for downsampling-only networks and is the largest
internal downsampling factor for networks that upsample again (a bilinear head, a U-Net).

Two window rules complete it: ``min_input``, the shortest input the network (or an exported
program's dynamic-shape range) accepts, and ``border``, how many rows from a true image border
a reflect/replicate padding may read (a window touching that border holds at least as many).
"""

from __future__ import annotations

from dataclasses import dataclass, field

Pair = tuple[int, int]


def _pair(value: int | tuple[int, int] | list[int]) -> Pair:
    if isinstance(value, int):
        return (value, value)
    y, x = value
    return (int(y), int(x))


def ceil_to(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value`` (``multiple`` > 0)."""
    return -(-value // multiple) * multiple


def floor_to(value: int, multiple: int) -> int:
    """Largest multiple of ``multiple`` that is <= ``value`` (``multiple`` > 0)."""
    return (value // multiple) * multiple


@dataclass(frozen=True, slots=True)
class Geometry:
    """Receptive field, stride, offset and alignment of a network, each ``(y, x)`` ints."""

    receptive_field: Pair
    stride: Pair
    offset: Pair
    alignment: Pair | None = None
    min_input: Pair = field(default=(1, 1), compare=False)
    border: Pair = field(default=(0, 0), compare=False)
    centre2: Pair | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("receptive_field", "stride", "offset", "min_input", "border"):
            object.__setattr__(self, name, _pair(getattr(self, name)))
        if self.centre2 is None:
            object.__setattr__(self, "centre2", tuple(
                2 * o + r - 1 for o, r in zip(self.offset, self.receptive_field, strict=True)))
        object.__setattr__(self, "centre2", _pair(self.centre2))
        align = self.stride if self.alignment is None else _pair(self.alignment)
        object.__setattr__(self, "alignment", align)
        for axis in (0, 1):
            if self.receptive_field[axis] < 1:
                raise ValueError(f"receptive_field must be >= 1, got {self.receptive_field}")
            if self.stride[axis] < 1:
                raise ValueError(f"stride must be >= 1, got {self.stride}")
            if align[axis] < 1 or align[axis] % self.stride[axis]:
                raise ValueError(
                    f"alignment {align} must be a positive multiple of the stride {self.stride}"
                )

    # -- per-axis arithmetic -------------------------------------------------------------
    def centre(self, axis: int, i: int = 0) -> float:
        """Input coordinate (pixel centres at integers) that output ``i`` is centred on:
        ``centre2/2 + stride*i``. ``centre2`` is twice output 0's centre: ``2*offset + rf - 1``
        unless the network crops, where the span a tile must read (a crop reads like a valid
        window over what it cuts) is wider than the pixels the output is computed from."""
        return self.centre2[axis] / 2 + self.stride[axis] * i

    def input_span(self, start: int, stop: int, axis: int) -> tuple[int, int]:
        """Input rows ``[a, b)`` that outputs ``[start, stop)`` depend on (unclipped).

        ``a = offset + stride*start``, ``b = offset + stride*(stop-1) + receptive_field``.
        """
        if stop <= start:
            raise ValueError(f"empty output range [{start}, {stop})")
        o, s, r = self.offset[axis], self.stride[axis], self.receptive_field[axis]
        return o + s * start, o + s * (stop - 1) + r

    def outputs_within(self, start: int, stop: int, axis: int) -> tuple[int, int]:
        """Outputs ``[i0, i1)`` whose whole input span lies in input rows ``[start, stop)``.

        ``i0 = ceil((start - offset) / stride)``, ``i1 = floor((stop - offset - rf) / stride) + 1``;
        ``i1 <= i0`` means none.
        """
        o, s, r = self.offset[axis], self.stride[axis], self.receptive_field[axis]
        i0 = -(-(start - o) // s)
        i1 = (stop - o - r) // s + 1
        return i0, max(i0, i1)

    def halo(self, axis: int) -> tuple[int, int]:
        """Input pixels needed before and after a tile, rounded up to the alignment.

        A tile of input rows ``[t, t + n)`` with ``t`` on the alignment grid, whose outputs are
        ``[t/stride, ...)``, needs ``before = ceil_to(max(0, -offset), alignment)`` extra rows in
        front and ``after = max(0, offset + rf - stride)`` rows behind (exact, no rounding: the
        end of a window need not be aligned).
        """
        o, s, r, a = (self.offset[axis], self.stride[axis], self.receptive_field[axis],
                      self.alignment[axis])
        return ceil_to(max(0, -o), a), max(0, o + r - s)

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, list[int]]:
        """JSON-friendly form: each field a ``[y, x]`` list."""
        return {
            "receptive_field": list(self.receptive_field),
            "stride": list(self.stride),
            "offset": list(self.offset),
            "alignment": list(self.alignment),
            "min_input": list(self.min_input),
            "border": list(self.border),
            "centre2": list(self.centre2),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        return cls(
            receptive_field=_pair(data["receptive_field"]),
            stride=_pair(data["stride"]),
            offset=_pair(data["offset"]),
            alignment=_pair(data["alignment"]) if data.get("alignment") is not None else None,
            min_input=_pair(data.get("min_input", 1)),
            border=_pair(data.get("border", 0)),
            centre2=_pair(data["centre2"]) if data.get("centre2") is not None else None,
        )
