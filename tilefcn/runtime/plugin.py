"""The dask worker plugin: each worker process prepares itself for tilefcn tasks once.

On ``setup`` it turns TF32 off (exact fp32), sets torch's thread count, and — when given a
:class:`~tilefcn.runtime.cache.ModelRef` — loads the model onto the worker's own device and
chooses its backend, so the first task does not pay for it and ``device="cuda"`` from a
CPU-only client resolves on each GPU worker. Registered by :func:`tilefcn.job.run` on the
client it connects to; the tasks work without it (they build the same engine on first use).
"""

from __future__ import annotations

import os

from distributed import WorkerPlugin

from tilefcn.runtime.cache import ModelRef, cached_engines, get_engine
from tilefcn.runtime.device import exact_math, worker_gpu

PLUGIN_NAME = "tilefcn-runtime"


class RuntimePlugin(WorkerPlugin):
    """Prepare a worker: exact maths, torch threads, and (optionally) one model preloaded."""

    name = PLUGIN_NAME

    def __init__(self, ref: ModelRef | None = None) -> None:
        self.ref = ref

    def setup(self, worker) -> None:  # noqa: ANN001 - distributed.Worker
        import torch

        exact_math()
        cores, nthreads = os.cpu_count() or 1, max(1, worker.state.nthreads)
        torch.set_num_threads(max(1, cores // nthreads))  # CPU tasks set theirs: get_engine
        if self.ref is not None:
            engine = get_engine(self.ref)
            worker.tilefcn = {"device": str(engine.device), "backend": engine.backend,
                              "choice": engine.choice, "gpu": worker_gpu(),
                              "engines": cached_engines()}


def worker_report(dask_worker) -> dict:  # noqa: ANN001 - for Client.run
    """What a worker's runtime holds (device, backend, cached engines)."""
    return dict(getattr(dask_worker, "tilefcn", {}), engines=cached_engines(), pid=os.getpid())
