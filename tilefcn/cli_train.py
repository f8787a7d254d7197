"""``tilefcn train``: parse the IMAGE MASK pairs and options, train, report each epoch.

Kept out of :mod:`tilefcn.cli` (which registers it) so that module stays short; the work is
:func:`tilefcn.train.train`.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("train")
@click.argument("pairs", nargs=-1, required=True, metavar="IMAGE MASK [IMAGE MASK ...]",
                type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to write (model.json + weights.safetensors).")
@click.option("--epochs", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--patch", type=click.IntRange(min=40), default=64, show_default=True,
              help="Patch edge in pixels, a multiple of 8 (the receptive field).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--classes", help="Comma-separated class names for mask values 0, 1, ... "
              "(default: names stored in the mask, else class0, class1, ...).")
@click.option("--samples-per-class", type=click.IntRange(min=2), default=2000,
              show_default=True, help="Patches sampled per class (balanced).")
@click.option("--stain-augment", is_flag=True, help="RGB brightfield: re-stain patches with "
              "random stain vectors (H&E to IHC), jitter colour, blur and JPEG re-encode them "
              "while training, so the model generalises beyond the training stain.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), help="µm per pixel the "
              "model is trained at, recorded in the bundle (default: the scans' pixel size).")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def train_command(pairs: tuple[Path, ...], out: Path, epochs: int, patch: int, seed: int,
          classes: str | None, samples_per_class: int, stain_augment: bool, mpp: float | None,
          overwrite: bool, quiet: bool) -> None:
    """Train a patch classifier on IMAGE MASK pairs and save it as a bundle for `run`."""
    from tilefcn.train import EpochReport
    from tilefcn.train import train as train_model

    if len(pairs) % 2:
        raise ValueError(f"expected IMAGE MASK pairs, got {len(pairs)} paths")
    for path in pairs:
        if not path.exists():
            raise FileNotFoundError(f"no such file: {path}")
    names = [c.strip() for c in classes.split(",")] if classes else None
    if names is not None and (not all(names) or len(set(names)) != len(names)):
        raise ValueError(f"--classes must be distinct non-empty names, got {classes!r}")

    def report(r: EpochReport) -> None:
        per = ", ".join(f"{c} {a:.3f}" for c, a in r.per_class_accuracy.items())
        click.echo(f"epoch {r.epoch}/{r.epochs}: loss {r.loss:.4f}, "
                   f"val accuracy {r.val_accuracy:.3f} ({per})")

    result = train_model(list(zip(pairs[::2], pairs[1::2], strict=True)), out, epochs=epochs,
                         patch=patch, seed=seed, classes=names,
                         samples_per_class=samples_per_class, overwrite=overwrite,
                         stain_augment=stain_augment, mpp=mpp,
                         progress=report if not quiet else False)
    click.echo(f"Validation accuracy {result.val_accuracy:.3f} on {result.samples} patches "
               f"in {result.seconds:.0f} s; bundle written to {result.bundle}")
