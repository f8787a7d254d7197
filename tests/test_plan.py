"""Tiling arithmetic: tiles partition the output, windows respect geometry, and a numpy
strided convolution run tile by tile reassembles its whole-signal output exactly."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilefcn.geometry import Geometry, ceil_to, floor_to
from tilefcn.plan import axis_window, axis_windows, plan_tiles, sub_windows


def conv1d(x: np.ndarray, kernel: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Zero-padded strided 1-D correlation, torch's arithmetic: len = (n + 2p - k)//s + 1."""
    padded = np.concatenate([np.zeros(pad), x, np.zeros(pad)])
    n_out = (len(x) + 2 * pad - len(kernel)) // stride + 1
    return np.array([padded[i * stride:i * stride + len(kernel)] @ kernel for i in range(n_out)])


geometries = st.builds(
    lambda s, k, p, m: Geometry((k, k), (s, s), (-p, -p), (s * m, s * m)),
    st.integers(1, 4), st.integers(1, 9), st.integers(0, 4), st.integers(1, 3))


@settings(max_examples=150, deadline=None)
@given(geometries, st.integers(1, 300), st.integers(1, 64))
def test_windows_partition_output_and_respect_geometry(g, n, tile):
    k, s, p = g.receptive_field[0], g.stride[0], -g.offset[0]
    m = (n + 2 * p - k) // s + 1
    if m < 1:
        with pytest.raises(ValueError):
            axis_windows(g, 0, n, m, tile)
        return
    windows = axis_windows(g, 0, n, m, tile)
    covered = np.concatenate([np.arange(w.out_start, w.out_stop) for w in windows])
    np.testing.assert_array_equal(covered, np.arange(m))  # disjoint, ordered, complete
    for w in windows:
        assert 0 <= w.read_start < w.read_stop <= n
        assert w.read_start == 0 or w.read_start % g.alignment[0] == 0
        assert w.out_start * s % g.alignment[0] == 0  # chunk origins on the alignment grid
        span = g.input_span(w.out_start, w.out_stop, 0)
        assert w.read_start <= max(span[0], 0) and w.read_stop >= min(span[1], n)
        assert w.crop_start == w.out_start - w.read_start // s


@settings(max_examples=150, deadline=None)
@given(geometries, st.integers(1, 300), st.integers(1, 64), st.integers(1, 40),
       st.integers(0, 2**31 - 1))
def test_tiled_strided_conv_equals_whole_signal(g, n, tile, sub, seed):
    """Each tile's read/crop/write slices reassemble the whole-signal output exactly."""
    k, s, p = g.receptive_field[0], g.stride[0], -g.offset[0]
    if p >= k:  # outputs that see only padding: torch forbids pad > k/2 anyway
        p = k - 1
        g = Geometry((k, k), (s, s), (-p, -p), g.alignment)
    rng = np.random.default_rng(seed)
    x, kernel = rng.normal(size=n), rng.normal(size=k)
    whole = conv1d(x, kernel, s, p)
    if len(whole) < 1:
        return
    stitched = np.full(len(whole), np.nan)
    for w in axis_windows(g, 0, n, len(whole), tile):
        tile_out = np.full(w.out_len, np.nan)
        for sw in sub_windows(g, 0, w, n, sub):  # sub-tiles index the tile's window
            window = x[w.read][sw.read]
            tile_out[sw.out_start - w.out_start:sw.out_stop - w.out_start] = conv1d(
                window, kernel, s, p)[sw.crop]
        stitched[w.out] = tile_out
    np.testing.assert_allclose(stitched, whole, rtol=0, atol=1e-12)


def test_plan_tiles_grid_and_chunks():
    g = Geometry((60, 60), (8, 8), (0, 0))
    plan = plan_tiles(g, (1000, 3000), (118, 368), 512)
    assert plan.chunks == ((64, 54), (64,) * 5 + (48,))
    assert plan.grid == (2, 6)
    tiles = plan.tiles()
    assert len(tiles) == 12 and tiles[7].index == (1, 1)
    # spans end at 8*117+60 = 996 and 8*127+60 = 1076; windows are ≡ the image (mod 8) long
    assert tiles[7].read == (slice(512, 1000), slice(512, 1080))


def test_halo_rounding_and_spans():
    g = Geometry((37, 37), (1, 1), (-18, -18), (8, 8))
    assert g.halo(0) == (24, 18)
    assert g.input_span(88, 92, 0) == (70, 110)
    assert g.outputs_within(0, 100, 0) == (18, 82)
    assert ceil_to(-3, 8) == 0 and floor_to(-3, 8) == -8
    w = axis_window(g, 0, 88, 100, 1000)
    assert (w.read_start, w.read_stop, w.crop_start) == (64, 120, 24)  # 118 -> ≡ 1000 (mod 8)
    with pytest.raises(ValueError):
        Geometry((3, 3), (2, 2), (0, 0), (3, 3))  # alignment not a multiple of the stride


@settings(max_examples=100, deadline=None)
@given(geometries, st.integers(50, 400), st.integers(4, 40))
def test_sub_windows_have_no_sliver_at_the_end(g, n, sub):
    k, s, p = g.receptive_field[0], g.stride[0], -g.offset[0]
    m = (n + 2 * p - k) // s + 1
    if m < 1:
        return
    step = -(-sub // g.alignment[0]) * g.alignment[0] // s
    outer = axis_windows(g, 0, n, m, 10**6)[0]
    subs = sub_windows(g, 0, outer, n, sub)
    assert [w.out_start for w in subs[1:]] == [w.out_stop for w in subs[:-1]]
    assert subs[0].out_start == 0 and subs[-1].out_stop == m
    if len(subs) > 1:
        assert subs[-1].out_len >= step // 2 and all(w.out_len == step for w in subs[:-1])
