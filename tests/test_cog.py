"""GeoTIFF heatmaps as Cloud-Optimized GeoTIFFs (tilefcn.cog), read back with rasterio and
validated with rio-cogeo: values equal the model on the whole image, CRS and geotransform
(rotation terms, stride and offset) equal the expected, overviews, NaN nodata."""

from __future__ import annotations

import dataclasses

import dask.array as da
import numpy as np
import pytest
import tifffile
from models_zoo import padded, strided, whole_image_output

from tilefcn import cog
from tilefcn.checkpoint import read_journal
from tilefcn.geometry import Geometry
from tilefcn.job import heatmap_geotransform, run
from tilefcn.measure import measure_geometry
from tilefcn.modelio import load_model
from tilefcn.read import open_scan
from tilefcn.write import check_output

rasterio = pytest.importorskip("rasterio")
cogeo = pytest.importorskip("rio_cogeo.cogeo")
from affine import Affine  # noqa: E402 - rasterio's dependency
from rasterio.crs import CRS  # noqa: E402

#: A Lambert conformal conic CRS that has no EPSG code.
LCC = ("+proj=lcc +lat_1=41.5 +lat_2=47.25 +lat_0=44 +lon_0=7.5 +x_0=123456 +y_0=654321 "
       "+ellps=GRS80 +units=m +no_defs")
ROTATED = Affine(9.5, 1.25, 650000.0, 0.75, -10.0, 6700000.0)  # X = a·col + b·row + c, …


@pytest.fixture(autouse=True)
def small_cog_blocks(monkeypatch):
    """128-px COG blocks (GDAL's smallest), so small test heatmaps get overviews."""
    monkeypatch.setattr(cog, "BLOCKSIZE", 128)


def _scene(path, shape=(320, 288), transform=ROTATED, crs=LCC, seed=0):
    """A 4-band uint16 tiled GeoTIFF written by GDAL; returns (path, image (y, x, 4))."""
    image = np.random.default_rng(seed).integers(1, 60000, (*shape, 4), dtype=np.uint16)
    with rasterio.open(path, "w", driver="GTiff", width=shape[1], height=shape[0], count=4,
                       dtype="uint16", crs=crs, transform=transform, tiled=True,
                       blockxsize=64, blockysize=64, compress="deflate") as dst:
        dst.write(image.transpose(2, 0, 1))
    return path, image


def _expected_transform(scan: Affine, g: Geometry) -> Affine:
    """Heatmap pixel (i, j) covers scan pixels from (t_y + s_y·i, t_x + s_x·j), t = o + (r-s)/2."""
    ty, tx = (g.offset[a] + (g.receptive_field[a] - g.stride[a]) / 2 for a in (0, 1))
    return scan @ Affine.translation(tx, ty) @ Affine.scale(g.stride[1], g.stride[0])


def _valid(path) -> None:
    valid, errors, warnings = cogeo.cog_validate(str(path), quiet=True)
    assert valid, errors
    assert not warnings, warnings


def test_rotated_non_epsg_scene_gives_an_exact_aligned_cog(tmp_path):
    scene, image = _scene(tmp_path / "scene.tif", shape=(1024, 576))
    assert open_scan(scene).info.crs is None  # no EPSG code in the GeoKeys: WKT needed
    model = padded(4, 3)  # stride 4, negative offset
    out = tmp_path / "heat.tif"
    summary = run(scene, model, out, tile=256, device="cpu", workers=2)
    expected = whole_image_output(model, image)
    assert summary.shape == expected.shape
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.tif", "scene.tif"]
    _valid(out)
    with rasterio.open(out) as src:
        assert src.count == 3 and src.dtypes == ("float32",) * 3
        assert np.isnan(src.nodata)
        assert src.descriptions == tuple(load_model(model).classes)
        assert src.crs == CRS.from_proj4(LCC) and src.crs.to_epsg() is None
        want = _expected_transform(ROTATED, measure_geometry(model, 4))
        assert src.transform.almost_equals(want, precision=1e-6)
        assert src.transform.b != 0 and src.transform.d != 0  # rotation terms kept
        assert src.overviews(1) == [2]  # 256×144 heatmap, 128-px blocks
        assert src.profile["compress"] == "deflate" and src.block_shapes[0] == (128, 128)
        np.testing.assert_allclose(src.read(), expected, rtol=0, atol=1e-5)
        overview = src.read(1, out_shape=(128, 72))
    np.testing.assert_allclose(overview, expected[0].reshape(128, 2, 72, 2).mean((1, 3)),
                               rtol=0, atol=1e-5)
    with pytest.raises(FileExistsError):
        check_output(out)
    assert check_output(out, overwrite=True) == "overwrite"


