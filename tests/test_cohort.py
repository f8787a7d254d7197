"""Cohorts: `tilefcn run` over several scans, folders and manifests, on local threads and on a
real dask cluster (a `dask scheduler` and a `dask worker` with 2 processes on 127.0.0.1,
started here, time-bounded, stopped in teardown), a worker killed with SIGKILL mid-run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner
from dask_processes import start_cluster, stop
from models_zoo import dilated, random_image, whole_image_output

from tilefcn.cli import main
from tilefcn.cohort import ScanJob, ScanResult, expand_inputs, run_cohort, write_summary
from tilefcn.modelio import load_model, save_exported

RUN_TIMEOUT = 120  # s: a CLI subprocess against the cluster


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    return save_exported(folder / "dilated.pt2", load_model(dilated(3)))


def _cohort(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> dict[str, np.ndarray]:
    """Scans s0.tif, s1.tif, … of ``sizes`` (tiled, lossless) in ``folder``; their pixels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for i, shape in enumerate(sizes):
        image = random_image(rng, shape, 3, "uint8")
        tifffile.imwrite(folder / f"s{i}.tif", image, tile=(64, 64), photometric="rgb")
        images[f"s{i}"] = image
    return images


def _corrupt(folder: Path) -> None:
    (folder / "corrupt.tif").write_bytes(b"II*\x00" + b"\x13" * 200)  # a TIFF header, no IFD
    tifffile.imwrite(folder / "gray.tif", np.zeros((96, 96), np.uint8))  # 1 band, model wants 3


def _rows(folder: Path) -> dict[str, dict]:
    with open(folder / "tilefcn-summary.csv", newline="") as handle:
        return {Path(r["scan"]).stem: r for r in csv.DictReader(handle)}


def _assert_outputs(out_dir: Path, images: dict[str, np.ndarray]) -> None:
    model = dilated(3)
    for stem, image in images.items():
        group = zarr.open_group(str(out_dir / f"{stem}.heatmap.zarr"), mode="r")
        assert group.attrs["tilefcn"]["status"] == "complete"
        np.testing.assert_allclose(group["0"][:], whole_image_output(model, image), rtol=0,
                                   atol=1e-5)


def _chunk_mtimes(out_dir: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in out_dir.rglob("c/*/*/*") if p.is_file()}


# --- expanding inputs (no compute) -------------------------------------------------------


def test_folder_lists_scans_but_not_outputs_hidden_or_other_files(tmp_path):
    for name in ("b.tif", "a.svs", ".hidden.tif", "notes.txt", "a.heatmap.tif", "b.mask.tif"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "c.zarr").mkdir()
    (tmp_path / "a.heatmap.zarr").mkdir()  # a previous run's output next to the scans
    (tmp_path / "sub").mkdir()
    jobs = expand_inputs([tmp_path], out_dir=tmp_path / "out")
    assert [j.image.name for j in jobs] == ["a.svs", "b.tif", "c.zarr"]
    assert [j.out for j in jobs] == [tmp_path / "out" / f"{s}.heatmap.zarr"
                                     for s in ("a", "b", "c")]
    assert expand_inputs([tmp_path / "b.tif"])[0].out == tmp_path / "b.heatmap.zarr"


