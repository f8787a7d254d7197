"""COG heatmap writing: time and peak memory of :class:`tilefcn.cog.CogSink` vs the OME-Zarr
store, and proof that memory does not grow with the heatmap.

Part 1 (``sink``): synthetic two-class heatmaps (a blurred noise field through a sigmoid, as
``bench_codec.py``) of ``S`` × ``S`` px, written chunk by chunk in a fresh process each (peak
RSS from ``getrusage``): into a COG (``CogSink``: intermediate tiles + GDAL's COG driver,
DEFLATE, overviews) with chunks aligned to its tiles (512) and not (500), and into an
OME-Zarr level 0 (no pyramid) for comparison. Reported: seconds to write the chunks, seconds
to finish (overviews + layout; zarr: 0), MB/s of raw float32, file size, peak RSS. Peak RSS
must stay flat across ``--sizes``.

Part 2 (``run``): ``tilefcn run`` end to end on a generated scene (``write_scene``, 4 bands)
with the bundled ``landcover`` model, ``--out .zarr`` vs ``--out .tif``: seconds and MP/s.

    python benchmarks/bench_cog.py                               # sizes 4096 8192, scene 4096
    python benchmarks/bench_cog.py --sizes 1024 --scene 512      # a quick check
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

CLASSES = 2


def _heat_block(seed: int, shape: tuple[int, int]) -> np.ndarray:
    """A smooth two-class probability block ``(2, h, w)`` float32."""
    rng = np.random.default_rng(seed)
    small = rng.standard_normal((shape[0] // 8 + 2, shape[1] // 8 + 2)).astype(np.float32)
    field = np.kron(small, np.ones((8, 8), np.float32))[:shape[0], :shape[1]]
    p = 1 / (1 + np.exp(-3 * field))
    return np.stack([p, 1 - p]).astype(np.float32)


def _sink_child(kind: str, size: int, chunk: int, path: str) -> dict:
    """Write a ``size``² heatmap in ``chunk``² blocks; returns the figures (run in a child)."""
    import zarr

    from tilefcn.cog import CogSink
    from tilefcn.write import COMPRESSORS

    shape = (CLASSES, size, size)
    start = time.perf_counter()
    if kind == "cog":
        sink = CogSink.open(path, shape=shape, chunks=(chunk, chunk), crs="EPSG:32633",
                            geotransform=(500000.0, 10.0, 0.0, 4600000.0, 0.0, -10.0))
        write = sink.write
    else:
        array = zarr.create_array(path, shape=shape, chunks=(CLASSES, chunk, chunk),
                                  dtype="float32", compressors=COMPRESSORS["float32"])

        def write(y: int, x: int, block: np.ndarray) -> None:
            array[:, y:y + block.shape[1], x:x + block.shape[2]] = block
    for y in range(0, size, chunk):
        for x in range(0, size, chunk):
            h, w = min(chunk, size - y), min(chunk, size - x)
            write(y, x, _heat_block(y * size + x, (h, w)))
    written = time.perf_counter()
    if kind == "cog":
        sink.finish()
    done = time.perf_counter()
    nbytes = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) \
        if Path(path).is_dir() else Path(path).stat().st_size
    return {"write_s": written - start, "finish_s": done - written,
            "mb_per_s": CLASSES * size * size * 4 / 1e6 / (done - start),
            "file_mb": nbytes / 1e6,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3}


def _in_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_sinks(sizes: list[int], tmp: Path) -> None:
    print(f"{'writer':<18}{'size':>7}{'write s':>9}{'finish s':>10}{'MB/s':>8}"
          f"{'file MB':>9}{'peak RSS MB':>13}")
    for size in sizes:
        for kind, chunk in (("cog", 512), ("cog", 500), ("zarr", 512)):
            path = tmp / f"{kind}-{size}-{chunk}.{'tif' if kind == 'cog' else 'zarr'}"
            r = _in_child(kind, str(size), str(chunk), str(path))
            print(f"{kind + f' chunk {chunk}':<18}{size:>7}{r['write_s']:>9.2f}"
                  f"{r['finish_s']:>10.2f}{r['mb_per_s']:>8.0f}{r['file_mb']:>9.1f}"
                  f"{r['peak_rss_mb']:>13.0f}", flush=True)


def bench_run(size: int, tmp: Path) -> None:
    from tilefcn.job import run
    from tilefcn.synthetic import write_scene

    scene = write_scene(tmp / "scene.tif", (size, size), seed=0).image
    print(f"\ntilefcn run landcover on a {size}² scene")
    for suffix in (".zarr", ".tif"):
        summary = run(scene, "landcover", tmp / f"scene.heatmap{suffix}", device="cpu")
        print(f"  {suffix:<6}{summary.seconds:8.2f} s {summary.mp_per_s:8.2f} MP/s",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--scene", type=int, default=4096, help="0: skip part 2")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, size, chunk, path = args.child
        print(json.dumps(_sink_child(kind, int(size), int(chunk), path)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        bench_sinks(args.sizes, Path(tmp))
        if args.scene:
            bench_run(args.scene, Path(tmp))


if __name__ == "__main__":
    main()
