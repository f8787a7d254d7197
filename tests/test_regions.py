"""GeoJSON export of heatmap regions (tilefcn.regions, `tilefcn export`): read back with shapely
and rasterio, compared with the thresholded / argmax whole heatmap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
import shapely.geometry
from affine import Affine
from click.testing import CliRunner
from rasterio.features import rasterize
from scipy import ndimage

from tilefcn.cli import main
from tilefcn.geometry import Geometry
from tilefcn.regions import export_geojson, pixel_transform
from tilefcn.write import create_ome_zarr, finish_ome_zarr

GEOMETRY = Geometry(receptive_field=(20, 20), stride=(4, 4), offset=(-6, -6))
CLASSES = ["background", "tissue", "tumour"]
FOUR = ndimage.generate_binary_structure(2, 1)


def _heatmap(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Smooth random class probabilities (softmax of blurred noise), ``(3, h, w)``."""
    logits = ndimage.gaussian_filter(rng.normal(size=(3, *shape)), (0, 3, 3)) * 12
    e = np.exp(logits - logits.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float32)


def _store(path, data, *, chunks=(32, 32), dtype="float32", source=None):
    attrs = {"classes": CLASSES, "geometry": GEOMETRY.to_dict(),
             "source": source or {"level": 1, "downsamples": [1.0, 2.0], "crs": None,
                                  "geotransform": None}}
    array = create_ome_zarr(path, shape=data.shape, chunks=chunks, scale=(4.0, 4.0),
                            translation=(0.0, 0.0), unit=None, attrs=attrs, dtype=dtype)
    array[:] = data if dtype != "uint8" else np.round(data * 255).astype(np.uint8)
    finish_ome_zarr(path, min_size=16)
    return path


def _features(path):
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    return data, data["features"]


def _raster(features, name, shape, transform):
    """Rasterise the polygons of class ``name`` onto the heatmap grid (level-0 scan coords)."""
    geoms = [shapely.geometry.shape(f["geometry"]) for f in features
             if f["properties"]["classification"]["name"] == name]
    assert all(g.is_valid and g.geom_type == "Polygon" for g in geoms)
    a, b, c, d, e, f = transform
    if not geoms:
        return np.zeros(shape, bool), 0
    out = rasterize([(g, 1) for g in geoms], out_shape=shape, transform=Affine(a, b, c, d, e, f),
                    fill=0, dtype="uint8", merge_alg=__import__("rasterio").enums.MergeAlg.add)
    return out, len(geoms)


def test_argmax_regions_equal_the_whole_heatmap_and_cross_seams_once(tmp_path) -> None:
    data = _heatmap(np.random.default_rng(3), (150, 170))  # 5 × 6 blocks of 32, ragged edges
    data[:, 40:60, 100:130] = np.nan  # a masked hole: no class there
    store = _store(tmp_path / "h.zarr", data)
    out = tmp_path / "regions.geojson"
    summary = export_geojson(store, out, block=32)
    collection, features = _features(out)
    assert "crs" not in collection
    transform = pixel_transform({"geometry": GEOMETRY.to_dict(),
                                 "source": {"level": 1, "downsamples": [1.0, 2.0]}})
    # heatmap pixel u covers scan level-1 [o + (r-s)/2 + s·u, …) = [2 + 4u, …), level 0 × 2
    assert transform == (8.0, 0.0, 4.0, 0.0, 8.0, 4.0)
    thirds = pixel_transform({"geometry": GEOMETRY.to_dict(),  # --mpp: level 1 averaged × 3
                              "source": {"level": 1, "downsamples": [1.0, 2.0], "factor": 3}})
    assert thirds == (24.0, 0.0, 12.0, 0.0, 24.0, 12.0)
    labels = np.argmax(np.nan_to_num(data, nan=-np.inf), axis=0)
    valid = ~np.isnan(data).all(axis=0)
    for i, name in enumerate(CLASSES):
        expected = (labels == i) & valid
        raster, count = _raster(features, name, expected.shape, transform)
        np.testing.assert_array_equal(raster, expected)  # no overlaps (add ≤ 1), no gaps
        assert count == ndimage.label(expected, FOUR)[1] == summary.polygons[name]
        assert count > 0
    f = features[0]["properties"]
    assert f["objectType"] == "annotation" and len(f["classification"]["color"]) == 3


def test_one_region_across_many_seams_is_one_polygon_with_its_hole(tmp_path) -> None:
    yy, xx = np.mgrid[:200, :200]
    r = np.hypot(yy - 100, xx - 97)
    p = np.where((r < 80) & (r > 20), 0.9, 0.1).astype(np.float32)  # a ring over 7 × 7 blocks
    data = np.stack([1 - p, p, np.zeros_like(p)])
    store = _store(tmp_path / "ring.zarr", data, chunks=(16, 16), dtype="uint8")
    out = tmp_path / "ring.json"
    export_geojson(store, out, classes=["tissue"], threshold=0.5, block=30)
    _, features = _features(out)
    assert len(features) == 1
    ring = shapely.geometry.shape(features[0]["geometry"])
    assert len(ring.interiors) == 1
    assert ring.area == pytest.approx(((r < 80) & (r > 20)).sum() * 8.0 * 8.0)
    # no leftover seam vertices: every vertex is a corner of the pixel outline
    coords = np.asarray(ring.exterior.coords)[:-1]
    prev, nxt = np.roll(coords, 1, axis=0), np.roll(coords, -1, axis=0)
    cross = ((coords - prev)[:, 0] * (nxt - coords)[:, 1]
             - (coords - prev)[:, 1] * (nxt - coords)[:, 0])
    assert np.all(cross != 0)