def test_manifest_rows_header_relative_paths_and_errors(tmp_path):
    manifest = tmp_path / "lists" / "cohort.csv"
    manifest.parent.mkdir()
    manifest.write_text("image,out,mask\n../x.tif\n# a comment\n\n"
                        "../y.tif,y-custom.tif,auto\n/abs/z.tiff,,masks/z.png\n")
    jobs = expand_inputs([manifest], out_dir=tmp_path / "out")
    base = manifest.parent
    assert jobs == [
        ScanJob(base / "../x.tif", tmp_path / "out" / "x.heatmap.zarr", None),
        ScanJob(base / "../y.tif", tmp_path / "out" / "y-custom.tif", "auto"),
        ScanJob(Path("/abs/z.tiff"), tmp_path / "out" / "z.heatmap.zarr",
                str(base / "masks/z.png"))]
    assert expand_inputs([manifest])[0].out == base / "../x.heatmap.zarr"  # next to the scan
    (tmp_path / "dup.csv").write_text("a/s.tif\nb/s.tif\n")
    with pytest.raises(ValueError, match="would both write"):
        expand_inputs([tmp_path / "dup.csv"], out_dir=tmp_path)
    (tmp_path / "wide.csv").write_text("s.tif,o.zarr,auto,extra\n")
    with pytest.raises(ValueError, match="line 1: expected image"):
        expand_inputs([tmp_path / "wide.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: a directory, not an image .* no scans"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="no such manifest"):
        expand_inputs([tmp_path / "missing.csv"])


def test_scans_in_flight_are_bounded_and_rows_keep_their_order(tmp_path):
    import threading

    running, peak, lock = 0, 0, threading.Lock()

    def one(job):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        if job.image.name == "bad":
            raise ValueError("bad scan\nsecond line")
        from tilefcn.job import RunSummary

        return RunSummary(str(job.out), (2, 1, 1), 1, 0, 0.5, 2.0)

    jobs = [ScanJob(Path(n), Path(f"{n}.zarr")) for n in ["a", "bad", *"cdefgh"]]
    seen = []
    rows = run_cohort(jobs, one, in_flight=3, progress=lambda r, d, t: seen.append((d, t)))
    assert peak == 3 and [r.scan for r in rows] == [str(j.image) for j in jobs]
    assert rows[1].status == "failed" and rows[1].error == "bad scan"
    assert {r.status for r in rows if r.scan != "bad"} == {"done"}
    assert rows[0].mp_per_s == 4.0 and seen[-1] == (8, 8)
    csv_path, json_path = write_summary(rows, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["counts"] == {"done": 7, "resumed": 0, "skipped": 0, "failed": 1}
    assert len(list(csv.DictReader(csv_path.open()))) == 8

    def lost(job):
        raise ConnectionError("scheduler gone")

    with pytest.raises(ConnectionError):  # fatal errors stop the cohort, not one row
        run_cohort(jobs, lost, in_flight=2, fatal=lambda exc: True)
    assert isinstance(rows[0], ScanResult)


def test_an_interrupt_does_not_wait_for_the_scans_in_flight():
    from tilefcn.job import RunSummary

    def one(job):
        time.sleep(0.01 if job.image.name == "quick" else 3)
        return RunSummary(str(job.out), (2, 1, 1), 1, 0, 0.1, 0.1)

    def interrupt(result, done, total):
        raise KeyboardInterrupt

    jobs = [ScanJob(Path(n), Path(f"{n}.zarr")) for n in ("quick", "slow", "later")]
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_cohort(jobs, one, in_flight=2, progress=interrupt)
    assert time.perf_counter() - start < 2


# --- the CLI on local threads ------------------------------------------------------------


def test_cohort_on_threads_reports_failures_skips_complete_and_resumes(tmp_path, model_file):
    scans = tmp_path / "scans"
    images = _cohort(scans, [(150, 130), (97, 200), (128, 128)])
    _corrupt(scans)
    out = tmp_path / "out"
    args = ["run", str(scans), "--model", str(model_file), "--out-dir", str(out),
            "--tile", "64", "--backend", "torch", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    rows = _rows(out)
    assert {k: r["status"] for k, r in rows.items()} == {
        "corrupt": "failed", "gray": "failed", "s0": "done", "s1": "done", "s2": "done"}
    assert "channel" in rows["gray"]["error"] and "Traceback" not in result.output
    assert rows["corrupt"]["error"] and "corrupt.tif" in result.output  # the table says why
    assert not (out / "corrupt.heatmap.zarr").exists()
    _assert_outputs(out, images)
    assert int(rows["s0"]["tiles"]) >= 4 and float(rows["s0"]["mp_per_s"]) > 0

    # an interrupted scan: one chunk gone, status back to running
    s1 = zarr.open_group(str(out / "s1.heatmap.zarr"), mode="r+")
    s1.attrs["tilefcn"] = {**s1.attrs["tilefcn"], "status": "running"}
    next((out / "s1.heatmap.zarr" / "0" / "c").rglob("*/*/*")).unlink()
    before = {k: v for k, v in _chunk_mtimes(out).items() if "s1.heatmap" not in k}
    start = time.perf_counter()
    again = CliRunner().invoke(main, args)
    seconds = time.perf_counter() - start
    assert again.exit_code == 1, again.output
    assert {k: r["status"] for k, r in _rows(out).items()} == {
        "corrupt": "failed", "gray": "failed", "s0": "skipped", "s1": "resumed",
        "s2": "skipped"}
    assert {k: v for k, v in _chunk_mtimes(out).items() if "s1.heatmap" not in k} == before
    _assert_outputs(out, images)
    assert seconds < 20  # skipping is planning only (bounded generously: a shared machine)

    (scans / "corrupt.tif").unlink()
    (scans / "gray.tif").unlink()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "3 skipped" in result.output


def test_cohort_refuses_out_and_keeps_a_foreign_output(tmp_path, model_file):
    images = _cohort(tmp_path / "scans", [(64, 64), (64, 80)])
    result = CliRunner().invoke(main, ["run", str(tmp_path / "scans"), "--out",
                                       str(tmp_path / "x.zarr")])
    assert result.exit_code == 2 and "--out-dir" in result.output
    out = tmp_path / "out"
    (out / "s1.heatmap.zarr").mkdir(parents=True)  # not ours: never touched
    (out / "s1.heatmap.zarr" / "data.bin").write_bytes(b"keep")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "scans" / "s0.tif"),
                                       str(tmp_path / "scans" / "s1.tif"), "--model",
                                       str(model_file), "--out-dir", str(out), "-q"])
    assert result.exit_code == 1, result.output
    rows = _rows(out)
    assert rows["s0"]["status"] == "done" and rows["s1"]["status"] == "failed"
    assert "not a tilefcn heatmap" in rows["s1"]["error"]
    assert (out / "s1.heatmap.zarr" / "data.bin").read_bytes() == b"keep"
    _assert_outputs(out, {"s0": images["s0"]})


