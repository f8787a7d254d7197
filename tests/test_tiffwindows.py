"""Windows decoded tile by tile in the calling thread equal tifffile's whole-image read."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tifffile

from tilefcn.read import open_scan


@pytest.mark.parametrize("kind", ["jpeg-rgb", "zlib-uint16-4band", "raw-gray-float32"])
def test_windows_equal_the_whole_image(tmp_path, kind):
    rng = np.random.default_rng(0)
    path = tmp_path / f"{kind}.tif"
    if kind == "jpeg-rgb":
        image = rng.integers(0, 255, (300, 517, 3), dtype=np.uint8)
        tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", compression="jpeg")
        image = tifffile.imread(path)  # lossy: compare with what tifffile decodes
    elif kind == "zlib-uint16-4band":
        image = rng.integers(0, 65535, (211, 190, 4), dtype=np.uint16)
        tifffile.imwrite(path, image, tile=(32, 48), photometric="minisblack",
                         planarconfig="contig", compression="zlib")
    else:
        image = rng.normal(size=(129, 77)).astype(np.float32)
        tifffile.imwrite(path, image, tile=(16, 32))
    scan = open_scan(path)
    assert scan.reader._handle().windows is not None  # the tile-by-tile path is used
    whole = image if image.ndim == 3 else image[..., None]
    h, w = whole.shape[:2]
    boxes = [(slice(0, h), slice(0, w)), (slice(h - 1, h), slice(0, 1)),
             (slice(5, 70), slice(w - 40, w)), (slice(31, 97), slice(17, 18))]
    with ThreadPoolExecutor(4) as pool:  # threads read at once, each its own tiles
        results = list(pool.map(lambda b: scan.reader[b], boxes * 3))
    for box, got in zip(boxes * 3, results, strict=True):
        np.testing.assert_array_equal(got, whole[box])


def test_dask_array_and_window_reads_share_the_file_safely(tmp_path):
    """The lazy array (3-slice keys) and window reads go through the same tile path and
    lock, so reading both at once from threads gives the right pixels."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 65535, (300, 260, 3), dtype=np.uint16)
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, image, tile=(32, 32), photometric="rgb", compression="zlib")
    scan = open_scan(path, chunk=64)
    with ThreadPoolExecutor(4) as pool:
        lazy = pool.submit(lambda: scan.array.compute(scheduler="threads"))
        windows = list(pool.map(lambda k: scan.reader[k * 7:k * 7 + 90, 3:250],
                                range(20)))
    np.testing.assert_array_equal(lazy.result(), image)
    for k, got in enumerate(windows):
        np.testing.assert_array_equal(got, image[k * 7:k * 7 + 90, 3:250])
    assert scan.reader[0:5, 0:5, 1:2].shape == (5, 5, 1)
