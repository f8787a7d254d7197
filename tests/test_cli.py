"""The command line: help, version, run (exactness through the CLI), info, errors."""

import json

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner
from models_zoo import padded, random_image, upsampling, whole_image_output

from tilefcn import __version__
from tilefcn.cli import main
from tilefcn.modelio import load_model, save_exported


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A model file for the CLI (the stride-4 'same'-padded net)."""
    path = tmp_path_factory.mktemp("model") / "padded.pt2"
    return save_exported(path, load_model(padded(3)))


@pytest.fixture()
def scan(tmp_path):
    image = random_image(np.random.default_rng(3), (230, 301), 3, "uint8")
    path = tmp_path / "slide.ome.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    return path, image


def test_help_and_version():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "run" in result.output and "info" in result.output
    assert runner.invoke(main, ["--version"]).output.strip().endswith(__version__)
    run_help = runner.invoke(main, ["run", "--help"])
    for option in ("--model", "--out", "--tile", "--level", "--mpp", "--device", "--overwrite"):
        assert option in run_help.output


def test_run_writes_exact_ome_zarr(scan, exported, tmp_path):
    path, image = scan
    out = tmp_path / "heat.zarr"
    result = CliRunner().invoke(main, ["run", str(path), "--model", str(exported),
                                       "--out", str(out), "--tile", "64", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Wrote" in result.output and "MP/s" in result.output
    assert "tiles" in result.output  # the progress bar (stderr is mixed in by CliRunner)
    group = zarr.open_group(str(out), mode="r")
    expected = whole_image_output(padded(3), image)
    np.testing.assert_allclose(group["0"][:], expected, rtol=0, atol=1e-5)
    attrs = group.attrs.asdict()
    assert attrs["tilefcn"]["status"] == "complete"
    assert attrs["tilefcn"]["geometry"]["stride"] == [4, 4]
    assert attrs["tilefcn"]["model"]["sha256"]

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = next(iter(Reader(parse_url(str(out)))()))
    axes = node.metadata["axes"]
    assert [a["name"] for a in axes] == ["c", "y", "x"]
    assert axes[1].get("unit") == "micrometer"
    transforms = node.metadata["coordinateTransformations"][0]
    scale = next(t["scale"] for t in transforms if t["type"] == "scale")
    assert scale == [1, 4 * 0.5, 4 * 0.5]  # stride × pixel size


def test_run_exact_for_an_upsampling_model_on_uint16_four_bands(tmp_path):
    """A second model/input family through the CLI: bilinear ×8 head (alignment 8, stride 1),
    a 4-band uint16 TIFF, a tile that is not a multiple of the alignment."""
    model = upsampling(4, 3)
    pt2 = save_exported(tmp_path / "up.pt2", load_model(model))
    image = random_image(np.random.default_rng(11), (141, 203), 4, "uint16")
    path = tmp_path / "bands.tif"
    tifffile.imwrite(path, image, tile=(32, 32), planarconfig="contig")
    out = tmp_path / "up.zarr"
    result = CliRunner().invoke(main, ["run", str(path), "--model", str(pt2), "--out", str(out),
                                       "--tile", "50", "--sub-tile", "40", "-q"])
    assert result.exit_code == 0, result.output
    heatmap = zarr.open_group(str(out), mode="r")["0"][:]
    np.testing.assert_allclose(heatmap, whole_image_output(model, image), rtol=0, atol=1e-5)


def test_existing_output_is_refused_then_overwritten(scan, exported, tmp_path):
    path, _ = scan
    out = tmp_path / "heat.zarr"
    args = ["run", str(path), "--model", str(exported), "--out", str(out), "-q"]
    assert CliRunner().invoke(main, args).exit_code == 0
    before = zarr.open_group(str(out), mode="r")["0"][:]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2
    assert "exists" in refused.output and "Traceback" not in refused.output
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["0"][:], before)
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0


@pytest.mark.parametrize("bad", ["missing.tif", "corrupt.tif"])
def test_bad_input_one_line_exit_2(tmp_path, exported, bad):
    target = tmp_path / bad
    if bad == "corrupt.tif":
        target.write_bytes(b"II*\x00garbage" * 10)
    result = CliRunner().invoke(main, ["run", str(target), "--model", str(exported)])
    assert result.exit_code == 2
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "missing.heatmap.zarr").exists()


def test_channel_mismatch_is_bad_input(tmp_path, exported):
    path = tmp_path / "gray.tif"
    tifffile.imwrite(path, np.zeros((80, 80), np.uint8))
    result = CliRunner().invoke(main, ["run", str(path), "--model", str(exported)])
    assert result.exit_code == 2 and "channel" in result.output


def test_info_scan_and_model(scan, exported):
    path, _ = scan
    result = CliRunner().invoke(main, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kind"] == "scan" and data["shape"] == [230, 301, 3]
    model = CliRunner().invoke(main, ["info", str(exported)])
    assert model.exit_code == 0, model.output
    assert "receptive_field" in model.output and "parameters" in model.output


def test_demo_writes_heatmap_and_preview(tmp_path):
    import imagecodecs

    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out-dir", str(out), "--size", "512", "-q"])
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(out / "slide.heatmap.zarr"), mode="r")
    assert group.attrs["tilefcn"]["status"] == "complete"
    assert group.attrs["tilefcn"]["classes"] == ["background", "tissue", "dense"]
    probabilities = group["0"][:]
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)  # softmax head
    preview = imagecodecs.png_decode((out / "slide.preview.png").read_bytes())
    assert preview.shape[1] == 512 and preview.shape[0] > 512  # thumbnail + legend below
    assert "Preview:" in result.output and "background" in result.output


def test_run_engine_options_through_the_cli(scan, exported, tmp_path):
    path, image = scan
    expected = whole_image_output(padded(3), image)
    out = tmp_path / "ort.zarr"
    result = CliRunner().invoke(main, [
        "run", str(path), "--model", str(exported), "--out", str(out), "--tile", "64",
        "--device", "cpu", "--backend", "onnxruntime", "--batch", "3", "--dtype", "float16",
        "--verbose", "-q"])
    assert result.exit_code == 0, result.output
    assert "Backend: onnxruntime" in result.output
    group = zarr.open_group(str(out), mode="r")
    assert group["0"].dtype == np.float16
    assert group.attrs["tilefcn"]["job"]["backend"] == "onnxruntime"
    np.testing.assert_allclose(group["0"][:].astype(np.float32), expected, rtol=1e-3,
                               atol=1e-3)
    auto = CliRunner().invoke(main, ["run", str(path), "--model", str(exported), "--out",
                                     str(tmp_path / "auto.zarr"), "--device", "cpu", "-v",
                                     "-q"])
    assert auto.exit_code == 0 and "measured:" in auto.output and "MP/s" in auto.output


@pytest.mark.parametrize("args,message", [
    (["--dtype", "uint8", "--mask", "auto"], "cannot store the NaN"),
    (["--backend", "tensorrt"], "Invalid value for '--backend'"),
    (["--precision", "fp8"], "Invalid value for '--precision'"),
    (["--batch", "0"], "Invalid value for '--batch'"),
    (["--out", "heat.tif", "--dtype", "float16"], "GeoTIFFs are float32"),
])
def test_bad_engine_options_exit_2_and_write_nothing(scan, exported, tmp_path, args, message):
    path, _ = scan
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a if a != "heat.tif" else str(tmp_path / a) for a in args]
    result = CliRunner().invoke(main, ["run", str(path), "--model", str(exported), "-q",
                                       *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_small_sub_tile_warns(scan, exported, tmp_path):
    path, _ = scan
    result = CliRunner().invoke(main, ["run", str(path), "--model", str(exported), "--out",
                                       str(tmp_path / "h.zarr"), "--sub-tile", "32", "-q"])
    assert result.exit_code == 0, result.output
    assert "Warning: --sub-tile 32 is small" in result.output


def test_gpus_without_cuda_is_a_clear_error(scan, exported, tmp_path):
    path, _ = scan
    result = CliRunner().invoke(main, ["run", str(path), "--model", str(exported), "--out",
                                       str(tmp_path / "h.zarr"), "--gpus", "1", "-q"])
    assert result.exit_code == 2, result.output
    assert "--gpus 1 asked for, but this machine has 0 CUDA device(s)" in result.output
    assert not (tmp_path / "h.zarr").exists()
