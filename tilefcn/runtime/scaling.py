"""Input scaling, one formula in three places: numpy (training, references), a numpy batch
pass for the CPU engine (:func:`scale_batch`), and torch (on the device, after a uint8/uint16
upload, so host → device moves 1–2 bytes a pixel, not 4).

``x / divisor`` (``"dtype"``: an integer dtype's maximum, floats unchanged), then
``(x - mean) / std`` per channel when the model has them. Both are float32 throughout, in
the same order, so they agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from tilefcn.modelio import Scaling


def _divisor(dtype: np.dtype, scaling: Scaling) -> float | None:
    if scaling.divisor == "dtype":
        return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else None
    return None if scaling.divisor in (None, 1, 1.0) else float(scaling.divisor)


def scale_input(window: np.ndarray, scaling: Scaling) -> np.ndarray:
    """Float32 ``(..., C)`` copy of ``window`` scaled as the model expects."""
    x = window.astype(np.float32, copy=True)
    divisor = _divisor(window.dtype, scaling)
    if divisor is not None:
        x /= np.float32(divisor)
    if scaling.mean is not None:
        x -= np.asarray(scaling.mean, np.float32)
    if scaling.std is not None:
        x /= np.asarray(scaling.std, np.float32)
    return x


def scale_batch(batch: np.ndarray, scaling: Scaling, *,
                channels_last: bool = False) -> np.ndarray:
    """``(B, h, w, C)`` raw pixels → float32 ``(B, C, h, w)``, scaled: :func:`scale_tensor`
    for the CPU, in numpy.

    The conversion, the layout (NCHW-contiguous, or with ``channels_last`` the ``(B, h, w,
    C)`` memory seen as ``(B, C, h, w)``) and the division by the divisor are one ufunc pass
    (``np.divide`` casting to float32 into the output), where torch's ``copy_`` + ``div_`` is
    two; mean and std then run in place — with ``channels_last`` on the ``(B, h, w·C)`` view
    against the per-channel values tiled along a row, as numpy's inner loop over a length-C
    axis is slow (1 × 2048² × 3 with mean and std: 50 → 15 ms). Same float32 operations in
    the same order as :func:`scale_input`, so bit for bit the same. ``batch`` is never
    changed.
    """
    b, h, w, c = batch.shape
    divisor = _divisor(batch.dtype, scaling)
    if channels_last:
        out = np.empty((b, h, w, c), np.float32)
        source, target = batch, out.reshape(b, h, w * c)

        def per_channel(values: tuple[float, ...]) -> np.ndarray:
            return np.tile(np.asarray(values, np.float32), w)
    else:
        out = np.empty((b, c, h, w), np.float32)
        source, target = batch.transpose(0, 3, 1, 2), out

        def per_channel(values: tuple[float, ...]) -> np.ndarray:
            return np.asarray(values, np.float32).reshape(1, c, 1, 1)
    if divisor is None:
        np.copyto(out, source, casting="unsafe")
    else:
        np.divide(source, np.float32(divisor), out=out, dtype=np.float32, casting="unsafe")
    if scaling.mean is not None:
        target -= per_channel(scaling.mean)
    if scaling.std is not None:
        target /= per_channel(scaling.std)
    return out.transpose(0, 3, 1, 2) if channels_last else out


def scale_tensor(batch: torch.Tensor, dtype: np.dtype, scaling: Scaling, *,
                 channels_last: bool = False) -> torch.Tensor:
    """``(B, h, w, C)`` raw pixels (of numpy ``dtype``) → float32 ``(B, C, h, w)``, scaled.

    One pass converts and lays the pixels out (NCHW-contiguous, or with ``channels_last``
    the ``(B, h, w, C)`` memory seen as ``(B, C, h, w)``: what the runner consumes, so it
    copies nothing); the scaling then runs in place, in :func:`scale_input`'s order.
    """
    if channels_last:
        x = batch.to(torch.float32, copy=True).permute(0, 3, 1, 2)  # never the caller's
    else:
        b, h, w, c = batch.shape
        x = torch.empty((b, c, h, w), dtype=torch.float32, device=batch.device)
        x.copy_(batch.permute(0, 3, 1, 2))
    channels = (1, x.shape[1], 1, 1)
    divisor = _divisor(np.dtype(dtype), scaling)
    if divisor is not None:
        x.div_(torch.tensor(divisor, dtype=torch.float32, device=x.device))
    if scaling.mean is not None:
        x.sub_(torch.tensor(scaling.mean, dtype=torch.float32, device=x.device).view(channels))
    if scaling.std is not None:
        x.div_(torch.tensor(scaling.std, dtype=torch.float32, device=x.device).view(channels))
    return x
