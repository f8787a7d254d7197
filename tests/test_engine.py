"""The runtime engine: staged streaming (reads run ahead, memory bounded), batching without
padding, backends verified against eager torch, the choice recorded, precision, and the
graph's GPU resource annotations. Exactness is always against the model on the whole image."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest
import torch
import zarr
from models_zoo import ZOO as SMALL_ZOO
from models_zoo import random_image, whole_image_output

import tilefcn
from tilefcn.modelio import load_model
from tilefcn.plan import plan_tiles
from tilefcn.runtime import select
from tilefcn.runtime.backends import installed
from tilefcn.runtime.cache import _verify, get_engine, make_ref
from tilefcn.runtime.engine import StageTimes, stream_tiles

torch.set_num_threads(1)


def _engine(model, **kw):
    return get_engine(make_ref(load_model(model), "cpu", **kw))


def _plan(model, image, tile):
    m = load_model(model)
    from tilefcn.measure.shapes import output_shape

    out = output_shape(m.module, image.shape[2], image.shape[:2], m.geometry)
    return plan_tiles(m.geometry, image.shape[:2], out[1:], tile)


def test_reads_run_ahead_of_compute_and_stay_bounded():
    model = SMALL_ZOO[1](3)  # unpadded: halo on every side
    image = random_image(np.random.default_rng(0), (256, 256), 3, "uint8")
    engine = _engine(model, backend="torch")
    plan = _plan(model, image, 64)
    in_flight, most, lock = 0, 0, threading.Lock()

    def read(tile):
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.02)  # a decode that takes time
        return image[tile.read]

    out = np.full((2, *plan.out_shape), np.nan, np.float32)

    def write(tile, block):
        nonlocal in_flight
        out[(slice(None), *tile.out)] = block
        with lock:
            in_flight -= 1

    times = StageTimes()
    done = stream_tiles(engine, plan.tiles(), read, write, image_shape=plan.image_shape,
                        sub_tile=32, prefetch=2, times=times)
    assert done == len(plan.tiles()) == 16
    order = [t.index for t in plan.tiles()]
    # the read of tile k+1 starts before tile k's compute ends: decode overlaps the model
    ahead = [times.read[b][0] < times.compute[a][1] for a, b in zip(order, order[1:], strict=False)]
    assert all(ahead), ahead
    assert most <= 2 + 2  # prefetch windows + one computing + one being written
    np.testing.assert_allclose(out, whole_image_output(model, image), rtol=0, atol=1e-5)


def test_an_error_in_the_read_stage_stops_the_stream():
    model = SMALL_ZOO[0](3)
    image = random_image(np.random.default_rng(1), (128, 128), 3, "uint8")
    plan = _plan(model, image, 32)

    def read(tile):
        if tile.index == (1, 1):
            raise OSError("corrupt tile at (1, 1)")
        return image[tile.read]

    with pytest.raises(OSError, match="corrupt tile"):
        stream_tiles(_engine(model, backend="torch"), plan.tiles(), read, lambda t, b: None,
                     image_shape=plan.image_shape)


@pytest.mark.parametrize("build", SMALL_ZOO, ids=[b.__name__ for b in SMALL_ZOO])
@pytest.mark.parametrize("backend,batch", [("torch", 4), ("onnxruntime", 3), ("auto", 2)])
def test_backends_and_batches_equal_the_whole_image(build, backend, batch):
    if backend == "onnxruntime" and not installed("onnxruntime"):
        pytest.skip("onnxruntime is not installed")  # it is, with the README's commands
    model = build(3)
    image = random_image(np.random.default_rng(3), (203, 317), 3, "uint16")
    expected = whole_image_output(model, image)
    heatmap = tilefcn.predict(image, model, tile=96, sub_tile=32, device="cpu",
                              backend=backend, batch=batch)
    result = heatmap.compute(scheduler="threads")
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


def test_batches_group_equal_shapes_only():
    model = SMALL_ZOO[1](3)
    engine = _engine(model, backend="torch", batch=4)
    calls = []
    runner = engine.runner
    engine.runner = lambda x: calls.append(tuple(x.shape)) or runner(x)
    image = random_image(np.random.default_rng(4), (150, 150), 3, "uint8")
    plan = _plan(model, image, 160)
    (tile,) = plan.tiles()
    block = engine.run_tile(image[tile.read], tile.y, tile.x, plan.image_shape, 32)
    engine.runner = runner
    assert max(c[0] for c in calls) > 1  # interior sub-windows went together
    for shape in calls:  # never padded: every batch is of one true window shape
        assert shape[0] <= 4
    np.testing.assert_allclose(block, whole_image_output(model, image), rtol=0, atol=1e-5)


def test_auto_measures_keeps_exact_backends_and_caches_the_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEFCN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(select, "_MEMO", {})
    model = load_model("tissue")
    ref = make_ref(model, "cpu")
    choice = ref.choice
    assert choice["backend"] in choice["rates_mp_per_s"]
    assert set(choice["rates_mp_per_s"]) >= {"torch", "torch-cl"}
    assert all(e <= 1e-5 for name, e in choice["max_error_vs_torch"].items()
               if name in choice["rates_mp_per_s"])
    assert (tmp_path / "backends.json").is_file()
    monkeypatch.setattr(select, "_MEMO", {})  # a new process: read back from disk
    again = select.choose_backend(
        ref.token, model.module, in_channels=3, window=(96, 104), out_pixels=1)
    assert not again.cached  # another window size is another measurement
    key = next(iter(__import__("json").loads((tmp_path / "backends.json").read_text())))
    window = tuple(int(v) for v in key.rsplit("|", 1)[1].split("x"))
    cached = select.choose_backend(ref.token, model.module, in_channels=3, window=window,
                                   out_pixels=1)
    assert cached.cached and cached.backend == choice["backend"]


def test_a_backend_that_differs_from_torch_is_refused():
    module = torch.nn.Conv2d(3, 2, 3).eval()

    def reference(x):
        with torch.inference_mode():
            return module(x)

    with pytest.raises(ValueError, match="differs from torch"):
        _verify(lambda x: reference(x) + 1e-3, reference, 3, [(16, 16)], "onnxruntime")
    assert _verify(reference, reference, 3, [(16, 16), (9, 13)], "onnxruntime") == 0


def test_bad_options_are_refused_before_compute():
    image = np.zeros((64, 64, 3), np.uint8)
    model = SMALL_ZOO[0](3)
    for kwargs, match in [({"backend": "tensorrt"}, "unknown backend"),
                          ({"precision": "fp8"}, "precision must be"),
                          ({"batch": 0}, "batch must be"),
                          ({"device": "tpu"}, "unknown device")]:
        with pytest.raises(ValueError, match=match):
            tilefcn.predict(image, model, **kwargs)


def test_reduced_precision_runs_and_reports_its_error():
    model = SMALL_ZOO[0](3)
    image = random_image(np.random.default_rng(5), (96, 96), 3, "uint8")
    expected = whole_image_output(model, image)
    out = tilefcn.predict(image, model, device="cpu", precision="bf16").compute()
    error = float(np.abs(out - expected).max())
    assert 0 < error < 0.05  # bf16 is not exact, but close


def test_cuda_runs_carry_gpu_resources(tmp_path):
    from tilefcn import job
    from tilefcn.graph import plan_prediction
    from tilefcn.write import create_ome_zarr

    model = SMALL_ZOO[0](3)
    image = random_image(np.random.default_rng(6), (128, 128), 3, "uint8")
    prediction = plan_prediction(image, model, tile=64, device="cuda", local=False)
    assert prediction.ref.device == "cuda"  # not resolved here: a CPU-only client is fine
    array = create_ome_zarr(tmp_path / "h.zarr", shape=(2, *prediction.plan.out_shape),
                            chunks=(64, 64), scale=(1, 1), translation=(0, 0), unit=None,
                            attrs={})
    graph, writes, pyramid, _ = job._zarr_graph(prediction, tmp_path / "h.zarr", array,
                                             "float32", set(), 2, gpu_resources=True)
    annotated = {name: layer.annotations for name, layer in graph.layers.items()}
    write_layer = writes[0][0]
    assert annotated[write_layer] == {"resources": {"GPU": 1}}
    pyramid_layers = [name for name in annotated if "pyramid" in name]
    assert pyramid_layers and not any(annotated[name] for name in pyramid_layers)
    graph, *_ = job._zarr_graph(prediction, tmp_path / "h.zarr", array, "float32", set(), 2,
                                gpu_resources=False)
    assert not any(layer.annotations for layer in graph.layers.values())


def test_gpu_cluster_gives_each_process_its_own_device():
    from distributed import Client

    from tilefcn.cluster import gpu_cluster, has_gpu_workers

    with gpu_cluster(2, threads=1, require_cuda=False) as cluster, \
            Client(cluster, timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
        seen = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "1"]
        assert has_gpu_workers(client)


def test_run_records_backend_and_dtype_and_pyramid(tmp_path):
    from tilefcn.job import run

    model = SMALL_ZOO[3](3)  # dilated: stride 1, so the heatmap has pyramid levels
    image = random_image(np.random.default_rng(7), (600, 540), 3, "uint8")
    path = tmp_path / "scan.tif"
    import tifffile

    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb")
    expected = whole_image_output(model, image)
    for dtype, atol in [("float32", 1e-5), ("float16", 2e-3), ("uint8", 0.5 / 255 + 1e-6)]:
        out = tmp_path / f"{dtype}.zarr"
        run(path, model, out, tile=128, dtype=dtype, device="cpu")
        group = zarr.open_group(str(out), mode="r")
        meta = group.attrs["tilefcn"]
        assert meta["status"] == "complete" and meta["job"]["dtype"] == dtype
        assert meta["job"]["backend_choice"]["backend"]
        level0 = group["0"][:]
        assert level0.dtype == np.dtype(dtype)
        scale = 255.0 if dtype == "uint8" else 1.0
        probs = np.clip(expected, 0, 1) if dtype == "uint8" else expected
        np.testing.assert_allclose(level0.astype(np.float64) / scale, probs, rtol=0,
                                   atol=atol)
        datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
        assert [d["path"] for d in datasets] == ["0", "1", "2"]
        if dtype == "float32":  # level 1 is the 2×2 mean of level 0, built on the workers
            c, h, w = level0.shape
            quads = level0[:, :h // 2 * 2, :w // 2 * 2].reshape(c, h // 2, 2, w // 2, 2)
            np.testing.assert_allclose(group["1"][:, :h // 2, :w // 2],
                                       quads.mean(axis=(2, 4)), rtol=1e-6, atol=1e-6)


def test_a_backend_that_fails_off_its_traced_shape_is_refused_or_passed_over(tmp_path):
    from zoo import ZOO

    from tilefcn.modelio import save_exported

    entry = next(e for e in ZOO if e.id == "unet_d2_bilinear_same")
    model = entry.make()
    # an ExportedProgram: its ONNX export keeps the traced sizes of the skip connections
    program = save_exported(tmp_path / "unet.pt2", load_model(model))
    image = random_image(np.random.default_rng(3), (150, 201), entry.in_channels, "uint8")
    with pytest.raises(ValueError, match="backend 'onnxruntime' fails on a"):
        tilefcn.predict(image, program, tile=64, sub_tile=32, device="cpu",
                        backend="onnxruntime")
    heatmap = tilefcn.predict(image, program, tile=64, sub_tile=32, device="cpu")
    np.testing.assert_allclose(heatmap.compute(), whole_image_output(model, image), rtol=0,
                               atol=1e-5)


def test_auto_chooses_the_sub_tile_edge_too_and_stays_exact(tmp_path, monkeypatch):
    """With no --sub-tile, --backend auto measures every candidate edge below the tile (and
    the first one not) with each backend and runs at the fastest pair; the heatmap equals
    the model on the whole image. A mask, or a given --sub-tile, measures one edge only."""
    import tilefcn.graph as graph

    monkeypatch.setenv("TILEFCN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(select, "_MEMO", {})
    monkeypatch.setattr(graph, "SUB_TILE_CANDIDATES", (32, 64, 128, 256))
    model = SMALL_ZOO[1](3)  # unpadded: a halo on every side
    image = random_image(np.random.default_rng(4), (300, 260), 3, "uint8")
    want = whole_image_output(model, image)

    prediction = graph.plan_prediction(image, model, tile=128, device="cpu")
    assert sorted(dict(prediction.ref.shapes)) == [32, 64, 128]  # 256 runs as 128 does
    choice = prediction.ref.choice
    assert set(choice["rates_by_sub_tile"]) == {"32", "64", "128"}
    assert choice["sub_tile"] in (32, 64, 128)
    pairs = {(name, int(edge)): rate for edge, rates in choice["rates_by_sub_tile"].items()
             for name, rate in rates.items()}
    if not choice.get("rejected"):  # the fastest (backend, edge) pair of all
        assert pairs[(choice["backend"], choice["sub_tile"])] == max(pairs.values())
    assert choice["rates_mp_per_s"] == choice["rates_by_sub_tile"][str(choice["sub_tile"])]
    assert get_engine(prediction.ref).sub_tile == choice["sub_tile"]
    got = prediction.heatmap.compute(scheduler="threads")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

    fixed = graph.plan_prediction(image, model, tile=128, device="cpu", sub_tile=64)
    assert [edge for edge, _ in fixed.ref.shapes] == [64]
    assert "rates_by_sub_tile" not in fixed.ref.choice
    assert get_engine(fixed.ref).sub_tile is None  # the run's own --sub-tile is used
    np.testing.assert_allclose(fixed.heatmap.compute(scheduler="threads"), want, atol=1e-5,
                               rtol=0)

    mask = np.zeros(image.shape[:2], np.uint8)
    mask[100:200, 50:150] = 1
    mask_path = tmp_path / "mask.tif"
    import tifffile

    tifffile.imwrite(mask_path, mask)
    masked = graph.plan_prediction(image, model, tile=128, device="cpu",
                                   mask=str(mask_path))
    assert [edge for edge, _ in masked.ref.shapes] == [256]  # the CPU default, finest grain


def test_auto_leaves_out_sub_tile_edges_that_need_too_much_memory(tmp_path, monkeypatch):
    """An edge whose measured peak memory per thread is over the budget (a quarter of the
    machine's memory over the threads) is not used, nor any larger one; the smallest always
    is. The peak is faked growing 50 MB a reading, the budget 1 MB."""
    import tilefcn.graph as graph
    from tilefcn.runtime import cache

    monkeypatch.setenv("TILEFCN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(select, "_MEMO", {})
    monkeypatch.setattr(graph, "SUB_TILE_CANDIDATES", (32, 64, 128))
    readings = itertools.count(0, 50)
    monkeypatch.setattr(select, "rss_mb", lambda: float(next(readings)))
    monkeypatch.setattr(cache, "rss_mb", lambda: float(next(readings)))
    monkeypatch.setattr(cache, "working_memory_mb", lambda: 1.0)
    monkeypatch.setattr(cache, "_CACHE", {})  # no engine built by an earlier test
    model = SMALL_ZOO[1](3)
    image = random_image(np.random.default_rng(5), (300, 260), 3, "uint8")
    prediction = graph.plan_prediction(image, model, tile=256, device="cpu")
    choice = prediction.ref.choice
    assert choice["sub_tile"] == 32 and get_engine(prediction.ref).sub_tile == 32
    assert list(choice["rates_by_sub_tile"]) == ["32"]
    assert list(choice["sub_tiles_left_out"]) == ["64"]  # and 128 not even measured
    assert "MB per thread" in choice["sub_tiles_left_out"]["64"]
    np.testing.assert_allclose(prediction.heatmap.compute(scheduler="threads"),
                               whole_image_output(model, image), atol=1e-5, rtol=0)


def test_peak_rss_sees_growth_below_an_earlier_higher_peak():
    """``--backend auto``'s memory check: a worker that peaked higher earlier still sees
    what a measurement needs (``getrusage``'s peak would show no growth at all)."""
    import resource

    from tilefcn.runtime.select import PeakRss, rss_mb

    earlier = np.ones(200 * 2**20 // 8)  # an earlier, higher peak, given back
    del earlier
    baseline, maxrss = rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with PeakRss() as peak:
        block = np.ones(80 * 2**20 // 8)  # 80 MB, touched
        time.sleep(0.05)
        del block
    assert peak.mb - baseline > 60, (peak.mb, baseline)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss == maxrss  # no new peak


class StagedLane:
    """A device lane's contract on the CPU (what :class:`~tilefcn.runtime.device.CudaLane`
    does with pinned memory and events): raw pixels go up as a copy and are scaled "there";
    results come down into buffers of their own and are handed back only on ``fetch``."""

    on_host = False

    def __init__(self) -> None:
        self.uploaded: list = []
        self.in_flight = 0

    def upload(self, batch: np.ndarray) -> torch.Tensor:
        self.uploaded.append(batch.dtype)
        return torch.from_numpy(np.array(batch))  # a copy, as a transfer is

    def stream(self):
        import contextlib

        return contextlib.nullcontext()

    def download(self, result: torch.Tensor) -> object:
        self.in_flight += 1
        return result.clone(), "event"

    def fetch(self, handle: object) -> np.ndarray:
        self.in_flight -= 1
        host, event = handle
        assert event == "event"
        return host.numpy()


@pytest.mark.parametrize("build", SMALL_ZOO, ids=[b.__name__ for b in SMALL_ZOO])
@pytest.mark.parametrize("pixels,batch", [("uint8", 4), ("uint16", 1), ("float16", 3)])
def test_the_device_lane_path_scales_on_the_device_and_equals_the_whole_image(
        build, pixels, batch, monkeypatch):
    """The engine as it runs on a GPU (raw pixels up, scaling, crop and encoding on the
    device, downloads fetched after the batch loop), with a CPU stand-in for the lane."""
    from tilefcn.runtime import engine as engine_module

    lane = StagedLane()
    monkeypatch.setattr(engine_module, "lane_for", lambda device: lane)
    model = build(3)
    rng = np.random.default_rng(8)
    image = rng.random((150, 181, 3)).astype(np.float16) if pixels == "float16" else \
        random_image(rng, (150, 181), 3, pixels)
    heatmap = tilefcn.predict(image, model, tile=96, sub_tile=32, device="cpu",
                              backend="torch", batch=batch).compute(scheduler="threads")
    np.testing.assert_allclose(heatmap, whole_image_output(model, image), rtol=0, atol=1e-5)
    # raw pixels went up (scaled there), except float16, which torch scales from float32
    assert set(lane.uploaded) == ({np.dtype(pixels)} if pixels != "float16"
                                  else {np.dtype(np.float32)})
    assert lane.in_flight == 0  # every download was fetched


@pytest.mark.parametrize("out_dtype", ["float16", "uint8"])
def test_the_device_lane_path_encodes_as_the_host_does(out_dtype, monkeypatch):
    from tilefcn.runtime import engine as engine_module
    from tilefcn.write import encode_block

    model = SMALL_ZOO[0](3)
    image = random_image(np.random.default_rng(9), (130, 140), 3, "uint8")
    plan = _plan(model, image, 160)
    (tile,) = plan.tiles()
    engine = _engine(model, backend="torch", batch=2)
    on_host = engine.run_tile(image[tile.read], tile.y, tile.x, plan.image_shape, 32)
    monkeypatch.setattr(engine_module, "lane_for", lambda device: StagedLane())
    staged = engine.run_tile(image[tile.read], tile.y, tile.x, plan.image_shape, 32, out_dtype)
    assert staged.dtype == np.dtype(out_dtype)
    np.testing.assert_array_equal(staged, encode_block(on_host, out_dtype))
