"""The three scalings (numpy for training and references, the CPU engine's numpy batch pass,
torch on the device) agree bit for bit, in both memory layouts, and never change the pixels
they are given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tilefcn.modelio import Scaling
from tilefcn.runtime.scaling import scale_batch, scale_input, scale_tensor

SCALINGS = [Scaling(), Scaling(mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.25)),
            Scaling(divisor=1000.0, mean=(0.1, 0.5, 0.9, 0.3), std=(0.2, 0.3, 0.25, 0.7))]


def _bands(scaling: Scaling) -> int:
    return 3 if scaling.mean is None else len(scaling.mean)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_scale_tensor_equals_scale_input_and_leaves_its_input(dtype, channels_last, scaling):
    rng = np.random.default_rng(0)
    high = 1.0 if dtype == "float32" else np.iinfo(dtype).max
    batch = (rng.random((2, 37, 41, _bands(scaling))) * high).astype(dtype)
    before = batch.copy()
    out = scale_tensor(torch.from_numpy(batch), batch.dtype, scaling,
                       channels_last=channels_last)
    want = scale_input(batch, scaling).transpose(0, 3, 1, 2)
    assert out.shape == want.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)
    np.testing.assert_array_equal(out.numpy(), want)  # bit for bit
    np.testing.assert_array_equal(batch, before)  # the caller's pixels are not scaled in place


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32", "float64"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_scale_batch_equals_scale_input_and_leaves_its_input(dtype, channels_last, scaling):
    rng = np.random.default_rng(1)
    high = 1.0 if dtype.startswith("float") else np.iinfo(dtype).max
    window = (rng.random((3, 50, 60, _bands(scaling))) * high).astype(dtype)
    batch = window[1:, 5:42, 7:48]  # a strided view, as the engine's sub-windows are
    before = batch.copy()
    out = scale_batch(batch, scaling, channels_last=channels_last)
    want = scale_input(batch, scaling).transpose(0, 3, 1, 2)
    assert out.shape == want.shape and out.dtype == np.float32
    tensor = torch.from_numpy(out)
    assert tensor.is_contiguous(memory_format=torch.channels_last if channels_last
                                else torch.contiguous_format)
    np.testing.assert_array_equal(out, want)  # bit for bit
    np.testing.assert_array_equal(batch, before)
