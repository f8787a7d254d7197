"""pipelines/medical/run.sh end to end on a small generated slide: the heatmap equals the tissue
model on the whole slide where computed (--mask auto), the preview exists, and the GeoJSON
regions rasterise back to the argmax of the heatmap."""

from __future__ import annotations

import json

import numpy as np
import shapely.geometry
import zarr
from affine import Affine
from models_zoo import whole_image_output
from rasterio.features import rasterize
from recipes import run_recipe
from scipy import ndimage

from tilefcn.regions import pixel_transform


def test_recipe_writes_heatmap_preview_and_qupath_regions(tmp_path) -> None:
    import tifffile

    from tilefcn.modelio import load_model

    lines = run_recipe("medical", tmp_path)
    regions = tmp_path / "slide.regions.geojson"
    assert lines[-1] == str(regions)
    assert (tmp_path / "slide.heatmap.preview.png").is_file()

    group = zarr.open_group(str(tmp_path / "slide.heatmap.zarr"), mode="r")
    attrs = dict(group.attrs["tilefcn"])
    assert attrs["status"] == "complete" and attrs["masked_tiles"] > 0  # glass skipped
    heat = group["0"][:]
    model = load_model("tissue")
    image = tifffile.imread(tmp_path / "slide.ome.tif", level=0)
    whole = whole_image_output(model, image)
    nan = np.isnan(heat)
    assert whole.shape == heat.shape and nan.any() and not nan.all()
    np.testing.assert_allclose(heat[~nan], whole[~nan], rtol=0, atol=1e-5)

    features = json.loads(regions.read_text())["features"]
    labels = np.argmax(np.nan_to_num(heat, nan=-np.inf), axis=0)
    valid = ~nan.all(axis=0)
    a, b, c, d, e, f = pixel_transform(attrs)
    for i, name in ((1, "tissue"), (2, "dense")):
        geoms = [shapely.geometry.shape(ft["geometry"]) for ft in features
                 if ft["properties"]["classification"]["name"] == name]
        assert all(ft["properties"]["objectType"] == "annotation" for ft in features)
        expected = (labels == i) & valid
        assert len(geoms) == ndimage.label(expected)[1] > 0
        got = rasterize([(g, 1) for g in geoms], out_shape=expected.shape,
                        transform=Affine(a, b, c, d, e, f), dtype="uint8")
        np.testing.assert_array_equal(got.astype(bool), expected)
    assert {ft["properties"]["classification"]["name"] for ft in features} == {"tissue", "dense"}
