"""Reading a window of a tiled TIFF level by decoding only the tiles it touches, in the
calling thread.

tifffile's zarr store decodes inside zarr's event loop, one tile at a time for the whole
process, so read threads queue behind each other (measured on 2 cores: 1 and 2 threads both
≈ 170 MP/s of JPEG). Here the file reads hold a lock only for their seek + read
(``FileHandle.read_segments``) and tifffile's own decoder (``TiffPage.decode``, which
releases the GIL in imagecodecs) runs in the thread that asked, so reads scale with threads.
Used for single-page tiled levels (chunky samples); anything else goes through the store.

A halo'd window decodes whole tiles of its neighbours' cores: ``tissue``'s 56-px halo
(right and bottom) on 2048-px chunks of 256-px JPEG tiles decodes 9 × 9 tiles for 8 × 8
(over an 8192² slide: 1.20 decodes per tile). The tiles a neighbouring window may read
again — on an axis where the window ends inside a tile, the two outer tile rows / columns on
each side that is not the image's border — are kept decoded in one bounded, process-wide
LRU (:class:`TileCache`, :data:`TILE_CACHE_MB`): 1.08–1.09 decodes per tile there; a tile
that two windows read at the same moment is decoded by the first and waited for by the other.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import threading
import warnings
from typing import Any

import numpy as np
import tifffile


def _cache_budget_mb(default: float = 64.0) -> float:
    """``$TILEFCN_TILE_CACHE_MB`` (MiB ≥ 0; 0 turns the cache off), else ``default``; a value
    that is not such a number is reported once and the default used."""
    value = os.environ.get("TILEFCN_TILE_CACHE_MB")
    if value is None or not value.strip():
        return default
    try:
        megabytes = float(value)
        if megabytes >= 0 and math.isfinite(megabytes):
            return megabytes
    except ValueError:
        pass
    warnings.warn(f"TILEFCN_TILE_CACHE_MB={value!r} is not a number of MiB >= 0; using "
                  f"{default:g}", RuntimeWarning, stacklevel=2)
    return default


#: Byte budget (MiB) of the process-wide cache of decoded boundary tiles (64, or
#: ``$TILEFCN_TILE_CACHE_MB`` when the process starts).
TILE_CACHE_MB = _cache_budget_mb()


class TileCache:
    """A thread-safe LRU of decoded tiles, bounded in bytes: ``get(key)`` / ``put(key, a)``,
    and ``claim(key)`` so that threads reading the same tile at once decode it once: the
    first claims it (decodes, then ``put`` or ``release``), the others get an event to
    wait on once their own tiles are done (waits never hold a claim: no cycles)."""

    def __init__(self, megabytes: float) -> None:
        self.budget = int(megabytes * 2**20)
        self.used = self.hits = self.misses = self.waits = 0
        self._tiles: collections.OrderedDict[Any, np.ndarray] = collections.OrderedDict()
        self._pending: dict[Any, threading.Event] = {}
        self._lock = threading.Lock()

    def _hit(self, key: Any) -> np.ndarray | None:
        tile = self._tiles.get(key)
        if tile is not None:
            self._tiles.move_to_end(key)
            self.hits += 1
        return tile

    def get(self, key: Any) -> np.ndarray | None:
        with self._lock:
            tile = self._hit(key)
            self.misses += tile is None
            return tile

    def claim(self, key: Any) -> tuple[np.ndarray | None, threading.Event | None]:
        """``(tile, None)`` if cached; ``(None, event)`` if another thread is decoding it
        (wait, then ``get``); ``(None, None)``: decode it, then ``put`` or ``release``."""
        with self._lock:
            tile = self._hit(key)
            if tile is not None:
                return tile, None
            event = self._pending.get(key)
            if event is not None:
                self.waits += 1
                return None, event
            self.misses += 1
            if self.budget > 0:
                self._pending[key] = threading.Event()
            return None, None

    def release(self, key: Any) -> None:
        """End a claim (no-op when none): threads waiting for ``key`` go on."""
        with self._lock:
            event = self._pending.pop(key, None)
        if event is not None:
            event.set()

    def put(self, key: Any, tile: np.ndarray) -> None:
        if tile.nbytes <= self.budget:
            tile.flags.writeable = False  # shared by every window that reads it
            with self._lock:
                old = self._tiles.pop(key, None)
                self.used += tile.nbytes - (0 if old is None else old.nbytes)
                self._tiles[key] = tile
                while self.used > self.budget:
                    self.used -= self._tiles.popitem(last=False)[1].nbytes
        self.release(key)

    def __len__(self) -> int:
        return len(self._tiles)


SHARED_TILES = TileCache(TILE_CACHE_MB)
_READER_IDS = itertools.count()


def shared_bands(start: int, stop: int, length: int, tile: int) -> set[int]:
    """Tile numbers along one axis of window ``[start, stop)`` that a neighbouring window may
    decode too. A window that starts and ends on tile boundaries (or the image's border)
    has no halo on this axis: none (keeping them would only cost memory). Otherwise the two
    outermost on each side that is not the image's border: a halo reaches into the
    neighbour's edge tile and the one next to it, whichever side of the boundary it ends."""
    if start % tile == 0 and (stop % tile == 0 or stop >= length):
        return set()
    first, last = start // tile, math.ceil(stop / tile) - 1
    bands = set()
    if start > 0:
        bands.update((first, first + 1))
    if stop < length:
        bands.update((last, last - 1))
    return bands


class TileWindows:
    """``read(ys, xs)`` → ``(h, w, S)`` for one tiled, single-page TIFF level."""

    def __init__(self, page: Any, cache: TileCache | None = None) -> None:
        self.page = page
        self.cache = SHARED_TILES if cache is None else cache
        self.key = next(_READER_IDS)  # this reader's tiles in the shared cache
        # one seek + read at a time on the shared handle: the handle's own lock, which
        # tifffile's zarr store (the fallback path, same file) also takes
        page.parent.filehandle.set_lock(True)  # idempotent: keeps an existing lock
        self.lock = page.parent.filehandle.lock
        self.shape = (int(page.imagelength), int(page.imagewidth))
        self.samples = int(page.samplesperpixel)
        self.tile = (int(page.tilelength), int(page.tilewidth))

    @staticmethod
    def supports(level: Any) -> bool:
        """Whether ``level`` (a tifffile series level) is one tiled 2-D page of chunky
        samples, the layout this reader handles."""
        pages = getattr(level, "pages", None) or []
        if len(pages) != 1:
            return False
        page = pages[0]
        return (isinstance(page, tifffile.TiffPage) and page.is_tiled
                and page.imagedepth == 1 and page.tiledepth == 1
                and (page.samplesperpixel == 1
                     or page.planarconfig == tifffile.PLANARCONFIG.CONTIG))

    def read(self, ys: slice, xs: slice) -> np.ndarray:
        (h, w), (th, tw) = self.shape, self.tile
        y0, y1, _ = ys.indices(h)
        x0, x1, _ = xs.indices(w)
        out = np.zeros((max(0, y1 - y0), max(0, x1 - x0), self.samples), self.page.dtype)
        if out.size == 0:
            return out
        across = math.ceil(w / tw)
        rows, cols = shared_bands(y0, y1, h, th), shared_bands(x0, x1, w, tw)
        index = [ty * across + tx for ty in range(y0 // th, math.ceil(y1 / th))
                 for tx in range(x0 // tw, math.ceil(x1 / tw))]
        page, fh = self.page, self.page.parent.filehandle
        if index[-1] >= min(len(page.dataoffsets), len(page.databytecounts)):
            raise ValueError(f"the file's tile table has {len(page.dataoffsets)} entries, "
                             f"the image needs {index[-1] + 1} or more (corrupt file?)")

        def place(i: int, tile: np.ndarray) -> None:
            ty, tx = i // across * th, i % across * tw
            sy0, sy1 = max(y0, ty), min(y1, ty + tile.shape[0])
            sx0, sx1 = max(x0, tx), min(x1, tx + tile.shape[1])
            out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = tile[sy0 - ty:sy1 - ty, sx0 - tx:sx1 - tx]

        def decode(indices: list[int]) -> None:
            offsets = [page.dataoffsets[i] for i in indices]
            counts = [page.databytecounts[i] for i in indices]
            for data, i in fh.read_segments(offsets, counts, indices=indices, lock=self.lock):
                tile = page.decode(data, i, jpegtables=page.jpegtables,
                                   jpegheader=page.jpegheader)[0]
                if tile is None:  # an empty tile: the fill value, zero
                    continue
                tile = tile.reshape(tile.shape[-3:])  # (th, tw, S)
                place(i, tile)
                if i in shared:
                    self.cache.put((self.key, i), tile)

        shared = {i for i in index if i // across in rows or i % across in cols}
        missing, claimed, waiting = [], [], []
        try:
            for i in index:
                if i in shared:
                    tile, event = self.cache.claim((self.key, i))
                    if tile is not None:
                        place(i, tile)
                        continue
                    if event is not None:
                        waiting.append((i, event))
                        continue
                    claimed.append(i)
                missing.append(i)
            decode(missing)
        finally:
            for i in claimed:  # no-op for those put; frees waiters if decoding failed
                self.cache.release((self.key, i))
        for i, event in waiting:  # decoded by another thread meanwhile (or, failing, here)
            event.wait(60.0)
            tile = self.cache.get((self.key, i))
            if tile is None:
                decode([i])
            else:
                place(i, tile)
        return out
