"""--mask: tiles without foreground are not computed (NaN); the rest stay exact."""

import dask.array as da
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from models_zoo import ZOO, padded, whole_image_output

import tilefcn
from tilefcn.cli import main
from tilefcn.geometry import Geometry
from tilefcn.graph import plan_prediction
from tilefcn.mask import Footprint, foreground_mask, max_pool
from tilefcn.plan import plan_sub_tiles, plan_tiles, tiles_without_foreground
from tilefcn.read import open_scan
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
    expected = whole_image_output(model, image)
    computed = ~np.isnan(heatmap)
    np.testing.assert_allclose(heatmap[computed], expected[computed], rtol=0, atol=1e-5)


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


def test_tiles_and_sub_tiles_are_skipped_by_their_receptive_fields():
    g = Geometry((3, 3), (1, 1), (-1, -1))
    plan = plan_tiles(g, (64, 64), (64, 64), 16)
    mask = np.zeros((8, 8), bool)
    mask[0, 2] = True  # image rows 0–7, cols 16–23: tile (0, 1), and (0, 0) through its halo
    footprint = Footprint((64, 64), mask, (8.0, 8.0))
    empty = tiles_without_foreground(g, plan, footprint.has_foreground)
    assert (0, 1) not in empty and (0, 0) not in empty  # (0, 0) sees col 16
    assert (0, 2) in empty and (1, 1) in empty and len(empty) == 16 - 2  # rows from 15 on
    # sub-tiles of tile (0, 1): 4 × 4 sub-windows of 4 outputs, receptive fields of 6 px; kept:
    # those whose receptive field reaches rows 0–7 and cols 16–23 (first three of each axis)
    sub = plan_sub_tiles(g, plan.tile(0, 1), (64, 64), 4, footprint.has_foreground)
    assert sub.keep == {(i, j) for i in range(3) for j in range(3)} and not sub.complete
    reads = sub.reads()  # one rectangle: the kept sub-windows with their halos
    y0, y1 = sub.rows[0].read_start, sub.rows[2].read_stop
    x0, x1 = sub.cols[0].read_start, sub.cols[2].read_stop
    assert reads == [(slice(y0, y1), slice(x0, x1))], reads
    assert y1 < plan.tile(0, 1).y.read_stop - plan.tile(0, 1).y.read_start
    assert not footprint.has_foreground((-5, 0), (0, 64))  # only the network's padding


def test_sub_window_reads_cover_exactly_the_kept_windows():
    rng = np.random.default_rng(5)
    g = Geometry((7, 7), (2, 2), (-3, -3))
    plan = plan_tiles(g, (300, 260), (150, 130), 128)
    for tile in plan.tiles():
        for _ in range(5):
            grid = rng.random((6, 6)) < 0.3
            footprint = Footprint((300, 260), grid, (50.0, 44.0))
            sub = plan_sub_tiles(g, tile, (300, 260), 32, footprint.has_foreground)
            need = np.zeros((tile.y.read_stop - tile.y.read_start,
                             tile.x.read_stop - tile.x.read_start), int)
            for sy, sx in sub.kept():
                need[sy.read, sx.read] = 1
            got = np.zeros_like(need)
            for ys, xs in sub.reads():
                got[ys, xs] += 1
            np.testing.assert_array_equal(got, need)  # disjoint, covering, nothing more


def test_max_pooling_keeps_one_pixel_lines_that_striding_drops(tmp_path):
    image = np.zeros((4099, 37, 1), np.uint8)
    image[1001, :, 0] = 1  # a 1-px line of tissue
    pooled = max_pool(da.from_array(image, chunks=(1000, 37, 1)), 3,
                      lambda b: (b != 0).astype(np.float32))
    assert pooled.shape == (1367, 13, 1)
    assert pooled[333, :, 0].all() and pooled.sum() == 13  # row 1001 // 3
    assert not image[::3].any()  # what a strided thumbnail would have seen
    tifffile.imwrite(tmp_path / "line.tif", image[..., 0], tile=(256, 32))
    scan = open_scan(np.zeros((4099, 37, 3), np.uint8))
    footprint = foreground_mask(scan, tmp_path / "line.tif", max_side=512)
    assert footprint.foreground.shape == (456, 5)  # pooled by ceil(4099 / 512) = 9
    assert footprint.has_foreground((1001, 1002), (0, 1))
    assert not footprint.has_foreground((1030, 4099), (0, 37))
    assert not footprint.has_foreground((0, 990), (0, 37))


