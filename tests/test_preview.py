"""Preview PNGs (tilefcn.preview, `tilefcn run --preview`) and viewer metadata (omero channels
read back by ome-zarr-py)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tilefcn.cli import main
from tilefcn.geometry import Geometry
from tilefcn.preview import _display_rgb, write_preview
from tilefcn.read import open_scan
from tilefcn.viewers import class_colour
from tilefcn.write import create_ome_zarr, finish_ome_zarr

OPACITY = 0.6


def _blend(background: int, colour: tuple[int, int, int], p: float = 1.0) -> np.ndarray:
    a = OPACITY * p
    return np.round(background * (1 - a) + np.array(colour, float) * a).astype(np.uint8)


def _bar_found(strip: np.ndarray, px: int, x0: int = 8) -> bool:
    """A row of the legend strip holding exactly ``px`` black pixels from ``x0``."""
    black = (strip == 0).all(axis=2)
    return any(row[x0:x0 + px].all() and not row[x0 + px] and not row[x0 - 1] for row in black)


def _swatch(strip: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return int((strip == np.array(colour)).all(axis=2).sum()) >= 14 * 14


def test_overlay_follows_the_geometry_and_the_legend_names_the_classes(tmp_path) -> None:
    scan = open_scan(np.full((512, 512, 3), 200, np.uint8))  # no pixel size: scale in px
    geometry = Geometry(receptive_field=(20, 20), stride=(4, 4), offset=(-2, -2))
    data = np.zeros((2, 128, 128), np.float32)
    data[1, :, 64:] = data[0, :, :64] = 1.0  # class 1 from heatmap column 64 = scan x 262
    data[:, :16] = np.nan  # masked rows: the scan shows through
    store = tmp_path / "h.zarr"
    attrs = {"classes": ["stroma", "tumour"], "geometry": geometry.to_dict(),
             "model": {"name": "toy"}, "source": {"source": "<numpy array>",
                                                  "shape": [512, 512, 3], "mpp": None,
                                                  "level": 0, "downsamples": [1.0]}}
    create_ome_zarr(store, shape=data.shape, chunks=(32, 32), scale=(4.0, 4.0),
                    translation=(7.5, 7.5), unit=None, attrs=attrs)[:] = data
    finish_ome_zarr(store, min_size=16)
    result = write_preview(store, tmp_path / "p.png", scan=scan, max_side=64)
    assert result.thumbnail == (64, 64) and result.level == 1  # 8 scan px per thumbnail px
    png = np.asarray(Image.open(result.path).convert("RGB"))
    image, strip = png[:64, :64], png[64:]
    # thumbnail column 32 is centred on scan x 259.5 (< 261.5, heatmap column 64's first
    # centre), column 33 on 267.5: the boundary sits one column later than a plain stretch
    np.testing.assert_array_equal(image[20, 32], _blend(200, class_colour(0)))
    np.testing.assert_array_equal(image[20, 33], _blend(200, class_colour(1)))
    # rows 0–8 see heatmap rows ≤ 15 (NaN) or none: no overlay; row 9 the first valid ones
    assert (image[:9] == 200).all() and not (image[9] == 200).all()
    assert result.scale_label == "100 px" and result.scale_px == 12  # 100 scan px / 8
    assert _bar_found(strip, result.scale_px)
    assert _swatch(strip, class_colour(0)) and _swatch(strip, class_colour(1))


def test_display_rgb_of_multiband_uint16_and_grey() -> None:
    bands = np.stack([np.linspace(0, 60000, 100).reshape(10, 10)] * 5, axis=2).astype(np.uint16)
    rgb = _display_rgb(bands)
    assert rgb.shape == (10, 10, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255  # 2–98 % stretch
    assert _display_rgb(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from tilefcn.synthetic import write_slide

    return write_slide(tmp_path_factory.mktemp("slide") / "s.ome.tif", (384, 384), seed=4)


def test_run_preview_option_and_omero_channels(slide, tmp_path) -> None:
    out = tmp_path / "s.heatmap.zarr"
    args = ["run", str(slide.image), "--out", str(out), "-q", "--tile", "256"]
    result = CliRunner().invoke(main, [*args, "--preview"])
    assert result.exit_code == 0, result.output
    png_path = tmp_path / "s.heatmap.preview.png"
    assert f"Preview: {png_path}" in result.output
    png = np.asarray(Image.open(png_path).convert("RGB"))
    assert png.shape[0] > 384 // 2 and png.shape[1] >= 320
    strip = png[384:]
    for i in range(3):  # background, tissue, dense
        assert _swatch(strip, class_colour(i))

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = next(iter(Reader(parse_url(str(out)))()))
    assert node.metadata["channel_names"] == ["background", "tissue", "dense"]
    assert node.metadata["contrast_limits"] == [[0, 1]] * 3
    np.testing.assert_allclose(node.metadata["colormap"][1][1],
                               np.array(class_colour(1)) / 255)

    # an existing preview is refused before anything runs (a new output is not created)
    before = png_path.read_bytes()
    again = CliRunner().invoke(main, ["run", str(slide.image), "--out",
                                      str(tmp_path / "t.heatmap.zarr"), "-q",
                                      "--preview", str(png_path)])
    assert again.exit_code == 2 and "preview exists" in again.output
    assert png_path.read_bytes() == before and not (tmp_path / "t.heatmap.zarr").exists()
    # a GeoTIFF output of the same run gives the same preview
    tif_png = tmp_path / "tif.png"
    tif = CliRunner().invoke(main, [*args[:3], str(tmp_path / "s.heatmap.tif"), "-q",
                                    "--tile", "256", "--preview", str(tif_png)])
    assert tif.exit_code == 0, tif.output
    np.testing.assert_array_equal(np.asarray(Image.open(tif_png).convert("RGB")), png)
    # --overwrite replaces both; PATH names the file
    named = tmp_path / "named.png"
    over = CliRunner().invoke(main, [*args, "--overwrite", "--preview", str(named)])
    assert over.exit_code == 0, over.output
    assert named.is_file() and Image.open(named).format == "PNG"
