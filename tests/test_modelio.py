"""Model files: bundles, ExportedPrograms, TorchScript, factories; pickles are refused."""

import pickle
import sys
import warnings

import numpy as np
import pytest
import torch
from models_zoo import convolutionalized, padded, upsampling

from tilefcn.modelio import ModelFileError, Scaling, load_model, save_bundle, save_exported
from tilefcn.models import patch_classifier, small_fcn


def _same_output(a: torch.nn.Module, b: torch.nn.Module, size=(3, 70, 90)) -> None:
    x = torch.rand(1, *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        np.testing.assert_allclose(a(x).numpy(), b(x).numpy(), rtol=0, atol=1e-6)


def test_bundle_round_trip(tmp_path):
    torch.manual_seed(0)
    module = small_fcn(3, 2, width=8).eval()
    save_bundle(tmp_path / "b", module, architecture="small_fcn",
                kwargs={"in_channels": 3, "classes": 2, "width": 8}, classes=["a", "b"],
                in_channels=3, scaling=Scaling("dtype", (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)))
    model = load_model(tmp_path / "b")
    _same_output(module, model.module)
    assert model.classes == ("a", "b")
    assert model.scaling.mean == (0.5, 0.5, 0.5)
    assert model.geometry.stride == (4, 4)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "model.json", "weights.safetensors"]


def test_convolutionalized_bundle_with_probabilities(tmp_path):
    from tilefcn.convert import convolutionalize

    torch.manual_seed(0)
    classifier = patch_classifier(3, 3, width=4, hidden=8).eval()
    fcn = convolutionalize(classifier, 64).eval()
    save_bundle(tmp_path / "c", fcn, architecture="patch_classifier",
                kwargs={"in_channels": 3, "classes": 3, "width": 4, "hidden": 8},
                classes=["x", "y", "z"], in_channels=3, patch_size=(64, 64),
                convolutionalized=True, probabilities=True)
    model = load_model(str(tmp_path / "c"))
    patch = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = torch.softmax(classifier(patch), dim=1)
        np.testing.assert_allclose(model.module(patch)[:, :, 0, 0], expected, atol=1e-6)
    assert model.patch_size == (64, 64)


def test_exported_program_round_trip_any_tile_size(tmp_path):
    model = load_model(upsampling(3))
    path = save_exported(tmp_path / "m.pt2", model)
    loaded = load_model(path)
    assert loaded.geometry == model.geometry
    assert loaded.classes == model.classes
    for size in [(3, 64, 80), (3, 131, 77)]:
        _same_output(model.module, loaded.module, size)


def test_torchscript_legacy_file(tmp_path):
    module = padded(3)
    path = tmp_path / "m.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(module, torch.rand(1, 3, 64, 64)), str(path))
    loaded = load_model(path)
    _same_output(module, loaded.module)
    assert loaded.geometry.stride == (4, 4)


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/tilefcn-pwned-marker", "w"))


@pytest.mark.parametrize("payload", ["module", "state_dict", "evil"])
def test_pickle_checkpoints_are_refused_never_executed(tmp_path, payload):
    marker = "/tmp/tilefcn-pwned-marker"
    path = tmp_path / "ckpt.pt"
    if payload == "module":
        torch.save(padded(3), path)
    elif payload == "state_dict":
        torch.save(padded(3).state_dict(), path)
    else:
        torch.save({"x": _Boom()}, path)
        import os

        if os.path.exists(marker):
            os.remove(marker)
    with pytest.raises(ModelFileError, match="pickled PyTorch checkpoint"):
        load_model(path)
    if payload == "evil":
        import os

        assert not os.path.exists(marker)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ModelFileError):
        load_model(raw)


def test_factory_spec_and_unknown_names(tmp_path, monkeypatch):
    (tmp_path / "my_factory.py").write_text(
        "from torch import nn\n"
        "def build():\n    return nn.Sequential(nn.Conv2d(3, 2, 5), nn.ReLU())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("my_factory:build")
    assert model.spec == "my_factory:build" and model.geometry.receptive_field == (5, 5)
    with pytest.raises(ModelFileError, match="no such model"):
        load_model("does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="not a model bundle"):
        load_model(tmp_path / "empty")
    sys.modules.pop("my_factory", None)


def test_non_local_models_are_refused_naming_the_layer():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match="GroupNorm"):
        load_model(net)


def test_in_memory_model_describes_itself():
    model = load_model(convolutionalized(3))
    info = model.describe()
    assert info["in_channels"] == 3 and info["classes"] == ["class0", "class1"]
    assert info["geometry"]["stride"] == [8, 8] and info["parameters"] > 0
    assert len(model.sha256) == 64
