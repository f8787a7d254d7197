"""Resolution choice (`--mpp`): a level within 10 %, else a finer level area-averaged by an
integer factor on the fly (exact for the model on the whole downsampled image), the summary
line naming level and µm/px, and the warning when the scan's µm/px is not the model's."""

import warnings

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from models_zoo import padded, random_image, whole_image_output

import tilefcn
from tilefcn.cli import main
from tilefcn.job import run
from tilefcn.modelio import save_bundle
from tilefcn.models import patch_classifier
from tilefcn.read import open_scan
from tilefcn.resample import DownsampledReader
from tilefcn.scanmeta import (
    Resolution,
    ResolutionWarning,
    describe_resolution,
    mpp_mismatch,
    select_level,
)

SHAPE = (403, 517)  # neither a multiple of 2 nor of 3: partial blocks at the far edges


def area_mean(image: np.ndarray, k: int) -> np.ndarray:
    """The reference downsampling: k×k block means (trailing partial blocks dropped),
    rounded half to even, in the image's dtype."""
    h, w = image.shape[0] // k, image.shape[1] // k
    blocks = image[:h * k, :w * k].reshape(h, k, w, k, image.shape[2])
    return np.rint(blocks.mean(axis=(1, 3))).astype(image.dtype)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A 3-level OME-TIFF pyramid at 0.25 / 0.5 / 1.0 µm/px (levels are ::2 views) and its
    level-0 pixels."""
    image = random_image(np.random.default_rng(11), SHAPE, 3, "uint8")
    path = tmp_path_factory.mktemp("res") / "pyramid.ome.tif"
    meta = {"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(image, tile=(64, 64), photometric="rgb", subifds=2, metadata=meta,
                  compression="zlib")
        for q in (2, 4):
            tif.write(image[::q, ::q], tile=(64, 64), photometric="rgb", subfiletype=1,
                      compression="zlib")
    return path, image


@pytest.fixture(scope="module")
def bundle_025(tmp_path_factory):
    """A small convolutionalized bundle whose card says it was trained at 0.25 µm/px."""
    from tilefcn.convert import convolutionalize

    kwargs = {"in_channels": 3, "classes": 2, "width": 4, "hidden": 8, "patch_size": 64}
    net = convolutionalize(patch_classifier(**kwargs).eval(), 64).eval()
    return save_bundle(tmp_path_factory.mktemp("b") / "at025", net,
                       architecture="patch_classifier", kwargs=kwargs, classes=["a", "b"],
                       in_channels=3, patch_size=(64, 64), convolutionalized=True,
                       card={"mpp": 0.25})


SIZES = [((400, 500), (0.25, 0.25)), ((200, 250), (0.5, 0.5)), ((100, 125), (1.0, 1.0))]


@pytest.mark.parametrize(("mpp", "expected"), [
    (0.25, Resolution(0)), (0.27, Resolution(0)), (0.46, Resolution(1)),
    (1.09, Resolution(2)),                      # within 10 %: that level as is
    (0.75, Resolution(0, 3)),                   # 0.25 × 3 exactly
    (2.0, Resolution(2, 2)), (4.1, Resolution(2, 4)),  # coarser than the coarsest level
    (0.6, Resolution(1)),                       # 0.5 as is beats 0.25 × 2 = 0.5 (fewer reads)
    (1.5, Resolution(1, 3)),                    # 0.5 × 3 = 1.5 beats 1.0 × 2 and 1.0 as is
])
def test_level_within_10_percent_else_finer_level_and_integer_factor(mpp, expected):
    yx, mpps = [s for s, _ in SIZES], [m for _, m in SIZES]
    assert select_level("scan", yx, mpps, None, mpp) == expected


def test_no_upsampling_and_no_pixel_size_are_clear_errors():
    yx, mpps = [s for s, _ in SIZES], [m for _, m in SIZES]
    with pytest.raises(ValueError, match="no level as fine as 0.1 µm/px.*does not upsample"):
        select_level("scan", yx, mpps, None, 0.1)
    with pytest.raises(ValueError, match="no pixel size in scan"):
        select_level("scan", yx, [None] * 3, None, 0.5)
    assert select_level("scan", yx, mpps, 2, None) == Resolution(2)


def test_downsampled_reader_windows_line_up_with_the_whole_downsampled_image(pyramid):
    path, image = pyramid
    scan = open_scan(path, mpp=0.75)
    info = scan.info
    assert (info.level, info.factor, info.mpp) == (0, 3, (0.75, 0.75))
    assert info.shape == (SHAPE[0] // 3, SHAPE[1] // 3, 3) and info.tile is None
    whole = area_mean(image, 3)
    np.testing.assert_array_equal(scan.array.compute(), whole)
    rng = np.random.default_rng(0)
    for _ in range(12):  # windows [y0, y1) read fine rows [3·y0, 3·y1) only
        y0, x0 = rng.integers(0, 100, 2)
        y1, x1 = y0 + rng.integers(1, 40), x0 + rng.integers(1, 72)
        np.testing.assert_array_equal(scan.reader[y0:y1, x0:x1], whole[y0:y1, x0:x1])
    assert scan.reader[5:5, 0:9].shape == (0, 9, 3)


def test_downsampled_reader_reads_in_bounded_strips(monkeypatch, pyramid):
    from tilefcn import resample

    path, image = pyramid
    reads = []

    class Counting:
        shape, dtype = image.shape, image.dtype

        def __getitem__(self, key):
            reads.append(key[0].stop - key[0].start)
            return image[key]

    monkeypatch.setattr(resample, "STRIP_BYTES", 2 * 2 * 2 * 200 * 3)  # 2 output rows
    np.testing.assert_array_equal(DownsampledReader(Counting(), 2)[0:9, 0:200],
                                  area_mean(image, 2)[0:9, 0:200])
    assert reads == [4, 4, 4, 4, 2]


def test_heatmap_equals_model_on_the_whole_downsampled_image(pyramid):
    path, image = pyramid
    model = padded(3)
    for mpp, k in ((0.75, 3), (0.52, 1), (1.5, 3)):  # 1.5: level 1 (::2) × 3
        base = image if mpp != 1.5 else np.ascontiguousarray(image[::2, ::2])
        expected = whole_image_output(model, area_mean(base, k) if k > 1 else base[::2, ::2])
        heatmap = tilefcn.predict(path, model, mpp=mpp, tile=48, device="cpu")
        assert heatmap.shape == expected.shape
        np.testing.assert_allclose(heatmap.compute(), expected, rtol=0, atol=1e-5)


def test_summary_and_mismatch_messages():
    assert describe_resolution(1, (0.5, 0.5)) == "level 1 (0.5 µm/px)"
    assert describe_resolution(1, (0.5, 0.6)) == "level 1 (0.5×0.6 µm/px)"
    assert describe_resolution(0, (0.75, 0.75), 3) == \
        "level 0 (0.75 µm/px, downsampled ×3 from 0.25)"
    assert describe_resolution(0, None) == "level 0 (pixel size unknown)"
    assert describe_resolution(0, None, geotransform=(5e5, 10.0, 0.0, 4.6e6, 0.0, -10.0),
                               crs="EPSG:32633") == "level 0 (10 EPSG:32633 units/px)"
    assert describe_resolution(0, None, geotransform=(0, 3.0, 4.0, 0, -4.0, 3.0),
                               crs="PROJCS[" + "x" * 40) == "level 0 (5 its CRS units/px)"
    assert mpp_mismatch((0.27, 0.27), 0.25, "m") is None  # 8 %: fine
    assert mpp_mismatch((0.5, 0.5), None, "m") is None and mpp_mismatch(None, 0.25, "m") is None
    message = mpp_mismatch((0.5, 0.5), 0.25, "m")
    assert "0.5 µm/px" in message and "trained at 0.25 µm/px" in message
    assert "--mpp 0.25" in message and "\n" not in message


def test_run_warns_when_the_scan_is_not_at_the_models_mpp(pyramid, bundle_025, tmp_path):
    path, _ = pyramid
    seen = []
    summary = run(path, bundle_025, tmp_path / "a.zarr", level=1, tile=64, device="cpu",
                  warn=seen.append)
    assert len(seen) == 1 and "trained at 0.25 µm/px" in seen[0]
    assert summary.resolution == "level 1 (0.499 µm/px)"  # 0.25 · 403/202
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at the model's mpp: no warning at all
        summary = run(path, bundle_025, tmp_path / "b.zarr", mpp=0.25, tile=64, device="cpu")
    assert summary.resolution == "level 0 (0.25 µm/px)"
    with pytest.warns(ResolutionWarning, match="trained at 0.25"):  # library default
        run(path, bundle_025, tmp_path / "c.zarr", mpp=0.75, tile=64, device="cpu")


def test_cli_summary_line_and_one_warning_line(pyramid, bundle_025, tmp_path):
    path, _ = pyramid
    result = CliRunner().invoke(main, ["run", str(path), "--model", str(bundle_025), "--mpp",
                                       "0.75", "--out", str(tmp_path / "h.zarr"), "--device",
                                       "cpu", "--tile", "64", "-q"])
    assert result.exit_code == 0, result.output
    warning_lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Warning:")]
    assert len(warning_lines) == 1 and "0.75 µm/px" in warning_lines[0]
    assert "at level 0 (0.75 µm/px, downsampled ×3 from 0.25)" in result.stdout


def test_cli_mpp_on_a_scan_without_pixel_size_is_one_line_exit_2(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, random_image(np.random.default_rng(1), (96, 96), 3, "uint8"),
                     photometric="rgb")
    out = tmp_path / "h.zarr"
    result = CliRunner().invoke(main, ["run", str(path), "--mpp", "0.5", "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: no pixel size in {path}: cannot select a level by mpp (use --level)"]
    assert not out.exists()
