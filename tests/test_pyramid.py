"""Tests of tilefcn.pyramid (plan, per-chunk tasks, graph layer) and write.py's output dtypes."""

from __future__ import annotations

import json
import math
import warnings

import dask.threaded
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from tilefcn.pyramid import (
    _STRIP,
    Level,
    _mean2x2,
    create_levels,
    plan_levels,
    pyramid_layer,
    reduce_chunk,
    source_range,
)
from tilefcn.write import (
    COMPRESSORS,
    OUTPUT_DTYPES,
    create_ome_zarr,
    decode_scale,
    encode_block,
    finish_ome_zarr,
)

RNG = np.random.default_rng(11)
ATTRS = {"version": "0.1.0", "model": {"name": "tiny", "sha256": "ab"}, "classes": ["a", "b"]}
SHAPE, CHUNKS, MIN = (2, 70, 90), (24, 20), 20  # two levels: (35, 45) and (18, 23)


def _store(path, shape=SHAPE, chunks=CHUNKS, **kw):
    return create_ome_zarr(path, shape=shape, chunks=chunks, scale=(4.0, 4.0),
                           translation=(1.5, 1.5), unit="micrometer", attrs=ATTRS, **kw)


def _nanmean2x2(a: np.ndarray) -> np.ndarray:
    c, h, w = a.shape
    pad = np.full((c, h + h % 2, w + w % 2), np.nan)
    pad[:, :h, :w] = a
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows
        return np.nanmean(pad.reshape(c, pad.shape[1] // 2, 2, -1, 2), axis=(2, 4))


def _write0(path: str, iy: int, ix: int, block: np.ndarray) -> int:
    """A level-0 chunk writer, standing in for the inference tasks."""
    arr = zarr.open_array(path, path="0", mode="r+")
    cy, cx = arr.chunks[1:]
    arr[:, iy * cy:iy * cy + block.shape[1], ix * cx:ix * cx + block.shape[2]] = block
    return 1


def _grid(shape, chunks) -> tuple[int, int]:
    return tuple(math.ceil(n / c) for n, c in zip(shape[1:], chunks, strict=True))


def test_plan_levels_arithmetic() -> None:
    assert plan_levels((2, 75, 61), (16, 16), 16) == [
        Level(1, (2, 38, 31), (16, 16)), Level(2, (2, 19, 16), (16, 16)),
        Level(3, (2, 10, 8), (10, 8))]
    odd = plan_levels((1, 513, 1024), (512, 512))
    assert [(lv.shape, lv.chunks) for lv in odd] == [((1, 257, 512), (257, 512)),
                                                      ((1, 129, 256), (129, 256))]
    assert odd[0].grid == (1, 1)
    assert plan_levels((1, 100, 300), (64, 64)) == []  # smaller than min_size: no pyramid
    assert plan_levels((1, 1, 1), (1, 1), 0) == []  # never halves below 2
    assert plan_levels((1, 3, 2), (3, 2), 0) == [Level(1, (1, 2, 1), (2, 1))]
    assert source_range(0, 16, 16, 4) == range(0, 2)
    assert source_range(16, 16, 24, 3) == range(1, 3)  # rows [32, 64) of 24-row chunks
    assert source_range(24, 11, 24, 3) == range(2, 3)  # odd edge: clipped to the grid


def test_level1_tasks_depend_on_exactly_the_chunks_they_read() -> None:
    levels = plan_levels(SHAPE, CHUNKS, MIN)
    grid0 = _grid(SHAPE, CHUNKS)
    deps = {(iy, ix): ("w", iy, ix) for iy in range(grid0[0]) for ix in range(grid0[1])}
    deps[(0, 0)] = None  # already stored (resume): no dependency
    del deps[(0, 1)]  # masked: never written
    layer, keys = pyramid_layer("s.zarr", levels, CHUNKS, grid0, deps, "pyr", "float32")
    assert set(layer) == set(keys) and len(keys) == len(set(keys))
    assert len(keys) == sum(lv.grid[0] * lv.grid[1] for lv in levels)
    for lv in levels:
        src_shape = SHAPE if lv.index == 1 else levels[lv.index - 2].shape
        src_chunks = CHUNKS if lv.index == 1 else levels[lv.index - 2].chunks
        cy, cx = lv.chunks
        for i in range(lv.grid[0]):
            for j in range(lv.grid[1]):
                task = layer[(f"pyr-{lv.index}", i, j)]
                assert task[:8] == (reduce_chunk, "s.zarr", lv.index, i * cy, j * cx, cy, cx,
                                    "float32")
                rows = range(2 * i * cy, min(2 * (i + 1) * cy, src_shape[1]))
                cols = range(2 * j * cx, min(2 * (j + 1) * cx, src_shape[2]))
                read = {(r // src_chunks[0], q // src_chunks[1]) for r in rows for q in cols}
                if lv.index == 1:
                    want = {deps[ab] for ab in read if deps.get(ab) is not None}
                else:
                    want = {(f"pyr-{lv.index - 1}", *ab) for ab in read}
                assert set(task[8:]) == want and len(task[8:]) == len(want)
    assert set(layer[("pyr-1", 0, 0)][8:]) == {("w", 1, 0), ("w", 1, 1)}
    assert layer[("pyr-1", 1, 2)][8:] == (("w", 2, 4),)  # bottom-right: one short chunk
    grouped = {(iy, ix): ("w", iy) for iy in range(grid0[0]) for ix in range(grid0[1])}
    layer, _ = pyramid_layer("s.zarr", levels, CHUNKS, grid0, grouped, "pyr", "float32")
    assert layer[("pyr-1", 0, 1)][8:] == (("w", 0), ("w", 1))  # one write task per row
    with pytest.raises(ValueError, match="levels"):
        pyramid_layer("s.zarr", levels[1:], CHUNKS, grid0, {}, "pyr", "float32")


def test_pyramid_tasks_equal_nan_aware_means(tmp_path) -> None:
    path = tmp_path / "heat.zarr"
    data = RNG.random(SHAPE).astype(np.float32)
    data[:, 10:14, 20:24] = np.nan  # whole windows NaN → NaN
    data[0, 31, 41] = np.nan  # one NaN in a window → mean of the other three
    data[:, 24:48, 20:40] = np.nan  # a masked chunk (1, 1), never written
    arr = _store(path)
    arr[:, 0:24, 0:20] = data[:, 0:24, 0:20]  # chunk (0, 0) already there (resume)
    levels = plan_levels(SHAPE, CHUNKS, MIN)
    create_levels(path, levels, "float32")
    grid0 = _grid(SHAPE, CHUNKS)
    graph, deps = {}, {}
    for iy in range(grid0[0]):
        for ix in range(grid0[1]):
            if (iy, ix) in ((0, 0), (1, 1)):
                continue
            key = ("write0", iy, ix)
            ys, xs = slice(iy * 24, (iy + 1) * 24), slice(ix * 20, (ix + 1) * 20)
            graph[key] = (_write0, str(path), iy, ix, data[:, ys, xs])
            deps[(iy, ix)] = key
    layer, keys = pyramid_layer(str(path), levels, CHUNKS, grid0, deps, "pyr", "float32")
    results = dask.threaded.get({**graph, **layer}, [*graph, *keys], num_workers=2)
    assert all(r == 1 for r in results)
    finish_ome_zarr(path, levels=len(levels))
    group = zarr.open_group(path, mode="r")
    assert dict(group.attrs)["tilefcn"]["status"] == "complete"
    np.testing.assert_array_equal(group["0"][:], data)
    ref = data.astype(np.float64)
    for lv in levels:
        ref = _nanmean2x2(ref)
        got = group[str(lv.index)]
        assert got.shape == lv.shape and got.chunks == (2, *lv.chunks)
        assert got.dtype == np.float32 and got.compressors == group["0"].compressors
        np.testing.assert_allclose(got[:], ref, rtol=1e-6)
    assert np.isnan(group["1"][:, 12:24, 10:20]).all()  # under the masked chunk

    old = tmp_path / "old.zarr"  # the in-process fallback gives the same levels
    _store(old)[:] = data
    finish_ome_zarr(old, min_size=MIN)
    for lv in levels:
        np.testing.assert_array_equal(zarr.open_array(old, path=str(lv.index))[:],
                                      group[str(lv.index)][:])


def _quad_mean(block: np.ndarray) -> np.ndarray:
    """``((a₀₀ + a₁₀) + (a₀₁ + a₁₁)) · 0.25`` in float32, whole-array numpy, even shapes."""
    b = block.astype(np.float32)
    return ((b[:, 0::2, 0::2] + b[:, 1::2, 0::2]) + (b[:, 0::2, 1::2] + b[:, 1::2, 1::2])) \
        * np.float32(0.25)


@pytest.mark.parametrize("dtype", ["float16", "uint8", "float32"])
@pytest.mark.parametrize("height", [2 * _STRIP, 2 * _STRIP + 6, 10])
def test_mean2x2_is_the_float32_quad_mean_bit_for_bit(dtype: str, height: int) -> None:
    """The strip-converted float16 / uint8 mean equals the float32 formula on every path:
    contiguous, a strided view, a read-only block (torch cannot view it), reversed rows."""
    if dtype == "uint8":
        block = RNG.integers(0, 256, (3, height, 38)).astype(np.uint8)
    else:
        block = (RNG.standard_normal((3, height, 38)) * 4).astype(dtype)
    ref = _quad_mean(block)
    got = _mean2x2(block)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    wide = np.repeat(block, 2, axis=2)[:, :, ::2]  # a non-contiguous view, same values
    np.testing.assert_array_equal(_mean2x2(wide), ref)
    frozen = block.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(_mean2x2(frozen), ref)
    flipped = block[:, ::-1]
    np.testing.assert_array_equal(_mean2x2(flipped), _quad_mean(flipped))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_mean2x2_nan_and_odd_edges_average_what_exists(dtype: str) -> None:
    block = RNG.random((2, 2 * _STRIP + 4, 20)).astype(dtype)
    block[0, 3, 5] = np.nan  # one NaN: the mean of the other three
    block[1, 40:42, 6:8] = np.nan  # a whole quad: NaN
    ref = _nanmean2x2(block.astype(np.float64))
    np.testing.assert_allclose(_mean2x2(block), ref, rtol=1e-6)
    odd = block[:, :-1, :-1]  # odd edges: the half quads average what exists
    np.testing.assert_allclose(_mean2x2(odd), _nanmean2x2(odd.astype(np.float64)), rtol=1e-6)


def test_encode_block_dtypes() -> None:
    p = np.array([[[0.0, 0.5, 1.0, -0.2, 1.3, 0.25]]], dtype=np.float32)
    assert encode_block(p, "float32") is p
    u = encode_block(p, "uint8")
    assert u.dtype == np.uint8 and u.tolist() == [[[0, 128, 255, 0, 255, 64]]]
    np.testing.assert_allclose(u / decode_scale("uint8"), np.clip(p, 0, 1), atol=0.5 / 255)
    h = encode_block(p, "float16")
    assert h.dtype == np.float16 and np.allclose(h, p, rtol=1e-3) and decode_scale("float16") == 1
    with pytest.raises(ValueError, match="NaN"):
        encode_block(np.array([[[0.5, np.nan]]], dtype=np.float32), "uint8")
    assert np.isnan(encode_block(np.array([np.nan], dtype=np.float32), "float16")).all()
    with pytest.raises(ValueError, match="float16"):
        encode_block(p, "int16")
    assert set(OUTPUT_DTYPES) == set(COMPRESSORS)


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_small_dtype_store_round_trip_and_pyramid(tmp_path, dtype: str) -> None:
    path = tmp_path / "heat.zarr"
    arr = _store(path, dtype=dtype)
    assert arr.dtype == np.dtype(dtype) and arr.chunks == (2, *CHUNKS)
    assert (arr[0, 0, 0] == 0) if dtype == "uint8" else np.isnan(arr[0, 0, 0])
    assert type(arr.compressors[0]) is type(COMPRESSORS[dtype][0])
    p = RNG.random(SHAPE).astype(np.float32)
    stored = encode_block(p, dtype)
    arr[:] = stored
    with pytest.raises(ValueError, match=f"dtype {dtype}.*float32"):
        _store(path, mode="resume")
    again = _store(path, mode="resume", dtype=dtype)
    np.testing.assert_array_equal(again[:], stored)
    finish_ome_zarr(path, min_size=MIN)
    level1 = zarr.open_array(path, path="1", mode="r")
    assert level1.dtype == np.dtype(dtype)
    mean = _nanmean2x2(stored.astype(np.float64))
    want = np.round(mean).astype(np.uint8) if dtype == "uint8" else mean.astype(np.float16)
    np.testing.assert_array_equal(level1[:], want)


def test_finish_metadata_only_and_ome_zarr_reader(tmp_path) -> None:
    path = tmp_path / "heat.zarr"
    _store(path, shape=(2, 75, 61), chunks=(16, 16))[:] = 0.25
    levels = plan_levels((2, 75, 61), (16, 16), 16)
    create_levels(path, levels, "float32")
    with pytest.raises(ValueError, match="4 pyramid levels asked, 3 present"):
        finish_ome_zarr(path, levels=4)
    finish_ome_zarr(path)  # arrays present: metadata only, nothing built
    assert np.isnan(zarr.open_array(path, path="1")[:]).all()
    layer, keys = pyramid_layer(str(path), levels, (16, 16), (5, 4), {}, "p", "float32")
    dask.threaded.get(layer, keys, num_workers=2)
    finish_ome_zarr(path, levels=len(levels))
    meta = json.loads((path / "zarr.json").read_text())["attributes"]
    assert meta["tilefcn"]["status"] == "complete"
    datasets = meta["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2", "3"]

    pytest.importorskip("ome_zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = list(Reader(parse_url(str(path)))())[0]
    assert [tuple(d.shape) for d in node.data] == [(2, 75, 61), (2, 38, 31), (2, 19, 16),
                                                   (2, 10, 8)]
    for level, tr in enumerate(node.metadata["coordinateTransformations"]):
        assert tr[0] == {"type": "scale", "scale": [1.0, 4.0 * 2**level, 4.0 * 2**level]}
    assert np.allclose(np.asarray(node.data[3]), 0.25)


def test_create_levels_refuses_other_dtype_and_replaces_stale(tmp_path) -> None:
    path = tmp_path / "heat.zarr"
    _store(path)
    with pytest.raises(ValueError, match="float16"):
        create_levels(path, plan_levels(SHAPE, CHUNKS, MIN), "float16")
    create_levels(path, plan_levels(SHAPE, CHUNKS, 2), "float32")
    assert (path / "4").exists()
    create_levels(path, plan_levels(SHAPE, CHUNKS, MIN), "float32")
    assert (path / "2").exists() and not (path / "3").exists()
    assert isinstance(COMPRESSORS["float32"][0], BloscCodec)
    assert isinstance(COMPRESSORS["uint8"][0], ZstdCodec)
