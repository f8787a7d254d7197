"""``--mask auto`` against an unmasked run on a slide whose tissue is one disk.

The slide (``--size``², default 8192², pyramidal JPEG-tiled TIFF) holds a disk of H&E-like
stain covering ``--tissue`` of it (default 20 %); the rest is glass with a little noise.
Both runs write OME-Zarr through ``tilefcn.job.run`` (same model, tile, workers; the mask's
own cost — reading a low level, Otsu, pooling — counts against ``auto``). Printed:

- seconds of each run and the speed ratio ``t_none / t_auto`` (target ≥ 2.5 at 20 %),
- far background NaN: the share of outputs whose receptive-field centre lies more than two
  sub-tiles plus one receptive field outside the disk that are NaN (target 100 %; a kept
  sub-tile touching the disk at a corner reaches 1.5·√2 sub-tiles out), and the share of all
  background outputs (receptive field clear of the disk) that are NaN,
- computed outputs: the largest difference from the unmasked run (must be 0) and how many
  outputs on the disk were left NaN (must be 0).

    python benchmarks/bench_mask.py                       # 8192², the issue's figures
    python benchmarks/bench_mask.py --size 2048 --model tissue --json out.json   # quick
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

GLASS = np.array([247, 246, 249])
EOSIN, HEMA = np.array([0.07, 0.99, 0.11]), np.array([0.65, 0.70, 0.29])


def _render(size: int, radius: float, q: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Pixels ``[y0, y0+h) × [x0, x0+w)`` of pyramid level ``q`` (a level-0 pixel every q)."""
    rng = np.random.default_rng([size, q, y0, x0])
    ys = (np.arange(y0, y0 + h) * q + q // 2)[:, None]
    xs = (np.arange(x0, x0 + w) * q + q // 2)[None, :]
    disk = (ys - size / 2) ** 2 + (xs - size / 2) ** 2 < radius ** 2
    od = (rng.uniform(0.15, 0.8, (h, w, 1)) * EOSIN
          + rng.uniform(0, 1, (h, w, 1)) ** 4 * HEMA)
    tissue = 255 * np.exp(-od - 0.03)
    glass = GLASS + rng.integers(-2, 3, (h, w, 3))
    return np.where(disk[..., None], tissue, glass).astype(np.uint8)


def disk_slide(path: Path, size: int, tissue: float, tile: int = 256) -> float:
    """Write the slide (levels halved down to < 1024 px, as SubIFDs); returns the radius."""
    import tifffile

    radius = math.sqrt(tissue / math.pi) * size
    levels = max(1, math.floor(math.log2(size / 1024)) + 2)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for lv in range(levels):
            q, side = 2 ** lv, -(-size // 2 ** lv)

            def tiles(q: int = q, side: int = side):
                for y in range(0, side, tile):
                    for x in range(0, side, tile):
                        h, w = min(tile, side - y), min(tile, side - x)
                        block = np.zeros((tile, tile, 3), np.uint8)
                        block[:h, :w] = _render(size, radius, q, y, x, h, w)
                        yield block

            tif.write(tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile),
                      photometric="rgb", compression="jpeg",
                      **({"subifds": levels - 1} if lv == 0 else {"subfiletype": 1}))
    return radius


def _timed_run(slide: Path, out: Path, mask: str, args: argparse.Namespace) -> float:
    from tilefcn.job import run

    start = time.perf_counter()
    run(str(slide), args.model, out, mask=mask, tile=args.tile, workers=args.workers,
        overwrite=True, backend=args.backend)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="slide edge in pixels")
    parser.add_argument("--tissue", type=float, default=0.2, help="share of the slide")
    parser.add_argument("--model", default="tissue")
    parser.add_argument("--tile", type=int, default=None, help="chunk edge (default: run's)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--sub-tile", type=int, default=256,
                        help="the engine's sub-tile (CPU default), for 'far background'")
    parser.add_argument("--workdir", help="keep the slide and heatmaps here (reused)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    import zarr

    import tilefcn

    folder = Path(args.workdir or tempfile.mkdtemp(prefix="tilefcn-bench-mask-"))
    folder.mkdir(parents=True, exist_ok=True)
    slide = folder / f"disk{args.size}-{round(100 * args.tissue)}.tif"
    radius = math.sqrt(args.tissue / math.pi) * args.size
    if not slide.exists():
        disk_slide(slide, args.size, args.tissue)
    tilefcn.predict(np.full((512, 512, 3), 200, np.uint8), args.model,  # backend choice,
                    backend=args.backend).compute()  # cached: not timed in either run
    seconds = {m: _timed_run(slide, folder / f"{m}.zarr", m, args) for m in ("none", "auto")}
    plain, masked = (zarr.open_group(str(folder / f"{m}.zarr"), mode="r")["0"][:]
                     for m in ("none", "auto"))
    g = tilefcn.load_model(args.model).geometry
    cy = g.centre(0) + g.stride[0] * np.arange(plain.shape[1])
    cx = g.centre(1) + g.stride[1] * np.arange(plain.shape[2])
    dist = np.hypot(cy[:, None] - args.size / 2, cx[None, :] - args.size / 2) - radius
    far = dist > 2 * args.sub_tile + max(g.receptive_field)
    background = dist > max(g.receptive_field) / 2
    inside = dist < -max(g.receptive_field)
    nan = np.isnan(masked).all(axis=0)
    done = ~np.isnan(masked)
    figures = {
        "size": args.size, "tissue": args.tissue, "model": args.model,
        "seconds_none": round(seconds["none"], 2), "seconds_auto": round(seconds["auto"], 2),
        "speed_ratio": round(seconds["none"] / seconds["auto"], 2),
        "far_background_nan_pct": round(100 * float(nan[far].mean()), 2),
        "background_nan_pct": round(100 * float(nan[background].mean()), 2),
        "outputs_nan_pct": round(100 * float(nan.mean()), 2),
        "max_diff_computed": float(np.abs(masked[done] - plain[done]).max(initial=0)),
        "disk_outputs_nan": int(nan[inside].sum()),
    }
    for key, value in figures.items():
        print(f"{key:>24}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