def _disk_slide(tmp_path, size=1024, radius=0.22, dtype=np.uint8):
    """A slide whose tissue is one disk of H&E-like stain (pixel optical densities
    ``e·eosin + h·haematoxylin``), the rest glass with a little noise, written as a tiled
    TIFF; returns (path, image, disk boolean)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (radius * size) ** 2
    eosin, hema = np.array([0.07, 0.99, 0.11]), np.array([0.65, 0.70, 0.29])
    od = (rng.uniform(0.15, 0.8, (size, size, 1)) * eosin
          + rng.uniform(0, 1, (size, size, 1)) ** 4 * hema)
    tissue = np.round(255 * np.exp(-od - 0.03))
    glass = np.array([247, 246, 249]) + rng.integers(-2, 3, (size, size, 3))
    image = np.where(disk[..., None], tissue, glass).astype(np.uint8)
    if dtype == np.uint16:
        image = image.astype(np.uint16) * 257
    path = tmp_path / f"disk-{np.dtype(dtype).name}.tif"
    tifffile.imwrite(path, image, tile=(128, 128), compression="zlib", photometric="rgb")
    return path, image, disk


def test_sub_tile_skipping_is_exact_reads_less_and_leaves_far_background_nan(tmp_path,
                                                                             monkeypatch):
    import zarr

    import tilefcn.sinks
    from tilefcn.job import run

    path, image, disk = _disk_slide(tmp_path)
    model = padded(3, 2)
    expected = whole_image_output(model, image)
    g = tilefcn.measure_geometry(model)
    read_px = {"n": 0}
    real_read = tilefcn.sinks.read_window

    def counting_read(reader, window):
        read_px["n"] += (window[0].stop - window[0].start) * (window[1].stop - window[1].start)
        return real_read(reader, window)

    monkeypatch.setattr(tilefcn.sinks, "read_window", counting_read)
    heatmaps, reads = {}, {}
    for mask in ("none", "auto"):
        read_px["n"] = 0
        out = tmp_path / f"{mask}.zarr"
        summary = run(str(path), model, out, tile=512, sub_tile=64, device="cpu", mask=mask,
                      workers=1, backend="torch")
        heatmaps[mask], reads[mask] = zarr.open_group(str(out), mode="r")["0"][:], read_px["n"]
    assert summary.tiles_masked == 0  # every 512-px tile touches the disk: sub-tiles skip
    plain, masked = heatmaps["none"], heatmaps["auto"]
    np.testing.assert_allclose(plain, expected, rtol=0, atol=1e-5)
    done = ~np.isnan(masked)
    np.testing.assert_array_equal(masked[done], plain[done])  # computed outputs: identical
    # outputs whose receptive field is more than a sub-tile (+ halo) away from the disk:
    # far background, every one NaN; outputs on the disk: every one computed
    (oy, ox), (sy, sx), (ry, rx) = g.offset, g.stride, g.receptive_field
    cy = oy + sy * np.arange(plain.shape[1]) + ry / 2
    cx = ox + sx * np.arange(plain.shape[2]) + rx / 2
    dist = np.hypot(cy[:, None] - 512, cx[None, :] - 512) - 0.22 * 1024
    far, inside = dist > 64 + 2 * ry, dist < -ry
    assert far.mean() > 0.4 and np.isnan(masked[:, far]).all()
    assert done[:, inside].all()
    assert reads["auto"] < 0.4 * reads["none"], reads  # skipped sub-tiles are not read


def test_auto_mask_finds_glass_on_16_bit_brightfield(tmp_path):
    path8, _, _ = _disk_slide(tmp_path, 512, dtype=np.uint8)
    path16, _, disk = _disk_slide(tmp_path, 512, dtype=np.uint16)
    model = padded(3, 2)
    masks = [plan_prediction(str(p), model, tile=64, device="cpu", backend="torch",
                             mask="auto").masked
             for p in (path8, path16)]
    assert len(masks[1]) > 0.4 * 64 and masks[0] == masks[1]
    footprint = foreground_mask(open_scan(path16), "auto")
    assert footprint.fraction == pytest.approx(disk.mean(), abs=0.02)


def test_thumbnail_reads_one_small_level(tmp_path):
    from tilefcn.read import thumbnail

    slide = write_slide(tmp_path / "p.ome.tif", (1024, 768), seed=1, compression="zlib",
                        levels=3)
    scan = open_scan(slide.image)
    level1 = open_scan(slide.image, level=1).array.compute()
    np.testing.assert_array_equal(thumbnail(scan, 512), level1)  # 512×384 fits as it is
    small = thumbnail(scan, 200)  # from level 2 (256×192) with a stride of 2
    np.testing.assert_array_equal(small, open_scan(slide.image, level=2).array.compute()[::2, ::2])
    image = np.arange(300 * 90 * 1, dtype=np.uint16).reshape(300, 90, 1)
    np.testing.assert_array_equal(thumbnail(open_scan(image), 100), image[::3, ::3])


@pytest.mark.parametrize("build", ZOO, ids=lambda b: b.__name__)
def test_skipped_sub_tiles_are_not_read_and_kept_ones_are_exact_for_every_geometry(build):
    """Random sub-tile footprints over the zoo (halos, strides, crops, upsampling): pixels
    outside the kept sub-windows' reads are never read, kept outputs equal the
    model on the whole image, the others are NaN."""
    from tilefcn.measure.shapes import output_shape
    from tilefcn.modelio import load_model
    from tilefcn.runtime.cache import get_engine, make_ref
    from tilefcn.runtime.engine import stream_tiles

    rng = np.random.default_rng(7)
    image = rng.integers(0, 255, (200, 232, 3), dtype=np.uint8)
    model = load_model(build(3))
    expected = whole_image_output(model.module, image)
    out_shape = output_shape(model.module, 3, image.shape[:2], model.geometry)[1:]
    plan = plan_tiles(model.geometry, image.shape[:2], out_shape, 96)
    grid = np.zeros((20, 24), bool)  # 10-px cells, a few of them foreground
    grid[rng.integers(0, 20, 4), rng.integers(0, 24, 4)] = True
    footprint = Footprint(image.shape[:2], grid, (10.0, 10.0))
    engine = get_engine(make_ref(model, "cpu", backend="torch"))
    heatmap = np.full(expected.shape, -1.0, np.float32)
    read = np.zeros(image.shape[:2], bool)

    def read_region(ys, xs):
        read[ys, xs] = True
        return image[ys, xs]

    def write(tile, block):
        heatmap[(slice(None), *tile.out)] = block

    stream_tiles(engine, plan.tiles(), lambda t: read_region(*t.read), write,
                 image_shape=image.shape[:2], sub_tile=32, footprint=footprint,
                 read_region=read_region)
    kept = np.zeros(expected.shape[1:], bool)
    needed = np.zeros(image.shape[:2], bool)
    for tile in plan.tiles():
        sub = engine.sub_plan(tile, image.shape[:2], 32, footprint)
        if sub.complete:  # read as one window
            needed[tile.read] = True
        for sy, sx in sub.kept():
            kept[sy.out, sx.out] = True
            needed[tile.y.read_start + sy.read_start:tile.y.read_start + sy.read_stop,
                   tile.x.read_start + sx.read_start:tile.x.read_start + sx.read_stop] = True
    assert 0.05 < kept.mean() < 0.9 and needed.mean() < 0.95, (kept.mean(), needed.mean())
    np.testing.assert_array_equal(read, needed)
    assert np.isnan(heatmap[:, ~kept]).all()
    np.testing.assert_allclose(heatmap[:, kept], expected[:, kept], rtol=0, atol=1e-5)
