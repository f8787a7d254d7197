"""Real dask processes for the cluster tests: a `dask scheduler` and a `dask worker` of 2
single-threaded processes on 127.0.0.1, started with time bounds and stopped in teardown."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

START_TIMEOUT = 60.0


def dask_command(*args: str) -> list[str]:
    exe = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
    if exe is None:
        pytest.fail("the `dask` command (installed with dask[distributed]) is missing")
    return [exe, *args]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def start_cluster(info: Path, procs: list, wait: bool = True) -> None:
    """Start a `dask scheduler` writing ``info`` and a `dask worker` of 2 single-threaded
    processes (nannies) on 127.0.0.1, appended to ``procs``; wait (bounded) for the scheduler
    and, with ``wait``, for both workers."""
    from distributed import Client

    procs.append(subprocess.Popen(
            dask_command("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                          "--scheduler-file", str(info)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    deadline = time.monotonic() + START_TIMEOUT
    while not info.exists() or not info.read_text().strip():
        if time.monotonic() > deadline or procs[-1].poll() is not None:
            pytest.fail("dask scheduler did not start")
        time.sleep(0.2)
    procs.append(subprocess.Popen(
        dask_command("worker", "--scheduler-file", str(info), "--nworkers", "2",
                      "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                      "--memory-limit", "2GB"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    if not wait:
        return
    with Client(scheduler_file=str(info), timeout="30s") as client:
        client.wait_for_workers(2, timeout=START_TIMEOUT)
