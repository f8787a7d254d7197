"""Where the tasks run: local threads, a ``distributed`` scheduler, or a local cluster of
GPU workers (``--gpus N``: one worker process per GPU); for cohorts, one client shared by
all scans (:func:`cluster_client`: an address, a scheduler file, ``--workers N`` local
processes or ``--gpus N``).

With dask-cuda installed its ``LocalCUDACluster`` is used; otherwise a
``distributed.SpecCluster`` of nannies, each with ``CUDA_VISIBLE_DEVICES`` set to its own GPU
(so every process sees its GPU as ``cuda:0``) and a ``GPU=1`` resource, so a cuda run's
tasks (annotated ``resources={"GPU": 1}``) run one model per GPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask


def gpu_worker_specs(gpus: int, threads: int = 2, per_gpu: int = 1) -> dict[str, dict]:
    """SpecCluster worker specs: ``per_gpu`` workers see only GPU ``i``, each offers
    ``GPU=1``."""
    from distributed import Nanny

    if gpus < 1 or per_gpu < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    return {f"gpu-{i}-{k}": {"cls": Nanny, "options": {
        "nthreads": threads, "env": {"CUDA_VISIBLE_DEVICES": str(i)},
        "resources": {"GPU": 1}}} for i in range(gpus) for k in range(per_gpu)}


def available_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def gpu_cluster(gpus: int, *, threads: int = 2, per_gpu: int = 1,
                require_cuda: bool = True) -> Iterator[Any]:
    """A local cluster with ``per_gpu`` worker processes per GPU (closed on exit)."""
    have = available_gpus()
    if require_cuda and gpus > have:
        raise ValueError(f"--gpus {gpus} asked for, but this machine has {have} CUDA device(s)")
    try:
        from dask_cuda import LocalCUDACluster  # GPU only: not run by the CPU tests
    except ImportError:
        LocalCUDACluster = None  # noqa: N806
    if LocalCUDACluster is not None and require_cuda and per_gpu == 1:
        cluster = LocalCUDACluster(n_workers=gpus, threads_per_worker=threads,
                                   CUDA_VISIBLE_DEVICES=list(range(gpus)),
                                   resources={"GPU": 1}, dashboard_address=":0")
    else:
        from distributed import Scheduler, SpecCluster

        cluster = SpecCluster(workers=gpu_worker_specs(gpus, threads, per_gpu), scheduler={
            "cls": Scheduler, "options": {"dashboard_address": ":0"}}, silence_logs=40)
    with cluster:
        yield cluster


SCHEDULER_TIMEOUT = "30s"


def _is_client(scheduler: Any) -> bool:
    return scheduler is not None and not isinstance(scheduler, str) and \
        hasattr(scheduler, "scheduler_info")


@contextlib.contextmanager
def executor(scheduler: Any, workers: int, gpus: int | None = None) -> Iterator[Any]:
    """A connected ``distributed.Client`` (also dask's default while open), or local threads.

    ``scheduler``: an address, or an already connected ``Client`` (used as it is and left
    open: a cohort shares one client between its scans). ``gpus``: a local cluster of one
    worker process per GPU (:func:`gpu_cluster`). On a client the
    :class:`~tilefcn.runtime.plugin.RuntimePlugin` prepares every worker.
    """
    if _is_client(scheduler):
        yield scheduler
        return
    if gpus:
        with gpu_cluster(gpus) as cluster:
            with _client(cluster) as client:
                yield client
        return
    if not scheduler:
        with dask.config.set(scheduler="threads", num_workers=workers):
            yield None
        return
    with _client(scheduler) as client:
        yield client


@contextlib.contextmanager
def local_cluster(processes: int, *, threads: int = 1) -> Iterator[Any]:
    """A ``LocalCluster`` of ``processes`` worker processes of ``threads`` threads each
    (``--workers N`` for a cohort), closed on exit."""
    from distributed import LocalCluster

    if processes < 1:
        raise ValueError(f"--workers must be at least 1, got {processes}")
    with LocalCluster(n_workers=processes, threads_per_worker=threads, processes=True,
                      dashboard_address=":0", silence_logs=40) as cluster:
        yield cluster


def read_scheduler_file(path: str | os.PathLike) -> str:
    """The scheduler address in a ``--scheduler-file`` (JSON written by ``dask scheduler
    --scheduler-file``, ``SLURMRunner`` or dask-mpi)."""
    try:
        address = json.loads(Path(path).read_text())["address"]
    except FileNotFoundError:
        raise FileNotFoundError(f"no such scheduler file: {path}") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a dask scheduler file (JSON with an "
                         f"'address')") from None
    if not isinstance(address, str) or not address:
        raise ValueError(f"{path} is not a dask scheduler file (no address)")
    return address


@contextlib.contextmanager
def cluster_client(*, scheduler: str | None = None,
                   scheduler_file: str | os.PathLike | None = None,
                   processes: int | None = None, gpus: int | None = None) -> Iterator[Any]:
    """One client for a whole cohort: a scheduler address, a ``--scheduler-file`` (JSON
    written by ``dask scheduler --scheduler-file``), a local cluster of ``processes`` worker
    processes, or of one process per GPU; ``None`` (local threads) when none is given."""
    given = [n for n, v in (("--scheduler", scheduler), ("--scheduler-file", scheduler_file),
                            ("--gpus", gpus)) if v]
    if len(given) > 1:
        raise ValueError(f"give one of --scheduler, --scheduler-file, --gpus, not "
                         f"{' and '.join(given)}")
    if scheduler_file:
        scheduler = read_scheduler_file(scheduler_file)
    if scheduler:
        with _client(scheduler) as client:
            yield client
    elif gpus:
        with gpu_cluster(gpus) as cluster, _client(cluster) as client:
            yield client
    elif processes:
        with local_cluster(processes) as cluster, _client(cluster) as client:
            yield client
    else:
        yield None


@contextlib.contextmanager
def _client(address: Any) -> Iterator[Any]:
    from distributed import Client

    from tilefcn.runtime.plugin import RuntimePlugin

    try:
        client = Client(address, timeout=SCHEDULER_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(f"cannot reach the dask scheduler at {address}: {exc}") from None
    # a lost scheduler is reported once, as an exception; not as distributed's tracebacks
    for name in ("distributed.client", "distributed.batched"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with client:
        client.register_plugin(RuntimePlugin())
        yield client


def scheduler_lost(client: Any, exc: BaseException | None = None) -> bool:
    """Whether ``client`` has lost its scheduler: ``exc`` is a task cancelled for that
    reason, or the client is no longer running (reconnecting, closed)."""
    if client is None:
        return False
    if exc is not None and "scheduler-connection-lost" in str(exc):
        return True
    return getattr(client, "status", "running") != "running"


def lost_scheduler_error(exc: BaseException, resume: str) -> ConnectionError:
    """The one-line error for a scheduler lost mid-run; ``resume`` says how to go on."""
    return ConnectionError(f"lost the dask scheduler mid-run; {resume} (chunks already "
                           f"written are kept): {str(exc).strip() or type(exc).__name__}")


def has_gpu_workers(client: Any) -> bool:
    """Whether any worker of ``client``'s cluster advertises a ``GPU`` resource."""
    workers = client.scheduler_info().get("workers", {}) if client is not None else {}
    return any("GPU" in (w.get("resources") or {}) for w in workers.values())
