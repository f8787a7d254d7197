"""float16 ↔ float32 casts of numpy arrays through torch's vectorised kernels.

numpy 2.x converts float16 one value at a time on this build: on 2 × 1024² values (AMD EPYC,
one thread) ``astype(np.float16)`` takes 8.0 ms, torch's ``copy_`` into an empty array 0.18
ms; float16 → float32 of 2 × 2048² 9.4 ms vs 0.9 ms. Both round to nearest-even and keep
NaN/±inf, so the results are the same bits (tests/test_casts.py). Arrays torch cannot view
(read-only, negative strides, non-native byte order) and other dtype pairs go through numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["astype", "copy_into"]

_FAST = {(np.dtype(np.float32), np.dtype(np.float16)), (np.dtype(np.float16), np.dtype(np.float32))}


def _viewable(a: np.ndarray) -> bool:
    """True when ``torch.from_numpy(a)`` works without a warning or an error."""
    return (a.flags.writeable and a.dtype.isnative
            and all(s >= 0 for s in a.strides))


def copy_into(out: np.ndarray, src: np.ndarray) -> None:
    """``np.copyto(out, src)`` (same shape), float16 ↔ float32 through torch."""
    if (out.dtype, src.dtype) in _FAST and _viewable(out) and _viewable(src) \
            and out.shape == src.shape:
        import torch

        torch.from_numpy(out).copy_(torch.from_numpy(src))
    else:
        np.copyto(out, src)


def astype(src: np.ndarray, dtype: np.dtype | str) -> np.ndarray:
    """``src.astype(dtype, copy=False)``, float16 ↔ float32 through torch."""
    dtype = np.dtype(dtype)
    if src.dtype == dtype:
        return src
    if (dtype, src.dtype) not in _FAST:
        return src.astype(dtype)
    out = np.empty(src.shape, dtype)
    copy_into(out, src)
    return out
