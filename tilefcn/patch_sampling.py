"""Sampling balanced training patches from labelled scans, window by window.

Class locations come from a bounded number of mask windows (a grid of ``window``² cells, a
seeded random subset per scan); a patch is labelled by the mask value at its centre pixel
``top + (P - 1)//2`` per axis, and patches are read window by window through the scan's
reader, so neither memory nor time depends on the scan size. The arithmetic (grids, centre
bounds, balanced picks, splits) is pure; :func:`sample_patches` does the reading.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tilefcn.read import Scan, open_scan, tiff_description

Window = tuple[int, int, int, int]  # y0, x0, h, w


def window_grid(shape: tuple[int, int], size: int) -> list[Window]:
    """Non-overlapping windows ``(y0, x0, h, w)`` of edge ``size`` (smaller at the far edges)
    covering an image of ``shape``, row-major."""
    return [(y, x, min(size, shape[0] - y), min(size, shape[1] - x))
            for y in range(0, shape[0], size) for x in range(0, shape[1], size)]


def centre_bounds(shape: tuple[int, int], patch: int) -> tuple[int, int, int, int]:
    """Half-open centre ranges ``(ylo, yhi, xlo, xhi)`` of patches lying inside the image:
    centre ``c`` has top ``c - (patch - 1)//2``, which must lie in ``[0, size - patch]``."""
    h = (patch - 1) // 2
    return h, shape[0] - patch + h + 1, h, shape[1] - patch + h + 1


