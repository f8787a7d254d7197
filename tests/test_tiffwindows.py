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


def test_shared_bands_are_the_two_outer_tiles_of_halod_windows_off_the_border():
    from tilefcn.tiffwindows import shared_bands

    assert shared_bands(0, 2104, 8192, 256) == {7, 8}  # left is the image's border
    assert shared_bands(2048, 4152, 8192, 256) == {8, 9, 15, 16}
    assert shared_bands(4096, 6200, 8192, 256) == {16, 17, 23, 24}  # a one-sided halo
    assert shared_bands(6144, 8192, 8192, 256) == set()  # on tile bounds: no halo here
    assert shared_bands(2048, 4096, 8192, 256) == set()
    assert shared_bands(0, 300, 300, 64) == set()  # the whole axis: no neighbour


def test_tile_cache_is_a_byte_bounded_lru_of_read_only_tiles():
    from tilefcn.tiffwindows import TileCache

    cache = TileCache(3 * 1024 / 2**20)  # room for three 1-KiB tiles
    tiles = {k: np.full(1024, k, np.uint8) for k in range(5)}
    for k in range(3):
        cache.put(k, tiles[k])
    assert cache.get(0) is tiles[0]  # 0 is now the most recent: 1 goes first
    cache.put(3, tiles[3])
    assert cache.get(1) is None and cache.get(2) is tiles[2] and len(cache) == 3
    assert cache.used == 3 * 1024
    cache.put(4, np.zeros(4096, np.uint8))  # larger than the whole budget: not kept
    assert cache.get(4) is None and len(cache) == 3
    with pytest.raises(ValueError):
        tiles[0][0] = 1  # shared by every window that reads it: read-only


def _halo_grid(tmp_path, seed: int) -> tuple:
    """A 512² JPEG slide of 64-px tiles, its whole-image read, and the 16 windows of a
    128-px chunk grid with a 9-px halo (clipped at the edges)."""
    rng = np.random.default_rng(seed)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, rng.integers(0, 255, (512, 512, 3), dtype=np.uint8),
                     tile=(64, 64), photometric="rgb", compression="jpeg")
    boxes = [(slice(max(0, y - 9), min(512, y + 128 + 9)),
              slice(max(0, x - 9), min(512, x + 128 + 9)))
             for y in range(0, 512, 128) for x in range(0, 512, 128)]
    return path, tifffile.imread(path), boxes


def test_halo_windows_reuse_their_neighbours_decoded_tiles(tmp_path, monkeypatch):
    """Halo'd windows of a chunk grid, read one after another: each shared boundary tile is
    decoded once, and every window still equals tifffile's whole-image read, also with a
    cache too small to hold anything."""
    import tilefcn.tiffwindows as tw

    path, image, boxes = _halo_grid(tmp_path, seed=2)
    decoded = []
    for megabytes in (64, 0):
        with tifffile.TiffFile(path) as tif:
            windows = tw.TileWindows(tif.pages[0], cache=tw.TileCache(megabytes))
            calls: list[int] = []

            def counted(*args, _calls=calls, _decode=windows.page.decode, **kwargs):
                _calls.append(args[1])
                return _decode(*args, **kwargs)

            monkeypatch.setattr(windows.page, "decode", counted, raising=False)
            for ys, xs in boxes:
                np.testing.assert_array_equal(windows.read(ys, xs), image[ys, xs])
        decoded.append(len(calls))
    assert decoded[1] == sum(  # no cache: every window decodes every tile it touches
        (-(-b[0].stop // 64) - b[0].start // 64) * (-(-b[1].stop // 64) - b[1].start // 64)
        for b in boxes)
    assert decoded[0] == 64  # the cache: each of the 8 × 8 tiles once


def test_tile_cache_budget_from_the_environment(monkeypatch):
    from tilefcn.tiffwindows import _cache_budget_mb

    monkeypatch.delenv("TILEFCN_TILE_CACHE_MB", raising=False)
    assert _cache_budget_mb() == 64
    for value, mb in (("0", 0.0), ("256", 256.0), ("12.5", 12.5), (" ", 64.0)):
        monkeypatch.setenv("TILEFCN_TILE_CACHE_MB", value)
        assert _cache_budget_mb() == mb
    for bad in ("lots", "-1", "inf"):
        monkeypatch.setenv("TILEFCN_TILE_CACHE_MB", bad)
        with pytest.warns(RuntimeWarning, match="TILEFCN_TILE_CACHE_MB"):
            assert _cache_budget_mb() == 64


def test_windows_read_at_once_decode_each_shared_tile_once(tmp_path, monkeypatch):
    """All halo'd windows of a chunk grid read at the same moment (one thread each, decodes
    slowed so they overlap): a boundary tile two windows need is decoded by the first and
    waited for by the other, and every window equals tifffile's whole-image read."""
    import threading
    import time

    import tilefcn.tiffwindows as tw

    path, image, boxes = _halo_grid(tmp_path, seed=3)
    with tifffile.TiffFile(path) as tif:
        windows = tw.TileWindows(tif.pages[0], cache=tw.TileCache(64))
        calls: list[int] = []
        decode = windows.page.decode

        def slow(*args, **kwargs):
            calls.append(args[1])
            time.sleep(0.02)
            return decode(*args, **kwargs)

        monkeypatch.setattr(windows.page, "decode", slow, raising=False)
        start = threading.Barrier(len(boxes))

        def read(box):
            start.wait(timeout=30)
            return windows.read(*box)

        with ThreadPoolExecutor(len(boxes)) as pool:
            results = list(pool.map(read, boxes))
    for (ys, xs), got in zip(boxes, results, strict=True):
        np.testing.assert_array_equal(got, image[ys, xs])
    assert sorted(calls) == list(range(64))  # each of the 8 × 8 tiles once
    assert windows.cache.waits > 0  # the reads did overlap


def test_a_claim_frees_its_waiters_when_released_and_cache_off_claims_nothing():
    from tilefcn.tiffwindows import TileCache

    cache = TileCache(1)
    assert cache.claim("a") == (None, None)  # ours to decode
    tile, event = cache.claim("a")
    assert tile is None and not event.is_set()  # another thread decodes it: wait
    cache.release("a")  # decoding failed (or the tile was empty): waiters go on
    assert event.is_set() and cache.get("a") is None
    assert cache.claim("a") == (None, None)
    cache.put("a", np.zeros(8, np.uint8))  # put ends the claim too
    got, event = cache.claim("a")
    assert event is None and got is not None
    off = TileCache(0)
    assert off.claim("b") == (None, None) and off.claim("b") == (None, None)  # no waits
