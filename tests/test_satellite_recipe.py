"""pipelines/satellite/run.sh end to end on a small generated scene with a nodata swath edge:
a valid COG with the scene's CRS, class bands, NaN where the receptive-field centre is nodata,
and elsewhere the landcover model's output on the whole scene."""

from __future__ import annotations

import numpy as np
import pytest
from models_zoo import whole_image_output
from recipes import run_recipe

rasterio = pytest.importorskip("rasterio")
cogeo = pytest.importorskip("rio_cogeo.cogeo")


def test_recipe_writes_a_landcover_cog_with_nan_outside_the_swath(tmp_path):
    from tilefcn.modelio import load_model

    lines = run_recipe("satellite", tmp_path)
    out = tmp_path / "scene.landcover.tif"
    assert lines[-1] == str(out)
    valid, errors, _ = cogeo.cog_validate(str(out), quiet=True)
    assert valid, errors
    model = load_model("landcover")
    with rasterio.open(tmp_path / "scene.tif") as src:
        image = src.read().transpose(1, 2, 0)
        scene_crs, nodata = src.crs, src.nodata
    with rasterio.open(out) as heat:
        assert heat.crs == scene_crs and heat.crs.to_epsg() == 32633
        assert heat.descriptions == tuple(model.classes) and np.isnan(heat.nodata)
        got = heat.read()
    assert nodata == 0 and (image == 0).all(axis=-1).any()
    expected = whole_image_output(model, image)
    assert got.shape == expected.shape
    nan = np.isnan(got)
    assert 0.05 < nan[0].mean() < 0.6 and (nan == nan[:1]).all()  # NaN in every band alike
    assert not nan[:, got.shape[1] // 2, got.shape[2] // 2].any()  # the swath's middle
    np.testing.assert_allclose(got[~nan], expected[~nan], rtol=0, atol=1e-5)
