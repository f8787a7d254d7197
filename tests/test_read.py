"""Tests of tilefcn.read: pixels, metadata, level selection, errors, pickling, processes."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from tilefcn.read import ScanInfo, TiffLevelReader, open_scan

RNG = np.random.default_rng(1234)
RGB = RNG.integers(0, 256, (700, 900, 3), dtype=np.uint8)
GEO = RNG.integers(0, 65536, (300, 520, 4), dtype=np.uint16)
GRAY = RNG.integers(0, 65536, (301, 403), dtype=np.uint16)
PLANAR = RNG.integers(0, 256, (3, 260, 330), dtype=np.uint8)
GEOKEYS = [(33550, 12, 3, (10.0, 10.0, 0.0), True),
           (33922, 12, 6, (0.0, 0.0, 0.0, 500000.0, 5000000.0, 0.0), True),
           (34735, 3, 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633), True)]


def _halve(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[::2, ::2])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("scans")
    f = {k: str(d / n) for k, n in [("ome", "a.ome.tif"), ("svs", "b.svs"), ("geo", "c.tif"),
                                    ("gray", "d.tif"), ("planar", "e.tif"), ("inch", "f.tif")]}
    with tifffile.TiffWriter(f["ome"]) as tw:  # OME-TIFF, levels as SubIFDs
        tw.write(RGB, subifds=2, tile=(128, 128), photometric="rgb", compression="zlib",
                 metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
        for k in (2, 4):
            tw.write(RGB[::k, ::k], tile=(128, 128), photometric="rgb", subfiletype=1,
                     compression="zlib")
    desc = "Aperio Image Library v12\n900x700 [0,0 900x700] (256x256) |AppMag = 20|MPP = 0.5"
    with tifffile.TiffWriter(f["svs"]) as tw:  # SVS layout: base, thumbnail, reduced pages
        tw.write(RGB, tile=(256, 256), photometric="rgb", metadata=None, description=desc)
        tw.write(RGB[::8, ::8], photometric="rgb", metadata=None,
                 description="Aperio Image Library v12\nthumbnail")
        for k in (2, 4):
            tw.write(RGB[::k, ::k], tile=(256, 256), photometric="rgb", metadata=None,
                     description=f"Aperio Image Library v12\n{900 // k}x{700 // k}")
    with tifffile.TiffWriter(f["geo"]) as tw:  # GeoTIFF, 4 bands contig, one overview page
        tw.write(GEO, tile=(64, 64), photometric="minisblack", planarconfig="contig",
                 extrasamples=[0, 0, 0], metadata=None, extratags=GEOKEYS)
        tw.write(_halve(GEO), tile=(64, 64), photometric="minisblack", planarconfig="contig",
                 extrasamples=[0, 0, 0], metadata=None, subfiletype=1)
    tifffile.imwrite(f["gray"], GRAY, rowsperstrip=16, resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    tifffile.imwrite(f["planar"], PLANAR, photometric="rgb", planarconfig="separate",
                     tile=(64, 64))
    tifffile.imwrite(f["inch"], RGB[:50, :60], photometric="rgb", resolution=(72, 72),
                     resolutionunit="INCH")
    return f


def _expected(kind: str) -> np.ndarray:
    return {"ome": RGB, "svs": RGB, "geo": GEO, "gray": GRAY[..., None],
            "planar": PLANAR.transpose(1, 2, 0), "inch": RGB[:50, :60]}[kind]


@pytest.mark.parametrize("kind", ["ome", "svs", "geo", "gray", "planar"])
def test_pixels_and_windows(files: dict[str, str], kind: str) -> None:
    scan = open_scan(files[kind], chunk=200)
    ref = _expected(kind)
    assert scan.info.shape == ref.shape and scan.array.shape == ref.shape
    assert scan.array.dtype == ref.dtype and scan.info.dtype == ref.dtype.name
    assert scan.reader.ndim == 3 and scan.reader.shape == ref.shape
    for ys, xs in [(slice(3, 201), slice(61, 190)), (slice(127, 129), slice(0, 257)),
                   (slice(250, 300), slice(300, 301))]:  # odd offsets, across tile borders
        np.testing.assert_array_equal(scan.reader[ys, xs], ref[ys, xs])
        np.testing.assert_array_equal(scan.reader[ys, xs, :], ref[ys, xs])
    np.testing.assert_array_equal(scan.array.compute(), ref)
    tile = scan.info.tile
    assert scan.array.chunks[0][0] % tile[0] == 0 and scan.array.chunks[2] == (ref.shape[2],)


def test_ome_pyramid_info(files: dict[str, str]) -> None:
    info = open_scan(files["ome"]).info
    assert info.levels == ((700, 900), (350, 450), (175, 225))
    assert info.downsamples == (1.0, 2.0, 4.0)
    assert info.mpp == (0.25, 0.25) and info.tile == (128, 128) and info.level == 0
    assert info.crs is None and info.geotransform is None
    low = open_scan(files["ome"], level=2)
    assert low.info.mpp == (1.0, 1.0) and low.info.shape == (175, 225, 3)
    np.testing.assert_array_equal(low.reader[10:99, 7:200], RGB[::4, ::4][10:99, 7:200])
    assert json.loads(json.dumps(info.to_dict()))["levels"][1] == [350, 450]


def test_svs_mpp_and_level_selection(files: dict[str, str]) -> None:
    scan = open_scan(files["svs"])
    assert scan.info.levels == ((700, 900), (350, 450), (175, 225))  # thumbnail excluded
    assert scan.info.mpp == (0.5, 0.5)
    assert open_scan(files["svs"], mpp=1.1).info.level == 1
    picked = open_scan(files["svs"], mpp=1.9)
    assert picked.info.level == 2 and picked.info.mpp == (2.0, 2.0)
    np.testing.assert_array_equal(picked.array.compute(), RGB[::4, ::4])
    with pytest.raises(ValueError, match="either level or mpp"):
        open_scan(files["svs"], level=1, mpp=1.0)


def test_geotiff_crs_and_transform(files: dict[str, str]) -> None:
    info = open_scan(files["geo"]).info
    assert info.crs == "EPSG:32633" and info.dtype == "uint16" and info.shape == (300, 520, 4)
    assert info.geotransform == (500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0)
    assert info.levels == ((300, 520), (150, 260)) and info.mpp is None
    low = open_scan(files["geo"], level=1)
    assert low.info.geotransform == (500000.0, 20.0, 0.0, 5000000.0, 0.0, -20.0)
    np.testing.assert_array_equal(low.reader[5:150, 33:77], _halve(GEO)[5:150, 33:77])


def test_gray_planar_and_resolution_units(files: dict[str, str]) -> None:
    gray = open_scan(files["gray"]).info
    assert gray.shape == (301, 403, 1) and gray.mpp == (0.5, 0.5) and gray.tile == (16, 403)
    assert open_scan(files["planar"]).info.shape == (260, 330, 3)
    assert open_scan(files["inch"]).info.mpp is None  # 72 dpi default is not a pixel size
    with pytest.raises(ValueError, match="no pixel size"):
        open_scan(files["inch"], mpp=0.5)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_errors(files: dict[str, str], tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        open_scan(tmp_path / "missing.tif")
    assert _one_line(exc) == f"no such file: {tmp_path / 'missing.tif'}"
    data = Path(files["ome"]).read_bytes()
    (tmp_path / "trunc.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as exc:
        open_scan(tmp_path / "trunc.tif")
    assert _one_line(exc).startswith(f"cannot read {tmp_path / 'trunc.tif'}: ")
    (tmp_path / "text.tif").write_text("hello, this is not an image\n")
    with pytest.raises(ValueError) as exc:
        open_scan(tmp_path / "text.tif")
    assert _one_line(exc).startswith(f"cannot read {tmp_path / 'text.tif'}: ")
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read"):
        open_scan(tmp_path / "empty.tif")
    with pytest.raises(ValueError) as exc:
        open_scan(files["ome"], level=3)
    assert "0 (700x900), 1 (350x450), 2 (175x225)" in _one_line(exc)
    with pytest.raises(TypeError):
        open_scan(42)
    with pytest.raises(ValueError, match="shape"):
        open_scan(np.zeros((2, 3, 4, 5)))


def test_reader_and_graph_pickle(files: dict[str, str]) -> None:
    scan = open_scan(files["ome"], chunk=256)
    clone = pickle.loads(pickle.dumps(scan.reader))
    assert isinstance(clone, TiffLevelReader) and "_h" not in clone.__dict__
    np.testing.assert_array_equal(clone[100:300, 250:260], RGB[100:300, 250:260])
    graph = dict(scan.array.__dask_graph__())
    assert pickle.loads(pickle.dumps(graph)).keys() == graph.keys()


def test_distributed_process_worker_reads_by_path(files: dict[str, str]) -> None:
    distributed = pytest.importorskip("distributed")
    scan = open_scan(files["ome"], level=1, chunk=128)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None, death_timeout=30) as cluster, \
            distributed.Client(cluster, timeout=30) as client:
        assert client.submit(os.getpid).result(timeout=30) != os.getpid()
        out = client.compute(scan.array[20:300, 31:400]).result(timeout=60)
        window = client.submit(scan.reader.__getitem__, (slice(5, 77), slice(9, 300)))
        win = window.result(timeout=60)
    half = _halve(RGB)
    np.testing.assert_array_equal(out, half[20:300, 31:400])
    np.testing.assert_array_equal(win, half[5:77, 9:300])


def test_array_inputs() -> None:
    gray = RNG.random((50, 70)).astype(np.float32)
    scan = open_scan(gray)
    assert scan.info.shape == (50, 70, 1) and scan.info.source == "<numpy array>"
    np.testing.assert_array_equal(scan.array.compute()[..., 0], gray)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(scan.reader))[3:9, 4:5, :],
                                  gray[3:9, 4:5, None])
    z = zarr.create_array(store={}, shape=(64, 80, 3), chunks=(32, 32, 3), dtype="uint8")
    z[:] = RGB[:64, :80]
    zs = open_scan(z)
    assert zs.info.source == "<zarr array>" and zs.info.tile == (32, 32)
    np.testing.assert_array_equal(zs.reader[10:50, 7:71], RGB[10:50, 7:71])
    d = da.from_array(RGB[:64, :80, 0], chunks=16)
    ds = open_scan(d)
    assert ds.reader is None and ds.info.shape == (64, 80, 1) and ds.info.source == "<dask array>"
    np.testing.assert_array_equal(ds.array.compute()[..., 0], RGB[:64, :80, 0])
    with pytest.raises(ValueError, match="no pixel size"):
        open_scan(gray, mpp=1.0)
    with pytest.raises(ValueError, match="level 1"):
        open_scan(d, level=1)


def test_zarr_and_ome_zarr_paths(tmp_path) -> None:
    plain = zarr.create_array(tmp_path / "plain.zarr", shape=(40, 30, 2), chunks=(16, 16, 2),
                              dtype="uint16")
    plain[:] = GEO[:40, :30, :2]
    scan = open_scan(tmp_path / "plain.zarr")
    assert scan.info.shape == (40, 30, 2) and scan.info.tile == (16, 16)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(scan.reader))[3:33, 5:6],
                                  GEO[3:33, 5:6, :2])
    group = zarr.open_group(tmp_path / "ome.zarr", mode="w", zarr_format=3)
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]
    datasets = []
    for lvl, img in enumerate([RGB[:128, :96], RGB[:128:2, :96:2]]):
        arr = group.create_array(str(lvl), shape=(3, *img.shape[:2]), chunks=(3, 32, 32),
                                 dtype="uint8")
        arr[:] = img.transpose(2, 0, 1)
        datasets.append({"path": str(lvl), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 0.5 * 2**lvl, 0.5 * 2**lvl]}]})
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    ome = open_scan(tmp_path / "ome.zarr", mpp=1.0)
    assert ome.info.level == 1 and ome.info.levels == ((128, 96), (64, 48))
    assert ome.info.mpp == (1.0, 1.0) and ome.info.shape == (64, 48, 3)
    np.testing.assert_array_equal(ome.array.compute(), RGB[:128:2, :96:2])


def test_scaninfo_is_frozen() -> None:
    info = open_scan(np.zeros((4, 4, 3), np.uint8)).info
    assert isinstance(info, ScanInfo)
    with pytest.raises(AttributeError):
        info.level = 1  # type: ignore[misc]
