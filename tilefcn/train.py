"""Training a patch classifier on labelled scans and saving it as a convolutionalized bundle.

Scans and masks are read lazily: class locations come from a bounded number of mask windows
(a grid of ``window``² cells, a seeded random subset of them per scan), and patches are read
window by window through the scan's reader, so neither memory nor time depends on the scan
size. Each patch is labelled by the mask value at its centre pixel ``top + (P - 1)//2`` per
axis, the pixel the convolutionalized network's output is centred on (``offset + stride·i +
(rf - 1)//2``); mask values outside ``range(len(classes))`` are unlabelled and ignored.
"""

from __future__ import annotations

import hashlib
import json
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
from tilefcn.read import Scan, open_scan, tiff_description
from tilefcn.runtime.scaling import scale_input

Window = tuple[int, int, int, int]  # y0, x0, h, w


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


# -- pure sampling arithmetic ---------------------------------------------------------------

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


# -- reading ----------------------------------------------------------------------------------

def _read(scan: Scan, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    if scan.reader is not None:
        return np.asarray(scan.reader[y0:y1, x0:x1])
    return np.asarray(scan.array[y0:y1, x0:x1].compute())


def _open_pairs(pairs: Sequence[Any], patch: int) -> list[tuple[Scan, Scan]]:
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
    opened = _open_pairs(pairs, patch)
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
