"""``tilefcn run`` for a cohort (several inputs, a folder, a manifest, ``--out-dir``): connect
once, run every scan with the same per-scan options, report progress and the summary table.

Kept out of :mod:`tilefcn.cli` so that module stays a list of commands; the per-scan work is
the single-scan command's own function (passed in), so every ``run`` option applies to every
scan of a cohort.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tilefcn.cohort import (
    ScanJob,
    ScanResult,
    expand_inputs,
    run_cohort,
    summary_folder,
    summary_table,
    write_summary,
)

DEFAULT_IN_FLIGHT = 4  # scans submitted at a time on a cluster


class _ScanBar:
    """tqdm progress over scans: done/total, input MP/s of the scans computed so far."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar, self.start, self.megapixels = None, time.perf_counter(), 0.0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="scan", file=sys.stderr, dynamic_ncols=True,
                            desc="scans")

    def __call__(self, result: ScanResult, done: int, total: int) -> None:
        self.megapixels += result.megapixels
        if self.bar is None:
            return
        elapsed = time.perf_counter() - self.start
        self.bar.set_postfix_str(f"{self.megapixels / elapsed:.1f} MP/s"
                                 + (f", {result.status}: {Path(result.scan).name}"
                                    if result.status == "failed" else ""), refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _dashboard(client: Any) -> str | None:
    try:
        return client.dashboard_link if client is not None else None
    except Exception:  # noqa: BLE001 - no dashboard (bokeh missing, --no-dashboard)
        return None


def run_cohort_command(run_one: Callable[..., Any], images: tuple[Path, ...],
                       out_dir: Path | None, processes: bool | None,
                       in_flight: int | None, params: dict[str, Any]) -> None:
    """Run the cohort ``images`` with ``run_one(image, **params)`` per scan; exit 1 when any
    scan failed (the printed table and ``tilefcn-summary.csv/.json`` say which and why)."""
    from tilefcn.cluster import cluster_client, lost_scheduler_error, scheduler_lost
    from tilefcn.modelio import load_model

    if params.get("out") is not None:
        raise click.UsageError("--out names one output; a cohort writes into --out-dir")
    if params.get("overwrite") and params.get("resume"):
        raise click.UsageError("give --overwrite or --resume, not both")
    if params.get("level") is not None and params.get("mpp") is not None:
        raise click.UsageError("give --level or --mpp, not both")
    jobs = expand_inputs(images, out_dir=out_dir)
    model = load_model(params["model"])  # once for the cohort; a bad model: exit 2 here
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    workers = params.get("workers")
    local = workers if workers and processes is not False else None
    quiet = params.get("quiet", False)
    start = time.perf_counter()
    with cluster_client(scheduler=params.get("scheduler"), gpus=params.get("gpus"),
                        processes=local) as client:
        if client is not None and not quiet and (link := _dashboard(client)):
            click.echo(f"Dashboard: {link}", err=True)
        flights = (in_flight or DEFAULT_IN_FLIGHT) if client is not None else 1

        def one(job: ScanJob) -> Any:
            overwrite = params.get("overwrite", False)
            return run_one(job.image, **{
                **params, "model": model, "out": job.out, "mask": job.mask or params["mask"],
                "quiet": True, "scheduler": client, "gpus": None,
                "resume": not overwrite and job.out.suffix.lower() == ".zarr"},
                skip_complete=not overwrite)

        bar = _ScanBar(len(jobs), not quiet)
        try:
            results = run_cohort(jobs, one, in_flight=flights, progress=bar,
                                 fatal=lambda exc: scheduler_lost(client, exc))
        except Exception as exc:
            if scheduler_lost(client, exc):
                raise lost_scheduler_error(exc, "run the same command again: complete scans "
                                                "are skipped, unfinished ones resume") from exc
            raise
        finally:
            bar.close()
    seconds = time.perf_counter() - start
    folder = summary_folder(jobs, out_dir)
    computed = sum(r.megapixels for r in results)
    csv_path, json_path = write_summary(results, folder, {
        "seconds": round(seconds, 3), "megapixels": round(computed, 3),
        "mp_per_s": round(computed / seconds, 3) if seconds > 0 else 0.0})
    click.echo(summary_table(results))
    click.echo(f"Summary: {csv_path} and {json_path.name} ({seconds:.1f} s, "
               f"{computed / seconds if seconds > 0 else 0:.1f} MP/s)")
    if any(r.status == "failed" for r in results):
        raise click.exceptions.Exit(1)
