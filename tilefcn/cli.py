"""The ``tilefcn`` command line: parse, call the library, report.

Exit codes: 0 success, 1 runtime failure, 2 usage or bad input. Errors are one line on
stderr; ``tilefcn --debug …`` shows the traceback.
"""

from __future__ import annotations

import errno
import json
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tilefcn import __version__
from tilefcn.cli_train import train_command
from tilefcn.progress import TileProgress

if TYPE_CHECKING:
    from tilefcn.job import RunSummary

SMALL_SUB_TILE = 64  # px; below this the per-call overhead and halo dominate
BAD_INPUT = (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError,
             NotADirectoryError, PermissionError)


class _Group(click.Group):
    """Turns library exceptions into one-line errors with the right exit code; with
    ``--debug`` the traceback is printed first and the exit code is kept."""

    def invoke(self, ctx: click.Context):  # noqa: ANN201
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a bad option of a command: one line, exit 2
            _traceback_if_debug(ctx)
            where = exc.ctx.command_path if exc.ctx is not None else "tilefcn"
            click.echo(f"Error: {_first_line(exc.format_message())} "
                       f"(see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted: run the same command with --resume to continue (a "
                       "cohort: the same command).", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the one place that reports all failures
            _traceback_if_debug(ctx)
            code = 2 if isinstance(exc, BAD_INPUT) else 1
            message = _first_line(str(exc)) or repr(exc)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                message = ("no space left on device while writing; free some space, then "
                           "run the same command with --resume")
            click.echo(f"Error: {message}", err=True)
            sys.exit(code)


def _traceback_if_debug(ctx: click.Context) -> None:
    if ctx.obj and ctx.obj.get("debug"):  # set by main's callback, inside invoke
        traceback.print_exc()


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tilefcn")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Run patch-trained fully convolutional networks over gigapixel scans, exactly.

    The scan is read in chunks, each chunk gets the halo the network's receptive field
    needs, and the stitched heatmap equals the model's output on the whole image.

    Start with `tilefcn demo`; then `tilefcn run SLIDE.tiff`.
    """
    ctx.ensure_object(dict)["debug"] = debug


@main.command()
@click.argument("images", nargs=-1, required=True, metavar="IMAGES...",
                type=click.Path(dir_okay=True, path_type=Path))
@click.option("--model", "model", default="tissue", show_default=True,
              help="Built-in name, bundle directory, .pt2 ExportedProgram, TorchScript file "
                   "or package.module:function factory.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Output: .zarr (OME-Zarr, default <stem>.heatmap.zarr next to the input) "
                   "or .tif (Cloud-Optimized GeoTIFF: input's CRS and geotransform, "
                   "overviews, NaN nodata). One input only; a cohort uses --out-dir.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Cohort: write <stem>.heatmap.zarr of every scan here, and the summary "
                   "(tilefcn-summary.csv/.json). Several IMAGES, a folder or a CSV manifest "
                   "(image[,out][,mask]) make a cohort: complete outputs of the same job are "
                   "skipped, unfinished ones resumed, a failed scan reported (exit 1) while "
                   "the others go on.")
@click.option("--tile", type=click.IntRange(min=16), help="Chunk edge in input pixels "
              "(default 2048, less for small scans; rounded up to the model's alignment).")
@click.option("--sub-tile", type=click.IntRange(min=16), help="Edge of the halo'd sub-tiles "
              "each task runs the model on (default on CPU: with --backend auto the fastest of "
              "256/512/1024 measured with each backend, else 256, and 256 with --mask; 1024 on "
              "CUDA).")
@click.option("--level", type=click.IntRange(min=0), help="Pyramid level to read (0 = full).")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True),
              help="Read at this many µm per pixel: the pyramid level within 10% of it, "
                   "else the nearest finer level area-averaged by an integer factor (never "
                   "upsampled; nodata values are left out of the means). The summary line "
                   "says which level and µm/px were used.")
@click.option("--device", default="auto", show_default=True,
              help="auto (cuda when available), cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=1),
              help="Local workers: threads for one scan (default: number of cores); for a "
                   "cohort, or with --processes, that many worker processes of one thread "
                   "(a dask LocalCluster: scans and tiles in parallel).")
@click.option("--processes/--threads", default=None,
              help="Whether --workers N starts local worker processes (default for a "
                   "cohort) or threads in this process (default for one scan).")
@click.option("--scheduler", help="Address of a dask.distributed scheduler, e.g. "
              "tcp://10.0.0.5:8786 (workers need tilefcn installed).")
@click.option("--scheduler-file", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON file written by `dask scheduler --scheduler-file` (or SLURMRunner, "
                   "dask-mpi): connect to that scheduler.")
@click.option("--scans-in-flight", type=click.IntRange(min=1),
              help="Cohort on a cluster: scans submitted at a time (default 4; 1 on local "
                   "threads), bounding client and scheduler memory for long manifests.")
@click.option("--mask", "mask", default="none", show_default=True, metavar="none|auto|PATH",
              help="none: compute every tile; auto: skip sub-tiles whose receptive fields "
                   "hold no tissue (brightfield: Otsu on optical density and saturation at a "
                   "low level) or only nodata (other scans); PATH: a mask image at any "
                   "resolution, non-zero = compute (max-pooled, thin tissue kept). Skipped "
                   "outputs are NaN; computed ones equal an unmasked run.")
@click.option("--bands", metavar="B,B,...", help="1-based bands the model gets, in this "
              "order (e.g. 4,3,2,8: red, green, blue, NIR of a Sentinel-2 stack).")
@click.option("--nodata", metavar="V|nan|none", help="Nodata value (default: the file's "
              "GDAL_NODATA tag; none: ignore it). Outputs whose receptive-field centre is "
              "nodata (every band equal to V) are NaN; with --mask auto nodata tiles are "
              "skipped.")
@click.option("--gpus", type=click.IntRange(min=1), help="Start a local cluster of one "
              "worker process per GPU (dask-cuda when installed) and run there.")
@click.option("--backend", type=click.Choice(["auto", "torch", "compile", "onnxruntime"]),
              default="auto", show_default=True,
              help="What runs the model on CPU. auto: time the installed backends (torch "
                   "NCHW/channels_last, ONNX Runtime) on sub-tiles of this model for a few "
                   "seconds, keep those within 1e-5 of torch, use the fastest (cached per "
                   "model and machine). compile: torch.compile (slow to start).")
@click.option("--batch", type=click.IntRange(min=1), help="Equal-shaped sub-tiles run "
              "together (default 1 on CPU, 8 on CUDA; border sub-tiles run alone, unpadded).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              show_default=True, help="fp32 is exact (TF32 off on GPUs); bf16/fp16 autocast "
                                      "is faster on GPUs but not exact (README: errors).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "uint8"]), default="float32",
              show_default=True, help="OME-Zarr values: float32, float16 (half the size), "
                                      "uint8 (probability × 255 rounded; no NaN, so no mask). "
                                      "GeoTIFFs: float32 or uint8.")
@click.option("--overwrite", is_flag=True, help="Replace an existing tilefcn output.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run of this same job: an OME-Zarr output keeps "
                   "its written chunks; a GeoTIFF keeps the tiles checkpointed beside it "
                   "(<out>.tiles.partial, every 30 s and when a run stops).")
@click.option("--preview", is_flag=False, flag_value="auto", default=None, metavar="[PATH]",
              help="Also write a PNG preview (OME-Zarr or GeoTIFF): the scan's thumbnail with the "
                   "argmax class colours blended in (opacity = probability), a legend of the "
                   "class names and a scale bar in µm. Alone: <out stem>.preview.png next to "
                   "the output (each scan of a cohort); or PATH (.png, one scan).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--verbose", "-v", is_flag=True, help="Also print the backend chosen and the "
                                                    "rates measured.")
def run(images: tuple[Path, ...], out_dir: Path | None, scheduler_file: Path | None,
        processes: bool | None, scans_in_flight: int | None, **params: Any) -> None:
    """Predict IMAGES (TIFF/OME-TIFF/SVS/GeoTIFF/zarr scans, folders of them, or CSV
    manifests) and write each heatmap chunk by chunk."""
    from tilefcn.cohort import is_cohort

    if scheduler_file is not None:
        if params["scheduler"] or params["gpus"]:
            raise click.UsageError("give one of --scheduler, --scheduler-file, --gpus")
        from tilefcn.cluster import read_scheduler_file

        params["scheduler"] = read_scheduler_file(scheduler_file)
    if is_cohort(images, out_dir):
        from tilefcn.cli_cohort import run_cohort_command

        if params.get("preview") not in (None, "auto"):
            raise click.UsageError("--preview PATH is for one scan; a cohort takes --preview "
                                   "alone (a preview next to each heatmap)")

        run_cohort_command(_run_one, images, out_dir, processes, scans_in_flight, params)
        return
    from tilefcn.cluster import cluster_client, lost_scheduler_error

    local = processes and params["workers"] and not (params["scheduler"] or params["gpus"])
    try:
        with cluster_client(processes=params["workers"] if local else None) as client:
            summary = _run_one(images[0], **{**params, "scheduler": client or
                                             params["scheduler"]})
    except Exception as exc:
        if "scheduler-connection-lost" in str(exc):
            raise lost_scheduler_error(exc, "run the same command with --resume to "
                                            "continue") from exc
        raise
    _report_scan(summary, params["verbose"])


def _run_one(image: Path, model: str, out: Path | None, tile: int | None, sub_tile: int | None,
        level: int | None, mpp: float | None, device: str, workers: int | None,
        scheduler: str | None, gpus: int | None, backend: str, batch: int | None,
        precision: str, dtype: str, mask: str, overwrite: bool, resume: bool, quiet: bool,
        verbose: bool, skip_complete: bool = False, bands: str | None = None,
        nodata: str | None = None, preview: str | None = None) -> RunSummary:
    """One scan of `tilefcn run` (also each scan of a cohort): open, run, return the summary."""
    from tilefcn.job import run as run_scan

    if level is not None and mpp is not None:
        raise click.UsageError("give --level or --mpp, not both")
    if overwrite and resume:
        raise click.UsageError("give --overwrite or --resume, not both")
    from tilefcn.read import open_scan

    if sub_tile is not None and sub_tile < SMALL_SUB_TILE:
        click.echo(f"Warning: --sub-tile {sub_tile} is small: each sub-tile pays the model's "
                   f"halo and a call of its own, so this runs several times slower than the "
                   f"default (256-1024 on CPU)", err=True)
    scan = open_scan(image, level=level, mpp=mpp)  # a missing file: one-line error, exit 2
    png = _preview_path(preview, out, scan, overwrite or resume or skip_complete)
    bar = TileProgress(scan.info.shape[0] * scan.info.shape[1] / 1e6, not quiet)
    try:
        summary = run_scan(scan, model, out, tile=tile, device=device,
                           workers=workers, scheduler=scheduler, gpus=gpus,
                           overwrite=overwrite, resume=resume, sub_tile=sub_tile, mask=mask,
                           backend=backend, precision=precision, batch=batch, dtype=dtype,
                           progress=bar, skip_complete=skip_complete, bands=bands,
                           nodata=nodata,
                           warn=lambda m: click.echo(f"Warning: {m}", err=True))
    finally:
        bar.close()
    if png is not None:
        from tilefcn.preview import write_preview

        click.echo(f"Preview: {write_preview(summary.out, png, scan=scan).path}")
    return summary


def _preview_path(preview: str | None, out: Path | None, scan: Any,
                  replace: bool) -> Path | None:
    """Where ``--preview`` writes (None: no preview), checked before the run starts."""
    if preview is None:
        return None
    from tilefcn.job import default_output
    from tilefcn.preview import check_preview_path, default_preview_path

    target = Path(out) if out is not None else default_output(str(scan.info.source))
    png = default_preview_path(target) if preview == "auto" else Path(preview)
    return check_preview_path(png, overwrite=replace)


def _report_scan(summary: RunSummary, verbose: bool) -> None:
    """The lines printed after one scan: the backend (``--verbose``) and what was written."""
    if verbose:
        choice = summary.backend_choice or {}
        by_edge = choice.get("rates_by_sub_tile") or (
            {str(choice.get("sub_tile", "")): choice["rates_mp_per_s"]}
            if choice.get("rates_mp_per_s") else {})
        rates = "; ".join((f"{edge} px: " if edge else "") + ", ".join(
            f"{k} {v:.1f} MP/s" for k, v in r.items()) for edge, r in by_edge.items())
        edge = f", {choice['sub_tile']}-px sub-tiles" if choice.get("sub_tile") else ""
        click.echo(f"Backend: {summary.backend}{edge}" + (
            f" (measured: {rates})" if rates else
            " (chosen on each worker)" if summary.backend == "auto" else ""))
    if summary.already_complete:
        click.echo(f"{summary.out} is already complete for this job: nothing to do")
        return
    click.echo(f"Wrote {summary.out}: heatmap {summary.shape} from "
               f"{summary.megapixels:.1f} MP"
               + (f" at {summary.resolution}" if summary.resolution else "")
               + f" in {summary.seconds:.1f} s "
               f"({summary.mp_per_s:.1f} MP/s, {summary.tiles} tiles"
               + (f", {summary.tiles_skipped} resumed" if summary.tiles_skipped else "")
               + (f", {summary.tiles_masked} masked" if summary.tiles_masked else "") + ")")


@main.command()
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(target: str, as_json: bool) -> None:
    """Describe a scan (levels, shape, dtype, tile, pixel size, georeference) or a model."""
    data = _describe(target)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        click.echo(f"{key:>16}: {value}")


def _describe(target: str) -> dict:
    from tilefcn.models import bundled_names

    path = Path(target)
    is_model = (target in bundled_names() or (path / "model.json").is_file()
                or path.suffix in (".pt2", ".pt", ".pth", ".ts", ".torchscript")
                or (":" in target and not path.exists()))
    if is_model:
        from tilefcn.modelio import load_model

        model = load_model(target)
        trained = {k: model.card[k] for k in ("mpp", "augmentation", "val_accuracy", "created")
                   if k in model.card}  # the model card's headline (all of it: model.json)
        return {"kind": "model", **model.describe(), **({"trained": trained} if trained else {})}
    from tilefcn.read import open_scan

    if not path.exists():
        raise FileNotFoundError(f"no such file or model: {target}")
    return {"kind": "scan", **open_scan(path).info.to_dict()}


@main.command()
@click.argument("heatmap", type=click.Path(path_type=Path))
@click.option("--geojson", "geojson", required=True, type=click.Path(path_type=Path),
              help="GeoJSON file to write (.geojson/.json): one Feature per region, "
                   "QuPath annotations (objectType, classification name and colour).")
@click.option("--class", "classes", multiple=True, metavar="NAME",
              help="Export only this class (repeatable; default: every class).")
@click.option("--threshold", type=click.FloatRange(min=0, max=1, min_open=True),
              help="A region is where the class probability is >= P (classes may overlap); "
                   "default: where the class is the most probable one.")
@click.option("--crs", "crs", is_flag=True, help="Coordinates in the scan's CRS (for QGIS; "
              "georeferenced scans only) instead of level-0 scan pixels (QuPath).")
@click.option("--level", type=click.IntRange(min=0), default=0, show_default=True,
              help="Heatmap pyramid level to vectorise (higher: coarser, fewer vertices).")
@click.option("--overwrite", is_flag=True, help="Replace an existing GeoJSON file.")
def export(heatmap: Path, geojson: Path, classes: tuple[str, ...], threshold: float | None,
           crs: bool, level: int, overwrite: bool) -> None:
    """Write the class regions of a HEATMAP (OME-Zarr or GeoTIFF) as GeoJSON polygons, chunk
    by chunk."""
    from tilefcn.regions import export_geojson

    result = export_geojson(heatmap, geojson, classes=list(classes) or None,
                            threshold=threshold, crs=crs, level=level, overwrite=overwrite)
    counts = ", ".join(f"{name} {n}" for name, n in result.polygons.items())
    click.echo(f"Wrote {result.out}: {sum(result.polygons.values())} polygons ({counts}) in "
               + (f"{result.crs} coordinates" if result.crs else "level-0 scan pixels"))


@main.command()
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("tilefcn-demo"), show_default=True,
              help="Folder for the synthetic slide, its heatmap and the preview.")
@click.option("--size", type=click.IntRange(min=256), default=4096, show_default=True,
              help="Edge of the synthetic slide in pixels.")
@click.option("--seed", type=int, default=2026, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def demo(out_dir: Path, size: int, seed: int, quiet: bool) -> None:
    """Generate a synthetic slide, run the bundled `tissue` model, write heatmap + preview."""
    from tilefcn.demo import run_demo

    click.echo(f"Generating a {size}x{size} synthetic slide in {out_dir}/ ...")
    bar = TileProgress(size * size / 1e6, not quiet)
    try:
        result = run_demo(out_dir, size=size, seed=seed, progress=bar)
    finally:
        bar.close()
    s = result.summary
    click.echo(f"Slide:   {result.slide} (mask: {result.mask})")
    click.echo(f"Heatmap: {result.heatmap} {s.shape} in {s.seconds:.1f} s "
               f"({s.mp_per_s:.1f} MP/s) - open it in napari or QuPath (OME-Zarr)")
    click.echo(f"Preview: {result.preview}")
    click.echo("Classes: " + ", ".join(f"{c} {f:.0%}" for c, f in result.fractions.items()))


main.add_command(train_command)
