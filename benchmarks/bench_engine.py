"""The engine against its limits, measured in one run on one JPEG-tiled synthetic slide.

Prints (and saves as JSON + a PNG bar chart):

* raw read + JPEG decode of the slide (2 threads, the reader the tasks use), also with a
  56-px halo round every 2048-px window, with and without the cache of decoded boundary
  tiles (:mod:`tilefcn.tiffwindows`);
* end to end (``tilefcn.job.run`` → OME-Zarr) with a near-free stride-8 model
  (``AvgPool2d(8)`` + 1×1 conv; target ≥ 0.9 of decode) and a near-free stride-1 model
  (1×1 conv, 2 classes, ``--dtype float16``; target ≥ 0.5 of decode);
* the bundled ``tissue`` model: its in-memory rate per backend (two threads of one torch
  thread, 2048-px tiles in 256 / 512 / 1024-px halo'd sub-tiles through the engine, no read
  or write; the best edge counts) and end to end with ``--backend auto`` (target ≥ 0.9 of
  the best backend at its best edge; its ceiling, ``1 / (1 + best / decode)``, is printed
  beside it);
* the ceiling of each near-free ratio on this machine: decoding and the model share the
  same cores, so even with nothing else costing anything a run reaches at most
  ``1 / (1 + decode / model)`` of the decode rate (the near-free models' in-memory rates are
  measured like ``tissue``'s);
* for the stride-1 model, whose heatmap has 4 (float16) or 8 (float32) bytes per input
  pixel: the writer alone (compression and pyramid level 1, :func:`write_rate`) and the
  ceiling with it sharing the cores too, ``1 / (1 + decode / model + decode / write)``;
* the peak RSS of every end-to-end run (each in a fresh process; target flat, < 1.5 GB).

Each end-to-end process runs twice: the second run's rate is quoted (the steady rate a
gigapixel scan runs at); the first, cold run's rate and the set-up time (model loading,
``--backend auto``'s measurement, or its cache) are printed beside it.

    python benchmarks/bench_engine.py                  # 8192² slide
    python benchmarks/bench_engine.py --size 4096      # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def near_free(stride: int):
    """A model that costs almost nothing: the machinery around it is what is measured."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = [nn.AvgPool2d(stride)] if stride > 1 else []
    return nn.Sequential(*layers, nn.Conv2d(3, 2, 1)).eval()


