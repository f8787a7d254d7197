"""Write the demo scene of the satellite recipe: a synthetic 4-band (B, G, R, NIR) uint16
GeoTIFF (tilefcn.synthetic.write_scene, UTM 33N, 10 m pixels) whose pixels outside a
diagonal swath are nodata (0, tagged GDAL_NODATA), as at the edge of a real acquisition.

    python pipelines/satellite/make_scene.py OUT.tif [--size 2048] [--seed 0]

Written window by window (256-px blocks), so any --size fits in memory.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from tilefcn.synthetic import write_scene

BLOCK = 256


def swath(rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    """Inside the swath: ``|col - row - size/8| < size/2`` (a band at 45°, off the centre)."""
    return np.abs(cols - rows - size / 8) < size / 2


def make_scene(out: str | Path, size: int = 2048, seed: int = 0) -> Path:
    """Write the demo scene to ``out`` (a ``size``² tiled, DEFLATE-compressed GeoTIFF)."""
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        full = write_scene(Path(tmp) / "full.tif", (size, size), seed=seed).image
        with rasterio.open(full) as src:
            profile = {**src.profile, "nodata": 0, "tiled": True, "blockxsize": BLOCK,
                       "blockysize": BLOCK, "compress": "deflate", "predictor": 2}
            with rasterio.open(out, "w", **profile) as dst:
                dst.descriptions = src.descriptions
                for y in range(0, size, BLOCK):
                    for x in range(0, size, BLOCK):
                        win = Window(x, y, min(BLOCK, size - x), min(BLOCK, size - y))
                        data = src.read(window=win)
                        rows, cols = np.mgrid[y:y + win.height, x:x + win.width]
                        data[:, ~swath(rows, cols, size)] = 0
                        dst.write(data, window=win)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=2048, help="edge in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_scene(args.out, args.size, args.seed))


if __name__ == "__main__":
    main()
