"""Heatmap writers: OME-Zarr (NGFF 0.5, zarr v3) with a pyramid (GeoTIFF/COG:
:mod:`tilefcn.cog`; the PNG preview: :mod:`tilefcn.preview`).

Coordinate conventions (the caller computes them; these writers only store them):

* Array index ``k`` of the scan denotes the *centre* of scan pixel ``k`` (NGFF convention).
  For a model with stride ``s``, offset ``o`` and receptive field ``r`` (per axis), heatmap
  pixel ``i`` sees scan pixels ``[o + s*i, o + s*i + r)``, so its centre is at scan index
  ``o + s*i + (r - 1)/2``. OME-Zarr ``scale = s * mpp`` and
  ``translation = (o + (r - 1)/2) * mpp`` (``mpp = 1`` and ``unit = None`` when the scan has
  no pixel size). Pyramid level ``L`` has ``scale_L = 2**L * scale_0`` and
  ``translation_L = translation_0 + (2**L - 1)/2 * scale_0``.
* GeoTIFF geotransforms are corner based (GDAL, PixelIsArea): see :mod:`tilefcn.cog`.

Outputs never look complete before they are: OME-Zarr stores carry ``tilefcn.status``
(``"running"`` until :func:`finish_ome_zarr` sets ``"complete"`` last); GeoTIFFs are written
to ``<path>.partial`` and renamed at the end (:mod:`tilefcn.cog`).

OME-Zarr values are stored as one of :data:`OUTPUT_DTYPES` (:func:`encode_block`): float32 as
computed, float16 cast, uint8 ``round(clip(p, 0, 1) · 255)`` (read back ``p ≈ v / 255``, see
:func:`decode_scale`; no NaN, so no masks). Pyramid levels are built by
:mod:`tilefcn.pyramid`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync

from tilefcn.casts import astype
from tilefcn.identity import identity_mismatch
from tilefcn.pyramid import build_pyramid
from tilefcn.read import tiff_description
from tilefcn.viewers import omero_metadata

__all__ = ["COMPRESSORS", "OUTPUT_DTYPES", "check_dtype", "check_output",
           "create_ome_zarr",
           "decode_scale", "encode_block", "finish_ome_zarr", "is_tilefcn_output",
           "open_for_writing", "written_chunks"]

#: zarr array config for every array tilefcn writes: a written chunk is stored even when it
#: equals the fill value, so resume can see it, and zarr skips its per-chunk fill-value
#: comparison (``np.array_equal(..., equal_nan=True)``, 16 % of a stride-1 run's CPU).
WRITE_CONFIG = {"write_empty_chunks": True}


def open_for_writing(store: str | os.PathLike, path: str) -> zarr.Array:
    """Array ``path`` of an existing heatmap ``store``, opened to write chunks with
    :data:`WRITE_CONFIG` (zarr 3.1's ``open_array`` ignores ``config`` for an existing array;
    ``with_config`` applies it)."""
    return zarr.open_array(str(store), path=path, mode="r+", zarr_format=3).with_config(
        WRITE_CONFIG)

#: Dtypes an OME-Zarr heatmap can be stored as (see :func:`encode_block`).
OUTPUT_DTYPES = ("float32", "float16", "uint8")

#: Compressors of the OME-Zarr arrays (level 0 and the pyramid), per stored dtype, from
#: ``benchmarks/bench_codec.py`` (table there; AMD EPYC, one thread, σ = 8 | 24 px maps;
#: encode MB/s, ratio): float32 blosc lz4 shuffle 729 1.30 | 841 1.39 (best 1.40 | 1.51);
#: float16 blosc lz4 shuffle 428 1.37 | 610 1.73 (blosc zstd 1: 196 1.49 | 243 1.89 — 8 %
#: smaller at 2.3× the encode time; float16 is chosen for speed and already halves the
#: store); uint8 zstd 3 128 1.89 | 200 2.91 (lz4 would lose a third of the ratio). zarr's
#: default, zstd 0 (= 3), gives float32 1.13 | 1.14: byte shuffle is what helps floats.
COMPRESSORS: dict[str, tuple] = {
    "float32": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
    "float16": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
    "uint8": (ZstdCodec(level=3),),
}

_TIFF_SUFFIXES = (".tif", ".tiff")


def check_dtype(dtype: str) -> str:
    """``dtype`` if it is one of :data:`OUTPUT_DTYPES`, else ``ValueError``."""
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"output dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    return dtype


def encode_block(block: np.ndarray, dtype: str) -> np.ndarray:
    """Probabilities ``p`` as stored: float32 as is, float16 cast, uint8
    ``round(clip(p, 0, 1) · 255)``. Raises ``ValueError`` for NaN with uint8. A block
    already of ``dtype`` (encoded by the engine on the device) is returned as is."""
    if block.dtype == np.dtype(check_dtype(dtype)):
        return block
    if dtype == "float32":
        return np.asarray(block, dtype=np.float32)
    if dtype == "float16":
        return astype(block, np.float16)
    if np.isnan(block).any():
        raise ValueError("uint8 output cannot hold NaN (masked or invalid pixels); "
                         "use float16 or float32")
    return np.round(np.clip(block, 0, 1) * 255).astype(np.uint8)


def decode_scale(dtype: str) -> float:
    """The divisor that turns stored values back into probabilities: 255 for uint8, else 1."""
    return 255.0 if check_dtype(dtype) == "uint8" else 1.0


def _fill_value(dtype: str) -> float:
    """Fill of unwritten chunks: NaN for float dtypes, 0 for uint8."""
    return 0 if dtype == "uint8" else np.nan


def _tilefcn_attrs(path: Path) -> dict | None:
    """The ``tilefcn`` attribute block of a zarr v3 group at ``path``, or None."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    block = meta.get("attributes", {}).get("tilefcn") if isinstance(meta, dict) else None
    return block if isinstance(block, dict) else None


