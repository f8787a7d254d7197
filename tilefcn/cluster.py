"""Where the tasks run: local threads, a ``distributed`` scheduler, or a local cluster of
GPU workers (``--gpus N``: one worker process per GPU).

With dask-cuda installed its ``LocalCUDACluster`` is used; otherwise a
``distributed.SpecCluster`` of nannies, each with ``CUDA_VISIBLE_DEVICES`` set to its own GPU
(so every process sees its GPU as ``cuda:0``) and a ``GPU=1`` resource, so a cuda run's
tasks (annotated ``resources={"GPU": 1}``) run one model per GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


@contextlib.contextmanager
def executor(scheduler: str | None, workers: int, gpus: int | None = None) -> Iterator[Any]:
    """A connected ``distributed.Client`` (also dask's default while open), or local threads.

    ``gpus``: a local cluster of one worker process per GPU (:func:`gpu_cluster`).
    On a client the :class:`~tilefcn.runtime.plugin.RuntimePlugin` prepares every worker.
    """
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
def _client(address: Any) -> Iterator[Any]:
    from distributed import Client

    from tilefcn.runtime.plugin import RuntimePlugin

    try:
        client = Client(address, timeout=SCHEDULER_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(f"cannot reach the dask scheduler at {address}: {exc}") from None
    with client:
        client.register_plugin(RuntimePlugin())
        yield client


def has_gpu_workers(client: Any) -> bool:
    """Whether any worker of ``client``'s cluster advertises a ``GPU`` resource."""
    workers = client.scheduler_info().get("workers", {}) if client is not None else {}
    return any("GPU" in (w.get("resources") or {}) for w in workers.values())
