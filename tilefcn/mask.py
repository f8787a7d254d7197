"""Which tiles to compute: a low-resolution foreground mask of the scan (``--mask``).

``auto``: brightfield RGB uint8 scans are foreground where the glass is not (grey < 220 or
colour saturation max−min > 20 on a 0–255 scale); other scans where any band is non-zero
(nodata = 0). A path: a mask image (any resolution, non-zero = compute). The mask is read at a
pyramid level (or a strided view) no larger than :data:`MAX_SIDE`, never the full scan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tilefcn.read import Scan, open_scan, thumbnail

MAX_SIDE = 2048
GLASS_GREY, GLASS_SATURATION = 220, 20


def auto_foreground(image: np.ndarray) -> np.ndarray:
    """Boolean foreground of a low-resolution ``(y, x, C)`` image (see module doc)."""
    if image.dtype == np.uint8 and image.shape[-1] == 3:
        grey = image.mean(axis=-1)
        saturation = image.max(axis=-1).astype(np.int16) - image.min(axis=-1)
        return (grey < GLASS_GREY) | (saturation > GLASS_SATURATION)
    return np.any(image != 0, axis=-1)


def foreground_mask(scan: Scan, spec: str | Path) -> np.ndarray:
    """The low-resolution boolean mask for ``spec`` (``"auto"`` or a mask image path)."""
    if str(spec) == "auto":
        return auto_foreground(thumbnail(scan, MAX_SIDE))
    mask = thumbnail(open_scan(spec), MAX_SIDE)
    return np.any(mask != 0, axis=-1)
