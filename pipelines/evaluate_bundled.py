"""Evaluate the bundled models on fresh synthetic scans (seeds never used in training).

    python pipelines/evaluate_bundled.py [--tissue SPEC] [--landcover SPEC] [--data DIR]

Each heatmap pixel is compared, by argmax, with the mask label at its receptive-field centre
(offset + stride·i + (rf - 1)//2 per axis), counting only pixels whose label is the same over
the ±16 px square around that centre ("away from class boundaries"). Prints accuracy overall
and per class (and, for reference, over all heatmap pixels, boundaries included: "all px");
exits 1 when a model is below the 0.95 target away from boundaries.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

import tilefcn
from tilefcn.modelio import load_model
from tilefcn.synthetic import write_scene, write_slide
from tilefcn.train import centre_accuracy

TARGET = 0.95
SEEDS = (1001, 1002)


def scans(kind: str, data: Path) -> list[tuple[str, Path, Path]]:
    """Fresh scans ``(label, image, mask)`` for ``kind`` (``tissue`` or ``landcover``)."""
    out = []
    for seed in SEEDS:
        if kind == "tissue":
            for comp, art in (("jpeg", False), ("zlib", False), ("jpeg", True)):
                tag = f"slide {seed} {comp}" + (" pen+bubbles" if art else "")
                path = data / f"slide-{seed}-{comp}{'-art' if art else ''}.ome.tif"
                s = write_slide(path, (4096, 4096), seed=seed, compression=comp, levels=1,
                                pen=art, bubbles=art)
                out.append((tag, s.image, s.mask))
        else:
            s = write_scene(data / f"scene-{seed}.tif", (2048, 2048), seed=seed)
            out.append((f"scene {seed}", s.image, s.mask))
    return out


def evaluate(spec: str, kind: str, data: Path, radius: int = 16) -> list[tuple]:
    """Rows ``(scan, overall, per-class list, counts, seconds, accuracy over all pixels)``."""
    model = load_model(spec)
    g = model.geometry
    rows = []
    for tag, image, mask in scans(kind, data):
        start = time.perf_counter()
        heatmap = tilefcn.predict(image, spec, device="cpu").compute()
        seconds = time.perf_counter() - start
        labels = tifffile.imread(mask)
        args = (heatmap.argmax(0), labels, g.stride, g.offset, g.receptive_field,
                len(model.classes))
        acc, per, counts = centre_accuracy(*args, radius)
        everywhere = centre_accuracy(*args, 0)[0]
        rows.append((tag, acc, per, counts, seconds, everywhere))
    return rows


def table(name: str, classes: tuple[str, ...], rows: list[tuple]) -> float:
    """Print one model's table; returns the pooled accuracy over all its scans."""
    width = max(len(c) for c in classes) + 2
    print(f"\n{name}: accuracy away from class boundaries (±16 px), fresh seeds {SEEDS}")
    print(f"{'scan':<28}{'overall':>9}" + "".join(f"{c:>{max(width, 9)}}" for c in classes)
          + f"{'pixels':>9}{'s':>7}{'all px':>9}")
    hits = np.zeros(len(classes))
    counts = np.zeros(len(classes))
    for tag, acc, per, cnt, sec, everywhere in rows:
        print(f"{tag:<28}{acc:>9.4f}" + "".join(f"{p:>{max(width, 9)}.4f}" for p in per)
              + f"{sum(cnt):>9}{sec:>7.1f}{everywhere:>9.4f}")
        hits += np.nan_to_num(np.array(per)) * np.array(cnt)
        counts += np.array(cnt)
    per = hits / np.maximum(counts, 1)
    pooled = float(hits.sum() / max(counts.sum(), 1))
    print(f"{'all':<28}{pooled:>9.4f}" + "".join(f"{p:>{max(width, 9)}.4f}" for p in per)
          + f"{int(counts.sum()):>9}")
    return min(pooled, float(per.min()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tissue", default="tissue", help="model spec (default: bundled)")
    parser.add_argument("--landcover", default="landcover", help="model spec (default: bundled)")
    parser.add_argument("--data", type=Path, help="folder for the fresh scans (default: temp)")
    parser.add_argument("--only", choices=("tissue", "landcover"))
    args = parser.parse_args(argv)
    worst = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp)
        data.mkdir(parents=True, exist_ok=True)
        for kind in ("tissue", "landcover"):
            if args.only and args.only != kind:
                continue
            spec = getattr(args, kind)
            rows = evaluate(spec, kind, data)
            worst = min(worst, table(kind, load_model(spec).classes, rows))
    print(f"\nlowest overall/per-class accuracy: {worst:.4f} (target {TARGET})")
    return 0 if worst >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