def is_tilefcn_output(path: Path) -> bool:
    """Whether ``path`` is a heatmap tilefcn wrote (zarr attributes or TIFF description)."""
    if path.is_dir():
        return _tilefcn_attrs(path) is not None
    if path.suffix.lower() in _TIFF_SUFFIXES and path.is_file():
        try:
            return "tilefcn" in json.loads(tiff_description(path) or "")
        except (ValueError, TypeError):
            return False
    return False


def check_output(path: str | os.PathLike, *, overwrite: bool = False,
                 resume: bool = False) -> str:
    """Decide how to treat an output path: ``"new"``, ``"overwrite"`` or ``"resume"``.

    Nothing is written or deleted here. Raises ``ValueError`` for a suffix other than
    ``.zarr`` (OME-Zarr) or ``.tif``/``.tiff`` (GeoTIFF), ``FileExistsError`` when the output
    exists and neither flag is given, ``ValueError`` when overwriting something that is not a
    tilefcn output or resuming something that is not a tilefcn heatmap (a GeoTIFF resumes
    from the checkpoint an interrupted run left beside it, :mod:`tilefcn.cog`).
    """
    p = Path(path)
    if p.suffix.lower() not in (".zarr", *_TIFF_SUFFIXES):
        raise ValueError(f"unknown output suffix {p.suffix or '(none)'!r} in {p}: use .zarr "
                         "(OME-Zarr) or .tif/.tiff (GeoTIFF)")
    if overwrite and resume:
        raise ValueError("use either --overwrite or --resume, not both")
    if resume and p.suffix.lower() in _TIFF_SUFFIXES:
        return _check_tiff_resume(p)
    if not (p.exists() or p.is_symlink()):
        folder = next((a for a in p.absolute().parents if a.exists()), None)
        if folder is not None and not folder.is_dir():
            raise NotADirectoryError(f"cannot write {p}: {folder} is a file, not a folder")
        if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write {p}: no permission to write in {folder}")
        return "new"
    if not (overwrite or resume):
        raise FileExistsError(f"output exists: {p} (use --overwrite or --resume)")
    if resume:
        if _tilefcn_attrs(p) is None or not (p / "0" / "zarr.json").is_file():
            raise ValueError(f"cannot resume {p}: not a tilefcn heatmap store")
        return "resume"
    if not is_tilefcn_output(p):
        raise ValueError(f"refusing to overwrite {p}: not a tilefcn output")
    return "overwrite"


