"""Memory stays bounded: a scan with 8× the pixels runs in the same peak RSS (the read-ahead
queue, the writer and the pyramid hold a bounded number of tiles, never the scan)."""

from __future__ import annotations

import json
import subprocess
import sys

from tilefcn.synthetic import write_slide

CHILD = """
import json, resource, sys
from tilefcn.job import run
run(sys.argv[1], "tissue", sys.argv[2], tile=512, device="cpu")
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
"""


def _peak_mb(slide, out) -> float:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(slide), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eight_times_the_pixels_same_peak_rss(tmp_path):
    small, big = tmp_path / "small.ome.tif", tmp_path / "big.ome.tif"
    write_slide(small, (1024, 1024), seed=1)
    write_slide(big, (2896, 2896), seed=2)  # 8.0× the pixels
    _peak_mb(small, tmp_path / "warm.zarr")  # fills the backend choice cache for both
    small_mb = _peak_mb(small, tmp_path / "small.zarr")
    big_mb = _peak_mb(big, tmp_path / "big.zarr")
    # measured 452 vs 455 MB; the big scan itself is 25 MB, so holding it (or its tiles
    # piling up in a queue) would show
    assert big_mb < small_mb + 15, (small_mb, big_mb)
