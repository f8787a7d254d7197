"""Runs killed with SIGKILL at random moments resume to the same heatmap as a clean run.

zarr ≥ 3.1.3 writes every chunk of a local store to a temporary file and renames it into
place, so a chunk is either whole or absent after a crash (``setup.cfg`` holds that floor);
``tilefcn.status`` says ``complete`` only after every chunk and the pyramid.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import zarr

from tilefcn.synthetic import write_slide

KILLS = 10
SUMMARY = re.compile(r"in ([0-9.]+) s \(")


def _command(slide, out, *extra):
    return [sys.executable, "-m", "tilefcn", "run", str(slide), "--out", str(out),
            "--tile", "256", "--sub-tile", "128", "--backend", "torch", "--workers", "1",
            "-q", *extra]


def _finish(cmd) -> float:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return float(SUMMARY.search(proc.stdout).group(1))


def _chunks(out) -> int:
    root = out / "0" / "c"
    return sum(len(files) for _, _, files in os.walk(root)) if root.exists() else 0


def test_kill_minus_nine_at_random_moments_then_resume_equals_a_clean_run(tmp_path):
    slide = tmp_path / "slide.ome.tif"
    write_slide(slide, (2048, 2048), seed=3)
    clean = tmp_path / "clean.zarr"
    # the faster of two clean runs: a cold first process (disk cache, a busy host) can take
    # several times as long, and kills timed by it would mostly land after the end
    clean_seconds = min(_finish(_command(slide, clean)),
                        _finish(_command(slide, clean, "--overwrite")))
    reference = zarr.open_group(str(clean), mode="r")
    expected = [reference[k][:] for k in sorted(reference.array_keys())]
    rng = np.random.default_rng(0)
    resumed_seconds, killed_mid_run = [], 0
    for k in range(KILLS):
        out = tmp_path / f"run{k}.zarr"
        proc = subprocess.Popen(_command(slide, out), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while not (out / "0" / "zarr.json").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never created its store"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, clean_seconds))  # somewhere inside the compute
        done = _chunks(out)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        status = zarr.open_group(str(out), mode="r").attrs["tilefcn"]["status"]
        if status == "running":
            killed_mid_run += 1
            resumed_seconds.append(_finish(_command(slide, out, "--resume")))
        group = zarr.open_group(str(out), mode="r")
        assert group.attrs["tilefcn"]["status"] == "complete", (k, done)
        for key, want in zip(sorted(group.array_keys()), expected, strict=True):
            np.testing.assert_array_equal(group[key][:], want, err_msg=f"kill {k}, {key}")
    print(f"\nkill -9 ×{KILLS}: {killed_mid_run} mid-run, all resumed equal to the clean run; "
          f"clean {clean_seconds:.1f} s, resumes {sorted(resumed_seconds)} s")
    assert killed_mid_run >= KILLS // 2, killed_mid_run  # most kills hit a running job
    assert np.median(resumed_seconds) < clean_seconds, (resumed_seconds, clean_seconds)