def window_candidates(labels: np.ndarray, window: Window, shape: tuple[int, int], patch: int,
                      cap: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Per label value present, up to ``cap`` random centres ``(k, 2)`` (scan coordinates) in
    one mask window whose patch lies inside the scan."""
    y0, x0 = window[:2]
    ylo, yhi, xlo, xhi = centre_bounds(shape, patch)
    sub = labels[max(ylo - y0, 0):max(yhi - y0, 0), max(xlo - x0, 0):max(xhi - x0, 0)]
    oy, ox = y0 + max(ylo - y0, 0), x0 + max(xlo - x0, 0)
    out = {}
    for k in np.unique(sub):
        ys, xs = np.nonzero(sub == k)
        if len(ys) > cap:
            pick = np.sort(rng.choice(len(ys), cap, replace=False))
            ys, xs = ys[pick], xs[pick]
        out[int(k)] = np.stack([ys + oy, xs + ox], axis=1).astype(np.int64)
    return out


def balanced_choice(counts: Sequence[int], per_class: int, rng: np.random.Generator
                    ) -> list[np.ndarray]:
    """Per class, ``per_class`` indices into its candidates (with replacement only when it has
    fewer candidates than that)."""
    return [rng.choice(n, per_class, replace=n < per_class) for n in counts]


def split_indices(n: int, val_fraction: float, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A seeded ``(train, val)`` split of ``range(n)``; ``val`` has ``round(n * fraction)``
    items (at least one when ``0 < fraction``), ``train`` at least one."""
    order = rng.permutation(n)
    n_val = min(max(round(n * val_fraction), 1 if val_fraction > 0 else 0), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# -- reading ----------------------------------------------------------------------------------

def _read(scan: Scan, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    if scan.reader is not None:
        return np.asarray(scan.reader[y0:y1, x0:x1])
    return np.asarray(scan.array[y0:y1, x0:x1].compute())


def open_pairs(pairs: Sequence[Any], patch: int) -> list[tuple[Scan, Scan]]:
    """Open and check ``(image, mask)`` pairs: one-channel integer masks of the image's size,
    images at least ``patch`` px and all of one channel count and dtype."""
    opened = []
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"expected (image, mask) pairs, got {pair!r}")
        image, mask = open_scan(pair[0]), open_scan(pair[1])
        name, mname = image.info.source, mask.info.source
        if mask.info.shape[2] != 1:
            raise ValueError(f"mask {mname} has {mask.info.shape[2]} channels; expected a "
                             "single-channel label image")
        if not np.issubdtype(np.dtype(mask.info.dtype), np.integer):
            raise ValueError(f"mask {mname} has dtype {mask.info.dtype}; expected integer labels")
        if mask.info.shape[:2] != image.info.shape[:2]:
            raise ValueError(f"mask {mname} is {mask.info.shape[:2]} but image {name} is "
                             f"{image.info.shape[:2]}")
        if min(image.info.shape[:2]) < patch:
            raise ValueError(f"image {name} {image.info.shape[:2]} is smaller than the "
                             f"{patch}-px patch")
        first = opened[0][0].info if opened else image.info
        if (image.info.shape[2], image.info.dtype) != (first.shape[2], first.dtype):
            raise ValueError(f"image {name} has {image.info.shape[2]} {image.info.dtype} "
                             f"channel(s) but {first.source} has {first.shape[2]} {first.dtype}")
        opened.append((image, mask))
    if not opened:
        raise ValueError("no (image, mask) pairs given")
    return opened


def _mask_classes(mask: Scan) -> list[str] | None:
    """Class names stored in a mask TIFF's JSON description (as tilefcn.synthetic writes)."""
    text = tiff_description(mask.info.source) if Path(mask.info.source).is_file() else None
    try:
        names = json.loads(text).get("classes") if text else None
    except (json.JSONDecodeError, AttributeError):
        return None
    return [str(c) for c in names] if isinstance(names, list) and names else None


def sample_patches(opened: list[tuple[Scan, Scan]], classes: list[str] | None, patch: int,
                   per_class: int, rng: np.random.Generator, window: int = 512,
                   windows_per_scan: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Balanced patches ``(N, P, P, C)`` (scan dtype) and labels ``(N,)`` plus class names."""
    grids = [window_grid(image.info.shape[:2], window) for image, _ in opened]
    picked = [[g[i] for i in np.sort(rng.permutation(len(g))[:windows_per_scan])] for g in grids]
    cap = max(64, -(-4 * per_class // sum(len(p) for p in picked)))
    found: list[tuple[int, dict[int, np.ndarray]]] = []  # (scan, {label: centres})
    for s, ((image, mask), windows) in enumerate(zip(opened, picked, strict=True)):
        for w in windows:
            labels = _read(mask, w[0], w[0] + w[2], w[1], w[1] + w[3])[..., 0]
            found.append((s, window_candidates(labels, w, image.info.shape[:2], patch, cap, rng)))
    if classes is None:
        top = max((max(c, default=0) for _, c in found), default=0)
        classes = _mask_classes(opened[0][1]) or [f"class{k}" for k in range(top + 1)]
    chosen = []  # rows: scan, window index, y, x, label
    for k, name in enumerate(classes):
        cands = [np.column_stack([np.full(len(c[k]), s), np.full(len(c[k]), i), c[k]])
                 for i, (s, c) in enumerate(found) if k in c]
        if not cands:
            raise ValueError(f"no pixels of class {name!r} (label {k}) found in the masks")
        cands = np.concatenate(cands)
        pick = balanced_choice([len(cands)], per_class, rng)[0]
        chosen.append(np.column_stack([cands[pick], np.full(per_class, k)]))
    rows = np.concatenate(chosen)
    channels, dtype = opened[0][0].info.shape[2], np.dtype(opened[0][0].info.dtype)
    patches = np.empty((len(rows), patch, patch, channels), dtype)
    half = (patch - 1) // 2
    for s, i in {(int(r[0]), int(r[1])) for r in rows}:
        sel = np.nonzero((rows[:, 0] == s) & (rows[:, 1] == i))[0]
        tops, lefts = rows[sel, 2] - half, rows[sel, 3] - half
        y0, x0 = int(tops.min()), int(lefts.min())
        region = _read(opened[s][0], y0, int(tops.max()) + patch, x0, int(lefts.max()) + patch)
        for j, t, lft in zip(sel, tops, lefts, strict=True):
            patches[j] = region[t - y0:t - y0 + patch, lft - x0:lft - x0 + patch]
    return patches, rows[:, 4].astype(np.int64), list(classes)
