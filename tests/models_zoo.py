"""Small local models of every kind the exactness tests cover (random weights, seeded)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tilefcn.modelio import Model
from tilefcn.runtime.scaling import scale_input


def _seeded(build):
    def make(in_channels: int, classes: int = 2) -> nn.Module:
        torch.manual_seed(0)
        model = build(in_channels, classes).eval()
        with torch.no_grad():  # non-trivial BatchNorm statistics
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        return model
    make.__name__ = build.__name__
    return make


@_seeded
def padded(c: int, k: int) -> nn.Module:
    """'same'-padded convs and two max-pools: stride 4, negative offset."""
    return nn.Sequential(
        nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, k, 1))


@_seeded
def unpadded(c: int, k: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c, 8, 5), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(8, k, 3))


@_seeded
def strided(c: int, k: int) -> nn.Module:
    """Strided convs with odd kernels and padding, ceil-mode pooling."""
    return nn.Sequential(nn.Conv2d(c, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 5, stride=3, padding=2), nn.Tanh(),
                         nn.MaxPool2d(3, stride=2, ceil_mode=True),
                         nn.Conv2d(8, k, 1))


@_seeded
def dilated(c: int, k: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=2, dilation=2), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=4, dilation=4), nn.ReLU(),
                         nn.Conv2d(8, k, 3, dilation=3))


@_seeded
def convolutionalized(c: int, k: int) -> nn.Module:
    from tilefcn.convert import convolutionalize
    from tilefcn.models import patch_classifier

    return convolutionalize(patch_classifier(c, k, width=4, hidden=8).eval(), 64).eval()


@_seeded
def upsampling(c: int, k: int) -> nn.Module:
    """A stride-8 trunk and a bilinear ×8 transposed-conv head: output stride 1, alignment 8."""
    from tilefcn.convert import bilinear_upsample

    return nn.Sequential(
        nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, k, 3, padding=1), nn.MaxPool2d(2),
        bilinear_upsample(k, 8))


ZOO = [padded, unpadded, strided, dilated, convolutionalized, upsampling]


def whole_image_output(model: nn.Module | Model, image: np.ndarray) -> np.ndarray:
    """The reference: the model on the whole image at once, input scaled per DESIGN §4 (an
    ``nn.Module``), or by its own mean/std (a loaded :class:`~tilefcn.modelio.Model`, e.g. a
    bundled one: the formula its training used)."""
    if isinstance(model, Model):
        x, module = scale_input(image if image.ndim == 3 else image[..., None],
                                model.scaling), model.module
    else:
        x, module = image.astype(np.float32), model
        if np.issubdtype(image.dtype, np.integer):
            x /= np.iinfo(image.dtype).max
        if x.ndim == 2:
            x = x[..., None]
    with torch.inference_mode():
        return module(torch.from_numpy(x).permute(2, 0, 1)[None].contiguous())[0].numpy()


def random_image(rng: np.random.Generator, shape: tuple[int, int], channels: int,
                 dtype: str) -> np.ndarray:
    size = (*shape, channels)
    if dtype == "float32":
        return rng.normal(size=size).astype(np.float32)
    return rng.integers(0, np.iinfo(dtype).max, size=size, endpoint=True, dtype=dtype)
