"""The engine on a CUDA GPU: decode rate, end-to-end MP/s, GPU busy fraction, exactness and
reduced-precision error, one vs two worker processes per GPU (each run twice: the cold
first run, with model loading, and the steady second one). Run on a machine with CUDA;
elsewhere it says so and exits 0 (``--device cpu`` rehearses every step on the CPU).

    python benchmarks/bench_gpu.py                 # 8192² slide, bundled `tissue`
    python benchmarks/bench_gpu.py --size 4096
    python benchmarks/bench_gpu.py --device cpu --size 512   # the same steps, no GPU

Busy fraction: the length of the union of the model calls' spans over wall time — CUDA events
recorded on each thread's stream around every call on the GPU (host clocks on the CPU).
Calls of two threads that overlap count once, so the fraction is at most 1.
Exactness: max |tiled − whole image| with the whole image run once on the same device in
fp32 (TF32 off), both scaled by the model's own :class:`~tilefcn.modelio.Scaling`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """Length (s) of the union of the intervals ``[start, end)``."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


class HostSpans:
    """Spans of model calls by the host clock (a CPU runner returns when it is done)."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def around(self, runner, x):
        start = time.perf_counter()
        y = runner(x)
        with self._lock:
            self.spans.append((start, time.perf_counter()))
        return y

    def finish(self) -> list[tuple[float, float]]:
        return self.spans


class CudaSpans:  # GPU only: not run by the CPU tests
    """Spans of model calls by CUDA events on the caller's current stream (the lane's),
    as seconds after a reference event recorded when the run starts."""

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self._ref = torch.cuda.Event(enable_timing=True)
        self._ref.record()
        self.events: list = []
        self._lock = threading.Lock()

    def around(self, runner, x):
        event = self._torch.cuda.Event
        start, end = event(enable_timing=True), event(enable_timing=True)
        start.record()
        y = runner(x)
        end.record()
        with self._lock:
            self.events.append((start, end))
        return y

    def finish(self) -> list[tuple[float, float]]:
        self._torch.cuda.synchronize()
        return [(self._ref.elapsed_time(s) / 1e3, self._ref.elapsed_time(e) / 1e3)
                for s, e in self.events]


def busy_fraction(slide: str, out: Path, model: str, device: str) -> dict:
    """One local run, twice in this process: the cold first run's MP/s (model loading,
    warm-up) and the second, steady run's MP/s and fraction of its wall time the device ran
    the model."""
    import torch

    from tilefcn import job
    from tilefcn.runtime import cache

    build = cache._build
    timer: list = [None]

    class Timed:  # the runner, each call through the timer (its attributes kept:
        def __init__(self, runner) -> None:  # channels_last decides the input layout)
            self.runner = runner

        def __call__(self, x):
            return timer[0].around(self.runner, x)

        def __getattr__(self, name: str):
            return getattr(self.runner, name)

    def timed_build(ref, dev):
        engine = build(ref, dev)
        engine.runner = Timed(engine.runner)
        return engine

    cache._build = timed_build
    figures: dict = {}
    try:
        for run in ("cold", "steady"):
            timer[0] = CudaSpans() if device == "cuda" else HostSpans()
            t0 = time.perf_counter()
            summary = job.run(slide, model, out, overwrite=True, device=device)
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            figures[f"{run}_mp_per_s"] = summary.mp_per_s
        figures["busy_fraction"] = busy_seconds(timer[0].finish()) / wall
    finally:
        cache._build = build
    return figures


def exactness(model_spec: str, device: str, size: int = 2048) -> dict:
    """Max |tiled − whole image| on ``device`` for fp32, bf16, fp16 (whole image in fp32)."""
    import numpy as np
    import torch

    import tilefcn
    from tilefcn.modelio import as_eval, load_model
    from tilefcn.runtime.device import exact_math
    from tilefcn.runtime.scaling import scale_input

    exact_math()
    model = load_model(model_spec)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (size, size, model.in_channels), dtype=np.uint8)
    x = torch.from_numpy(scale_input(image, model.scaling)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        module = as_eval(model.module).to(device)
        whole = module(x.contiguous().to(device))[0].float().cpu().numpy()
    errors = {}
    for precision in ("fp32", "bf16", "fp16"):
        heat = tilefcn.predict(image, model_spec, device=device, precision=precision,
                               tile=min(1024, size // 2)).compute(scheduler="threads")
        errors[precision] = float(np.abs(heat - whole).max())
    return errors


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--model", default="tissue")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: rehearse every step without a GPU (figures not saved)")
    args = parser.parse_args(argv)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # before dask is imported
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: bench_gpu.py has nothing to measure (exit 0)")
        return None
    from bench_engine import bench_slide, decode_rate

    from tilefcn import job
    from tilefcn.cluster import gpu_cluster

    cuda = args.device == "cuda"
    slide = bench_slide(args.workdir, args.size, "tilefcn-gpu-")
    workdir = slide.parent
    result: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu",
                    "size": args.size}
    result["decode_mp_per_s"] = decode_rate(str(slide), threads=4)
    result["end_to_end"] = busy_fraction(str(slide), workdir / "local.zarr", args.model,
                                         args.device)
    result["max_error_vs_whole_image"] = exactness(args.model, args.device,
                                                   min(2048, args.size))
    for per_gpu in (1, 2):  # twice on each cluster: cold (workers load the model), steady
        with gpu_cluster(1, per_gpu=per_gpu, require_cuda=cuda) as cluster:
            rates = [job.run(str(slide), args.model, workdir / f"p{per_gpu}.zarr",
                             overwrite=True, device=args.device,
                             scheduler=cluster.scheduler_address).mp_per_s for _ in range(2)]
            result[f"processes_per_gpu_{per_gpu}"] = {"cold_mp_per_s": rates[0],
                                                      "steady_mp_per_s": rates[1]}
    print(json.dumps(result, indent=1))
    if cuda:  # a rehearsal's figures are not GPU figures
        out = Path(__file__).resolve().parent / "results"
        out.mkdir(exist_ok=True)
        (out / "bench_gpu.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
