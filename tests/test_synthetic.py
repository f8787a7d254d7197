"""Synthetic slides and scenes: seamless, deterministic, labelled consistently, readable."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from tilefcn.synthetic import (
    SCENE_CLASSES,
    SLIDE_CLASSES,
    scene_tile,
    slide_tile,
    write_scene,
    write_slide,
)

SLIDE = (1536, 2048)  # not square, not a multiple of the tile


@pytest.fixture(scope="module")
def big_slide() -> tuple[np.ndarray, np.ndarray]:
    return slide_tile(0, 0, 0, 2048, 2048, shape=(2048, 2048))


@pytest.fixture(scope="module")
def lossless(tmp_path_factory: pytest.TempPathFactory):
    return write_slide(tmp_path_factory.mktemp("slide") / "s.ome.tif", SLIDE, seed=3,
                       compression="zlib", pen=True, bubbles=True)


@pytest.mark.parametrize("window", [(0, 0, 64, 64), (301, 517, 97, 131), (700, 1200, 256, 300)])
def test_slide_windows_are_crops_of_a_bigger_window(window: tuple[int, int, int, int]) -> None:
    y, x, h, w = window
    kw = {"shape": SLIDE, "pen": True, "bubbles": True}
    big_rgb, big_lab = slide_tile(3, 0, 0, 1000, 1600, **kw)
    rgb, lab = slide_tile(3, y, x, h, w, **kw)
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8 and lab.dtype == np.uint8
    np.testing.assert_array_equal(rgb, big_rgb[y:y + h, x:x + w])
    np.testing.assert_array_equal(lab, big_lab[y:y + h, x:x + w])


@pytest.mark.parametrize("window", [(0, 0, 64, 64), (301, 517, 97, 131)])
def test_scene_windows_are_crops_of_a_bigger_window(window: tuple[int, int, int, int]) -> None:
    y, x, h, w = window
    big, big_lab = scene_tile(5, 0, 0, 800, 800, shape=(1000, 1000))
    bands, lab = scene_tile(5, y, x, h, w, shape=(1000, 1000))
    assert bands.shape == (h, w, 4) and bands.dtype == np.uint16
    np.testing.assert_array_equal(bands, big[y:y + h, x:x + w])
    np.testing.assert_array_equal(lab, big_lab[y:y + h, x:x + w])


def test_deterministic_per_seed() -> None:
    a, b, c = (slide_tile(s, 500, 500, 300, 300, shape=(2048, 2048)) for s in (1, 1, 2))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert np.abs(a[0].astype(int) - c[0]).mean() > 5
    d, e, f = (scene_tile(s, 0, 0, 200, 200, shape=(1024, 1024)) for s in (1, 1, 2))
    np.testing.assert_array_equal(d[0], e[0])
    assert not np.array_equal(d[0], f[0])


def test_slide_classes_match_content(big_slide: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, lab = big_slide
    fractions = np.bincount(lab.ravel(), minlength=3) / lab.size
    assert 0.45 < fractions[0] < 0.75 and fractions[1] > 0.15 and fractions[2] > 0.05
    pixels = [rgb[lab == c].astype(float) for c in range(3)]
    brightness = [p.mean() for p in pixels]
    assert brightness[0] > brightness[1] + 30 > brightness[2] + 60
    purple = [(p[:, 2] - p[:, 0]).mean() for p in pixels]  # blue minus red: hematoxylin
    assert purple[2] > purple[1] + 20
    nuclear = [(p.sum(1) < 400).mean() for p in pixels]  # dark hematoxylin pixels
    assert nuclear[2] > 3 * nuclear[1] and nuclear[0] == 0


def test_artefacts_are_background() -> None:
    plain = slide_tile(0, 0, 0, 1024, 1024, shape=(1024, 1024))
    marked = slide_tile(0, 0, 0, 1024, 1024, shape=(1024, 1024), pen=True, bubbles=True)
    changed = plain[1] != marked[1]
    assert changed.mean() > 0.002 and np.all(marked[1][changed] == 0)
    assert (np.abs(plain[0].astype(int) - marked[0]).max(2) > 30).mean() > 0.005


def test_scene_classes_match_content() -> None:
    bands, lab = scene_tile(0, 0, 0, 1024, 1024, shape=(1024, 1024))
    assert set(np.unique(lab)) == set(range(len(SCENE_CLASSES)))
    mean = np.array([bands[lab == c].mean(0) for c in range(5)])  # rows: classes, cols: B G R NIR
    ndvi_like = mean[:, 3] / mean[:, 2]
    assert ndvi_like.argmax() == SCENE_CLASSES.index("vegetation")
    assert mean[:, 3].argmin() == SCENE_CLASSES.index("water")
    assert mean.mean(1).argmax() == SCENE_CLASSES.index("cloud")


def test_ome_tiff_pyramid(lossless) -> None:
    assert lossless.classes == SLIDE_CLASSES and lossless.shape == SLIDE
    assert lossless.mask.name == "s.mask.tif"
    with tifffile.TiffFile(lossless.image) as tif:
        assert tif.is_ome and len(tif.pages) == 1
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(1536, 2048, 3), (768, 1024, 3), (384, 512, 3)]
        assert 'PhysicalSizeX="0.25"' in tif.ome_metadata
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.tags["ResolutionUnit"].value == 3
        assert page.tags["XResolution"].value == (40000, 1)
        full = levels[0].asarray()
        small = levels[2].asarray()
    rgb, lab = slide_tile(3, 0, 0, *SLIDE, shape=SLIDE, pen=True, bubbles=True)
    np.testing.assert_array_equal(full, rgb)  # lossless: exactly the generated pixels
    np.testing.assert_array_equal(tifffile.imread(lossless.mask), lab)
    assert abs(small.astype(float).mean() - full.astype(float).mean()) < 8
    store = tifffile.imread(lossless.image, aszarr=True)
    group = zarr.open(store, mode="r")
    np.testing.assert_array_equal(group["0"][100:300, 200:400], rgb[100:300, 200:400])
    assert group["1"].shape == (768, 1024, 3)
    store.close()


def test_same_seed_writes_the_same_bytes(tmp_path) -> None:
    first, second = (write_slide(tmp_path / f"{i}.ome.tif", (300, 400), seed=9, compression="zlib",
                                 pen=True) for i in (1, 2))
    assert first.image.read_bytes() == second.image.read_bytes()
    assert first.mask.read_bytes() == second.mask.read_bytes()
    scenes = [write_scene(tmp_path / f"{i}.tif", (200, 300), seed=9) for i in (3, 4)]
    assert scenes[0].image.read_bytes() == scenes[1].image.read_bytes()


def test_writing_does_not_depend_on_the_tile_size(lossless, tmp_path) -> None:
    other = write_slide(tmp_path / "t.tif", SLIDE, seed=3, compression=None, tile=128,
                        levels=1, pen=True, bubbles=True, mask_path=tmp_path / "m.tif")
    np.testing.assert_array_equal(tifffile.imread(other.image), tifffile.imread(lossless.image))
    np.testing.assert_array_equal(tifffile.imread(other.mask), tifffile.imread(lossless.mask))
    with tifffile.TiffFile(other.image) as tif:
        assert tif.pages[0].tilewidth == 128 and len(tif.series[0].levels) == 1


def test_jpeg_slide_is_close_to_lossless(lossless, tmp_path) -> None:
    jpeg = write_slide(tmp_path / "j.ome.tif", SLIDE, seed=3, pen=True, bubbles=True)
    with tifffile.TiffFile(jpeg.image) as tif:
        assert tif.pages[0].compression == 7 and len(tif.series[0].levels) == 3
        decoded = tif.series[0].asarray().astype(float)
    assert np.abs(decoded - tifffile.imread(lossless.image)).mean() < 4


def test_geotiff_scene_reads_in_rasterio(tmp_path) -> None:
    rasterio = pytest.importorskip("rasterio")
    scan = write_scene(tmp_path / "scene.tif", (600, 700), seed=2, pixel_size=20.0)
    with rasterio.open(scan.image) as ds:
        assert (ds.count, ds.dtypes[0], ds.width, ds.height) == (4, "uint16", 700, 600)
        assert ds.crs.to_epsg() == 32633
        assert tuple(ds.transform)[:6] == (20.0, 0.0, 500000.0, 0.0, -20.0, 4600000.0)
        assert ds.descriptions == ("B", "G", "R", "NIR")
        data = ds.read()
    bands, lab = scene_tile(2, 0, 0, 600, 700, shape=(600, 700))
    np.testing.assert_array_equal(data.transpose(1, 2, 0), bands)
    with rasterio.open(scan.mask) as ds:
        assert ds.crs.to_epsg() == 32633 and ds.transform == rasterio.open(scan.image).transform
        np.testing.assert_array_equal(ds.read(1), lab)
    assert scan.classes == SCENE_CLASSES and scan.mpp is None


@pytest.mark.parametrize("call", [
    lambda p: write_slide(p, (512, 512), tile=100),
    lambda p: write_slide(p, (512, 512), compression="lzw"),
    lambda p: write_slide(p, (512, 512), mpp=0),
    lambda p: write_slide(p, (512, 512), levels=0),
    lambda p: write_scene(p, (512, 512), compression="jpeg"),
    lambda p: slide_tile(0, 500, 0, 64, 64, shape=(512, 512)),
    lambda p: scene_tile(0, 0, 0, 0, 64, shape=(512, 512)),
    lambda p: slide_tile(0, 0, 0, 64, 64, shape=(0, 512)),
])
def test_bad_arguments_raise_value_error(call, tmp_path) -> None:
    with pytest.raises(ValueError):
        call(tmp_path / "x.tif")
    assert not list(tmp_path.iterdir())
