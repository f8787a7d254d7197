"""Checkpoints of a GeoTIFF job (:class:`tilefcn.cog.CogSink`), so ``--resume`` continues it.

Beside the output ``<out>``: ``<out>.tiles.partial`` (the intermediate tiles, closed at each
checkpoint so GDAL has written their directory) and ``<out>.tiles.partial.json``, the record
``{"identity": job identity, "done": [[iy, ix], …]}`` of the tiles they hold.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["check_resumable", "cog_identity", "journal_path", "read_journal", "write_journal"]


def journal_path(path: str | os.PathLike) -> Path:
    """Where a GeoTIFF job records its checkpointed tiles: ``<out>.tiles.partial.json``."""
    p = Path(path)
    return p.with_name(p.name + ".tiles.partial.json")


def read_journal(path: str | os.PathLike) -> dict | None:
    """The checkpoint record of an interrupted GeoTIFF job at ``path`` (None if absent,
    unreadable, or without its intermediate tiles)."""
    journal = journal_path(path)
    tiles = journal.with_name(journal.name.removesuffix(".json"))
    try:
        record = json.loads(journal.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("done"), list) and tiles.is_file()
    return record if ok else None


def cog_identity(path: str | os.PathLike) -> Any:
    """The job identity record stored in a tilefcn GeoTIFF's description (None if none)."""
    from tilefcn.read import tiff_description

    try:
        return json.loads(tiff_description(path) or "")["tilefcn"].get("identity")
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def write_journal(path: str | os.PathLike, identity: dict | None,
                  tiles: Iterable[tuple[int, int]]) -> None:
    """Record ``tiles`` (indices, already in the closed intermediate tiles) of the job
    ``identity`` for the output ``path``, atomically (a kill leaves the old record or the
    new one, whole)."""
    journal = journal_path(path)
    temp = journal.with_name(journal.name + ".tmp")
    temp.write_text(json.dumps({"identity": identity, "done": sorted(tiles)}))
    os.replace(temp, journal)


def check_resumable(dataset: Any, path: Path, profile: dict) -> None:
    """``ValueError`` unless the reopened intermediate tiles have this run's layout."""
    have = (dataset.count, dataset.height, dataset.width, dataset.dtypes[0])
    want = (profile["count"], profile["height"], profile["width"], profile["dtype"])
    if have != want:
        raise ValueError(f"cannot resume {path}: its unfinished tiles hold {have[0]}×"
                         f"{have[1]}×{have[2]} {have[3]}, this run needs {want[0]}×{want[1]}×"
                         f"{want[2]} {want[3]}")
