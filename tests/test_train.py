"""Training: sampling arithmetic, a seconds-long run, the saved bundle, determinism, bad input,
the CLI command, and the bundled models."""

import json
import shutil

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import tilefcn
import tilefcn.modelio
import tilefcn.models
from tilefcn.cli import main
from tilefcn.modelio import load_model
from tilefcn.patch_sampling import (
    balanced_choice,
    centre_bounds,
    split_indices,
    window_candidates,
    window_grid,
)
from tilefcn.runtime.scaling import scale_input
from tilefcn.synthetic import SCENE_CLASSES, SLIDE_CLASSES, write_slide
from tilefcn.train import augment, centre_accuracy, train

TINY = {"epochs": 2, "samples_per_class": 200, "progress": False}


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("data") / "s.ome.tif", (1024, 1024), seed=7,
                       compression="jpeg", levels=1)


@pytest.fixture(scope="module")
def trained(slide, tmp_path_factory):
    return train([(slide.image, slide.mask)], tmp_path_factory.mktemp("out") / "b", **TINY)


# -- pure arithmetic -------------------------------------------------------------------------

def test_window_grid_covers_the_image_once():
    grid = window_grid((1100, 700), 512)
    cover = np.zeros((1100, 700), int)
    for y, x, h, w in grid:
        cover[y:y + h, x:x + w] += 1
    assert (cover == 1).all() and len(grid) == 6


def test_candidates_are_centres_of_patches_inside_the_scan():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (100, 120)).astype(np.uint8)
    shape, patch = (160, 150), 64
    ylo, yhi, xlo, xhi = centre_bounds(shape, patch)
    assert (ylo, yhi - 1) == (31, 160 - 64 + 31)
    found = window_candidates(labels, (60, 30, 100, 120), shape, patch, 10**6, rng)
    assert sorted(found) == [0, 1, 2]
    for k, cands in found.items():
        ys, xs = cands.T
        assert (labels[ys - 60, xs - 30] == k).all()
        assert ys.min() >= ylo and ys.max() < yhi and xs.min() >= xlo and xs.max() < xhi
        tops = ys - (patch - 1) // 2
        assert tops.min() >= 0 and tops.max() + patch <= shape[0]
    capped = window_candidates(labels, (60, 30, 100, 120), shape, patch, 5, rng)
    assert [len(c) for c in capped.values()] == [5, 5, 5]


def test_balanced_choice_and_split():
    rng = np.random.default_rng(1)
    picks = balanced_choice([3, 1000], 10, rng)
    assert [len(p) for p in picks] == [10, 10]
    assert len(set(picks[1])) == 10 and set(picks[0]) <= {0, 1, 2}
    tr, va = split_indices(100, 0.2, rng)
    assert len(va) == 20 and len(tr) == 80 and not set(tr) & set(va)


def test_augment_keeps_values_without_jitter():
    rng = np.random.default_rng(2)
    batch = rng.random((8, 16, 16, 3), dtype=np.float32)
    out = augment(batch, rng, jitter=False)
    for a, b in zip(batch, out, strict=True):
        assert np.allclose(np.sort(a.ravel()), np.sort(b.ravel()))


def test_centre_accuracy_counts_only_uniform_neighbourhoods():
    labels = np.zeros((64, 64), np.uint8)
    labels[:, 32:] = 1
    pred = np.zeros((8, 8), int)  # stride 8, offset 0, rf 8: centres at 8i + 3
    pred[:, 4:] = 1
    pred[0, 0] = 1  # one wrong pixel of class 0
    acc, per, counts = centre_accuracy(pred, labels, (8, 8), (0, 0), (8, 8), 2, radius=3)
    assert counts == [32, 32]  # columns 0-3 and 4-7 are all > 3 px from the boundary at 32
    assert per == [31 / 32, 1.0] and acc == 63 / 64


# -- training ---------------------------------------------------------------------------------

def test_tiny_run_beats_chance_and_writes_a_bundle(trained, slide):
    assert trained.val_accuracy > 0.6
    assert set(trained.per_class_accuracy) == set(SLIDE_CLASSES)
    assert trained.samples == 600 and trained.epochs == 2
    meta = json.loads((trained.bundle / "model.json").read_text())
    card = meta["card"]
    assert card["training_data"][0]["image"] == "s.ome.tif"
    assert len(card["training_data"][0]["sha256"]) == 64
    assert len(card["training_data"][0]["mask_sha256"]) == 64
    assert card["samples"] == {"train": 480, "val": 120, "per_class": 200}
    assert meta["classes"] == list(SLIDE_CLASSES)  # names read from the synthetic mask
    assert len(meta["scaling"]["mean"]) == 3


def test_bundle_loads_by_path_and_by_name(trained, tmp_path, monkeypatch):
    model = load_model(trained.bundle)
    assert model.classes == SLIDE_CLASSES and model.in_channels == 3
    assert model.geometry.receptive_field == (64, 64) and model.geometry.stride == (8, 8)
    shutil.copytree(trained.bundle, tmp_path / "mine")
    monkeypatch.setattr(tilefcn.models, "BUNDLED_DIR", tmp_path)
    monkeypatch.setattr(tilefcn.modelio, "BUNDLED_DIR", tmp_path)
    by_name = load_model("mine")
    assert by_name.sha256 == model.sha256 and by_name.spec == "mine"


