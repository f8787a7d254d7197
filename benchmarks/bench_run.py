"""End-to-end throughput and memory of ``tilefcn run`` on JPEG-tiled synthetic slides.

Prints, for each slide size: end-to-end MP/s (read → infer → OME-Zarr write) and its ratio to
the model's own best rate on in-memory 256-px halo'd tiles (measured in the same run), and the
peak RSS of the process that ran it (a fresh subprocess per size, so sizes compare fairly).

    python benchmarks/bench_run.py                 # 8k and 16k slides, bundled `tissue`
    python benchmarks/bench_run.py --sizes 4096    # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def model_rate(model_spec: str, tile: int = 256, seconds: float = 8.0) -> float:
    """MP/s of the bare model on in-memory ``tile``² RGB tiles plus halo, best layout
    (channels_last, inference_mode, one torch thread per worker thread, 2 threads)."""
    import threading

    import numpy as np

    from tilefcn.modelio import load_model
    from tilefcn.runtime.cache import get_engine, make_ref

    model = load_model(model_spec)
    engine = get_engine(make_ref(model, "cpu", torch_threads=1))

    def forward(window: np.ndarray) -> None:
        engine.runner(engine._prepare(window[None]))
    g = model.geometry
    halo = sum(g.halo(0))
    side = tile + halo
    window = np.random.default_rng(0).integers(0, 255, (side, side, model.in_channels),
                                               dtype=np.uint8)
    counts = [0] * (os.cpu_count() or 1)
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            forward(window)
            counts[i] += 1

    forward(window)  # warm up
    stop = time.perf_counter() + seconds
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(counts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) * tile * tile / 1e6 / seconds


def child(slide: str, out: str, model: str) -> None:
    """Run in a fresh process: the end-to-end run, then print JSON with rate and peak RSS."""
    from tilefcn.job import run

    summary = run(slide, model, out, overwrite=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mp_per_s": summary.mp_per_s, "seconds": summary.seconds,
                      "megapixels": summary.megapixels, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--model", default="tissue")
    parser.add_argument("--workdir", default=None, help="where to write slides (default: tmp)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from tilefcn.synthetic import write_slide

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tilefcn-bench-"))
    best = model_rate(args.model)
    print(f"model {args.model}: best in-memory rate on 256-px tiles: {best:.2f} MP/s")
    print(f"{'slide':>12} {'MP':>8} {'s':>8} {'MP/s':>8} {'ratio':>7} {'peak RSS MB':>12}")
    for size in args.sizes:
        slide = workdir / f"slide{size}.ome.tif"
        if not slide.exists():
            t0 = time.perf_counter()
            write_slide(slide, (size, size), seed=size, compression="jpeg")
            gen = time.perf_counter() - t0
            print(f"  (generated {size}² JPEG slide in {gen:.1f} s, "
                  f"{size * size / 1e6 / gen:.0f} MP/s)")
        out = workdir / f"slide{size}.heatmap.zarr"
        proc = subprocess.run([sys.executable, __file__, "--child", str(slide), str(out),
                               args.model], capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{size:>10}² {r['megapixels']:8.1f} {r['seconds']:8.1f} {r['mp_per_s']:8.2f} "
              f"{r['mp_per_s'] / best:7.2f} {r['peak_rss_mb']:12.0f}")


if __name__ == "__main__":
    main()
