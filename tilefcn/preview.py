"""PNG preview of a heatmap: the scan's thumbnail, the heatmap blended in, a legend, a scale.

Only small things are read: a thumbnail of the scan (:func:`tilefcn.read.thumbnail`, at most
``max_side`` px) and the one pyramid level of the heatmap whose pixels are just finer than the
thumbnail's. Each thumbnail pixel takes the heatmap pixel it lies in, found through the
heatmap's geometry, so the overlay lines up with the scan (offsets included):

* thumbnail pixel ``t`` (of ``n_t`` over ``n`` scan pixels) is centred on scan coordinate
  ``y = (t + ½)·n/n_t − ½`` (pixel centres at integers);
* level-0 heatmap index ``u = (y − c)/s`` for the receptive field's centre ``c`` of output 0
  and stride ``s`` (:meth:`tilefcn.geometry.Geometry.centre`);
* pyramid level ``L`` pixel ``k = ⌊(u − (2^L − 1)/2)/2^L + ½⌋`` (its centre is
  ``2^L·k + (2^L − 1)/2``); outside ``[0, n_L)`` or all-NaN: no overlay.

Colour: the argmax class's :data:`tilefcn.viewers.PALETTE` colour with opacity
``opacity · p_max`` (one class: its colour with opacity ``opacity · p``), over the thumbnail.
Below the image: the class swatches with their names and a scale bar of a round length (µm,
or mm from 1000 µm, when the scan has a pixel size; else level-0 scan pixels).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tilefcn.geometry import Geometry
from tilefcn.viewers import PALETTE, class_colour

__all__ = ["Preview", "check_preview_path", "default_preview_path", "render_preview",
           "write_preview"]

MAX_SIDE = 1024  # px, larger side of the thumbnail
OPACITY = 0.6  # of a class with probability 1
_PAD, _SWATCH, _FONT = 8, 14, 14  # legend layout (px)


@dataclass(frozen=True, slots=True)
class Preview:
    """A written preview: the file, the thumbnail's size ``(h, w)`` (the image part, top
    left of the PNG), the heatmap level used, and the scale bar (length in PNG px, label)."""

    path: str
    thumbnail: tuple[int, int]
    level: int
    scale_px: int
    scale_label: str


def default_preview_path(out: str | os.PathLike) -> Path:
    """``<out stem>.preview.png`` next to the output (``slide.heatmap.zarr`` →
    ``slide.heatmap.preview.png``)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.preview.png")