def bench_slide(workdir: str | None, size: int, prefix: str = "tilefcn-bench-") -> Path:
    """The ``size``² JPEG-tiled synthetic slide in ``workdir`` (a new temporary folder when
    None), generated once and reused by later runs."""
    from tilefcn.synthetic import write_slide

    folder = Path(workdir or tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    slide = folder / f"slide{size}.ome.tif"
    if not slide.exists():
        write_slide(slide, (size, size), seed=size, compression="jpeg")
    return slide


def decode_rate(slide: str, threads: int = 2, window: int = 2048,
                through_store: bool = False, halo: int = 0, cache: bool = True) -> float:
    """MP/s of image reading + decoding every pixel through the scan's window reader
    (``through_store``: through tifffile's zarr store instead, the reader before [engine]);
    ``halo``: each window grown by that many pixels on every side, as a model's halo does,
    with the reader's cache of decoded boundary tiles fresh (or, without ``cache``, none)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from tilefcn.read import open_scan
    from tilefcn.tiffwindows import TILE_CACHE_MB, TileCache

    scan = open_scan(slide)
    handle = scan.reader._handle()  # the process's cached open file: restored below
    windows = handle.windows
    kept = None if windows is None else windows.cache
    if through_store:
        handle.windows = None
    elif windows is not None:
        windows.cache = TileCache(TILE_CACHE_MB if cache else 0)
    h, w, _ = scan.info.shape
    boxes = [(slice(max(0, y - halo), min(y + window + halo, h)),
              slice(max(0, x - halo), min(x + window + halo, w)))
             for y in range(0, h, window) for x in range(0, w, window)]
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda b: np.asarray(scan.reader[b]).sum(dtype=np.uint64), boxes))
        return h * w / 1e6 / (time.perf_counter() - start)
    finally:
        handle.windows = windows
        if windows is not None:
            windows.cache = kept


def backend_rates(model_spec, seconds: float, names: list[str],
                  edges: tuple[int, ...] = (256, 512, 1024)) -> dict[str, dict]:
    """In-memory MP/s of each backend through the engine (2 threads × 1 torch thread, a
    2048-px tile well inside a larger image, as ``run`` tiles it) at each sub-tile edge:
    ``{backend: {"mp_per_s": best, "sub_tile": its edge, "by_sub_tile": {edge: MP/s}}}``."""
    import numpy as np
    import torch

    from tilefcn.measure.shapes import output_shape
    from tilefcn.modelio import as_eval, load_model
    from tilefcn.plan import plan_tiles
    from tilefcn.runtime.backends import build_runner, installed
    from tilefcn.runtime.cache import interior_window
    from tilefcn.runtime.engine import Engine

    torch.set_num_threads(1)
    model = load_model(model_spec)
    g = model.geometry
    side = 2048 + 2 * 256  # interior sub-windows only
    image_len = side * 3
    out = output_shape(model.module, model.in_channels, (image_len, image_len), g)
    plan = plan_tiles(g, (image_len, image_len), out[1:], 2048)
    tile = plan.tile(1, 1)
    rng = np.random.default_rng(0)
    window = rng.integers(0, 255, (tile.y.read_stop - tile.y.read_start,
                                   tile.x.read_stop - tile.x.read_start, 3), dtype=np.uint8)
    module = as_eval(model.module)
    pixels = (tile.y.out_len * g.stride[0]) * (tile.x.out_len * g.stride[1])
    rates: dict[str, dict] = {}
    for name in names:
        if not installed(name):
            continue
        by_edge = {}
        for edge in edges:
            example = interior_window(g, edge)[0][0]
            engine = Engine(model, build_runner(name, module, torch.device("cpu"),
                                                in_channels=model.in_channels,
                                                example=example),
                            torch.device("cpu"), name)
            engine.run_tile(window, tile.y, tile.x, plan.image_shape, edge)  # warm up
            counts = [0, 0]
            stop = time.perf_counter() + seconds / len(edges)

            def work(i: int, engine: Engine = engine, stop: float = stop,
                     counts: list = counts, edge: int = edge) -> None:
                while time.perf_counter() < stop:
                    engine.run_tile(window, tile.y, tile.x, plan.image_shape, edge)
                    counts[i] += 1

            workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
            start = time.perf_counter()
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            by_edge[edge] = sum(counts) * pixels / 1e6 / (time.perf_counter() - start)
        edge = max(by_edge, key=by_edge.get)
        rates[name] = {"mp_per_s": by_edge[edge], "sub_tile": edge, "by_sub_tile": by_edge}
    return rates


def write_rate(slide: str, workdir: Path, dtype: str, threads: int = 2,
               chunk: int = 2048) -> float:
    """MP/s of the writer stage alone for the near-free stride-1 model: its real output on
    one decoded ``chunk``² window of the slide (encoded to ``dtype`` as the engine does),
    written by ``threads`` threads through :class:`tilefcn.sinks.ZarrSink` — compression
    plus level 1 of the pyramid — at every chunk of a slide-sized OME-Zarr on disk (levels
    ≥ 2, built afterwards from level 1, not counted: a quarter of level 1's pixels)."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from tilefcn.modelio import load_model
    from tilefcn.plan import plan_tiles
    from tilefcn.pyramid import create_levels, plan_levels
    from tilefcn.read import open_scan
    from tilefcn.runtime.scaling import scale_batch
    from tilefcn.sinks import ZarrSink
    from tilefcn.write import create_ome_zarr, encode_block, open_for_writing

    scan = open_scan(slide)
    h, w, _ = scan.info.shape
    model = load_model(near_free(1))
    pixels = np.asarray(scan.reader[(slice(0, chunk), slice(0, chunk))])[None]
    with torch.inference_mode():
        block = model.module(torch.from_numpy(scale_batch(pixels, model.scaling)))[0]
    block = encode_block(block.numpy(), dtype)
    plan = plan_tiles(model.geometry, (h, w), (h, w), chunk)
    out = workdir / f"write-{dtype}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    array = create_ome_zarr(out, shape=(block.shape[0], h, w), chunks=(chunk, chunk),
                            scale=(1.0, 1.0), translation=(0.0, 0.0), unit=None, attrs={},
                            dtype=dtype)
    levels = plan_levels(array.shape, (chunk, chunk), half_first=True)
    create_levels(out, levels, dtype)
    sink = ZarrSink(array, dtype, open_for_writing(out, "1"))
    tiles = plan.tiles()
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda t: sink(t, block[:, :t.y.out_len, :t.x.out_len]), tiles))
    rate = h * w / 1e6 / (time.perf_counter() - start)
    shutil.rmtree(out, ignore_errors=True)
    return rate


def ceiling(decode: float, model: float, write: float | None = None) -> float:
    """The most of ``decode`` an end-to-end run can reach when decoding and the model (and,
    given its rate, the writer) share the same cores and nothing else costs anything: each
    rate uses every core, so a megapixel costs ``1/decode + 1/model (+ 1/write)`` seconds,
    ratio ``1 / (1 + decode / model (+ decode / write))``."""
    return 1.0 / (1.0 + decode / model + (decode / write if write else 0.0))


