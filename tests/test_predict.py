"""The exactness invariant: the tiled, lazy heatmap equals the model on the whole image."""

import numpy as np
import pytest
import tifffile
import torch
from models_zoo import ZOO, random_image, whole_image_output

import tilefcn
from tilefcn.measure.shapes import output_shape

# (image shape, tile) cases: non-multiples of tile and stride, one pixel past a chunk
# boundary, smaller than one chunk, tiny tiles that make many chunks.
CASES = [((203, 317), 64), ((129, 65), 64), ((97, 150), 512), ((257, 188), 40),
         ((150, 121), 96)]


@pytest.mark.parametrize("build", ZOO, ids=lambda b: b.__name__)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_predict_equals_whole_image(build, case):
    rng = np.random.default_rng(case)
    shape, tile = CASES[case]
    channels, dtype = [(3, "uint8"), (1, "uint16"), (4, "float32"), (3, "float32"),
                       (1, "uint8")][case]
    image = random_image(rng, shape, channels, dtype)
    model = build(channels)
    heatmap = tilefcn.predict(image, model, tile=tile, device="cpu", sub_tile=48)
    expected = whole_image_output(model, image)
    assert heatmap.shape == expected.shape
    assert heatmap.dtype == np.float32
    result = heatmap.compute(scheduler="threads")
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("build", ZOO, ids=lambda b: b.__name__)
def test_tiff_path_and_dask_inputs(build, tmp_path):
    rng = np.random.default_rng(7)
    image = random_image(rng, (190, 230), 3, "uint8")
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb")
    model = build(3)
    expected = whole_image_output(model, image)
    from_path = tilefcn.predict(path, model, tile=96, device="cpu").compute()
    np.testing.assert_allclose(from_path, expected, rtol=0, atol=1e-5)
    import dask.array as da

    lazy = da.from_array(image, chunks=(70, 50, 3))
    from_dask = tilefcn.predict(lazy, model, tile=64, device="cpu").compute()
    np.testing.assert_allclose(from_dask, expected, rtol=0, atol=1e-5)


def test_output_shape_is_the_networks_own_arithmetic():
    model = ZOO[0](3)  # stride 4, 'same' padding: 1537 rows → 384 outputs, not 385
    assert output_shape(model, 3, (1537, 64)) == (2, 384, 16)
    heatmap = tilefcn.predict(np.zeros((1537, 64, 3), np.uint8), model, device="cpu")
    assert heatmap.shape == (2, 384, 16)


def test_heatmap_is_lazy_and_composes():
    model = ZOO[0](3)
    image = np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    heatmap = tilefcn.predict(image, model, tile=64, device="cpu")
    assert heatmap.chunks[1] == (16,) * 4 + (11,)
    mean = heatmap.mean(axis=(1, 2)).compute()  # composes with the user's own graph
    np.testing.assert_allclose(mean, whole_image_output(model, image).mean(axis=(1, 2)),
                               rtol=1e-5)


def test_channel_mismatch_and_non_local_models_are_refused():
    image = np.zeros((64, 64, 4), np.uint8)
    with pytest.raises(ValueError, match="4 channel"):
        tilefcn.predict(image, ZOO[0](3), device="cpu")
    pooled = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 3), torch.nn.AdaptiveAvgPool2d(1))
    with pytest.raises(ValueError, match="AdaptiveAvgPool2d"):
        tilefcn.predict(image, pooled, device="cpu")


def test_process_workers_reload_unpicklable_models_by_path(tmp_path):
    """The same graph on a process cluster: the TIFF is reopened by path and the
    ExportedProgram (which cannot be pickled) is loaded by each worker from its file."""
    from distributed import Client, LocalCluster

    from tilefcn.job import run
    from tilefcn.modelio import load_model, save_exported

    model = ZOO[5](3)  # the upsampling head: alignment 8 ≠ stride 1
    pt2 = save_exported(tmp_path / "m.pt2", load_model(model))
    image = random_image(np.random.default_rng(5), (150, 170), 3, "uint8")
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb")
    expected = whole_image_output(model, image)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        heatmap = tilefcn.predict(path, pt2, tile=64, device="cpu")
        result = client.compute(heatmap).result(timeout=120)
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)
        summary = run(path, pt2, tmp_path / "h.zarr", tile=64, device="cpu",
                      scheduler=cluster.scheduler_address)
    import zarr

    written = zarr.open_group(str(tmp_path / "h.zarr"), mode="r")
    np.testing.assert_allclose(written["0"][:], expected, rtol=0, atol=1e-5)
    assert written.attrs["tilefcn"]["status"] == "complete" and summary.tiles == 9


@pytest.mark.parametrize("build", ZOO, ids=lambda b: b.__name__)
def test_output_shape_by_period_matches_meta(build):
    """The TorchScript fallback (a small real forward + periodicity) agrees with meta."""
    from tilefcn.measure import measure_geometry
    from tilefcn.measure.shapes import _output_shape_by_period

    model = build(3)
    geometry = measure_geometry(model)
    for hw in [(1537, 200), (203, 317), (1000, 1001)]:
        assert _output_shape_by_period(model, 3, hw, geometry)[1:] == output_shape(model, 3, hw)


def test_in_memory_models_ship_by_value_or_fail_clearly(tmp_path):
    import pickle

    from tilefcn.modelio import load_model, save_exported
    from tilefcn.runtime.cache import get_engine, make_ref

    model = load_model(ZOO[0](3))
    ref = make_ref(model, "cpu")
    copy = pickle.loads(pickle.dumps(ref))
    x = torch.rand(1, 3, 40, 40)
    with torch.inference_mode():
        np.testing.assert_array_equal(copy.model.module(x), model.module(x))
    assert get_engine(copy).model.sha256 == model.sha256
    program = torch.export.load(str(save_exported(tmp_path / "m.pt2", model))).module()
    unpicklable = make_ref(load_model(program), "cpu")  # in memory, no path to reload from
    with pytest.raises(TypeError, match="pass the path instead"):
        pickle.dumps(unpicklable)