def _display_rgb(image: np.ndarray) -> np.ndarray:
    """``(h, w, 3)`` uint8 for display: uint8 RGB as is; other dtypes stretched per band
    from the 2nd to the 98th percentile; bands 1–3 of multi-band scans, grey for 1–2 bands."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    image = image[..., :3] if image.shape[2] >= 3 else np.repeat(image[..., :1], 3, axis=2)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    out = np.zeros(image.shape, dtype=np.uint8)
    for b in range(3):
        band = image[..., b].astype(np.float64)
        finite = band[np.isfinite(band)]
        if finite.size == 0:
            continue
        lo, hi = np.percentile(finite, (2, 98))
        scaled = (band - lo) / (hi - lo) if hi > lo else np.zeros_like(band)
        out[..., b] = np.round(np.clip(np.nan_to_num(scaled), 0, 1) * 255)
    return out


def _pick_level(levels: int, stride: float, step: float) -> int:
    """The coarsest pyramid level whose pixel (``stride·2^L`` scan px) is ≤ ``step``."""
    best = 0
    for level in range(levels):
        if stride * 2**level <= step:
            best = level
    return best


def _indices(n_thumb: int, n_scan: int, centre: float, stride: int, level: int,
             n_level: int) -> tuple[np.ndarray, np.ndarray]:
    """Heatmap level-``level`` index of every thumbnail pixel along one axis, and validity."""
    y = (np.arange(n_thumb) + 0.5) * n_scan / n_thumb - 0.5
    u = (y - centre) / stride
    f = 2**level
    k = np.floor((u - (f - 1) / 2) / f + 0.5).astype(np.int64)
    ok = (k >= 0) & (k < n_level)
    return np.clip(k, 0, max(0, n_level - 1)), ok


def _blend(background: np.ndarray, probs: np.ndarray, opacity: float) -> np.ndarray:
    """Argmax colours over ``background`` with opacity ``opacity · p`` (see module doc)."""
    nan = np.isnan(probs).all(axis=0)
    if probs.shape[0] == 1:
        alpha = np.clip(np.nan_to_num(probs[0]), 0, 1)
        colour = np.broadcast_to(PALETTE[0].astype(np.float32), (*alpha.shape, 3))
    else:
        filled = np.nan_to_num(probs, nan=-np.inf)
        label = np.argmax(filled, axis=0)
        alpha = np.clip(np.take_along_axis(filled, label[None], 0)[0], 0, 1)
        colour = PALETTE[label % len(PALETTE)].astype(np.float32)
    alpha = np.where(nan, 0.0, opacity * alpha)[..., None]
    out = background.astype(np.float32) * (1 - alpha) + colour * alpha
    return np.round(out).astype(np.uint8)


def _scale_bar(width_px: int, unit_per_px: float, unit: str) -> tuple[int, str]:
    """A round length (1, 2 or 5 × 10^k units) near a quarter of ``width_px``: (px, label)."""
    target = max(1.0, width_px / 4) * unit_per_px
    power = 10 ** math.floor(math.log10(target))
    length = max(m * power for m in (1, 2, 5) if m * power <= target)
    px = max(1, round(length / unit_per_px))
    if unit == "µm" and length >= 1000:
        return px, f"{length / 1000:g} mm"
    return px, f"{length:g} {unit}"


def _font(size: int) -> tuple[Any, bool]:
    """A font and whether it has the µ glyph: DejaVu Sans where installed, else Pillow's
    bundled font (no µ: labels then say "um")."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", size), True
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size), False
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default(), False


