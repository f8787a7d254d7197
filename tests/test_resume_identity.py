"""--resume continues only the same job: another source (even of the same size), model, plan,
dtype, precision, sub-tile or mask is refused naming what differs, with the store untouched;
backend and batch may change."""

import hashlib
import os

import numpy as np
import pytest
import tifffile
import zarr
from models_zoo import random_image, strided, whole_image_output

from tilefcn.identity import identity_mismatch, source_fingerprint
from tilefcn.job import run
from tilefcn.read import open_scan
from tilefcn.sinks import ZarrSink

SHAPE = (150, 170)


def _scan(path, seed):
    image = random_image(np.random.default_rng(seed), SHAPE, 3, "uint8")
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb")
    return image


def _snapshot(root):
    """Every file under ``root``: (mtime_ns, sha256 of its bytes)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (os.stat(path).st_mtime_ns,
                                                    hashlib.sha256(f.read()).hexdigest())
    return out


@pytest.fixture()
def interrupted(tmp_path, monkeypatch):
    """An interrupted run of ``strided`` on a.tif into heat.zarr (3 of its chunks written)."""
    image = _scan(tmp_path / "a.tif", 1)
    model = strided(3, 2)
    out = tmp_path / "heat.zarr"
    real_write, calls = ZarrSink.__call__, []

    def failing_write(sink, tile, block):
        calls.append(tile)
        if len(calls) > 3:
            raise RuntimeError("worker lost")
        return real_write(sink, tile, block)

    monkeypatch.setattr(ZarrSink, "__call__", failing_write)
    with pytest.raises(RuntimeError, match="worker lost"):
        run(tmp_path / "a.tif", model, out, tile=64, device="cpu", workers=1)
    monkeypatch.setattr(ZarrSink, "__call__", real_write)
    return tmp_path / "a.tif", image, model, out


def _refused(out, match, source, model, **kwargs):
    before = _snapshot(out)
    with pytest.raises(ValueError, match=match) as exc:
        run(source, model, out, tile=kwargs.pop("tile", 64), device="cpu", resume=True,
            **kwargs)
    assert str(exc.value).startswith(f"cannot resume {out}: ")
    assert len(str(exc.value).splitlines()) == 1
    assert _snapshot(out) == before  # attributes, chunks and all: nothing rewritten
    return str(exc.value)


def test_another_scan_of_the_same_size_is_refused(interrupted, tmp_path):
    source, _, model, out = interrupted
    _scan(tmp_path / "b.tif", 2)
    assert os.path.getsize(tmp_path / "b.tif") == os.path.getsize(source)
    message = _refused(out, r"written from another source \(path ", tmp_path / "b.tif", model)
    assert str(source.resolve()) in message and str((tmp_path / "b.tif").resolve()) in message


def test_same_path_replaced_by_another_scan_is_refused(interrupted):
    source, _, model, out = interrupted
    stat = os.stat(source)
    _scan(source, 2)  # same size, same name; then even the same mtime
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(source).st_size == stat.st_size
    _refused(out, r"another source \(fingerprint [0-9a-f]{12}… vs [0-9a-f]{12}…\)", source,
             model)


def test_touched_source_is_refused(interrupted):
    source, _, model, out = interrupted
    stat = os.stat(source)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _refused(out, r"another source \(mtime_ns ", source, model)


@pytest.mark.parametrize("change,match", [
    ({"tile": 96}, r"another tile plan \(chunks \[6, 6\] vs \[8, 8\]\)"),
    ({"dtype": "float16"}, r"other options \(dtype float32 vs float16\)"),
    ({"sub_tile": 48}, r"other options \(sub_tile None vs 48\)"),
    ({"mask": "left.tif"}, r"other options \(masked_tiles 0 vs [1-9]\d*\)"),
])
def test_other_plan_or_options_are_refused(interrupted, change, match):
    source, _, model, out = interrupted
    if "mask" in change:  # foreground on the left third only
        mask = np.zeros(SHAPE, np.uint8)
        mask[:, : SHAPE[1] // 3] = 1
        tifffile.imwrite(source.parent / change["mask"], mask)
        change = {"mask": str(source.parent / change["mask"])}
    _refused(out, match, source, model, **change)


def test_other_model_is_refused(interrupted):
    source, _, _, out = interrupted
    other = strided(3, 2)
    for p in other.parameters():
        p.data += 0.01
    _refused(out, "different model|another model", source, other)


def test_backend_and_batch_may_change_and_resume_is_exact(interrupted):
    source, image, model, out = interrupted
    summary = run(source, model, out, tile=64, device="cpu", resume=True, backend="torch",
                  batch=2)
    assert summary.tiles_skipped == 3
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["tilefcn"]["status"] == "complete"
    assert group.attrs["tilefcn"]["identity"]["source"]["path"] == str(source.resolve())
    np.testing.assert_allclose(group["0"][:], whole_image_output(model, image), atol=1e-5)


def test_store_without_identity_is_refused(interrupted):
    source, _, model, out = interrupted
    group = zarr.open_group(str(out), mode="r+")
    attrs = dict(group.attrs["tilefcn"])
    attrs.pop("identity")
    group.attrs["tilefcn"] = attrs
    _refused(out, "no job identity record", source, model)


def test_fingerprint_reads_fixed_windows_of_the_level(tmp_path):
    image = _scan(tmp_path / "a.tif", 1)
    scan = open_scan(tmp_path / "a.tif")
    same = source_fingerprint(open_scan(image))  # same pixels, read from memory
    assert source_fingerprint(scan) == same
    changed = image.copy()
    changed[SHAPE[0] // 2, SHAPE[1] // 2] ^= 1  # a pixel of the centre window
    assert source_fingerprint(open_scan(changed)) != same
    outside = image.copy()
    outside[70, 5] ^= 1  # between the windows: the fingerprint is a bounded sample
    assert source_fingerprint(open_scan(outside)) == same


def test_identity_mismatch_names_the_first_difference():
    record = {"source": {"path": "/a", "size": 1}, "model": {"sha256": "0" * 64},
              "plan": {"chunks": [2, 2]}, "options": {"dtype": "float32"}}
    assert identity_mismatch(record, record) is None
    other = {**record, "source": {"path": "/a", "size": 2}}
    assert identity_mismatch(record, other) == "it was written from another source (size 1 vs 2)"
    assert "no job identity" in identity_mismatch(None, record)
