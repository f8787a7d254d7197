"""What makes two runs the same job, so that ``--resume`` continues only that job.

A heatmap store keeps an identity record in its ``tilefcn.identity`` attribute: the source
(resolved path, size and ``mtime_ns`` of a file, the level read, its shape and dtype, and a
content fingerprint: sha256 of :data:`FINGERPRINT_WINDOWS` small windows decoded through the
scan's reader at fixed positions — bounded work whatever the scan's size), the model's
weights (sha256), the plan (image and output shape, chunks), the stored dtype, the precision
and what decides which tiles are computed (sub-tile, the tiles a mask leaves out). Backend,
batch, device and workers do not change the values beyond 1e-5 and may differ between runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FINGERPRINT_EDGE", "identity_mismatch", "job_identity", "source_fingerprint"]

FINGERPRINT_EDGE = 64  # px: edge of each fingerprint window
FINGERPRINT_WINDOWS = ("top-left", "top-right", "centre", "bottom-left", "bottom-right")

# (section of the record, how a difference in it is described)
_SECTIONS = (("source", "it was written from another source"),
             ("model", "it was written with another model"),
             ("plan", "it was written with another tile plan"),
             ("options", "it was written with other options"))


def _windows(height: int, width: int, edge: int) -> list[tuple[slice, slice]]:
    """The fingerprint windows: corners and centre, ``edge`` px (less for a smaller scan)."""
    h, w = min(edge, height), min(edge, width)
    ys = {"top": 0, "centre": (height - h) // 2, "bottom": height - h}
    xs = {"left": 0, "centre": (width - w) // 2, "right": width - w}
    out = []
    for name in FINGERPRINT_WINDOWS:
        row, _, col = name.partition("-")
        y, x = ys[row], xs[col or row]
        out.append((slice(y, y + h), slice(x, x + w)))
    return out


def source_fingerprint(scan: Any, edge: int = FINGERPRINT_EDGE) -> str:
    """sha256 of the scan's decoded pixels in the windows of :data:`FINGERPRINT_WINDOWS`
    (read through ``scan.reader``, or ``scan.array`` for dask inputs), with shape and dtype."""
    height, width, channels = scan.info.shape
    digest = hashlib.sha256(f"{height}x{width}x{channels}:{scan.info.dtype}".encode())
    for ys, xs in _windows(height, width, edge):
        block = scan.reader[ys, xs] if scan.reader is not None else \
            scan.array[ys, xs].compute()
        digest.update(np.ascontiguousarray(block).tobytes())
    return digest.hexdigest()


def _source(scan: Any) -> dict[str, Any]:
    info = scan.info
    record: dict[str, Any] = {"path": info.source, "size": None, "mtime_ns": None}
    if not info.source.startswith("<") and os.path.exists(info.source):
        path = Path(info.source).resolve()
        record["path"] = str(path)
        if path.is_file():
            stat = path.stat()
            record["size"], record["mtime_ns"] = stat.st_size, stat.st_mtime_ns
    return {**record, "level": info.level, "shape": list(info.shape), "dtype": info.dtype,
            "fingerprint": source_fingerprint(scan)}


def job_identity(prediction: Any, *, dtype: str) -> dict[str, Any]:
    """The identity record of a planned prediction (JSON-friendly). The mask is recorded
    as the set of tiles it leaves out (count and sha256), whatever the spec that chose it."""
    plan = prediction.plan
    masked = json.dumps(sorted([int(y), int(x)] for y, x in prediction.masked))
    footprint = getattr(prediction, "footprint", None)  # sub-tile mask and nodata
    extra = {} if footprint is None else {"footprint": str(footprint.__dask_tokenize__())}
    return {
        "source": _source(prediction.scan),
        "model": {"sha256": prediction.model.sha256},
        "plan": {"image_shape": list(plan.image_shape), "out_shape": list(plan.out_shape),
                 "chunks": [plan.chunks[0][0], plan.chunks[1][0]]},
        "options": {"dtype": dtype, "precision": prediction.ref.precision,
                    "sub_tile": prediction.sub_tile, "masked_tiles": len(prediction.masked),
                    "masked_sha256": hashlib.sha256(masked.encode()).hexdigest(), **extra},
    }


def _short(value: Any) -> str:
    text = str(value)
    return f"{text[:12]}…" if len(text) == 64 and all(c in "0123456789abcdef" for c in text) \
        else text


def identity_mismatch(stored: Any, current: dict[str, Any]) -> str | None:
    """What differs between a store's identity record and this run's, in words
    (``"it was written from another source (size 123 vs 456)"``), or None when the same."""
    if not isinstance(stored, dict):
        return "it has no job identity record (written by an older tilefcn; use --overwrite)"
    for section, words in _SECTIONS:
        old, new = stored.get(section), current.get(section, {})
        if not isinstance(old, dict):
            return f"{words} (no {section} record)"
        for key, value in new.items():
            if old.get(key) != value:
                return f"{words} ({key} {_short(old.get(key))} vs {_short(value)})"
    return None