def _check_tiff_resume(p: Path) -> str:
    """``--resume`` of a GeoTIFF: ``"resume"`` with an interrupted run's checkpoint beside it
    (:func:`tilefcn.cog.read_journal`) or a tilefcn GeoTIFF there (a finished job: left as it
    is if it is this one), else ``"new"``."""
    from tilefcn.checkpoint import read_journal

    if (p.exists() or p.is_symlink()) and not is_tilefcn_output(p):
        raise ValueError(f"cannot resume {p}: not a tilefcn heatmap")
    if read_journal(p) is not None or p.exists():
        return "resume"
    return check_output(p)


def _multiscales(name: str, unit: str | None, scale: tuple[float, float],
                 translation: tuple[float, float], nlevels: int) -> list[dict]:
    axes: list[dict[str, Any]] = [{"name": "c", "type": "channel"}]
    for ax in ("y", "x"):
        axes.append({"name": ax, "type": "space", **({"unit": unit} if unit else {})})
    datasets = []
    for level in range(nlevels):
        f = 2**level
        s = [1.0, scale[0] * f, scale[1] * f]
        t = [0.0, *(t0 + (f - 1) / 2 * s0 for t0, s0 in zip(translation, scale, strict=True))]
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": s}, {"type": "translation", "translation": t}]})
    return [{"name": name, "axes": axes, "datasets": datasets}]


def _omero(attrs: dict, channels: int, dtype: str) -> dict:
    """``{"omero": …}`` naming the channels by ``attrs["classes"]`` (none without names)."""
    classes = attrs.get("classes")
    if not isinstance(classes, list) or len(classes) != channels:
        return {}
    return {"omero": omero_metadata([str(c) for c in classes], dtype)}


def create_ome_zarr(path: str | os.PathLike, *, shape: tuple[int, int, int],
                    chunks: tuple[int, int], scale: tuple[float, float],
                    translation: tuple[float, float], unit: str | None, attrs: dict,
                    mode: str = "new", dtype: str = "float32") -> zarr.Array:
    """Create (or reopen with ``mode="resume"``) an NGFF 0.5 heatmap store.

    Dataset ``"0"`` is ``dtype`` ``(c, y, x)`` of ``shape``, chunked ``(c, *chunks)``, filled
    with NaN (0 for uint8), compressed with ``COMPRESSORS[dtype]``; the group's ``tilefcn``
    attributes are ``{**attrs, "status": "running"}``. ``mode="overwrite"`` deletes the old
    store first, only if it is a tilefcn output; ``mode="resume"`` refuses another model,
    shape, chunking or dtype, or (when ``attrs`` has an ``identity`` record) another job —
    :func:`tilefcn.identity.identity_mismatch`, checked before anything is changed — and
    deletes a stale pyramid. Returns the writable level-0 array.
    """
    p = Path(path)
    if mode not in ("new", "overwrite", "resume"):
        raise ValueError(f"mode must be 'new', 'overwrite' or 'resume', got {mode!r}")
    check_dtype(dtype)
    shape = tuple(int(v) for v in shape)
    chunks = (shape[0], *(int(c) for c in chunks))
    if mode == "resume":
        old = _tilefcn_attrs(p)
        if old is None:
            raise ValueError(f"cannot resume {p}: not a tilefcn heatmap store")
        if "model" in old and "model" in attrs and old["model"] != attrs["model"]:
            raise ValueError(f"cannot resume {p}: it was written with a different model")
        if "identity" in attrs and (why := identity_mismatch(old.get("identity"),
                                                             attrs["identity"])):
            raise ValueError(f"cannot resume {p}: {why}")  # checked before anything changes
        group = zarr.open_group(p, mode="r+", zarr_format=3)
        array = open_for_writing(p, "0")
        if array.shape != shape or array.chunks != chunks:
            raise ValueError(f"cannot resume {p}: it holds shape {array.shape} chunks "
                             f"{array.chunks}, this run needs {shape} chunks {chunks}")
        if str(array.dtype) != dtype:
            raise ValueError(f"cannot resume {p}: it holds dtype {array.dtype}, this run "
                             f"needs {dtype}")
        for name in [k for k in group.array_keys() if k != "0"]:
            del group[name]  # a stale pyramid from an earlier finish
        group.attrs.put({
            **dict(group.attrs),
            "ome": {"version": "0.5",
                    "multiscales": _multiscales(p.stem, unit, scale, translation, 1),
                    **_omero(attrs, shape[0], dtype)},
            "tilefcn": {**old, **attrs, "status": "running"}})
        return array
    if p.exists() or p.is_symlink():
        if mode == "new":
            raise FileExistsError(f"output exists: {p} (use --overwrite or --resume)")
        if not is_tilefcn_output(p):
            raise ValueError(f"refusing to overwrite {p}: not a tilefcn output")
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    group = zarr.open_group(p, mode="w-", zarr_format=3)
    group.attrs.put({
        "ome": {"version": "0.5",
                "multiscales": _multiscales(p.stem, unit, scale, translation, 1),
                **_omero(attrs, shape[0], dtype)},
        "tilefcn": {**attrs, "status": "running"},
    })
    return group.create_array("0", shape=shape, chunks=chunks, dtype=dtype,
                              fill_value=_fill_value(dtype), compressors=COMPRESSORS[dtype],
                              dimension_names=["c", "y", "x"], config=WRITE_CONFIG)


