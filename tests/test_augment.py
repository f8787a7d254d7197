"""Stain augmentation (tilefcn.augment), training with it (`--stain-augment`, the bundle's
recorded mpp), and the bundled `tissue` model on a real brightfield image it never saw."""

import json

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

import tilefcn
from tilefcn.augment import (
    STAIN_VECTORS,
    StainAugment,
    gaussian_blur,
    jpeg_roundtrip,
    random_stain_vectors,
    restain,
)
from tilefcn.cli import main
from tilefcn.modelio import load_model
from tilefcn.synthetic import write_slide
from tilefcn.synthetic.slide import slide_tile
from tilefcn.train import centre_accuracy, train


def _patches(n: int = 16) -> np.ndarray:
    image, _ = slide_tile(1, 1200, 1200, 64 * n, 64, shape=(4096, 4096))
    return image.reshape(n, 64, 64, 3).astype(np.float32) / 255


def test_augment_is_seeded_bounded_and_changes_colour():
    x = _patches()
    a = StainAugment()(x, np.random.default_rng(5))
    b = StainAugment()(x, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert not np.array_equal(a, StainAugment()(x, np.random.default_rng(6)))
    mean_shift = np.abs(a.mean(axis=(1, 2)) - x.mean(axis=(1, 2))).max()
    assert mean_shift > 0.03  # colours really move
    with pytest.raises(ValueError, match="RGB"):
        StainAugment()(x[..., :1], np.random.default_rng(0))


def test_restain_keeps_glass_and_can_turn_eosin_brown():
    rng = np.random.default_rng(0)
    glass = np.full((8, 8, 3), 0.93, np.float32)
    for _ in range(20):  # OD ≈ 0.07: glass stays light grey whatever the stains
        assert restain(glass, rng).min() > 0.8
    m = random_stain_vectors(rng)
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1, rtol=1e-6)
    eosin = np.exp(-STAIN_VECTORS[1] * 1.0).astype(np.float32)[None, None].repeat(4, 0)
    reds, blues = [], []
    for seed in range(40):
        out = restain(eosin, np.random.default_rng(seed))[0, 0]
        reds.append(out[0])
        blues.append(out[2])
    assert min(np.array(blues) - np.array(reds)) < -0.2  # some come out brown (DAB-like)


def test_blur_and_jpeg_keep_shape_and_mean():
    x = _patches(1)[0]
    blurred = gaussian_blur(x, 1.2)
    assert blurred.shape == x.shape and abs(blurred.mean() - x.mean()) < 0.01
    assert np.abs(np.diff(blurred, axis=0)).mean() < np.abs(np.diff(x, axis=0)).mean()
    flat = np.full((16, 16, 3), 0.5, np.float32)
    np.testing.assert_allclose(gaussian_blur(flat, 1.0), flat, atol=1e-6)
    jpeg = jpeg_roundtrip(x, 40)
    assert jpeg.shape == x.shape and 0 < np.abs(jpeg - x).mean() < 0.05


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("data") / "s.ome.tif", (768, 768), seed=7,
                       compression="jpeg", levels=1, mpp=0.5)


def test_stain_augmented_training_records_mpp_and_augmentation(slide, tmp_path):
    result = train([(slide.image, slide.mask)], tmp_path / "b", epochs=1,
                   samples_per_class=64, progress=False, stain_augment=True)
    card = json.loads((tmp_path / "b" / "model.json").read_text())["card"]
    assert card["mpp"] == 0.5 and card["augmentation"] == "stain"
    assert load_model(result.bundle).card["mpp"] == 0.5
    explicit = train([(slide.image, slide.mask)], tmp_path / "c", epochs=1,
                     samples_per_class=64, progress=False, mpp=0.25)
    assert explicit.bundle.joinpath("model.json").read_text().count('"mpp": 0.25') == 1


def test_training_scans_of_different_pixel_sizes_need_an_mpp(slide, tmp_path):
    other = write_slide(tmp_path / "o.ome.tif", (512, 512), seed=8, levels=1, mpp=0.25)
    with pytest.raises(ValueError, match="differ in pixel size.*give the model's mpp"):
        train([(slide.image, slide.mask), (other.image, other.mask)], tmp_path / "b",
              epochs=1, samples_per_class=32, progress=False)


def test_cli_train_stain_augment_and_mpp(slide, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, [
        "train", str(slide.image), str(slide.mask), "--out", str(out), "--epochs", "1",
        "--samples-per-class", "32", "--stain-augment", "--mpp", "0.4", "-q"])
    assert result.exit_code == 0, result.output
    card = load_model(out).card
    assert card["mpp"] == 0.4 and card["augmentation"] == "stain"
    helptext = CliRunner().invoke(main, ["train", "--help"]).output
    assert "--stain-augment" in helptext and "--mpp" in helptext


def test_bundled_tissue_finds_real_ihc_tissue_and_glass(tmp_path):
    """skimage's real IHC image (never used in training) tiled on glass: the bundled model
    calls most of it tissue and the glass background (the old weights: 0.01 % tissue)."""
    skdata = pytest.importorskip("skimage.data")
    ihc = skdata.immunohistochemistry()
    rng = np.random.default_rng(0)
    canvas = np.clip(np.round(235 + rng.normal(0, 3, (1024, 1024, 3))), 0, 255).astype(np.uint8)
    canvas[256:768, 256:768] = ihc
    labels = np.zeros((1024, 1024), np.uint8)
    labels[256:768, 256:768] = 1
    path = tmp_path / "ihc.tif"
    tifffile.imwrite(path, canvas, tile=(256, 256), photometric="rgb")
    model = load_model("tissue")
    assert model.card["mpp"] == 0.25 and model.card["augmentation"] == "stain"
    heatmap = tilefcn.predict(path, "tissue", device="cpu").compute()
    g = model.geometry
    _, (glass, tissue), counts = centre_accuracy(
        np.minimum(heatmap.argmax(0), 1), labels, g.stride, g.offset, g.receptive_field, 2, 32)
    assert min(counts) > 500
    assert glass > 0.98 and tissue > 0.8, (glass, tissue)
