"""Training a patch classifier on labelled scans and saving it as a convolutionalized bundle.

Scans and masks are read lazily (:mod:`tilefcn.patch_sampling`: a bounded number of mask
windows, patches read window by window), so neither memory nor time depends on the scan
size. Each patch is labelled by the mask value at its centre pixel ``top + (P - 1)//2`` per
axis, the pixel the convolutionalized network's output is centred on (``offset + stride·i +
(rf - 1)//2``); mask values outside ``range(len(classes))`` are unlabelled and ignored.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tilefcn import __version__
from tilefcn.modelio import Scaling, save_bundle
from tilefcn.models import patch_classifier
from tilefcn.patch_sampling import open_pairs, sample_patches, split_indices
from tilefcn.read import Scan
from tilefcn.runtime.scaling import scale_input


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced: the bundle, its validation scores and the classifier."""

    bundle: Path
    val_accuracy: float
    per_class_accuracy: dict[str, float]
    epochs: int
    seconds: float
    samples: int
    classifier: nn.Module = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class EpochReport:
    """One epoch's numbers, passed to a ``progress`` callback."""

    epoch: int
    epochs: int
    loss: float
    val_accuracy: float
    per_class_accuracy: dict[str, float]


# -- augmentation and evaluation (pure) ------------------------------------------------------

def augment(batch: np.ndarray, rng: np.random.Generator, jitter: bool) -> np.ndarray:
    """Random flips and 90° rotations of ``(B, P, P, C)`` float patches (values in [0, 1] after
    dtype scaling); with ``jitter``, small brightness and contrast changes per patch."""
    out = np.empty_like(batch)
    ks, flips = rng.integers(0, 4, len(batch)), rng.integers(0, 2, len(batch))
    for i, (k, f) in enumerate(zip(ks, flips, strict=True)):
        p = np.rot90(batch[i], k, axes=(0, 1))
        out[i] = p[:, ::-1] if f else p
    if jitter:
        n, c = len(batch), batch.shape[-1]
        contrast = rng.uniform(0.85, 1.15, (n, 1, 1, 1)).astype(np.float32)
        bright = (rng.uniform(-0.06, 0.06, (n, 1, 1, 1))
                  + rng.uniform(-0.03, 0.03, (n, 1, 1, c))).astype(np.float32)
        mean = out.mean(axis=(1, 2, 3), keepdims=True)
        out = (out - mean) * contrast + mean + bright
    return out


def centre_accuracy(pred: np.ndarray, labels: np.ndarray, stride: tuple[int, int],
                    offset: tuple[int, int], receptive_field: tuple[int, int], n_classes: int,
                    radius: int = 16) -> tuple[float, list[float], list[int]]:
    """Accuracy of class map ``pred`` ``(H', W')`` against ``labels`` ``(H, W)`` away from
    class boundaries.

    Output ``(i, j)`` is compared with the label at its receptive-field centre
    ``(o + s·i + (r - 1)//2)`` per axis, counted only where the label is the same over the
    whole ``(2·radius + 1)²`` square around that centre. Returns overall accuracy, per-class
    accuracy (NaN for a class never counted) and per-class counts.
    """
    cy = offset[0] + stride[0] * np.arange(pred.shape[0]) + (receptive_field[0] - 1) // 2
    cx = offset[1] + stride[1] * np.arange(pred.shape[1]) + (receptive_field[1] - 1) // 2
    ky, kx = (cy - radius >= 0) & (cy + radius < labels.shape[0]), \
        (cx - radius >= 0) & (cx + radius < labels.shape[1])
    pred, cy, cx = pred[ky][:, kx], cy[ky], cx[kx]
    full = (2 * radius + 1) ** 2
    hits, counts = [], []
    for k in range(n_classes):
        integral = np.zeros((labels.shape[0] + 1, labels.shape[1] + 1), np.int32)
        np.cumsum(np.cumsum(labels == k, axis=0, dtype=np.int32), axis=1, out=integral[1:, 1:])
        y0, y1, x0, x1 = cy - radius, cy + radius + 1, cx - radius, cx + radius + 1
        box = (integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0]
               + integral[y0][:, x0])
        uniform = box == full
        counts.append(int(uniform.sum()))
        hits.append(int((pred[uniform] == k).sum()))
    per = [h / c if c else float("nan") for h, c in zip(hits, counts, strict=True)]
    return sum(hits) / max(sum(counts), 1), per, counts