def written_chunks(array: zarr.Array) -> set[tuple[int, int]]:
    """Spatial chunk indices ``(iy, ix)`` already stored (lists keys; reads no data)."""
    store, prefix = array.store_path.store, array.store_path.path
    prefix = f"{prefix}/" if prefix else ""

    async def keys() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    # decoded by hand: zarr 3.1's DefaultChunkKeyEncoding.decode_chunk_key fails on "c/0/1/2"
    sep = getattr(array.metadata.chunk_key_encoding, "separator", "/")
    out = set()
    for key in sync(keys()):
        parts = key[len(prefix):].split(sep)
        parts = parts[1:] if parts[0] == "c" else parts
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            out.add((int(parts[1]), int(parts[2])))
    return out


def _pyramid_count(group: zarr.Group) -> int:
    """How many consecutive pyramid arrays ``"1"``, ``"2"``, … the group holds."""
    names = set(group.array_keys())
    n = 0
    while str(n + 1) in names:
        n += 1
    return n


def finish_ome_zarr(path: str | os.PathLike, *, levels: int | None = None,
                    build: bool | None = None, min_size: int = 256) -> None:
    """List pyramid levels in the multiscales metadata and mark the store complete.

    ``levels``: how many pyramid arrays ``"1"``..``"n"`` to list (they must exist); None:
    every consecutive one present. ``build``: True builds the pyramid here first (threads,
    chunk by chunk: :mod:`tilefcn.pyramid`, halving while the smaller side is
    ``≥ max(min_size, 2)``), replacing any present; False never builds; None (default)
    builds only when ``levels`` is None and no pyramid array exists — the old in-process
    behaviour for callers that do not run the pyramid tasks. ``tilefcn.status =
    "complete"`` is written last.
    """
    p = Path(path)
    if _tilefcn_attrs(p) is None:
        raise ValueError(f"cannot finish {p}: not a tilefcn heatmap store")
    group = zarr.open_group(p, mode="r+", zarr_format=3)
    if build is None:
        build = levels is None and _pyramid_count(group) == 0
    if build:
        build_pyramid(p, min_size=min_size)
    present = _pyramid_count(group)
    if levels is None:
        levels = present
    elif levels > present:
        raise ValueError(f"cannot finish {p}: {levels} pyramid levels asked, "
                         f"{present} present")
    ms = dict(group.attrs["ome"])["multiscales"][0]
    t0 = ms["datasets"][0]["coordinateTransformations"]
    scale = next(t["scale"][1:] for t in t0 if t["type"] == "scale")
    translation = next((t["translation"][1:] for t in t0 if t["type"] == "translation"),
                       [0.0, 0.0])
    unit = next((a.get("unit") for a in ms["axes"] if a["name"] == "y"), None)
    ome = dict(group.attrs["ome"])
    ome["multiscales"] = _multiscales(ms.get("name", p.stem), unit, scale, translation,
                                      levels + 1)
    group.attrs["ome"] = ome
    group.attrs["tilefcn"] = {**dict(group.attrs["tilefcn"]), "status": "complete"}