def test_masked_tiles_are_nan_nodata(tmp_path):
    scene, image = _scene(tmp_path / "scene.tif", shape=(256, 256),
                          transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0),
                          crs="EPSG:32633", seed=1)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :16] = 1  # only the left quarter holds foreground
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    model = strided(4, 2)  # stride 12, chunks not multiples of 16 output pixels
    out = tmp_path / "heat.tif"
    summary = run(scene, model, out, tile=48, device="cpu", mask=str(tmp_path / "mask.tif"))
    assert summary.tiles_masked > 0
    expected = whole_image_output(model, image)
    _valid(out)
    with rasterio.open(out) as src:
        assert src.crs.to_epsg() == 32633 and np.isnan(src.nodata)
        got = src.read()
        masks = src.read_masks(1)
    nan = np.isnan(got)
    assert nan[:, :, -1].all() and not nan[:, :, 0].any()
    assert (nan == nan[:1]).all()  # every band NaN alike (GDAL fills only band 1 itself)
    assert (masks[nan[0]] == 0).all() and (masks[~nan[0]] == 255).all()
    np.testing.assert_allclose(got[~nan], expected[~nan], rtol=0, atol=1e-5)


def test_plain_slide_gives_a_cog_in_scan_pixels_and_uint8(tmp_path):
    image = np.random.default_rng(2).integers(0, 255, (200, 176, 3), dtype=np.uint8)
    slide = tmp_path / "slide.tif"
    tifffile.imwrite(slide, image, tile=(64, 64), photometric="rgb")
    model = padded(3, 2)
    expected = whole_image_output(model, image)
    for dtype in ("float32", "uint8"):
        out = tmp_path / f"heat-{dtype}.tif"
        run(slide, model, out, tile=64, device="cpu", dtype=dtype)
        _valid(out)
        with rasterio.open(out) as src:
            assert src.crs is None and src.dtypes[0] == dtype
            want = _expected_transform(Affine.identity(), measure_geometry(model, 3))
            assert src.transform.almost_equals(want, precision=1e-9)
            got = src.read()
        if dtype == "uint8":
            np.testing.assert_array_equal(got, np.round(np.clip(expected, 0, 1) * 255))
        else:
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    run(slide, model, tmp_path / "heat-uint8.tif", tile=64, device="cpu", overwrite=True)
    with rasterio.open(tmp_path / "heat-uint8.tif") as src:
        assert src.dtypes[0] == "float32"  # replaced by the new run


def _read(path):
    with rasterio.open(path) as src:
        return src.read()