def child(slide: str, out: str, which: str, dtype: str, backend: str) -> None:
    """In a fresh process: the end-to-end run twice — the first one cold (the process's
    first zarr writes, thread pools, page faults), the second the steady rate a long scan
    runs at; prints JSON (both rates and seconds, peak RSS)."""
    from tilefcn.job import run

    model = {"stride8": lambda: near_free(8), "stride1": lambda: near_free(1)}.get(
        which, lambda: which)()
    start = time.perf_counter()
    cold = run(slide, model, out, overwrite=True, dtype=dtype, backend=backend, device="cpu")
    cold_total = time.perf_counter() - start  # with model loading and --backend auto
    summary = run(slide, model, out, overwrite=True, dtype=dtype, backend=backend,
                  device="cpu")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from tilefcn.tiffwindows import SHARED_TILES  # both runs' boundary-tile lookups

    print(json.dumps({"mp_per_s": summary.mp_per_s, "seconds": summary.seconds,
                      "tile_cache": {"hits": SHARED_TILES.hits,
                                     "misses": SHARED_TILES.misses,
                                     "waits": SHARED_TILES.waits},
                      "cold_mp_per_s": cold.mp_per_s, "cold_seconds": cold.seconds,
                      "cold_seconds_with_setup": cold_total,
                      "peak_rss_mb": peak_mb, "backend": summary.backend,
                      "choice": summary.backend_choice}))


