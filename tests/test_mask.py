"""--mask: tiles without foreground are not computed (NaN); the rest stay exact."""

import numpy as np
import tifffile
from click.testing import CliRunner
from models_zoo import padded, whole_image_output

import tilefcn
from tilefcn.cli import main
from tilefcn.geometry import Geometry
from tilefcn.graph import plan_prediction
from tilefcn.mask import auto_foreground
from tilefcn.plan import plan_tiles, tiles_without_foreground
from tilefcn.synthetic import write_slide


def _block_nan(heatmap, plan, masked):
    for tile in plan.tiles():
        block = heatmap[(slice(None), *tile.out)]
        assert np.isnan(block).all() == (tile.index in masked), tile.index
        assert not np.isnan(block).any() or tile.index in masked


def test_auto_mask_skips_only_glass_and_keeps_the_rest_exact(tmp_path):
    slide = write_slide(tmp_path / "s.ome.tif", (1024, 1024), seed=3, compression="zlib")
    prediction = plan_prediction(slide.image, "tissue", tile=128, device="cpu", mask="auto")
    plan, masked = prediction.plan, prediction.masked
    assert 0 < len(masked) < plan.grid[0] * plan.grid[1]
    labels = tifffile.imread(slide.mask)
    for index in masked:  # never skip a tile whose window holds tissue (independent labels)
        assert not labels[plan.tile(*index).read].any(), index
    heatmap = prediction.heatmap.compute()
    _block_nan(heatmap, plan, masked)
    image = tifffile.imread(slide.image)
    model = tilefcn.load_model("tissue")
    expected = _tissue_reference(model, image)
    computed = ~np.isnan(heatmap)
    np.testing.assert_allclose(heatmap[computed], expected[computed], rtol=0, atol=1e-5)


def _tissue_reference(model, image):
    import torch

    from tilefcn.runtime.scaling import scale_input

    x = torch.from_numpy(scale_input(image, model.scaling)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        return model.module(x.contiguous())[0].numpy()


def test_mask_file_and_nodata_through_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(1, 60000, (200, 240, 4), dtype=np.uint16)
    image[:, 150:] = 0  # nodata band on the right
    path = tmp_path / "bands.tif"
    tifffile.imwrite(path, image, tile=(64, 64))
    model = padded(4, 2)
    expected = whole_image_output(model, image)
    from tilefcn.modelio import load_model, save_exported

    pt2 = save_exported(tmp_path / "m.pt2", load_model(model))
    out = tmp_path / "auto.zarr"
    result = CliRunner().invoke(main, ["run", str(path), "--model", str(pt2), "--out", str(out),
                                       "--tile", "48", "--mask", "auto", "-q"])
    assert result.exit_code == 0, result.output
    assert "masked" in result.output
    import zarr

    heatmap = zarr.open_group(str(out), mode="r")["0"][:]
    assert np.isnan(heatmap[:, :, -1]).all() and not np.isnan(heatmap[:, :, 0]).any()
    ok = ~np.isnan(heatmap)
    np.testing.assert_allclose(heatmap[ok], expected[ok], rtol=0, atol=1e-5)

    mask = np.zeros((50, 60), np.uint8)  # quarter resolution: compute the top-left only
    mask[:10, :10] = 1
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    heatmap = tilefcn.predict(path, model, tile=48, device="cpu",
                              mask=str(tmp_path / "mask.tif")).compute()
    assert not np.isnan(heatmap[:, 0, 0]).any() and np.isnan(heatmap[:, -1, -1]).all()


def test_tiles_without_foreground_widens_windows_by_one_mask_pixel():
    g = Geometry((3, 3), (1, 1), (-1, -1))
    plan = plan_tiles(g, (64, 64), (64, 64), 16)
    mask = np.zeros((8, 8), bool)
    mask[0, 2] = True  # image rows 0–7, cols 16–23: tile (0, 1) and its neighbours' halos
    empty = tiles_without_foreground(plan, mask)
    assert (0, 1) not in empty and (0, 0) not in empty and (0, 2) not in empty
    assert (3, 3) in empty and len(empty) == 16 - 6
    assert auto_foreground(np.full((4, 4, 3), 240, np.uint8)).sum() == 0
    assert auto_foreground(np.array([[[200, 100, 200]]], np.uint8)).all()


def test_thumbnail_reads_one_small_level(tmp_path):
    from tilefcn.read import open_scan, thumbnail

    slide = write_slide(tmp_path / "p.ome.tif", (1024, 768), seed=1, compression="zlib",
                        levels=3)
    scan = open_scan(slide.image)
    level1 = open_scan(slide.image, level=1).array.compute()
    np.testing.assert_array_equal(thumbnail(scan, 512), level1)  # 512×384 fits as it is
    small = thumbnail(scan, 200)  # from level 2 (256×192) with a stride of 2
    np.testing.assert_array_equal(small, open_scan(slide.image, level=2).array.compute()[::2, ::2])
    image = np.arange(300 * 90 * 1, dtype=np.uint16).reshape(300, 90, 1)
    np.testing.assert_array_equal(thumbnail(open_scan(image), 100), image[::3, ::3])