def test_failed_run_keeps_the_old_output_and_resumes_from_its_checkpoint(tmp_path,
                                                                          monkeypatch):
    scene, _ = _scene(tmp_path / "scene.tif", shape=(128, 128), seed=4)
    model, out, clean = padded(4, 2), tmp_path / "heat.tif", tmp_path / "clean.tif"
    run(scene, model, out, tile=64, device="cpu")
    before = out.read_bytes()
    run(scene, model, clean, tile=32, device="cpu")
    real, calls = cog.CogSink.__call__, []

    def failing(sink, tile, block):
        calls.append(tile)
        if len(calls) > 2:
            raise RuntimeError("worker lost")
        return real(sink, tile, block)

    monkeypatch.setattr(cog.CogSink, "__call__", failing)
    with pytest.raises(RuntimeError, match="worker lost"):
        run(scene, model, out, tile=32, device="cpu", overwrite=True)
    assert out.read_bytes() == before  # the old output is replaced by a finished run only
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "clean.tif", "heat.tif", "heat.tif.tiles.partial", "heat.tif.tiles.partial.json",
        "scene.tif"]
    assert len(read_journal(out)["done"]) == 2
    with pytest.raises(ValueError, match="cannot resume .*another tile plan"):
        run(scene, model, out, tile=64, device="cpu", resume=True)  # another job: refused
    assert read_journal(out) is not None  # and nothing lost

    written = []
    monkeypatch.setattr(cog.CogSink, "__call__",
                        lambda sink, tile, block: (written.append(tile.index),
                                                   real(sink, tile, block))[1])
    summary = run(scene, model, out, tile=32, device="cpu", resume=True)
    assert summary.tiles_skipped == 2 and len(written) == 16 - 2
    np.testing.assert_array_equal(_read(out), _read(clean))
    _valid(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.tif", "heat.tif", "scene.tif"]
    again = run(scene, model, out, tile=32, device="cpu", resume=True)
    assert again.already_complete and len(written) == 14  # this job's finished COG: kept
    with pytest.raises(ValueError, match="cannot resume .*another tile plan"):
        run(scene, model, out, tile=64, device="cpu", resume=True)
    assert check_output(tmp_path / "none.tif", resume=True) == "new"
    with pytest.raises(ValueError, match="not a tilefcn heatmap"):
        check_output(scene, resume=True)


def test_a_corrupt_checkpoint_is_computed_afresh(tmp_path, monkeypatch):
    scene, _ = _scene(tmp_path / "scene.tif", shape=(64, 64), seed=4)
    model, out, clean = padded(4, 2), tmp_path / "heat.tif", tmp_path / "clean.tif"
    run(scene, model, clean, tile=32, device="cpu")
    real = cog.CogSink.__call__

    def failing(sink, tile, block):
        if sink._written:
            raise RuntimeError("worker lost")
        return real(sink, tile, block)

    monkeypatch.setattr(cog.CogSink, "__call__", failing)
    with pytest.raises(RuntimeError, match="worker lost"):
        run(scene, model, out, tile=32, device="cpu", workers=1)
    assert len(read_journal(out)["done"]) == 1
    (tmp_path / "heat.tif.tiles.partial").write_bytes(b"II*\0 killed while GDAL wrote")
    monkeypatch.setattr(cog.CogSink, "__call__", real)
    summary = run(scene, model, out, tile=32, device="cpu", resume=True)
    assert summary.tiles_skipped == 0
    np.testing.assert_array_equal(_read(out), _read(clean))


def test_failure_before_any_tile_leaves_no_partial_files(tmp_path, monkeypatch):
    scene, _ = _scene(tmp_path / "scene.tif", shape=(64, 64), seed=4)

    def failing(sink, tile, block):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(cog.CogSink, "__call__", failing)
    with pytest.raises(RuntimeError, match="worker lost"):
        run(scene, padded(4, 2), tmp_path / "heat.tif", tile=32, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


KILLED_RUN = """
import os, signal, sys
from models_zoo import padded
from tilefcn import cog
from tilefcn.checkpoint import read_journal
from tilefcn.job import run
import torch
cog.CHECKPOINT_S = 0.0  # a checkpoint after every tile
real, calls = cog.CogSink.__call__, []
def dying(sink, tile, block):
    calls.append(tile)
    if len(calls) > 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 would, mid-run
    return real(sink, tile, block)
cog.CogSink.__call__ = dying
torch.manual_seed(0)
run(sys.argv[1], padded(4, 2), sys.argv[2], tile=32, device="cpu", workers=1)
"""


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import torch

    scene, _ = _scene(tmp_path / "scene.tif", shape=(128, 128), seed=5)
    out, clean = tmp_path / "heat.tif", tmp_path / "clean.tif"
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH",
                                                                              "")])}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(scene), str(out)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists() and len(read_journal(out)["done"]) == 3
    torch.manual_seed(0)
    model = padded(4, 2)  # the same weights as the killed run's
    summary = run(scene, model, out, tile=32, device="cpu", resume=True)
    assert summary.tiles_skipped == 3
    run(scene, model, clean, tile=32, device="cpu")
    np.testing.assert_array_equal(_read(out), _read(clean))


