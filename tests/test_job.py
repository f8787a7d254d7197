"""Writing heatmaps: GeoTIFF georeferencing, interrupted runs and --resume, coordinates."""

import numpy as np
import pytest
import zarr
from models_zoo import strided, whole_image_output

from tilefcn.geometry import Geometry
from tilefcn.job import heatmap_geotransform, heatmap_transform, run
from tilefcn.read import open_scan
from tilefcn.sinks import ZarrSink
from tilefcn.synthetic import write_scene


def test_geotiff_output_is_georeferenced_and_exact(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    scene = write_scene(tmp_path / "scene.tif", (300, 260), seed=4, pixel_size=10.0)
    model = strided(4, 3)
    image = open_scan(scene.image).array.compute()
    out = tmp_path / "heat.tif"
    summary = run(scene.image, model, out, tile=96, device="cpu")
    expected = whole_image_output(model, image)
    assert summary.shape == expected.shape
    with rasterio.open(out) as src:
        assert src.count == 3 and src.dtypes[0] == "float32"
        assert src.crs.to_epsg() == 32633
        np.testing.assert_allclose(src.read(), expected, rtol=0, atol=1e-5)
        transform = tuple(src.transform)[:6]
    geo = heatmap_geotransform(open_scan(scene.image).info, model_geometry(model))
    x0, px, _, y0, _, py = geo
    assert transform == pytest.approx((px, 0, x0, 0, py, y0))
    assert px == 10.0 * 12  # stride 2·3·2 × 10 m


def model_geometry(model):
    from tilefcn.measure import measure_geometry

    return measure_geometry(model, 4)


def test_heatmap_pixel_centres_sit_on_receptive_field_centres():
    g = Geometry((60, 60), (8, 8), (-4, -4))
    scale, translation = heatmap_transform(g, 0)
    assert (scale, translation) == (8.0, -4 + 59 / 2)  # output 0 sees rows [-4, 56)


def test_interrupted_run_resumes_to_the_same_heatmap(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (200, 260, 3), dtype=np.uint8)
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
        run(image, model, out, tile=64, device="cpu", workers=1)
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["tilefcn"]["status"] == "running"  # never looks complete
    with pytest.raises(FileExistsError):
        run(image, model, out, tile=64, device="cpu")
    monkeypatch.setattr(ZarrSink, "__call__", real_write)
    summary = run(image, model, out, tile=64, device="cpu", resume=True)
    # 17×22 outputs, 6 per chunk (tile 64 → 72 px on the alignment grid of 12)
    assert summary.tiles_skipped == 3 and summary.tiles == 12
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["tilefcn"]["status"] == "complete"
    np.testing.assert_allclose(group["0"][:], whole_image_output(model, image), atol=1e-5)
