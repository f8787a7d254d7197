"""Tissue on a brightfield slide, at low resolution, in scikit-image terms.

Per pixel of a pyramid level (:func:`brightfield_features`, any integer or float dtype):

- optical density ``OD = max_c −ln(I_c / I_max)`` (``I_max`` the dtype's maximum: 255, 65535;
  1 for floats), and
- saturation ``S = (max_c I_c − min_c I_c) / max_c I_c`` (HSV; 0 for black),

both max-pooled onto the low-resolution grid (:func:`tilefcn.mask.max_pool`), so a thin
strand of tissue keeps its darkest / most coloured pixel. :func:`tissue_from_features`
thresholds each with Otsu, clamped to ``[b + lo, b + hi]`` above the glass level ``b`` (the 1st
percentile: a constant shift of ``ln I_max`` — 12-bit data in a 16-bit file — moves Otsu's
threshold and ``b`` alike), keeps pixels above either threshold, removes objects of fewer than
:data:`MIN_OBJECT_FRACTION` of the image and fills holes. The upper clamps keep Otsu from
splitting tissue into haematoxylin and eosin when the glass is a small share of the slide.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["brightfield_features", "tissue_from_features"]

OD_CLAMP = (0.05, 0.15)  # Otsu's OD threshold lies this far above the glass level (ln units)
SATURATION_CLAMP = (0.05, 0.10)  # … and the saturation threshold (0–1 scale)
MIN_OBJECT_FRACTION = 5e-5  # objects smaller than this share of the image are noise


@functools.cache
def _od_table(dtype: str) -> np.ndarray:
    """``−ln(max(v, 1) / I_max)`` for every value ``v`` of an unsigned 8/16-bit dtype."""
    top = np.iinfo(dtype).max
    return (-np.log(np.maximum(np.arange(top + 1), 1) / top)).astype(np.float32)


def brightfield_features(block: np.ndarray) -> np.ndarray:
    """``(h, w, 3)`` RGB pixels → ``(h, w, 2)`` float32 ``[OD, saturation]`` (module doc)."""
    hi, lo = block.max(axis=-1), block.min(axis=-1)
    if block.dtype in (np.uint8, np.uint16):
        od = _od_table(block.dtype.name)[lo]  # a lookup: no log per pixel
    else:
        top = float(np.iinfo(block.dtype).max) if block.dtype.kind in "iu" else 1.0
        od = -np.log(np.clip(lo.astype(np.float32), 1e-6 * top, None) / top)
    hi = hi.astype(np.float32)
    saturation = (hi - lo) / np.maximum(hi, np.float32(1e-12))  # 0 for black
    return np.stack([od, saturation.astype(np.float32)], axis=-1)


def _threshold(values: np.ndarray, clamp: tuple[float, float]) -> float:
    from skimage.filters import threshold_otsu

    base = float(np.percentile(values, 1))
    if float(values.max()) - float(values.min()) < 1e-6:  # flat: nothing stands out
        return float(values.max())
    return float(np.clip(threshold_otsu(values), base + clamp[0], base + clamp[1]))


def tissue_from_features(features: np.ndarray) -> np.ndarray:
    """Boolean tissue ``(h, w)`` from max-pooled ``(h, w, 2)`` ``[OD, saturation]`` features."""
    from scipy.ndimage import binary_fill_holes
    from skimage.morphology import remove_small_objects

    od, saturation = features[..., 0], features[..., 1]
    tissue = (od > _threshold(od, OD_CLAMP)) | (saturation > _threshold(saturation,
                                                                         SATURATION_CLAMP))
    smallest = max(4, int(MIN_OBJECT_FRACTION * tissue.size))
    try:  # scikit-image >= 0.26 names the bound max_size (objects of at most that size go)
        tissue = remove_small_objects(tissue, max_size=smallest - 1)
    except TypeError:
        tissue = remove_small_objects(tissue, min_size=smallest)
    return binary_fill_holes(tissue)  # background not reached from the image's edge
