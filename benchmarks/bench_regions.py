"""`tilefcn export --geojson` on large heatmaps: seconds, heatmap MP/s, polygons and peak RSS.

Each size runs in a fresh process (so ``ru_maxrss`` is that run's peak): a two-class heatmap
``(2, N, N)`` float32 is written chunk by chunk into an OME-Zarr store (``p = sigmoid(6·f)``
with ``f`` a bilinearly upsampled random grid of one node per ``--cell`` px: blobs of
~``cell`` px that cross the chunk seams), then :func:`tilefcn.regions.export_geojson` writes
the class-1 regions (argmax) and the ``p ≥ 0.5`` regions. Peak RSS that stays flat while N
doubles is the bounded-memory claim; polygons must be identical for every ``--block``.

    python benchmarks/bench_regions.py --sizes 256             # smoke test (seconds)
    python benchmarks/bench_regions.py --sizes 4096 8192 16384 # the real figures
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _field(grid: np.ndarray, cell: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of ``grid`` (one node per ``cell`` px) on rows/cols of a window."""
    ys, xs = (np.arange(y0, y0 + h) + 0.5) / cell, (np.arange(x0, x0 + w) + 0.5) / cell
    iy, ix = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - iy)[:, None], (xs - ix)[None, :]
    g = grid
    return ((1 - fy) * (1 - fx) * g[iy][:, ix] + (1 - fy) * fx * g[iy][:, ix + 1]
            + fy * (1 - fx) * g[iy + 1][:, ix] + fy * fx * g[iy + 1][:, ix + 1])


def _write_store(path: Path, size: int, chunk: int, cell: int, seed: int) -> None:
    from tilefcn.geometry import Geometry
    from tilefcn.write import create_ome_zarr, finish_ome_zarr

    grid = np.random.default_rng(seed).normal(size=(size // cell + 2, size // cell + 2))
    attrs = {"classes": ["other", "target"], "source": {"level": 0, "downsamples": [1.0]},
             "geometry": Geometry(receptive_field=(8, 8), stride=(8, 8), offset=(0, 0)).to_dict()}
    array = create_ome_zarr(path, shape=(2, size, size), chunks=(chunk, chunk),
                            scale=(8.0, 8.0), translation=(3.5, 3.5), unit=None, attrs=attrs)
    for y0 in range(0, size, chunk):
        for x0 in range(0, size, chunk):
            h, w = min(chunk, size - y0), min(chunk, size - x0)
            p = 1 / (1 + np.exp(-6 * _field(grid, cell, y0, x0, h, w)))
            array[:, y0:y0 + h, x0:x0 + w] = np.stack([1 - p, p]).astype(np.float32)
    finish_ome_zarr(path, levels=0)


def _one(size: int, chunk: int, cell: int, block: int | None) -> dict:
    from tilefcn.regions import export_geojson

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "h.zarr"
        _write_store(store, size, chunk, cell, seed=size)
        rss_store = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows = {}
        for name, threshold in (("argmax", None), ("p>=0.5", 0.5)):
            start = time.perf_counter()
            result = export_geojson(store, Path(tmp) / f"{len(rows)}.geojson",
                                    classes=["target"], threshold=threshold, block=block)
            seconds = time.perf_counter() - start
            rows[name] = {"seconds": round(seconds, 2), "polygons": result.polygons["target"],
                          "heatmap_mp_per_s": round(size * size / 1e6 / seconds, 1),
                          "geojson_mb": round((Path(result.out)).stat().st_size / 1e6, 1)}
    return {"size": size, "peak_rss_mb": round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_writing_store_mb": round(rss_store, 1), **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384],
                        help="heatmap edges in px (a stride-8 model: slides 8× larger)")
    parser.add_argument("--chunk", type=int, default=256, help="store chunk edge (px)")
    parser.add_argument("--cell", type=int, default=48, help="blob scale (px)")
    parser.add_argument("--block", type=int, help="export block edge (default: tilefcn's)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.chunk, args.cell, args.block)))
        return
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(size), "--chunk", str(args.chunk),
               "--cell", str(args.cell)] + (["--block", str(args.block)] if args.block else [])
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                        text=True).stdout.strip().splitlines()[-1])
        print(json.dumps(row))


if __name__ == "__main__":
    main()
