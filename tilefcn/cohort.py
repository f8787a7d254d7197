"""Cohorts: many scans in one run, each into its own output, with a summary table.

Inputs (:func:`expand_inputs`) are scan paths, folders (the scans directly inside them) and
CSV manifests (``image[,out][,mask]`` rows, an optional header; relative paths are relative
to the manifest's folder). Each becomes a :class:`ScanJob`. :func:`run_cohort` runs them
with at most ``in_flight`` scans submitted at a time (the client and the cluster see a
bounded graph however long the manifest), each scan's tiles in parallel on the workers;
a scan that fails is recorded and the others go on. The result rows are a summary table
(:func:`write_summary`: CSV and JSON).
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tilefcn.job import RunSummary, default_output

__all__ = ["ScanJob", "ScanResult", "expand_inputs", "is_cohort", "read_manifest",
           "run_cohort", "summary_table", "write_summary"]

SCAN_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".btf", ".qptiff", ".zarr")
MANIFEST_SUFFIXES = (".csv",)
NOT_SCANS = (".heatmap.", ".mask.")  # outputs (<stem>.heatmap.zarr) and masks beside scans
SUMMARY_NAME = "tilefcn-summary"
FIELDS = ("scan", "status", "tiles", "mp_per_s", "seconds", "output", "error")


@dataclass(frozen=True, slots=True)
class ScanJob:
    """One scan of a cohort: what to read, where to write, and its own mask (None: the
    run's ``--mask``)."""

    image: Path
    out: Path
    mask: str | None = None


@dataclass(frozen=True, slots=True)
class ScanResult:
    """One row of the summary: ``status`` is ``done``, ``resumed``, ``skipped`` (already
    complete for this job) or ``failed`` (``error`` says why)."""

    scan: str
    status: str
    tiles: int
    mp_per_s: float
    seconds: float
    output: str
    error: str = ""
    megapixels: float = 0.0


def _is_scan(path: Path) -> bool:
    """A scan file or zarr store (not a tilefcn output, a ``.mask.`` file or hidden)."""
    name = path.name.lower()
    if name.startswith(".") or any(mark in name for mark in NOT_SCANS):
        return False
    if path.is_dir():
        return name.endswith(".zarr") or any(
            (path / m).exists() for m in ("zarr.json", ".zarray", ".zgroup"))
    return name.endswith(SCAN_SUFFIXES)


def is_cohort(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None) -> bool:
    """Whether ``inputs`` is a cohort (several inputs, a folder, a manifest, or
    ``--out-dir``) rather than the single scan of ``tilefcn run IMAGE``."""
    if out_dir is not None or len(inputs) != 1:
        return True
    path = Path(inputs[0])
    return path.suffix.lower() in MANIFEST_SUFFIXES or (path.is_dir() and not _is_scan(path))


def _output(image: Path, out_dir: Path | None, suffix: str) -> Path:
    default = default_output(str(image))
    name = default.with_suffix(suffix).name if suffix != ".zarr" else default.name
    return (out_dir / name) if out_dir is not None else default.with_name(name)


def read_manifest(path: str | os.PathLike, *, out_dir: str | os.PathLike | None = None,
                  suffix: str = ".zarr") -> list[ScanJob]:
    """The jobs of a CSV manifest: rows ``image[,out][,mask]`` (a first row starting with
    ``image`` is a header; blank rows and ``#`` comments are skipped). Relative images and
    masks are relative to the manifest's folder, relative outputs to ``out_dir`` (else the
    manifest's folder); an empty ``out`` is ``<stem>.heatmap.zarr`` in ``out_dir``, else
    next to the scan."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such manifest: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"cannot read manifest {path}: {exc}") from None
    base, target = path.parent, Path(out_dir) if out_dir is not None else None
    jobs = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if number == 1 and cells[0].lower() == "image":
            continue
        if len(cells) > 3 or not cells[0]:
            raise ValueError(f"{path} line {number}: expected image[,out][,mask], got "
                             f"{','.join(row)!r}")
        image = base / cells[0]
        out = cells[1] if len(cells) > 1 and cells[1] else None
        mask = cells[2] if len(cells) > 2 and cells[2] else None
        if mask is not None and mask not in ("auto", "none"):
            mask = str(base / mask)
        jobs.append(ScanJob(image, (target or base) / out if out else
                            _output(image, target, suffix), mask))
    return jobs


def expand_inputs(inputs: Iterable[str | os.PathLike], *,
                  out_dir: str | os.PathLike | None = None,
                  suffix: str = ".zarr") -> list[ScanJob]:
    """Scan jobs for ``inputs`` (scans, folders of scans, CSV manifests), in order.

    Outputs are ``<out_dir>/<stem>.heatmap<suffix>`` (next to each scan without
    ``out_dir``). Raises ``ValueError`` when two jobs would write the same output or when
    there is nothing to run, ``FileNotFoundError`` for a missing folder or manifest.
    A missing scan is not an error here: it fails on its own row of the summary.
    """
    target = Path(out_dir) if out_dir is not None else None
    jobs: list[ScanJob] = []
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            jobs.extend(read_manifest(path, out_dir=target, suffix=suffix))
        elif path.is_dir() and not _is_scan(path):
            found = sorted(p for p in path.iterdir() if _is_scan(p))
            if not found:
                raise ValueError(f"{path}: a directory, not an image or a zarr store, and "
                                 f"no scans in it (names ending in {', '.join(SCAN_SUFFIXES)})")
            jobs.extend(ScanJob(p, _output(p, target, suffix)) for p in found)
        else:
            jobs.append(ScanJob(path, _output(path, target, suffix)))
    if not jobs:
        raise ValueError("no scans to run: the folders and manifests given list none "
                         f"(scans end in {', '.join(SCAN_SUFFIXES)})")
    seen: dict[Path, Path] = {}
    for job in jobs:
        key = Path(os.path.abspath(job.out))
        if key in seen:
            raise ValueError(f"{seen[key]} and {job.image} would both write {job.out}: give "
                             "them distinct outputs (a manifest's out column)")
        seen[key] = job.image
    return jobs


RunOne = Callable[[ScanJob], RunSummary]
Progress = Callable[[ScanResult, int, int], None]  # (row just finished, done, total)


def _result(job: ScanJob, summary: RunSummary) -> ScanResult:
    status = ("skipped" if summary.already_complete else
              "resumed" if summary.tiles_skipped else "done")
    return ScanResult(str(job.image), status, summary.tiles, round(summary.mp_per_s, 3)
                      if summary.seconds > 0 else 0.0, round(summary.seconds, 3),
                      summary.out, "", summary.megapixels)


def _failure(job: ScanJob, exc: BaseException) -> ScanResult:
    lines = str(exc).strip().splitlines()
    return ScanResult(str(job.image), "failed", 0, 0.0, 0.0, str(job.out),
                      lines[0] if lines else type(exc).__name__)


def _attempt(run_one: RunOne, job: ScanJob, fatal: Callable[[BaseException], bool]
             ) -> ScanResult:
    start = time.perf_counter()
    try:
        return _result(job, run_one(job))
    except Exception as exc:  # noqa: BLE001 - a failed scan is a row; the cohort goes on
        if fatal(exc):
            raise
        failed = _failure(job, exc)
        return ScanResult(**{**asdict(failed), "seconds": round(time.perf_counter() - start,
                                                                3)})


def run_cohort(jobs: Sequence[ScanJob], run_one: RunOne, *, in_flight: int = 1,
               progress: Progress | None = None,
               fatal: Callable[[BaseException], bool] = lambda exc: False
               ) -> list[ScanResult]:
    """Run every job with ``run_one`` (e.g. :func:`tilefcn.job.run` on a shared client),
    at most ``in_flight`` at a time; returns one :class:`ScanResult` per job, in order.

    A job that raises becomes a ``failed`` row, unless ``fatal(exc)`` (a lost scheduler):
    then the exception propagates once the jobs in flight have ended, and rerunning the
    cohort resumes (complete outputs are skipped, running ones resumed).
    """
    if in_flight < 1:
        raise ValueError(f"scans in flight must be at least 1, got {in_flight}")
    results: list[ScanResult | None] = [None] * len(jobs)
    done = 0

    def record(index: int, result: ScanResult) -> None:
        nonlocal done
        results[index], done = result, done + 1
        if progress:
            progress(result, done, len(jobs))

    if in_flight == 1:
        for index, job in enumerate(jobs):
            record(index, _attempt(run_one, job, fatal))
        return results  # type: ignore[return-value]
    pending: dict[cf.Future, int] = {}
    queue = iter(enumerate(jobs))
    pool = cf.ThreadPoolExecutor(in_flight, thread_name_prefix="tilefcn-scan")

    def submit_next() -> None:
        for index, job in queue:
            pending[pool.submit(_attempt, run_one, job, fatal)] = index
            return

    try:
        for _ in range(in_flight):
            submit_next()
        error: BaseException | None = None
        while pending:
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                index = pending.pop(future)
                try:
                    result = future.result()
                except BaseException as exc:  # noqa: BLE001 - fatal: stop submitting
                    error = error or exc
                    continue
                record(index, result)
                if error is None:
                    submit_next()
        if error is not None:
            raise error
    except BaseException:  # Ctrl-C or fatal: do not wait here for the scans in flight
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results  # type: ignore[return-value]


def summary_table(results: Sequence[ScanResult]) -> str:
    """The summary as aligned text: scan, status, tiles, MP/s, seconds, output (and why a
    scan failed)."""
    head = ("scan", "status", "tiles", "MP/s", "seconds", "output")
    rows = [(Path(r.scan).name, r.status, str(r.tiles), f"{r.mp_per_s:.2f}",
             f"{r.seconds:.2f}", r.error if r.status == "failed" else r.output)
            for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in (head, *rows)]
    counts = {s: sum(r.status == s for r in results)
              for s in ("done", "resumed", "skipped", "failed")}
    lines.append(f"{len(results)} scans: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def summary_folder(jobs: Sequence[ScanJob], out_dir: str | os.PathLike | None) -> Path:
    """Where the summary goes: ``out_dir``, else the common folder of the outputs."""
    if out_dir is not None:
        return Path(out_dir)
    return Path(os.path.commonpath([os.path.abspath(j.out.parent) for j in jobs]))


def write_summary(results: Sequence[ScanResult], folder: str | os.PathLike,
                  extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``tilefcn-summary.csv`` (one row per scan: :data:`FIELDS`) and
    ``tilefcn-summary.json`` (the rows, counts per status, ``extra``) into ``folder``
    (replacing an earlier run's summary); returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = folder / f"{SUMMARY_NAME}.csv", folder / f"{SUMMARY_NAME}.json"
    rows = [{k: getattr(r, k) for k in FIELDS} for r in results]
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    counts = {s: sum(r.status == s for r in results)
              for s in ("done", "resumed", "skipped", "failed")}
    json_path.write_text(json.dumps({"scans": len(results), "counts": counts,
                                     **(extra or {}), "results": rows}, indent=2))
    return csv_path, json_path
