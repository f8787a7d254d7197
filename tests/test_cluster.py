"""`tilefcn run --scheduler` against a real dask.distributed cluster: a `dask scheduler` and a
`dask worker` (2 processes) started on 127.0.0.1 by the test, stopped by it, time-bounded."""

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import tifffile
import torch
import zarr
from click.testing import CliRunner
from dask_processes import start_cluster, stop
from models_zoo import dilated, random_image, whole_image_output

from tilefcn import cluster as tilefcn_cluster
from tilefcn.cli import main
from tilefcn.modelio import load_model, save_exported


@pytest.fixture()
def cluster(tmp_path):
    """A scheduler and 2 single-threaded worker processes on 127.0.0.1; yields the address."""
    info, procs = tmp_path / "scheduler.json", []
    try:
        start_cluster(info, procs)
        yield json.loads(info.read_text())["address"]
    finally:
        for proc in reversed(procs):
            stop(proc)


def test_cli_run_on_a_real_cluster_equals_whole_image(cluster, tmp_path):
    model = dilated(3)
    pt2 = save_exported(tmp_path / "dilated.pt2", load_model(model))
    image = random_image(np.random.default_rng(2), (260, 190), 3, "uint8")
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb")
    out = tmp_path / "heat.zarr"
    result = CliRunner().invoke(main, ["run", str(path), "--model", str(pt2), "--out", str(out),
                                       "--tile", "64", "--scheduler", cluster, "-q"])
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["tilefcn"]["status"] == "complete"
    np.testing.assert_allclose(group["0"][:], whole_image_output(model, image), rtol=0,
                               atol=1e-5)
    from distributed import Client

    from tilefcn.runtime.plugin import PLUGIN_NAME, worker_report

    with Client(cluster, timeout="30s") as client:  # the runtime plugin prepared each worker
        plugins = client.run(lambda dask_worker: sorted(dask_worker.plugins))
        reports = client.run(worker_report)
    assert len(plugins) == 2 and all(PLUGIN_NAME in p for p in plugins.values())
    assert len({r["pid"] for r in reports.values()}) == 2
    assert sum(r["engines"] for r in reports.values()) >= 1  # models cached on the workers
    job = group.attrs["tilefcn"]["job"]
    assert job["device"] == "auto"  # resolved on the workers, and recorded per worker:
    assert len(job["workers"]) == 2
    assert {w["device"] for w in job["workers"].values()} == {"cpu"}
    assert job["backend_choice"]["backend"] in {w["backend"] for w in job["workers"].values()}


