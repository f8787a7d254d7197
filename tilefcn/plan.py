"""Tiling plans: pure arithmetic over a :class:`~tilefcn.geometry.Geometry` (no I/O, no torch).

Every output tile is three things (CSBDeep's idea): the input window to read (halo included),
the rows/cols of the model's output on that window to keep, and where they go in the heatmap.

Per axis, for outputs ``[i0, i1)`` of a network with offset ``o``, stride ``s``, receptive
field ``r`` and alignment ``A`` on an image of ``n`` rows::

    read_start = 0                          if o + s*i0 <= 0  (true border: the net pads itself)
               = floor_to(min(o, 0) + s*i0, A)   otherwise     (feature grids line up)
    read_stop  = n                          if o + s*(i1-1) + r >= n  (true border)
               = the least e >= o + s*(i1-1) + r with e ≡ n (mod A)   otherwise
    crop_start = i0 - read_start / s        (index of output i0 in model(window))

Every window length is thus ≡ n (mod A): a size the network accepts whenever it accepts the whole
image (a U-Net's skips line up, an unpooling finds its sizes). A window shorter than the
geometry's ``min_input`` (or, touching a true border, than its ``border``) grows by multiples of
``A`` — forwards while it can, backwards at the far border — inside ``bounds``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tilefcn.geometry import Geometry, ceil_to, floor_to


@dataclass(frozen=True, slots=True)
class AxisWindow:
    """One axis of a tile: outputs ``[out_start, out_stop)`` from input ``[read_start, read_stop)``.

    ``crop_start`` is the index, in the model's output on the window, of output ``out_start``.
    """

    out_start: int
    out_stop: int
    read_start: int
    read_stop: int
    crop_start: int

    @property
    def out_len(self) -> int:
        return self.out_stop - self.out_start

    @property
    def crop(self) -> slice:
        return slice(self.crop_start, self.crop_start + self.out_len)

    @property
    def out(self) -> slice:
        return slice(self.out_start, self.out_stop)

    @property
    def read(self) -> slice:
        return slice(self.read_start, self.read_stop)

    def relative_to(self, start: int) -> AxisWindow:
        """The same window with input coordinates relative to input row ``start``."""
        return AxisWindow(self.out_start, self.out_stop, self.read_start - start,
                          self.read_stop - start, self.crop_start)


def axis_window(geometry: Geometry, axis: int, out_start: int, out_stop: int,
                image_len: int, bounds: tuple[int, int] | None = None) -> AxisWindow:
    """Input window and crop for outputs ``[out_start, out_stop)`` along ``axis`` (module doc).

    ``bounds`` (default the image) limits how far a short window may grow: a sub-window stays
    inside its task's window.
    """
    if not 0 <= out_start < out_stop:
        raise ValueError(f"bad output range [{out_start}, {out_stop})")
    if image_len < 1:
        raise ValueError(f"empty image axis ({image_len} px)")
    s, a = geometry.stride[axis], geometry.alignment[axis]
    lo, hi = bounds or (0, image_len)
    need_start, need_stop = geometry.input_span(out_start, out_stop, axis)
    # clamps only matter for outputs that see nothing but the network's padding
    read_start = 0 if need_start <= 0 else min(floor_to(min(need_start, s * out_start), a),
                                               floor_to(image_len - 1, a))
    if need_stop >= image_len:
        read_stop = image_len
    else:
        read_stop = max(need_stop, read_start + 1)
        read_stop += (image_len - read_stop) % a
    least = geometry.min_input[axis]
    if read_start == 0 or read_stop == image_len:
        least = max(least, geometry.border[axis])
    if read_stop - read_start < least:
        grow = ceil_to(least - (read_stop - read_start), a)
        read_stop = min(read_stop + grow, hi) if read_stop < image_len else read_stop
        if read_stop - read_start < least:
            read_start = max(lo, floor_to(read_stop - least, a))
    return AxisWindow(out_start, out_stop, read_start, read_stop, out_start - read_start // s)


def output_chunks(out_len: int, chunk: int) -> tuple[int, ...]:
    """Split ``out_len`` outputs into chunks of ``chunk`` (the last one shorter)."""
    if out_len < 1:
        raise ValueError(f"the model produces no output for this image size (length {out_len})")
    full, rest = divmod(out_len, chunk)
    return (chunk,) * full + ((rest,) if rest else ())


def axis_windows(geometry: Geometry, axis: int, image_len: int, out_len: int,
                 tile: int) -> list[AxisWindow]:
    """Windows for consecutive output chunks covering ``[0, out_len)``.

    ``tile`` (input pixels) is rounded up to the alignment; each chunk has ``tile / stride``
    outputs, so chunk origins in the input are multiples of the alignment.
    """
    out_chunk = output_chunk_len(geometry, axis, tile)
    windows, start = [], 0
    for n in output_chunks(out_len, out_chunk):
        windows.append(axis_window(geometry, axis, start, start + n, image_len))
        start += n
    return windows


def output_chunk_len(geometry: Geometry, axis: int, tile: int) -> int:
    """Outputs per chunk for a requested input tile edge: ``ceil_to(tile, A) / stride``."""
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    return ceil_to(tile, geometry.alignment[axis]) // geometry.stride[axis]


@dataclass(frozen=True, slots=True)
class Tile:
    """One task of the plan: chunk index ``(iy, ix)`` and its two axis windows."""

    index: tuple[int, int]
    y: AxisWindow
    x: AxisWindow

    @property
    def read(self) -> tuple[slice, slice]:
        return self.y.read, self.x.read

    @property
    def crop(self) -> tuple[slice, slice]:
        return self.y.crop, self.x.crop

    @property
    def out(self) -> tuple[slice, slice]:
        return self.y.out, self.x.out

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.y.out_len, self.x.out_len


@dataclass(frozen=True, slots=True)
class TilePlan:
    """The chunk grid of a heatmap: output shape, chunk sizes and one :class:`Tile` per chunk."""

    image_shape: tuple[int, int]
    out_shape: tuple[int, int]
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    rows: tuple[AxisWindow, ...]
    cols: tuple[AxisWindow, ...]

    def tile(self, iy: int, ix: int) -> Tile:
        return Tile((iy, ix), self.rows[iy], self.cols[ix])

    def tiles(self) -> list[Tile]:
        return [self.tile(iy, ix) for iy in range(len(self.rows)) for ix in range(len(self.cols))]

    @property
    def grid(self) -> tuple[int, int]:
        return len(self.rows), len(self.cols)


def default_tile(image_shape: tuple[int, int], workers: int) -> int:
    """Largest chunk edge of 2048, 1024 or 512 px giving at least 4 chunks per worker (load
    balance, progress); big scans get 2048 (DESIGN §5: 1024–2048 px chunks measured best)."""
    for tile in (2048, 1024):
        if -(-image_shape[0] // tile) * -(-image_shape[1] // tile) >= 4 * workers:
            return tile
    return 512


def plan_tiles(geometry: Geometry, image_shape: tuple[int, int], out_shape: tuple[int, int],
               tile: int | tuple[int, int]) -> TilePlan:
    """Plan the output chunk grid of a ``image_shape`` scan whose heatmap is ``out_shape``.

    ``out_shape`` is the network's own arithmetic (measured on the model), never a formula.
    """
    ty, tx = (tile, tile) if isinstance(tile, int) else tile
    rows = axis_windows(geometry, 0, image_shape[0], out_shape[0], ty)
    cols = axis_windows(geometry, 1, image_shape[1], out_shape[1], tx)
    chunks = (tuple(w.out_len for w in rows), tuple(w.out_len for w in cols))
    return TilePlan(tuple(image_shape), tuple(out_shape), chunks, tuple(rows), tuple(cols))


def sub_windows(geometry: Geometry, axis: int, outer: AxisWindow, image_len: int,
                sub_tile: int) -> list[AxisWindow]:
    """Split a task's window into sub-tiles of about ``sub_tile`` input pixels.

    Sub-windows nest inside ``outer`` (same rule, same true borders), and are returned with
    read coordinates relative to ``outer.read_start`` so they index the task's window array.
    A last sub-tile shorter than half a step is folded into the one before it (fewer tiny
    forwards, and no 1-output windows that exported programs may have specialised away).
    """
    step = output_chunk_len(geometry, axis, sub_tile)
    windows, start = [], outer.out_start
    while start < outer.out_stop:
        stop = min(start + step, outer.out_stop)
        if outer.out_stop - stop < step // 2:  # no sliver sub-tile at the end: fold it in
            stop = outer.out_stop
        windows.append(axis_window(geometry, axis, start, stop, image_len, (
            outer.read_start, outer.read_stop)).relative_to(outer.read_start))
        start = stop
    return windows


Foreground = Callable[[tuple[int, int], tuple[int, int]], bool]
"""``has_foreground((y0, y1), (x0, x1))``: whether image rows × columns hold foreground."""


def tiles_without_foreground(geometry: Geometry, plan: TilePlan,
                             has_foreground: Foreground) -> frozenset[tuple[int, int]]:
    """Indices of tiles whose outputs' receptive fields hold no foreground.

    Outputs ``[i0, i1)`` of a tile see input rows ``[o + s·i0, o + s·(i1−1) + r)``
    (:meth:`Geometry.input_span`; likewise columns); a tile is skipped when that span has no
    foreground — then so has each of its sub-tiles (:func:`plan_sub_tiles`).
    """
    empty = set()
    for tile in plan.tiles():
        ys = geometry.input_span(tile.y.out_start, tile.y.out_stop, 0)
        xs = geometry.input_span(tile.x.out_start, tile.x.out_stop, 1)
        if not has_foreground(ys, xs):
            empty.add(tile.index)
    return frozenset(empty)


@dataclass(frozen=True, slots=True)
class SubTilePlan:
    """A tile's sub-windows (read coordinates relative to the tile's read start) and which
    of them run: ``keep`` holds ``(i, j)`` of ``rows[i] × cols[j]``; the others are NaN."""

    rows: tuple[AxisWindow, ...]
    cols: tuple[AxisWindow, ...]
    keep: frozenset[tuple[int, int]]

    @property
    def complete(self) -> bool:
        return len(self.keep) == len(self.rows) * len(self.cols)

    def kept(self) -> list[tuple[AxisWindow, AxisWindow]]:
        """The sub-windows that run, row-major."""
        return [(sy, sx) for i, sy in enumerate(self.rows) for j, sx in enumerate(self.cols)
                if (i, j) in self.keep]

    def reads(self) -> list[tuple[slice, slice]]:
        """Disjoint rectangles (relative to the tile's window) covering the input windows of
        the kept sub-windows, and nothing else: the union cut at every window edge into
        row bands, each band's covered columns merged into runs, equal neighbouring bands
        merged (a tile with every sub-window kept reads as one rectangle)."""
        rects = [(sy.read_start, sy.read_stop, sx.read_start, sx.read_stop)
                 for sy, sx in self.kept()]
        if not rects:
            return []
        ys = sorted({v for r in rects for v in r[:2]})
        bands: list[list] = []  # [y0, y1, runs]
        for y0, y1 in zip(ys, ys[1:], strict=False):
            spans = sorted((r[2], r[3]) for r in rects if r[0] <= y0 and y1 <= r[1])
            runs: list[list[int]] = []
            for a, b in spans:
                if runs and a <= runs[-1][1]:
                    runs[-1][1] = max(runs[-1][1], b)
                else:
                    runs.append([a, b])
            if bands and bands[-1][1] == y0 and bands[-1][2] == runs:
                bands[-1][1] = y1
            elif runs:
                bands.append([y0, y1, runs])
        return [(slice(y0, y1), slice(a, b)) for y0, y1, runs in bands for a, b in runs]


def plan_sub_tiles(geometry: Geometry, tile: Tile, image_shape: tuple[int, int],
                   sub_tile: int, has_foreground: Foreground | None = None) -> SubTilePlan:
    """The sub-windows of ``tile`` (:func:`sub_windows`) and those whose outputs' receptive
    fields hold foreground (all of them when ``has_foreground`` is None)."""
    rows = sub_windows(geometry, 0, tile.y, image_shape[0], sub_tile)
    cols = sub_windows(geometry, 1, tile.x, image_shape[1], sub_tile)
    if has_foreground is None:
        keep = {(i, j) for i in range(len(rows)) for j in range(len(cols))}
    else:
        ys = [geometry.input_span(w.out_start, w.out_stop, 0) for w in rows]
        xs = [geometry.input_span(w.out_start, w.out_stop, 1) for w in cols]
        keep = {(i, j) for i, y in enumerate(ys) for j, x in enumerate(xs)
                if has_foreground(y, x)}
    return SubTilePlan(tuple(rows), tuple(cols), frozenset(keep))


def sub_window_shapes(geometry: Geometry, plan: TilePlan,
                      sub_tile: int) -> frozenset[tuple[int, int]]:
    """Every input shape ``(h, w)`` the model will see in this plan with ``sub_tile``.

    Rows and columns split independently, so the shapes are the product of the distinct
    sub-window heights and widths. A backend other than eager torch is checked on each.
    """
    heights = {w.read_stop - w.read_start for row in plan.rows
               for w in sub_windows(geometry, 0, row, plan.image_shape[0], sub_tile)}
    widths = {w.read_stop - w.read_start for col in plan.cols
              for w in sub_windows(geometry, 1, col, plan.image_shape[1], sub_tile)}
    return frozenset((h, w) for h in heights for w in widths)
