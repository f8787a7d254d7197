"""--bands and nodata: the model sees the chosen bands in order; outputs whose receptive-field
centre is nodata are NaN, every other output equals the model on the whole image."""

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner
from models_zoo import padded, whole_image_output

import tilefcn
from tilefcn.bands import nodata_pixels, parse_bands, parse_nodata
from tilefcn.cli import main
from tilefcn.read import open_scan

NODATA = 65535
CPU = {"device": "cpu", "backend": "torch"}


def _scene(tmp_path, nodata_tag: str | None = str(NODATA), um_per_px: float | None = None):
    """A 4-band uint16 scene: nodata on the left 96 columns and at scattered pixels (with
    ``um_per_px``, CENTIMETER resolution tags saying so)."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 60000, (256, 320, 4), dtype=np.uint16)
    image[:, :96] = NODATA
    ys, xs = rng.integers(0, 256, 300), rng.integers(96, 320, 300)
    image[ys, xs] = NODATA
    image[10, 200, 0] = NODATA  # one band only: not nodata
    path = tmp_path / "scene.tif"
    tags = [] if nodata_tag is None else [(42113, "s", 0, nodata_tag, True)]
    size = {} if um_per_px is None else {"resolution": (1e4 / um_per_px, 1e4 / um_per_px),
                                         "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, image, tile=(64, 64), extratags=tags, planarconfig="contig",
                     **size)
    return path, image


def _centre_is_nodata(model, image, out_shape):
    """Outputs whose receptive-field centre pixel (the lower middle one, clamped into the
    image) has every band equal to NODATA."""
    g = tilefcn.measure_geometry(model, in_channels=image.shape[2])
    rows = [np.clip(g.centre2[a] // 2 + g.stride[a] * np.arange(out_shape[a]), 0,
                    image.shape[a] - 1) for a in (0, 1)]
    return (image[np.ix_(*rows)] == NODATA).all(axis=-1)


def test_geotiff_nodata_tag_gives_nan_exactly_where_the_centre_is_nodata(tmp_path):
    path, image = _scene(tmp_path)
    assert open_scan(path).info.nodata == NODATA
    model = padded(4, 2)
    expected = whole_image_output(model, image)
    centre = _centre_is_nodata(model, image, expected.shape[1:])
    assert 0.3 < centre.mean() < 0.5
    heatmap = tilefcn.predict(path, model, tile=64, **CPU).compute()
    np.testing.assert_array_equal(np.isnan(heatmap), np.broadcast_to(centre, heatmap.shape))
    np.testing.assert_allclose(heatmap[:, ~centre], expected[:, ~centre], rtol=0, atol=1e-5)

    prediction = tilefcn.graph.plan_prediction(path, model, tile=64, **CPU,
                                               mask="auto")
    assert len(prediction.masked) >= 4  # the all-nodata tiles on the left are not run
    masked = prediction.heatmap.compute()
    done = ~np.isnan(masked)
    assert not done[:, centre].any() and done[:, :, 40:].sum() > 0.9 * (~centre[:, 40:]).sum()
    np.testing.assert_allclose(masked[done], expected[done], rtol=0, atol=1e-5)

    ignored = tilefcn.predict(path, model, tile=64, **CPU, nodata="none").compute()
    np.testing.assert_allclose(ignored, expected, rtol=0, atol=1e-5)
    lazy = tilefcn.predict(da.from_array(image, chunks=(100, 100, 4)), model, tile=64, **CPU,
                           nodata=NODATA, mask="auto").compute()  # no reader: dask windows
    np.testing.assert_array_equal(np.isnan(lazy), np.isnan(masked))
    np.testing.assert_allclose(lazy[done], expected[done], rtol=0, atol=1e-5)


def _area_mean(image, k, nodata=None):
    """The reference downsampling, one block and band at a time: the mean of the block's
    values that are not ``nodata`` (``nodata`` when none is), rounded half to even."""
    h, w, bands = image.shape[0] // k, image.shape[1] // k, image.shape[2]
    out = np.empty((h, w, bands), image.dtype)
    for i in range(h):
        for j in range(w):
            block = image[i * k:(i + 1) * k, j * k:(j + 1) * k].reshape(-1, bands)
            for b in range(bands):
                values = block[:, b] if nodata is None else block[block[:, b] != nodata, b]
                out[i, j, b] = nodata if values.size == 0 else \
                    np.rint(values.astype(np.float64).mean())
    return out


def test_mpp_downsampling_leaves_nodata_out_of_its_means(tmp_path):
    path, image = _scene(tmp_path, um_per_px=1.0)
    scan = open_scan(path, mpp=3.0)
    assert (scan.info.factor, scan.info.nodata) == (3, NODATA)
    reference = _area_mean(image, 3, NODATA)
    mixed = [(y // 3, x // 3) for y, x in zip(*np.nonzero(nodata_pixels(image, NODATA)),
                                              strict=True) if 96 <= x < 318 and y < 255]
    assert len(mixed) > 100 and all((reference[y, x] != NODATA).all() for y, x in mixed)
    np.testing.assert_array_equal(scan.array.compute(), reference)
    model = padded(4, 2)
    expected = whole_image_output(model, reference)
    centre = _centre_is_nodata(model, reference, expected.shape[1:])
    assert 0.3 < centre.mean() < 0.5
    heatmap = tilefcn.predict(path, model, mpp=3.0, tile=32, **CPU).compute()
    np.testing.assert_array_equal(np.isnan(heatmap), np.broadcast_to(centre, heatmap.shape))
    np.testing.assert_allclose(heatmap[:, ~centre], expected[:, ~centre], rtol=0, atol=1e-5)

    plain = tilefcn.predict(path, model, mpp=3.0, tile=32, **CPU, nodata="none").compute()
    np.testing.assert_allclose(plain, whole_image_output(model, _area_mean(image, 3)),
                               rtol=0, atol=1e-5)  # --nodata none: every value averaged
    (tmp_path / "untagged").mkdir()
    untagged, _ = _scene(tmp_path / "untagged", nodata_tag=None, um_per_px=1.0)
    given = tilefcn.predict(untagged, model, mpp=3.0, tile=32, **CPU, nodata=NODATA)
    np.testing.assert_array_equal(given.compute(), heatmap)  # --nodata V: as the tag does


def test_nodata_option_without_a_tag_and_auto_mask_of_a_scene(tmp_path):
    path, image = _scene(tmp_path, nodata_tag=None)
    assert open_scan(path).info.nodata is None
    model = padded(4, 2)
    expected = whole_image_output(model, image)
    assert not np.isnan(tilefcn.predict(path, model, tile=64, **CPU).compute()).any()
    heatmap = tilefcn.predict(path, model, tile=64, **CPU, nodata=NODATA,
                              mask="auto").compute()
    centre = _centre_is_nodata(model, image, expected.shape[1:])
    assert np.isnan(heatmap[:, centre]).all()
    ok = ~np.isnan(heatmap)
    np.testing.assert_allclose(heatmap[ok], expected[ok], rtol=0, atol=1e-5)


def test_bands_select_and_order_what_the_model_sees(tmp_path):
    path, image = _scene(tmp_path, nodata_tag=None)
    model = padded(3, 2)
    expected = whole_image_output(model, image[..., [3, 0, 1]])
    for bands in ("4,1,2", [4, 1, 2]):
        heatmap = tilefcn.predict(path, model, tile=96, **CPU, bands=bands).compute()
        np.testing.assert_allclose(heatmap, expected, rtol=0, atol=1e-5)
    array = tilefcn.predict(image, model, tile=96, **CPU, bands="4,1,2").compute()
    np.testing.assert_allclose(array, expected, rtol=0, atol=1e-5)
    assert parse_bands("4,3,2,8") == (3, 2, 1, 7) and parse_bands(None) is None
    assert parse_nodata("nan") != parse_nodata("nan")  # NaN
    pixels = np.array([[[np.nan, np.nan], [np.nan, 1.0]]], np.float32)
    assert nodata_pixels(pixels, float("nan")).tolist() == [[True, False]]


def test_bands_and_nodata_through_the_cli(tmp_path):
    from tilefcn.modelio import load_model, save_exported

    path, image = _scene(tmp_path)
    model = padded(3, 2)
    pt2 = save_exported(tmp_path / "m.pt2", load_model(model))
    out = tmp_path / "h.zarr"
    run = ["run", str(path), "--model", str(pt2), "--tile", "64", "-q", "--bands", "4,3,2"]
    result = CliRunner().invoke(main, [*run, "--out", str(out), "--mask", "auto"])
    assert result.exit_code == 0, result.output
    heatmap = zarr.open_group(str(out), mode="r")["0"][:]
    selected = image[..., [3, 2, 1]]
    expected = whole_image_output(model, selected)
    ok = ~np.isnan(heatmap)
    assert np.isnan(heatmap[:, :, :20]).all() and ok[:, :, 30:].mean() > 0.9
    np.testing.assert_allclose(heatmap[ok], expected[ok], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("args", "words"), [
    (["--bands", "0,1,2"], "numbered from 1"),
    (["--bands", "2,3,5"], "has 4 band(s)"),
    (["--bands", "a,b,c"], "1-based band numbers"),
    (["--nodata", "lots"], "--nodata takes a number"),
    (["--nodata", "70000"], "cannot occur in uint16"),
    (["--bands", "1,2,3", "--dtype", "uint8"], "uint8"),
])
def test_bad_bands_and_nodata_are_one_line_and_write_nothing(tmp_path, args, words):
    path, _ = _scene(tmp_path)
    out = tmp_path / "h.zarr"
    result = CliRunner().invoke(main, ["run", str(path), "--model", "tissue", "--out", str(out),
                                       "-q", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0], lines
    assert not out.exists()


def test_area_downsample_with_nan_nodata_is_a_per_band_nanmean():
    from tilefcn.resample import area_downsample

    rng = np.random.default_rng(4)
    block = rng.random((6, 8, 3)).astype(np.float32)
    block[0:2, 0:2] = np.nan  # a whole block: NaN out
    block[2, 3, 1] = np.nan  # one value of one band
    got = area_downsample(block, 2, np.float32, float("nan"))
    quads = block.reshape(3, 2, 4, 2, 3).astype(np.float64)
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning, match="empty"):
        want = np.nanmean(quads, axis=(1, 3)).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[0, 0]).all() and not np.isnan(got[1, 1]).any()
    ints = rng.integers(0, 255, (4, 4, 1), dtype=np.uint8)  # NaN cannot occur in integers
    np.testing.assert_array_equal(area_downsample(ints, 2, np.uint8, float("nan")),
                                  area_downsample(ints, 2, np.uint8))