def test_float16_geotiff_is_refused_before_anything_is_written(tmp_path):
    scene, _ = _scene(tmp_path / "scene.tif", shape=(64, 64))
    with pytest.raises(ValueError, match="GeoTIFFs are float32 or uint8"):
        run(scene, padded(4, 2), tmp_path / "h.tif", device="cpu", dtype="float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_heatmap_geotransform_keeps_rotation_stride_and_offset():
    from tilefcn.read import ScanInfo

    g = Geometry((11, 7), (4, 2), (-3, 1))
    info = ScanInfo("<x>", (100, 100, 4), "uint16", 0, ((100, 100),), (1.0,), None, None,
                    "EPSG:32633", ROTATED.to_gdal())
    got = Affine.from_gdal(*heatmap_geotransform(info, g))
    assert got.almost_equals(_expected_transform(ROTATED, g), precision=1e-9)
    assert heatmap_geotransform(dataclasses.replace(info, geotransform=None), g) is None


def test_write_geotiff_streams_unaligned_chunks(tmp_path):
    rng = np.random.default_rng(7)
    data = rng.random((3, 300, 260)).astype(np.float32)
    data[1, 5:9, 3:60] = np.nan
    heat = da.from_array(data, chunks=(3, 70, 90))  # chunks not aligned with 16-px tiles
    done: list[int] = []
    path = tmp_path / "heat.tif"
    gt = (500000.0, 20.0, 0.0, 5000000.0, 0.0, -20.0)
    cog.write_geotiff(path, heat, geotransform=gt, crs="EPSG:32633", compress="zstd",
                      description={"classes": ["a", "b", "c"]}, progress=done.append)
    assert sum(done) == 300 * 260 and len(done) == 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.tif"]
    _valid(path)
    with rasterio.open(path) as ds:
        assert ds.count == 3 and ds.shape == (300, 260) and ds.crs.to_epsg() == 32633
        assert tuple(ds.transform)[:6] == (20.0, 0.0, 500000.0, 0.0, -20.0, 5000000.0)
        assert np.isnan(ds.nodata) and ds.descriptions == ("a", "b", "c")
        assert ds.profile["compress"] == "zstd" and ds.overviews(1) == [2, 4]
        np.testing.assert_array_equal(ds.read(), data)
    assert check_output(path, overwrite=True) == "overwrite"


def test_interrupted_or_refused_geotiff_leaves_nothing(tmp_path):
    path = tmp_path / "heat.tif"

    def boom(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cog.write_geotiff(path, da.zeros((1, 64, 64), dtype=np.float32, chunks=16),
                          geotransform=None, crs=None, progress=boom)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not a coordinate reference system"):
        cog.write_geotiff(path, np.zeros((1, 8, 8), np.float32), geotransform=None,
                          crs="no such CRS")
    assert list(tmp_path.iterdir()) == []
    foreign = tmp_path / "scan.tif"
    tifffile.imwrite(foreign, np.ones((8, 8), np.uint8))
    with pytest.raises(ValueError, match="not a tilefcn output"):
        cog.write_geotiff(foreign, np.zeros((1, 8, 8), np.float32), geotransform=None,
                          crs=None)
    assert tifffile.imread(foreign).sum() == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.tif"]


def test_cluster_workers_send_blocks_to_one_writer(tmp_path, monkeypatch):
    from distributed import LocalCluster

    import tilefcn.job

    gathered: list[int] = []

    def spy(*args, **kwargs):
        gathered.append(tilefcn.gather.gather_into(*args, **kwargs))
        return gathered[-1]

    monkeypatch.setattr(tilefcn.job, "gather_into", spy)
    scene, image = _scene(tmp_path / "scene.tif", shape=(192, 160), seed=3)
    model = padded(4, 2)
    out = tmp_path / "heat.tif"
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=":0") as cluster:
        run(scene, model, out, tile=64, device="cpu", scheduler=cluster.scheduler_address)
    assert gathered == [3 * 3]  # every tile through the client's one writer
    _valid(out)
    with rasterio.open(out) as src:
        np.testing.assert_allclose(src.read(), whole_image_output(model, image), rtol=0,
                                   atol=1e-5)
        assert src.crs == CRS.from_proj4(LCC)
