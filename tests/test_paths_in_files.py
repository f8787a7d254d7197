"""Paths written inside model files and heatmap stores are never followed: a bundle reads
only its own ``model.json`` and ``weights.safetensors``, whatever its fields say, and a
store's attributes (source paths, dataset paths) never make tilefcn read or write elsewhere."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from tilefcn import modelio
from tilefcn.cli import main
from tilefcn.models import BUNDLED_DIR


@pytest.fixture()
def bundle(tmp_path):
    path = tmp_path / "models" / "mine"
    shutil.copytree(BUNDLED_DIR / "tissue", path)
    return path


def test_bundle_fields_that_look_like_paths_are_not_followed(bundle, tmp_path, monkeypatch):
    secret = tmp_path / "secret.safetensors"
    shutil.copy(bundle / "weights.safetensors", secret)
    meta = json.loads((bundle / "model.json").read_text())
    meta.update(weights=str(secret), path="../../secret.safetensors", name="../../escape")
    (bundle / "model.json").write_text(json.dumps(meta))
    opened = []
    real = modelio.load_file
    monkeypatch.setattr(modelio, "load_file", lambda p, *a, **k: opened.append(p) or
                        real(p, *a, **k))
    model = modelio.load_model(str(bundle))
    assert opened == [str(bundle / "weights.safetensors")]
    assert model.in_channels == 3
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("architecture", ["os:system", "../../evil", "/abs/module.py"])
def test_an_architecture_is_a_registered_name_never_an_import(bundle, architecture):
    meta = json.loads((bundle / "model.json").read_text())
    meta["architecture"] = architecture
    (bundle / "model.json").write_text(json.dumps(meta))
    with pytest.raises(modelio.ModelFileError, match="unknown architecture"):
        modelio.load_model(str(bundle))


def test_store_attributes_with_foreign_paths_are_only_compared(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    scan = tmp_path / "work" / "scan.tif"
    scan.parent.mkdir()
    tifffile.imwrite(scan, image, tile=(64, 64), photometric="rgb")
    out = tmp_path / "work" / "heat.zarr"
    assert CliRunner().invoke(main, ["run", str(scan), "--out", str(out), "-q"]).exit_code == 0
    group = zarr.open_group(str(out), mode="r+")
    attrs = dict(group.attrs["tilefcn"])
    attrs["identity"]["source"]["path"] = "/etc/passwd"
    attrs["source"]["source"] = "../../outside.tif"
    attrs["status"] = "running"
    ome = dict(group.attrs["ome"])
    ome["multiscales"][0]["datasets"][0]["path"] = "../../outside"
    group.attrs.put({"tilefcn": attrs, "ome": ome})
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, ["run", str(scan), "--out", str(out), "-q", "--resume"])
    assert result.exit_code == 2 and "another source" in result.output, result.output
    again = CliRunner().invoke(main, ["run", str(scan), "--out", str(out), "-q",
                                      "--overwrite"])
    assert again.exit_code == 0, again.output  # replaced in place, nothing outside touched
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path / "outside").exists() and not (tmp_path.parent / "outside").exists()