def test_threshold_regions_overlap_and_crs_coordinates(tmp_path) -> None:
    data = _heatmap(np.random.default_rng(5), (70, 90))
    source = {"level": 0, "downsamples": [1.0], "crs": "EPSG:32633",
              "geotransform": [500000.0, 10.0, 0.0, 4200000.0, 0.0, -10.0]}
    store = _store(tmp_path / "geo.zarr", data, source=source)
    out = tmp_path / "geo.geojson"
    summary = export_geojson(store, out, threshold=0.2, crs=True, block=24)
    collection, features = _features(out)
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    assert summary.crs == "EPSG:32633"
    transform = pixel_transform({"geometry": GEOMETRY.to_dict(), "source": source}, crs=True)
    # corner u = 0 is scan pixel x = 2 → 500000 + 10·2; one heatmap pixel is 4 scan px = 40 m
    assert transform == (40.0, 0.0, 500020.0, 0.0, -40.0, 4199980.0)
    for i, name in enumerate(CLASSES):
        expected = data[i] >= 0.2
        raster, count = _raster(features, name, expected.shape, transform)
        np.testing.assert_array_equal(raster, expected)
        assert count == ndimage.label(expected, FOUR)[1]
    with pytest.raises(ValueError, match="georeferenced"):
        export_geojson(_store(tmp_path / "plain.zarr", data), tmp_path / "x.geojson", crs=True)


def test_export_cli_refuses_bad_input_and_existing_outputs(tmp_path) -> None:
    data = _heatmap(np.random.default_rng(1), (40, 40))
    store = _store(tmp_path / "h.zarr", data)
    out = tmp_path / "r.geojson"
    ok = CliRunner().invoke(main, ["export", str(store), "--geojson", str(out),
                                   "--class", "tumour", "--class", "tissue"])
    assert ok.exit_code == 0, ok.output
    assert "tumour" in ok.output and out.is_file()
    names = {f["properties"]["classification"]["name"] for f in _features(out)[1]}
    assert names <= {"tumour", "tissue"} and names
    before = out.read_bytes()
    running = tmp_path / "running.zarr"
    create_ome_zarr(running, shape=data.shape, chunks=(32, 32), scale=(4.0, 4.0),
                    translation=(0.0, 0.0), unit=None, attrs={"classes": CLASSES})
    cases = [
        ([str(running), "--geojson", str(tmp_path / "n.geojson")], "not complete"),
        ([str(store), "--geojson", str(out)], "exists"),
        ([str(store), "--geojson", str(tmp_path / "n.geojson"), "--class", "nope"], "unknown"),
        ([str(store), "--geojson", str(tmp_path / "n.geojson"), "--threshold", "1.5"], "1.5"),
        ([str(store), "--geojson", str(tmp_path / "n.txt")], ".geojson"),
        ([str(tmp_path / "missing.zarr"), "--geojson", str(tmp_path / "n.geojson")], "no such"),
    ]
    for args, text in cases:
        result = CliRunner().invoke(main, ["export", *args])
        assert result.exit_code == 2, (args, result.output)
        assert text in result.output and "Traceback" not in result.output
    assert out.read_bytes() == before and not (tmp_path / "n.geojson").exists()
    again = CliRunner().invoke(main, ["export", str(store), "--geojson", str(out), "--overwrite",
                                      "--level", "1"])
    assert again.exit_code == 0, again.output


def test_a_geotiff_heatmap_exports_the_regions_of_its_ome_zarr_twin(tmp_path) -> None:
    from tilefcn.job import run
    from tilefcn.synthetic import write_slide

    slide = write_slide(tmp_path / "s.ome.tif", (512, 512), seed=2)
    for name in ("h.zarr", "h.tif"):  # the bundled model: background, tissue and dense
        run(slide.image, "tissue", tmp_path / name, tile=256, device="cpu")
    zarr_export = export_geojson(tmp_path / "h.zarr", tmp_path / "z.geojson")
    tif_export = export_geojson(tmp_path / "h.tif", tmp_path / "t.geojson")
    assert sum(tif_export.polygons.values()) > 3
    assert tif_export.polygons == zarr_export.polygons
    assert _features(tmp_path / "t.geojson") == _features(tmp_path / "z.geojson")
    with pytest.raises(ValueError, match=r"--level 1 is not in the heatmap \(levels 0..0\)"):
        export_geojson(tmp_path / "h.tif", tmp_path / "t1.geojson", level=1)  # no overviews
    (tmp_path / "x.tif").write_bytes(b"not a tiff")
    with pytest.raises(ValueError, match="not a tilefcn GeoTIFF heatmap"):
        export_geojson(tmp_path / "x.tif", tmp_path / "x.geojson")