def test_dense_output_equals_classifier_on_every_patch(trained):
    model = load_model(trained.bundle)
    classifier = trained.classifier.eval()
    image = np.random.default_rng(3).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    x = torch.from_numpy(scale_input(image, model.scaling)).permute(2, 0, 1)[None]
    (oy, ox), (sy, sx), (ry, rx) = (model.geometry.offset, model.geometry.stride,
                                    model.geometry.receptive_field)
    with torch.inference_mode():
        dense = model.module(x)[0]
        n_i, n_j = dense.shape[1:]
        assert (n_i, n_j) == ((200 - 64) // 8 + 1,) * 2
        patches = torch.cat([x[:, :, oy + sy * i:oy + sy * i + ry, ox + sx * j:ox + sx * j + rx]
                             for i in range(n_i) for j in range(n_j)])
        expected = torch.softmax(classifier(patches), dim=1).T.reshape(-1, n_i, n_j)
    np.testing.assert_allclose(dense.numpy(), expected.numpy(), rtol=0, atol=1e-5)


def test_same_seed_same_weights(slide, tmp_path):
    quick = {**TINY, "epochs": 1, "samples_per_class": 60}
    runs = [train([(slide.image, slide.mask)], tmp_path / f"r{i}", seed=seed, **quick)
            for i, seed in enumerate((5, 5, 6))]
    first, second, third = (load_file(str(r.bundle / "weights.safetensors")) for r in runs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert runs[0].val_accuracy == runs[1].val_accuracy
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_bad_inputs(slide, tmp_path):
    pair = (slide.image, slide.mask)
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.zeros((512, 512), np.uint8))
    deep = tmp_path / "deep.tif"
    tifffile.imwrite(deep, np.zeros((1024, 1024, 3), np.uint16), tile=(256, 256))
    cases = [
        ([(slide.image, small)], {}, r"mask .*small.tif is \(512, 512\) but image"),
        ([(slide.image, slide.image)], {}, "has 3 channels; expected a single-channel"),
        ([pair], {"classes": [*SLIDE_CLASSES, "necrosis"]}, "no pixels of class 'necrosis'"),
        ([(slide.image,)], {}, r"expected \(image, mask\) pairs"),
        ([], {}, "no \\(image, mask\\) pairs given"),
        ([pair], {"patch": 60}, "patch must be a multiple of 8"),
        ([pair, (deep, slide.mask)], {}, "has 3 uint16 channel.s. but .* has 3 uint8"),
    ]
    for pairs, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            train(pairs, tmp_path / "out", **{**TINY, **kwargs})
    with pytest.raises(FileNotFoundError):
        train([(tmp_path / "missing.tif", slide.mask)], tmp_path / "out", **TINY)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        train([pair], tmp_path / "full", **TINY)
    assert not (tmp_path / "out").exists()


def test_cli_train(slide, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-bundle"
    args = ["train", str(slide.image), str(slide.mask), "--out", str(out), "--epochs", "1",
            "--samples-per-class", "40", "--classes", "bg,tissue,dense", "--seed", "3"]
    result = runner.invoke(main, [*args, "-q"])
    assert result.exit_code == 0, result.output
    assert "Validation accuracy" in result.output and str(out) in result.output
    assert load_model(out).classes == ("bg", "tissue", "dense")
    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "not empty" in again.output
    result = runner.invoke(main, [*args, "--overwrite"])
    assert result.exit_code == 0 and "epoch 1/1: loss" in result.output
    odd = runner.invoke(main, ["train", str(slide.image), "--out", str(tmp_path / "x")])
    assert odd.exit_code == 2 and "expected IMAGE MASK pairs, got 1 paths" in odd.output


# -- bundled models ---------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "channels", "classes"),
                         [("tissue", 3, SLIDE_CLASSES), ("landcover", 4, SCENE_CLASSES)])
def test_bundled_models_load_by_name(name, channels, classes):
    model = load_model(name)
    assert model.in_channels == channels and model.classes == classes
    assert model.geometry.stride == (8, 8) and model.geometry.receptive_field == (64, 64)
    assert model.card["training_data"] and model.card["val_accuracy"] > 0.95
    assert sum(p.stat().st_size for p in (tilefcn.models.BUNDLED_DIR / name).iterdir()) < 2e6


def test_bundled_tissue_on_a_fresh_slide(tmp_path):
    fresh = write_slide(tmp_path / "fresh.ome.tif", (512, 512), seed=1003, levels=1)
    model = load_model("tissue")
    heatmap = tilefcn.predict(fresh.image, "tissue", device="cpu").compute()
    g = model.geometry
    acc, per, counts = centre_accuracy(heatmap.argmax(0), tifffile.imread(fresh.mask), g.stride,
                                       g.offset, g.receptive_field, 3)
    assert sum(counts) > 500
    assert acc > 0.9, (acc, per, counts)
