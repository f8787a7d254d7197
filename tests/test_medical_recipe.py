"""pipelines/medical/run.sh end to end on a small generated slide: the heatmap equals the tissue
model on the whole slide where computed (--mask auto), the preview exists, and the GeoJSON
regions rasterise back to the argmax of the heatmap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import shapely.geometry
import zarr
from affine import Affine
from rasterio.features import rasterize
from scipy import ndimage

from tilefcn.regions import pixel_transform

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "medical" / "run.sh"


def test_recipe_writes_heatmap_preview_and_qupath_regions(tmp_path) -> None:
    import tifffile
    import torch

    from tilefcn.modelio import load_model
    from tilefcn.runtime.scaling import scale_input

    env = {**os.environ, "WORK": str(tmp_path), "SIZE": "512",
           "TILEFCN_ARGS": "--tile 128 --workers 2 -q",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(RECIPE)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    regions = tmp_path / "slide.regions.geojson"
    assert done.stdout.strip().splitlines()[-1] == str(regions)
    assert (tmp_path / "slide.heatmap.preview.png").is_file()

    group = zarr.open_group(str(tmp_path / "slide.heatmap.zarr"), mode="r")
    attrs = dict(group.attrs["tilefcn"])
    assert attrs["status"] == "complete" and attrs["masked_tiles"] > 0  # glass skipped
    heat = group["0"][:]
    model = load_model("tissue")
    image = tifffile.imread(tmp_path / "slide.ome.tif", level=0)
    x = torch.from_numpy(scale_input(image, model.scaling)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        whole = model.module(x.contiguous())[0].numpy()
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
