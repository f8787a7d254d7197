"""Tests of tilefcn.write: OME-Zarr store + pyramid, resume bookkeeping, PNG preview
(GeoTIFF/COG: tests/test_cog.py)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import tifffile
import zarr

from tilefcn.write import (
    check_output,
    create_ome_zarr,
    finish_ome_zarr,
    written_chunks,
)

RNG = np.random.default_rng(7)
ATTRS = {"version": "0.1.0", "model": {"name": "tiny", "sha256": "ab"}, "classes": ["a", "b"]}


def _store(path, shape=(2, 64, 64), chunks=(32, 32), **kw):
    return create_ome_zarr(path, shape=shape, chunks=chunks, scale=(4.0, 4.0),
                           translation=(1.5, 1.5), unit="micrometer", attrs=ATTRS, **kw)


def _status(path) -> str:
    return json.loads((path / "zarr.json").read_text())["attributes"]["tilefcn"]["status"]


def _nanmean2x2(a: np.ndarray) -> np.ndarray:
    c, h, w = a.shape
    pad = np.full((c, h + h % 2, w + w % 2), np.nan)
    pad[:, :h, :w] = a
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows
        return np.nanmean(pad.reshape(c, pad.shape[1] // 2, 2, -1, 2), axis=(2, 4))


def test_ome_zarr_round_trip_with_pyramid(tmp_path) -> None:
    path = tmp_path / "heat.zarr"
    data = RNG.random((2, 75, 61)).astype(np.float32)
    data[:, 10:14, 20:24] = np.nan  # whole 2x2 windows NaN → NaN
    data[0, 31, 41] = np.nan  # one NaN in a window → mean of the other three
    arr = create_ome_zarr(path, shape=(2, 75, 61), chunks=(16, 16), scale=(4.0, 4.0),
                          translation=(1.5, 1.5), unit="micrometer", attrs=ATTRS)
    assert arr.dtype == np.float32 and arr.chunks == (2, 16, 16) and np.isnan(arr[0, 0, 0])
    assert _status(path) == "running"
    arr[:] = data
    finish_ome_zarr(path, min_size=16)
    assert _status(path) == "complete"

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = list(Reader(parse_url(str(path)))())[0]
    assert [a["name"] for a in node.metadata["axes"]] == ["c", "y", "x"]
    assert node.metadata["axes"][1]["unit"] == "micrometer"
    shapes = [tuple(d.shape) for d in node.data]
    assert shapes == [(2, 75, 61), (2, 38, 31), (2, 19, 16), (2, 10, 8)]
    transforms = node.metadata["coordinateTransformations"]
    for level, tr in enumerate(transforms):
        assert tr[0] == {"type": "scale", "scale": [1.0, 4.0 * 2**level, 4.0 * 2**level]}
        t = 1.5 + (2**level - 1) / 2 * 4.0
        assert tr[1] == {"type": "translation", "translation": [0.0, t, t]}
    np.testing.assert_array_equal(np.asarray(node.data[0]), data)
    ref = data.astype(np.float64)
    for level in range(1, 4):
        ref = _nanmean2x2(ref)
        np.testing.assert_allclose(np.asarray(node.data[level]), ref, rtol=1e-6)
    level1 = np.asarray(node.data[1])
    assert np.isnan(level1[:, 5:7, 10:12]).all()
    assert np.isclose(level1[0, 15, 20], np.nanmean(data[0, 30:32, 40:42]))
    group = zarr.open_group(path, mode="r")
    assert dict(group.attrs)["tilefcn"]["model"] == ATTRS["model"]


def test_written_chunks_and_resume(tmp_path) -> None:
    path = tmp_path / "h.zarr"
    arr = _store(path)
    assert written_chunks(arr) == set()
    arr[:, 0:32, 32:64] = 1.0
    arr[:, 32:64, 0:32] = np.nan  # an all-NaN chunk counts as written
    assert written_chunks(arr) == {(0, 1), (1, 0)}
    assert check_output(path, resume=True) == "resume"
    again = _store(path, mode="resume")
    assert written_chunks(again) == {(0, 1), (1, 0)} and again[0, 0, 40] == 1.0
    with pytest.raises(ValueError, match="shape"):
        _store(path, shape=(2, 64, 96), mode="resume")
    with pytest.raises(ValueError, match="different model"):
        create_ome_zarr(path, shape=(2, 64, 64), chunks=(32, 32), scale=(1, 1),
                        translation=(0, 0), unit=None, attrs={"model": {"name": "other"}},
                        mode="resume")
    finish_ome_zarr(path, min_size=16)
    assert _status(path) == "complete" and (path / "1" / "zarr.json").exists()
    _store(path, mode="resume")  # resuming a finished store drops its stale pyramid
    assert _status(path) == "running" and not (path / "1").exists()
    fresh = _store(path, mode="overwrite")
    assert written_chunks(fresh) == set() and _status(path) == "running"


def test_check_output_refusals(tmp_path) -> None:
    out = tmp_path / "out.zarr"
    assert check_output(out) == "new"
    _store(out)
    with pytest.raises(FileExistsError) as exc:
        check_output(out)
    assert str(exc.value) == f"output exists: {out} (use --overwrite or --resume)"
    assert check_output(out, overwrite=True) == "overwrite"
    assert (out / "0" / "zarr.json").exists()  # nothing deleted by the check
    with pytest.raises(ValueError, match="not both"):
        check_output(out, overwrite=True, resume=True)

    foreign = tmp_path / "photos.zarr"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["x"] = 1
    for path in (foreign, tmp_path / "other.zarr"):
        for flags in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(ValueError, match="not a tilefcn"):
                check_output(path, **flags)
        with pytest.raises(ValueError, match="not a tilefcn"):
            _store(path, mode="overwrite")
    assert (foreign / "keep.txt").read_text() == "precious"
    assert (tmp_path / "other.zarr" / "zarr.json").exists()

    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="not a tilefcn"):
        check_output(plain, overwrite=True)
    with pytest.raises(ValueError, match="cannot resume .*plain.tif: not a tilefcn"):
        check_output(plain, resume=True)
    assert check_output(tmp_path / "new.tif", resume=True) == "new"  # nothing to continue
    with pytest.raises(FileExistsError):
        _store(out)