# -- training ---------------------------------------------------------------------------------

def training_mpp(opened: list[tuple[Scan, Scan]], mpp: float | None) -> float | None:
    """The µm/px a model is trained at: ``mpp`` when given, else the training scans' common
    pixel size (mean of y and x; ``None`` when any scan has none). Scans whose pixel sizes
    differ by more than 10% need an explicit ``mpp``."""
    if mpp is not None:
        if not mpp > 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        return float(mpp)
    sizes = [None if i.info.mpp is None else sum(i.info.mpp) / 2 for i, _ in opened]
    if None in sizes:
        return None
    if max(sizes) > 1.1 * min(sizes):
        raise ValueError(f"the training scans differ in pixel size ({min(sizes):g} to "
                         f"{max(sizes):g} µm/px); give the model's mpp explicitly")
    return float(np.mean(sizes))


def _sha256(path: Path) -> str | None:
    """sha256 of a file (streamed in 1 MB blocks) or of a directory's files (sorted)."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _fit_scaling(patches: np.ndarray, index: np.ndarray, chunk: int = 256) -> Scaling:
    """Per-channel mean and std of ``patches[index]`` after dtype scaling (in chunks)."""
    total = np.zeros(patches.shape[-1])
    squares = np.zeros(patches.shape[-1])
    for i in range(0, len(index), chunk):
        x = scale_input(patches[index[i:i + chunk]], Scaling("dtype")).astype(np.float64)
        total += x.sum(axis=(0, 1, 2))
        squares += (x * x).sum(axis=(0, 1, 2))
    n = len(index) * patches.shape[1] * patches.shape[2]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 1e-12))
    return Scaling("dtype", tuple(float(v) for v in mean), tuple(float(v) for v in std))


def _to_tensor(batch: np.ndarray, scaling: Scaling) -> torch.Tensor:
    x = scale_input(batch, scaling)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def _evaluate(net: nn.Module, x: np.ndarray, y: np.ndarray, scaling: Scaling,
              n_classes: int, batch_size: int) -> tuple[float, list[float]]:
    net.eval()
    pred = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            pred.append(net(_to_tensor(x[i:i + batch_size], scaling)).argmax(1).numpy())
    pred = np.concatenate(pred) if pred else np.zeros(0, np.int64)
    per = [float(np.mean(pred[y == k] == k)) if np.any(y == k) else float("nan")
           for k in range(n_classes)]
    return float(np.mean(pred == y)) if len(y) else float("nan"), per


def train(pairs: Sequence[tuple[Any, Any]], out: str | Path, *, epochs: int = 8,
          patch: int = 64, seed: int = 0, classes: Sequence[str] | None = None,
          width: int = 16, hidden: int = 64, batch_size: int = 64,
          samples_per_class: int = 2000, val_fraction: float = 0.2, lr: float = 2e-3,
          window: int = 512, windows_per_scan: int = 64, overwrite: bool = False,
          stain_augment: bool = False, mpp: float | None = None,
          progress: bool | Callable[[EpochReport], None] = True) -> TrainResult:
    """Train a ``patch_classifier`` on ``(image, mask)`` pairs and save it to bundle ``out``.

    Patches of ``patch`` px are sampled balanced over ``classes`` (default: the names stored
    in the first mask, else ``class0…``), ``val_fraction`` of them held out. Training is
    deterministic for a given ``seed`` and thread count. ``progress``: ``True`` shows a tqdm
    bar per epoch, a callable additionally receives an :class:`EpochReport` per epoch,
    ``False`` is silent. The saved bundle is convolutionalized and outputs probabilities.
    ``stain_augment`` (RGB only): every training batch is re-stained, colour-jittered,
    blurred and JPEG re-encoded (:mod:`tilefcn.augment`). ``mpp``: the µm/px the model is
    trained at, recorded in the bundle (default: the training scans' pixel size, when known).
    """
    start = time.perf_counter()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use overwrite)")
    for name, value, low in (("epochs", epochs, 1), ("patch", patch, 40),
                             ("samples_per_class", samples_per_class, 2),
                             ("batch_size", batch_size, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if patch % 8:
        raise ValueError(f"patch must be a multiple of 8 (the classifier's stride), got {patch}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    opened = open_pairs(pairs, patch)
    mpp = training_mpp(opened, mpp)
    rng = np.random.default_rng(seed)
    patches, labels, names = sample_patches(opened, list(classes) if classes else None, patch,
                                            samples_per_class, rng, window, windows_per_scan)
    tr, va = split_indices(len(labels), val_fraction, rng)
    channels, dtype = patches.shape[-1], patches.dtype
    scaling = _fit_scaling(patches, tr)
    jitter = channels == 3 and dtype == np.uint8
    stain = None
    if stain_augment:
        if channels != 3:
            raise ValueError(f"stain augmentation needs RGB scans, these have {channels} "
                             "channel(s)")
        from tilefcn.augment import StainAugment

        stain, jitter = StainAugment(), False
    kwargs = {"in_channels": channels, "classes": len(names), "width": width,
              "hidden": hidden, "patch_size": patch}

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        net = patch_classifier(**kwargs)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        steps = epochs * -(-len(tr) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
        loss_fn = nn.CrossEntropyLoss()
        for epoch in range(1, epochs + 1):
            net.train()
            order = tr[rng.permutation(len(tr))]
            batches = range(0, len(order), batch_size)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(batches, desc=f"epoch {epoch}/{epochs}", unit="batch",
                           file=sys.stderr, leave=False, dynamic_ncols=True)
            total = 0.0
            for i in bar if bar is not None else batches:
                idx = order[i:i + batch_size]
                x = augment(scale_input(patches[idx], Scaling("dtype")), rng, jitter)
                if stain is not None:
                    x = stain(x, rng)
                loss = loss_fn(net(_to_tensor(x, scaling)), torch.from_numpy(labels[idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                if bar is not None:
                    bar.set_postfix_str(f"loss {loss.item():.3f}", refresh=False)
            if bar is not None:
                bar.close()
            acc, per = _evaluate(net, patches[va], labels[va], scaling, len(names), 256)
            per_class = dict(zip(names, per, strict=True))
            if callable(progress):
                progress(EpochReport(epoch, epochs, total / len(tr), acc, per_class))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    net.eval()
    from tilefcn.convert import convolutionalize

    fcn = convolutionalize(net, patch).eval()
    card = {
        "training_data": [
            {"image": Path(i.info.source).name, "sha256": _sha256(Path(i.info.source)),
             "mask": Path(m.info.source).name, "mask_sha256": _sha256(Path(m.info.source))}
            for i, m in opened],
        "seed": seed, "epochs": epochs, "val_accuracy": acc,
        "per_class_accuracy": per_class, "patch_size": patch, "mpp": mpp,
        "augmentation": "stain" if stain is not None else "flips+jitter" if jitter else "flips",
        "samples": {"train": len(tr), "val": len(va), "per_class": samples_per_class},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tilefcn_version": __version__,
    }
    save_bundle(out, fcn, architecture="patch_classifier", kwargs=kwargs, classes=names,
                in_channels=channels, scaling=scaling, patch_size=(patch, patch),
                convolutionalized=True, probabilities=True, card=card)
    return TrainResult(out, acc, per_class, epochs, time.perf_counter() - start, len(labels), net)
