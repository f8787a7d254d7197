"""``tilefcn demo``: a synthetic slide, the bundled ``tissue`` model, a heatmap and a preview."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from tilefcn.job import Progress, RunSummary, run


@dataclass(frozen=True, slots=True)
class DemoResult:
    slide: Path
    mask: Path
    heatmap: Path
    preview: Path
    summary: RunSummary
    fractions: dict[str, float]


def preview_level(group: zarr.Group, max_side: int = 1024) -> np.ndarray:
    """The first pyramid level of a heatmap store whose larger side is <= ``max_side``."""
    paths = [d["path"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]]
    for path in paths:
        if max(group[path].shape[1:]) <= max_side:
            return group[path][:]
    return group[paths[-1]][:]


def run_demo(out_dir: str | Path = "tilefcn-demo", *, size: int = 4096, seed: int = 2026,
             overwrite: bool = True, progress: Progress | None = None) -> DemoResult:
    """Generate a ``size``² synthetic slide in ``out_dir``, run ``tissue`` on it, and write the
    OME-Zarr heatmap and its preview PNG (:func:`tilefcn.preview.write_preview`: the slide
    thumbnail with the argmax colours blended in, a legend of the classes, a µm scale)."""
    from tilefcn.preview import write_preview
    from tilefcn.read import open_scan
    from tilefcn.synthetic import write_slide

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    synthetic = write_slide(out_dir / "slide.ome.tif", (size, size), seed=seed)
    heatmap = out_dir / "slide.heatmap.zarr"
    scan = open_scan(synthetic.image)
    summary = run(scan, "tissue", heatmap, overwrite=overwrite and heatmap.exists(),
                  progress=progress)
    preview = out_dir / "slide.preview.png"
    write_preview(heatmap, preview, scan=scan, overwrite=overwrite)
    group = zarr.open_group(str(heatmap), mode="r")
    small = preview_level(group)
    classes = list(group.attrs["tilefcn"]["classes"])
    labels = np.argmax(np.nan_to_num(small, nan=-1.0), axis=0)
    fractions = {c: float(np.mean(labels == i)) for i, c in enumerate(classes)}
    return DemoResult(synthetic.image, synthetic.mask, heatmap, preview, summary, fractions)
