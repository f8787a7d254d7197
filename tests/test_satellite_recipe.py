"""pipelines/satellite/run.sh end to end on a small generated scene with a nodata swath edge:
a valid COG with the scene's CRS, class bands, NaN where the receptive-field centre is nodata,
and elsewhere the landcover model's output on the whole scene."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
cogeo = pytest.importorskip("rio_cogeo.cogeo")

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "satellite" / "run.sh"


def _whole_scene(model, image: np.ndarray) -> np.ndarray:
    import torch

    from tilefcn.runtime.scaling import scale_input

    x = torch.from_numpy(scale_input(image, model.scaling)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        return model.module(x.contiguous())[0].numpy()


def test_recipe_writes_a_landcover_cog_with_nan_outside_the_swath(tmp_path):
    from tilefcn.modelio import load_model

    env = {**os.environ, "WORK": str(tmp_path), "SIZE": "512",
           "TILEFCN_ARGS": "--tile 128 --workers 2 -q",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(RECIPE)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "scene.landcover.tif"
    assert done.stdout.strip().splitlines()[-1] == str(out)
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
    expected = _whole_scene(model, image)
    assert got.shape == expected.shape
    nan = np.isnan(got)
    assert 0.05 < nan[0].mean() < 0.6 and (nan == nan[:1]).all()  # NaN in every band alike
    assert not nan[:, got.shape[1] // 2, got.shape[2] // 2].any()  # the swath's middle
    np.testing.assert_allclose(got[~nan], expected[~nan], rtol=0, atol=1e-5)
