"""Cohort throughput: the same scans on the threaded scheduler, a 1-process and a 2-process
local cluster, measured in one run.

Prints, for each executor: scans/hour on a cohort of ``--scans`` synthetic JPEG-tiled slides
(``--size`` px square) and its ratio to the 1-process cluster; and the per-scan overhead
(scheduling, planning, metadata, store creation and finish) as seconds per scan on a cohort
of ``--small`` scans of ``--small-size`` px (one tile each, where the model costs ~nothing).
Cluster start-up and the workers' first model load are timed separately, not in the rates.

    python benchmarks/bench_cohort.py                       # 8 × 2048² + 16 small scans
    python benchmarks/bench_cohort.py --scans 2 --size 512 --small 2   # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EXECUTORS = ("threads", "1-process", "2-process")


def make_cohort(folder: Path, count: int, size: int, prefix: str) -> list[Path]:
    """``count`` synthetic slides of ``size``² px (JPEG-tiled, one level), masks elsewhere."""
    from tilefcn.synthetic import write_slide

    (folder / "masks").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{prefix}{i:03d}.tif"
        write_slide(path, (size, size), seed=i, levels=1,
                    mask_path=folder / "masks" / f"{prefix}{i:03d}.mask.tif")
        paths.append(path)
    return paths


@contextlib.contextmanager
def executor_client(name: str):  # noqa: ANN201
    """None for threads, else a client of a LocalCluster with 1 or 2 worker processes."""
    from tilefcn.cluster import cluster_client

    processes = {"threads": None, "1-process": 1, "2-process": 2}[name]
    with cluster_client(processes=processes) as client:
        yield client


def run_cohort_once(scans: list[Path], out_dir: Path, model: Any, client: Any,
                    tile: int | None) -> tuple[float, list]:
    """Wall seconds for the whole cohort (fresh outputs), and its rows."""
    from tilefcn.cohort import expand_inputs, run_cohort
    from tilefcn.job import run

    jobs = expand_inputs(scans, out_dir=out_dir)
    in_flight = 4 if client is not None else 1

    def one(job):  # noqa: ANN001, ANN202
        return run(job.image, model, job.out, tile=tile, scheduler=client, overwrite=True)

    start = time.perf_counter()
    rows = run_cohort(jobs, one, in_flight=in_flight)
    seconds = time.perf_counter() - start
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        raise RuntimeError(f"{failed[0].scan}: {failed[0].error}")
    return seconds, rows


def bench(args: argparse.Namespace) -> dict:
    from tilefcn.modelio import load_model

    model = load_model(args.model)
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as tmp:
        root = Path(tmp)
        big = make_cohort(root / "big", args.scans, args.size, "scan")
        small = make_cohort(root / "small", args.small, args.small_size, "small")
        warm = small[:1]
        results: dict[str, dict] = {}
        for name in EXECUTORS:
            start = time.perf_counter()
            with executor_client(name) as client:
                started = time.perf_counter() - start
                warm_s, _ = run_cohort_once(warm, root / f"warm-{name}", model, client,
                                            args.tile)  # workers load the model once
                big_s, rows = run_cohort_once(big, root / f"out-{name}", model, client,
                                              args.tile)
                small_s, _ = run_cohort_once(small, root / f"small-{name}", model, client,
                                             None)
            mp = sum(r.megapixels for r in rows)
            results[name] = {
                "start_s": round(started, 2), "first_scan_s": round(warm_s, 2),
                "cohort_s": round(big_s, 2), "scans_per_hour": round(3600 * len(big) / big_s, 1),
                "mp_per_s": round(mp / big_s, 2),
                "overhead_s_per_small_scan": round(small_s / len(small), 3)}
            print(f"{name:>10}: {results[name]}", file=sys.stderr)
    base = results["1-process"]["scans_per_hour"]
    for r in results.values():
        r["ratio_to_1_process"] = round(r["scans_per_hour"] / base, 2) if base else None
    return {"scans": args.scans, "size": args.size, "small": args.small,
            "small_size": args.small_size, "model": args.model, "tile": args.tile,
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=8, help="scans in the timed cohort")
    parser.add_argument("--size", type=int, default=2048, help="edge of each scan, px")
    parser.add_argument("--small", type=int, default=16, help="small scans (overhead)")
    parser.add_argument("--small-size", type=int, default=256, help="edge of a small scan")
    parser.add_argument("--model", default="tissue")
    parser.add_argument("--tile", type=int, default=1024, help="chunk edge, px")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    report = bench(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