def _legend(image: np.ndarray, classes: list[str], bar: tuple[int, str], title: str) -> Any:
    """The PNG: ``image`` on top, below it the swatches + names (wrapped) and the scale bar."""
    from PIL import Image, ImageDraw

    font, has_mu = _font(_FONT)
    h, w = image.shape[:2]
    width = max(w, 320)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries, x, rows = [], _PAD, 0
    for i, name in enumerate(classes):
        size = _SWATCH + 4 + int(probe.textlength(name, font=font)) + 2 * _PAD
        if x + size > width and x > _PAD:
            x, rows = _PAD, rows + 1
        entries.append((x, rows, i, name))
        x += size
    line = _SWATCH + _PAD
    strip = _PAD + (rows + 1) * line + line + _PAD + line  # classes, scale bar, title
    canvas = Image.new("RGB", (width, h + strip), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    top = h + _PAD
    for x, row, i, name in entries:
        y = top + row * line
        draw.rectangle([x, y, x + _SWATCH - 1, y + _SWATCH - 1], fill=class_colour(i))
        draw.text((x + _SWATCH + 4, y + _SWATCH // 2), name, fill=(0, 0, 0), font=font,
                  anchor="lm")
    y = top + (rows + 1) * line + _SWATCH // 2
    px, label = bar
    label = label if has_mu else label.replace("µ", "u")
    draw.rectangle([_PAD, y - 2, _PAD + px - 1, y + 2], fill=(0, 0, 0))
    draw.text((_PAD + px + 6, y), label, fill=(0, 0, 0), font=font, anchor="lm")
    draw.text((_PAD, y + line), title, fill=(90, 90, 90), font=font, anchor="lm")
    return canvas


def _open_source(attrs: dict) -> Any | None:
    """The run's scan level reopened by its recorded path, or None when it cannot be."""
    from tilefcn.read import open_scan

    source = attrs.get("source") or {}
    path = str(source.get("source", "<"))
    if path.startswith("<") or not Path(path).exists():
        return None
    try:
        return open_scan(path, level=int(source.get("level") or 0))
    except (ValueError, OSError):
        return None


def render_preview(heatmap: str | os.PathLike, *, scan: Any = None, max_side: int = MAX_SIDE,
                   opacity: float = OPACITY) -> tuple[Any, Preview]:
    """The preview of a ``heatmap`` (OME-Zarr or COG) as a PIL image and its :class:`Preview` record
    (``path`` empty). ``scan``: the :class:`tilefcn.read.Scan` the heatmap was computed from
    (default: reopened from the path recorded in the store; white when that fails)."""
    from tilefcn.heatmaps import open_heatmap
    from tilefcn.read import thumbnail
    from tilefcn.write import decode_scale

    path = Path(heatmap)
    if max_side < 16:
        raise ValueError(f"max_side must be >= 16, got {max_side}")
    if not 0 < opacity <= 1:
        raise ValueError(f"opacity must be in (0, 1], got {opacity}")
    opened = open_heatmap(path)
    attrs, levels = opened.attrs, opened.levels
    geometry = Geometry.from_dict(attrs["geometry"])
    source = attrs.get("source") or {}
    height, width = (int(v) for v in source.get("shape", levels[0].shape[1:])[:2])
    scan = scan if scan is not None else _open_source(attrs)
    if scan is not None:
        background = _display_rgb(thumbnail(scan, max_side))
    else:
        side = max(height, width)
        th, tw = (max(1, round(n * min(1.0, max_side / side))) for n in (height, width))
        background = np.full((th, tw, 3), 255, dtype=np.uint8)
    th, tw = background.shape[:2]
    step = min(height / th, width / tw)
    level = _pick_level(len(levels), min(geometry.stride), step)
    array = levels[level]
    ky, oky = _indices(th, height, geometry.centre(0), geometry.stride[0], level, array.shape[1])
    kx, okx = _indices(tw, width, geometry.centre(1), geometry.stride[1], level, array.shape[2])
    probs = np.asarray(array[:], dtype=np.float32) / decode_scale(str(array.dtype))
    probs = probs[:, ky][:, :, kx]
    probs[:, ~(oky[:, None] & okx[None, :])] = np.nan
    classes = [str(c) for c in attrs.get("classes") or range(probs.shape[0])]
    mpp = source.get("mpp")
    if mpp:
        bar = _scale_bar(tw, width / tw * float(mpp[1]), "µm")
    else:
        downsamples, lv = source.get("downsamples") or [1.0], int(source.get("level") or 0)
        d = float(downsamples[min(lv, len(downsamples) - 1)]) * int(source.get("factor") or 1)
        bar = _scale_bar(tw, width / tw * d, "px")  # level-0 scan pixels
    model = (attrs.get("model") or {}).get("name", "model")
    title = f"{model} on {Path(str(source.get('source', path.name))).name}"
    image = _legend(_blend(background, probs, opacity), classes, bar, title)
    return image, Preview("", (th, tw), level, *bar)


def write_preview(heatmap: str | os.PathLike, png: str | os.PathLike | None = None, *,
                  scan: Any = None, max_side: int = MAX_SIDE, opacity: float = OPACITY,
                  overwrite: bool = True) -> Preview:
    """Write the preview PNG of ``heatmap`` (see :func:`render_preview`) to ``png``
    (default :func:`default_preview_path`); an existing file is kept unless ``overwrite``.
    Written to ``<png>.partial`` and renamed."""
    png = Path(png) if png is not None else default_preview_path(heatmap)
    check_preview_path(png, overwrite=overwrite)
    image, info = render_preview(heatmap, scan=scan, max_side=max_side, opacity=opacity)
    partial = png.with_name(png.name + ".partial")
    try:
        image.save(partial, format="PNG")
        os.replace(partial, png)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return Preview(str(png), info.thumbnail, info.level, info.scale_px, info.scale_label)


def check_preview_path(png: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``png`` if a preview may be written there: a ``.png`` name, not a folder, and not an
    existing file unless ``overwrite``; else ``ValueError`` / ``FileExistsError``."""
    png = Path(png)
    if png.suffix.lower() != ".png":
        raise ValueError(f"preview must be a .png file, got {png}")
    if png.is_dir():
        raise ValueError(f"preview path is a folder: {png}")
    if png.exists() and not overwrite:
        raise FileExistsError(f"preview exists: {png} (use --overwrite)")
    return png
