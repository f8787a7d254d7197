"""The engine on a CUDA GPU: decode rate, end-to-end MP/s, GPU busy fraction, exactness and
reduced-precision error, one vs two worker processes per GPU. Run on a machine with CUDA;
elsewhere it says so and exits 0.

    python benchmarks/bench_gpu.py                 # 8192² slide, bundled `tissue`
    python benchmarks/bench_gpu.py --size 4096

Busy fraction: CUDA events around every model call on the GPU, summed, over wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def busy_fraction(slide: str, out: Path, model: str) -> tuple[float, float]:
    """(end-to-end MP/s, fraction of wall time the GPU ran the model) for one local run."""
    import torch

    from tilefcn import job
    from tilefcn.runtime import cache

    spans: list = []
    build = cache._build

    def timed_build(ref, device):  # wrap the runner: events around each call
        engine = build(ref, device)
        runner = engine.runner

        def timed(x):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
            y = runner(x)
            end.record()
            spans.append((start, end))
            return y

        engine.runner = timed
        return engine

    cache._build = timed_build
    try:
        t0 = time.perf_counter()
        summary = job.run(slide, model, out, overwrite=True, device="cuda")
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        cache._build = build
    busy = sum(s.elapsed_time(e) for s, e in spans) / 1e3
    return summary.mp_per_s, busy / wall


def exactness(model_spec: str, size: int = 2048) -> dict:
    """Max |tiled − whole image| on the GPU for fp32, bf16, fp16 (whole image in fp32)."""
    import numpy as np
    import torch

    import tilefcn
    from tilefcn.modelio import load_model
    from tilefcn.runtime.device import exact_math

    exact_math()
    model = load_model(model_spec)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (size, size, model.in_channels), dtype=np.uint8)
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None].cuda()
    with torch.inference_mode():
        whole = model.module.cuda().eval()(x)[0].float().cpu().numpy()
    errors = {}
    for precision in ("fp32", "bf16", "fp16"):
        heat = tilefcn.predict(image, model_spec, device="cuda", precision=precision,
                               tile=1024).compute(scheduler="threads")
        errors[precision] = float(np.abs(heat - whole).max())
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--model", default="tissue")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: bench_gpu.py has nothing to measure (exit 0)")
        return
    from bench_engine import bench_slide, decode_rate

    from tilefcn import job

    slide = bench_slide(args.workdir, args.size, "tilefcn-gpu-")
    workdir = slide.parent
    result: dict = {"gpu": torch.cuda.get_device_name(0), "size": args.size}
    result["decode_mp_per_s"] = decode_rate(str(slide), threads=4)
    rate, busy = busy_fraction(str(slide), workdir / "local.zarr", args.model)
    result.update(end_to_end_mp_per_s=rate, gpu_busy_fraction=busy)
    result["max_error_vs_whole_image"] = exactness(args.model)
    for per_gpu in (1, 2):
        from tilefcn.cluster import gpu_cluster

        with gpu_cluster(1, per_gpu=per_gpu) as cluster:
            t0 = time.perf_counter()
            summary = job.run(str(slide), args.model, workdir / f"p{per_gpu}.zarr",
                              overwrite=True, device="cuda", scheduler=cluster.scheduler_address)
            result[f"processes_per_gpu_{per_gpu}_mp_per_s"] = summary.mp_per_s
            result[f"processes_per_gpu_{per_gpu}_s"] = time.perf_counter() - t0
    print(json.dumps(result, indent=1))
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