# --- a real cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scheduler_file(tmp_path_factory):
    """A scheduler and 2 worker processes shared by this module's cluster tests; yields the
    scheduler file. Everything is stopped in teardown."""
    info, procs = tmp_path_factory.mktemp("cluster") / "scheduler.json", []
    try:
        start_cluster(info, procs)
        yield info
    finally:
        for proc in reversed(procs):
            stop(proc)


def _worker_tasks(info: Path) -> dict[str, int]:
    """tilefcn write tasks each worker process has run (from its transition log)."""
    from distributed import Client

    def count(dask_worker) -> int:  # noqa: ANN001
        return len({str(e[0]) for e in dask_worker.state.log
                    if "tilefcn-write" in str(e[0])})

    with Client(scheduler_file=str(info), timeout="30s") as client:
        return client.run(count)


def test_cohort_on_a_real_cluster_with_a_corrupt_scan(scheduler_file, tmp_path, model_file):
    scans = tmp_path / "scans"
    images = _cohort(scans, [(200, 170), (130, 260), (192, 192)], seed=1)
    _corrupt(scans)
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("image\n" + "".join(f"scans/{n}\n" for n in
                                            ("s0.tif", "corrupt.tif", "s1.tif", "s2.tif")))
    out = tmp_path / "out"
    args = ["run", str(manifest), "--model", str(model_file), "--out-dir", str(out),
            "--tile", "64", "--backend", "torch", "--scheduler-file", str(scheduler_file),
            "--scans-in-flight", "2", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    rows = _rows(out)
    assert {k: r["status"] for k, r in rows.items()} == {
        "s0": "done", "corrupt": "failed", "s1": "done", "s2": "done"}
    _assert_outputs(out, images)
    tasks = _worker_tasks(scheduler_file)
    assert len(tasks) == 2 and all(n > 0 for n in tasks.values()), tasks  # both worked
    summary = json.loads((out / "tilefcn-summary.json").read_text())
    assert summary["counts"]["failed"] == 1 and summary["results"][1]["error"]

    before = _chunk_mtimes(out)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1, again.output
    assert {r["status"] for k, r in _rows(out).items() if k != "corrupt"} == {"skipped"}
    assert _chunk_mtimes(out) == before


def test_one_scan_with_a_scheduler_file_keeps_out(scheduler_file, tmp_path, model_file):
    images = _cohort(tmp_path, [(100, 90)], seed=4)
    out = tmp_path / "one.zarr"
    result = CliRunner().invoke(main, ["run", str(tmp_path / "s0.tif"), "--model",
                                       str(model_file), "--out", str(out), "--backend",
                                       "torch", "--scheduler-file", str(scheduler_file), "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Wrote {out}")  # the single-scan report, no table
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_allclose(group["0"][:], whole_image_output(dilated(3), images["s0"]),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such scheduler file"), ("{not json", "is not a dask scheduler file"),
    ('{"address": ""}', "is not a dask scheduler file")])
def test_bad_scheduler_file_is_one_line_exit_2(tmp_path, content, message):
    info = tmp_path / "scheduler.json"
    if content is not None:
        info.write_text(content)
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    for inputs in ([str(tmp_path / "s.tif")], [str(tmp_path)]):  # one scan, a cohort
        result = CliRunner().invoke(main, ["run", *inputs, "--scheduler-file", str(info),
                                           "-q"])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("Error:") and message in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s.heatmap.zarr").exists()


def test_worker_killed_mid_run_outputs_still_identical(scheduler_file, tmp_path, model_file):
    from distributed import Client

    images = _cohort(tmp_path / "scans", [(320, 256), (288, 256)], seed=2)
    out = tmp_path / "out"
    with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
        pids = sorted(client.run(lambda: os.getpid()).values())
    run = _CliThread(_run_args(tmp_path / "scans", model_file, out, scheduler_file))
    _wait_for_a_chunk(run, out)
    os.kill(pids[0], signal.SIGKILL)  # its in-flight tasks are lost; dask reruns them
    killed_while_running = run.poll() is None
    result = run.join()
    assert result.exit_code == 0, result.output
    assert killed_while_running
    _assert_outputs(out, images)
    assert {r["status"] for r in _rows(out).values()} == {"done"}


def _run_args(scans: Path, model_file: Path, out: Path, info: Path) -> list[str]:
    return ["run", str(scans), "--model", str(model_file), "--out-dir", str(out), "--tile",
            "32", "--backend", "torch", "--scheduler-file", str(info), "-q"]


class _CliThread:
    """`tilefcn run` in this process, on a thread (so the test can act while it runs)."""

    def __init__(self, args: list[str]) -> None:
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(args,), daemon=True)
        self.thread.start()

    def _run(self, args: list[str]) -> None:
        self.result = CliRunner().invoke(main, args)

    def poll(self) -> int | None:
        return None if self.thread.is_alive() else self.result.exit_code

    def join(self):  # noqa: ANN201 - click's Result
        self.thread.join(RUN_TIMEOUT)
        if self.thread.is_alive():
            pytest.fail(f"tilefcn run did not finish in {RUN_TIMEOUT} s")
        return self.result


def _wait_for_a_chunk(run: Any, out: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while not any(out.glob("*.heatmap.zarr/0/c/*/*/*")):
        if time.monotonic() > deadline or run.poll() is not None:
            pytest.fail("the cohort wrote no chunk")
        time.sleep(0.05)


def test_scheduler_lost_mid_run_is_one_line_and_the_same_command_resumes(tmp_path,
                                                                         model_file):
    images = _cohort(tmp_path / "scans", [(320, 256), (288, 256)], seed=3)
    info, out, procs = tmp_path / "scheduler.json", tmp_path / "out", []
    try:
        start_cluster(info, procs, wait=False)  # workers start while the CLI imports
        proc = subprocess.Popen(  # a real console process: its stderr is what users see
            [sys.executable, "-m", "tilefcn",
             *_run_args(tmp_path / "scans", model_file, out, info)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        _wait_for_a_chunk(proc, out)
        os.killpg(procs[0].pid, signal.SIGKILL)  # the scheduler
        output = proc.communicate(timeout=RUN_TIMEOUT)[0].decode()
        assert proc.returncode == 1, output
        errors = [line for line in output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "lost the dask scheduler" in errors[0], output
        assert "Traceback" not in output and "run the same command again" in errors[0]
        os.killpg(procs[1].pid, signal.SIGKILL)  # workers without a scheduler: no graceful
        procs[1].wait(timeout=10)                # close to wait for
        info.unlink()
        procs.clear()
        start_cluster(info, procs)  # a new scheduler writes the same scheduler file
        result = _CliThread(_run_args(tmp_path / "scans", model_file, out, info)).join()
        assert result.exit_code == 0, result.output
    finally:
        for p in reversed(procs):
            stop(p)
    assert "resumed" in {r["status"] for r in _rows(out).values()}
    _assert_outputs(out, images)
