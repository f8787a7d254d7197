"""The command line's progress bar for one scan's tiles (tqdm on stderr)."""

from __future__ import annotations

import sys
import time


class TileProgress:
    """tqdm progress: tiles done/total, input MP/s, ETA."""

    def __init__(self, megapixels: float, enabled: bool) -> None:
        self.megapixels, self.enabled, self.bar, self.start = megapixels, enabled, None, 0.0
        self.first = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="tile", file=sys.stderr,
                            dynamic_ncols=True, desc="tiles")
            self.start, self.first = time.perf_counter(), done
            return
        self.bar.update(done - self.bar.n)
        elapsed = time.perf_counter() - self.start
        if elapsed > 0:
            rate = self.megapixels * (done - self.first) / total / elapsed
            self.bar.set_postfix_str(f"{rate:.1f} MP/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