def test_cuda_asked_of_cpu_workers_is_a_clear_error_and_writes_nothing(cluster, tmp_path):
    image = tmp_path / "scan.tif"
    tifffile.imwrite(image, np.zeros((128, 128, 3), np.uint8), tile=(64, 64),
                     photometric="rgb")
    pt2 = save_exported(tmp_path / "d.pt2", load_model(dilated(3)))
    out = tmp_path / "heat.zarr"
    # resolved on the workers, not on this client (which could not tell them apart)
    result = CliRunner().invoke(main, ["run", str(image), "--model", str(pt2), "--out",
                                       str(out), "--device", "cuda", "--scheduler", cluster,
                                       "-q"])
    assert result.exit_code == 2, result.output
    assert "CUDA is not available" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_unreachable_scheduler_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tilefcn_cluster, "SCHEDULER_TIMEOUT", "2s")
    image = tmp_path / "scan.tif"
    tifffile.imwrite(image, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    pt2 = save_exported(tmp_path / "d.pt2", load_model(dilated(3)))
    result = CliRunner().invoke(main, ["run", str(image), "--model", str(pt2), "--scheduler",
                                       "tcp://127.0.0.1:9", "-q"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot reach the dask scheduler")
    assert "Traceback" not in result.output
    assert not (tmp_path / "scan.heatmap.zarr").exists()  # connected before writing


class _Scan(NamedTuple):
    path: Path
    pt2: Path
    out: Path
    model: torch.nn.Module
    image: np.ndarray


def _geotiff_scan(tmp_path: Path, seed: int) -> _Scan:
    """A 200×150 tiled RGB scan, an exported dilated model, and where its GeoTIFF goes."""
    model = dilated(3)
    pt2 = save_exported(tmp_path / "dilated.pt2", load_model(model))
    image = random_image(np.random.default_rng(seed), (200, 150), 3, "uint8")
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, image, tile=(32, 32), photometric="rgb")
    return _Scan(path, pt2, tmp_path / "heat.tif", model, image)


def _resume_computes_only_the_rest(scan: _Scan, cluster, monkeypatch, write) -> None:
    """After a run that checkpointed 3 tiles and stopped: the resumed run on ``cluster``
    (``write``: the real ``CogSink.__call__``) skips those 3, computes every other tile
    once, equals the whole-image model and leaves no checkpoint."""
    import rasterio

    from tilefcn import cog
    from tilefcn.checkpoint import read_journal
    from tilefcn.job import run

    done = {tuple(t) for t in read_journal(scan.out)["done"]}
    assert len(done) == 3 and not scan.out.exists()
    written = []
    monkeypatch.setattr(cog.CogSink, "__call__",
                        lambda sink, tile, block: (written.append(tile.index),
                                                   write(sink, tile, block))[1])
    summary = run(scan.path, str(scan.pt2), scan.out, tile=64, scheduler=str(cluster),
                  resume=True)
    assert summary.tiles_skipped == 3 and len(written) == summary.tiles - 3
    assert done.isdisjoint(written)  # the checkpointed tiles were not computed again
    with rasterio.open(scan.out) as src:
        got = src.read()
    np.testing.assert_allclose(got, whole_image_output(scan.model, scan.image), rtol=0,
                               atol=1e-5)
    assert read_journal(scan.out) is None  # finished: no checkpoint left


def test_geotiff_run_on_a_real_cluster_resumes_from_its_checkpoint(cluster, tmp_path,
                                                                    monkeypatch):
    """A GeoTIFF run on the cluster that fails part-way keeps its checkpointed tiles; the
    resumed run on the cluster computes only the others and equals the whole-image model."""
    from tilefcn import cog
    from tilefcn.job import run

    scan = _geotiff_scan(tmp_path, seed=5)
    path, pt2, out = scan.path, scan.pt2, scan.out
    real, calls = cog.CogSink.__call__, []

    def failing(sink, tile, block):  # the client's writer, fed by the workers
        calls.append(tile.index)
        if len(calls) > 3:
            raise RuntimeError("client lost its disk")
        return real(sink, tile, block)

    monkeypatch.setattr(cog.CogSink, "__call__", failing)
    with pytest.raises(RuntimeError, match="client lost its disk"):
        run(path, str(pt2), out, tile=64, scheduler=str(cluster))
    _resume_computes_only_the_rest(scan, cluster, monkeypatch, real)


KILLED_CLUSTER_RUN = """
import os, signal, sys
from tilefcn import cog
from tilefcn.job import run
cog.CHECKPOINT_S = 0.0  # a checkpoint after every tile
real, calls = cog.CogSink.__call__, []
def dying(sink, tile, block):  # the client's writer, fed by the workers
    calls.append(tile)
    if len(calls) > 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 would, other groups in flight
    return real(sink, tile, block)
cog.CogSink.__call__ = dying
run(sys.argv[1], sys.argv[2], sys.argv[3], tile=64, scheduler=sys.argv[4])
"""


def test_geotiff_client_killed_on_a_real_cluster_resumes_from_its_last_checkpoint(
        cluster, tmp_path, monkeypatch):
    """kill -9 of the client of a GeoTIFF run on the cluster (periodic checkpoints, no
    abort): the resumed run on the same cluster computes only the tiles not checkpointed
    and equals the whole-image model."""
    import os
    import signal
    import subprocess
    import sys

    from tilefcn.cog import CogSink

    scan = _geotiff_scan(tmp_path, seed=6)
    path, pt2, out = scan.path, scan.pt2, scan.out
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILLED_CLUSTER_RUN, str(path), str(pt2),
                           str(out), str(cluster)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    _resume_computes_only_the_rest(scan, cluster, monkeypatch, CogSink.__call__)