def end_to_end(slide: Path, workdir: Path, which: str, dtype: str = "float32",
               backend: str = "auto") -> dict:
    out = workdir / f"{which}-{dtype}.heatmap.zarr"
    proc = subprocess.run([sys.executable, __file__, "--child", str(slide), str(out), which,
                           dtype, backend], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"end-to-end run {which} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def bar_chart(path: Path, bars: list[tuple[str, float, float | None]]) -> bool:
    """PNG bar chart of MP/s (with target lines); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [b[0] for b in bars]
    ax.barh(names, [b[1] for b in bars], color="#1f77b4")
    for i, (_, value, target) in enumerate(bars):
        ax.text(value, i, f" {value:.1f}", va="center")
        if target:
            ax.plot([target, target], [i - 0.4, i + 0.4], color="#d62728", lw=2)
    ax.invert_yaxis()
    ax.set_xlabel("MP/s (red: target)")
    ax.set_title(f"tilefcn engine, {cpu_name()}, {os.cpu_count()} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--workdir", default=None, help="where to write the slide (tmp)")
    parser.add_argument("--seconds", type=float, default=6.0, help="per backend rate")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile "
                        "(about a minute to compile on 2 cores)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for JSON and PNG")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    slide = bench_slide(args.workdir, args.size)
    workdir = slide.parent
    print(f"{cpu_name()}, {os.cpu_count()} cores; slide {args.size}² JPEG-tiled")
    decode = max(decode_rate(str(slide)) for _ in range(2))
    print(f"decode (read + JPEG, 2 threads):            {decode:7.1f} MP/s")
    store = max(decode_rate(str(slide), through_store=True) for _ in range(2))
    halo = {True: 0.0, False: 0.0}  # alternated, best of three each: the host drifts
    for _ in range(3):
        for cache in halo:
            halo[cache] = max(halo[cache], decode_rate(str(slide), halo=56, cache=cache))
    print(f"  the same through tifffile's zarr store:   {store:7.1f} MP/s (the reader before)")
    print(f"  with a 56-px halo on every side:          {halo[True]:7.1f} MP/s of image "
          f"(without the cache of decoded boundary tiles {halo[False]:.1f}: "
          f"×{halo[True] / halo[False]:.2f})")
    runs = {
        "stride8": end_to_end(slide, workdir, "stride8"),
        "stride1-float16": end_to_end(slide, workdir, "stride1", "float16"),
        "stride1-float32": end_to_end(slide, workdir, "stride1", "float32"),
    }
    names = ["torch", "torch-cl", "onnxruntime"] + (["compile"] if args.compile else [])
    rates = backend_rates("tissue", args.seconds, names)
    runs["tissue-auto"] = end_to_end(slide, workdir, "tissue")
    best = max(r["mp_per_s"] for r in rates.values())
    free = {stride: max(r["mp_per_s"] for r in backend_rates(
        near_free(stride), args.seconds / 2, names[:3]).values()) for stride in (8, 1)}
    writes = {dtype: max(write_rate(str(slide), workdir, dtype) for _ in range(2))
              for dtype in ("float16", "float32")}
    ceilings = {"stride8": ceiling(decode, free[8]), "stride1-float16": ceiling(decode, free[1]),
                "stride1-float32": ceiling(decode, free[1])}
    with_writer = {f"stride1-{dtype}": ceiling(decode, free[1], rate)
                   for dtype, rate in writes.items()}
    for key, target in [("stride8", 0.9), ("stride1-float16", 0.5), ("stride1-float32", None)]:
        r = runs[key]
        print(f"end to end, near-free {key:16s}    {r['mp_per_s']:7.1f} MP/s  "
              f"{r['mp_per_s'] / decode:5.2f} of decode"
              + (f" (target ≥ {target})" if target else "")
              + f"  (cold first run {r['cold_mp_per_s']:.1f})"
              + f"  peak RSS {r['peak_rss_mb']:.0f} MB")
    for stride in (8, 1):
        key = f"stride{stride}" + ("-float16" if stride == 1 else "")
        print(f"  near-free stride-{stride} model in memory: {free[stride]:7.1f} MP/s → ceiling "
              f"{ceilings[key]:.2f} of decode with decode and model sharing these cores "
              f"(reached {runs[key]['mp_per_s'] / decode / ceilings[key]:.2f} of it)")
    for dtype, rate in writes.items():
        key = f"stride1-{dtype}"
        reached = runs[key]["mp_per_s"] / decode / with_writer[key]
        print(f"  its writer alone ({dtype}: compression + pyramid level 1, 2 threads): "
              f"{rate:7.1f} MP/s → ceiling {with_writer[key]:.2f} of decode with the writer "
              f"sharing the cores too (reached {reached:.2f} of it)")
    for name, r in rates.items():
        edges = ", ".join(f"{e}: {v:.1f}" for e, v in r["by_sub_tile"].items())
        print(f"tissue in memory, {name:12s}               {r['mp_per_s']:7.1f} MP/s  "
              f"(sub-tile {edges})")
    t = runs["tissue-auto"]
    print(f"tissue end to end, --backend auto ({t['backend']}, "
          f"{t['choice'].get('sub_tile')}-px sub-tiles) {t['mp_per_s']:7.1f} MP/s  "
          f"{t['mp_per_s'] / best:5.2f} of the best backend (target ≥ 0.9; ceiling "
          f"{ceiling(best, decode):.2f} with decoding sharing these cores)  "
          f"(cold first run {t['cold_mp_per_s']:.1f}, "
          f"{t['cold_seconds_with_setup'] - t['cold_seconds']:.1f} s setup incl. auto)  "
          f"peak RSS {t['peak_rss_mb']:.0f} MB")
    hits, misses = t["tile_cache"]["hits"], t["tile_cache"]["misses"]
    waits = t["tile_cache"].get("waits", 0)
    print(f"  its boundary-tile cache (both runs): {hits} hits, {misses} misses "
          f"({hits / max(1, hits + misses):.0%} of lookups), {waits} waits for a tile "
          f"another thread was decoding")
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "size": args.size,
              "decode_mp_per_s": decode, "decode_through_zarr_store_mp_per_s": store,
              "decode_halo56_mp_per_s": halo[True],
              "decode_halo56_without_tile_cache_mp_per_s": halo[False],
              "end_to_end": runs, "tissue_backends": rates,
              "near_free_in_memory_mp_per_s": {f"stride{k}": v for k, v in free.items()},
              "ceilings_vs_decode": ceilings,
              "stride1_writer_mp_per_s": writes,
              "stride1_ceilings_with_writer_vs_decode": with_writer,
              "tissue_ceiling_vs_best_backend": ceiling(best, decode),
              "ratios": {"stride8_vs_decode": runs["stride8"]["mp_per_s"] / decode,
                         "stride1_float16_vs_decode":
                             runs["stride1-float16"]["mp_per_s"] / decode,
                         "tissue_auto_vs_best_backend": t["mp_per_s"] / best},
              "peak_rss_mb": max(r["peak_rss_mb"] for r in runs.values())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_engine.json").write_text(json.dumps(result, indent=1))
    bars = [("decode", decode, None), ("decode (zarr store)", store, None),
            ("stride-8 e2e", runs["stride8"]["mp_per_s"], 0.9 * decode),
            ("stride-1 e2e f16", runs["stride1-float16"]["mp_per_s"], 0.5 * decode),
            ("stride-1 e2e f32", runs["stride1-float32"]["mp_per_s"], None),
            *[(f"tissue {n}", r["mp_per_s"], None) for n, r in rates.items()],
            ("tissue e2e auto", t["mp_per_s"], 0.9 * best)]
    png = out / "bench_engine.png"
    saved = bar_chart(png, bars)
    print(f"saved {out / 'bench_engine.json'}" + (f" and {png}" if saved else
          " (pip install matplotlib for the PNG chart)"))


if __name__ == "__main__":
    main()
