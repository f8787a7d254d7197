"""Built-in architectures (a registry of names → constructors) and bundled model names.

A bundle's ``model.json`` names an architecture from :data:`ARCHITECTURES` plus its keyword
arguments; loading never executes anything but these constructors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

BUNDLED_DIR = Path(__file__).parent


def patch_classifier(in_channels: int = 3, classes: int = 3, width: int = 16,
                     hidden: int = 64, patch_size: int = 64) -> nn.Sequential:
    """A small patch classifier: an unpadded conv trunk (stride 8) and a fully connected head.

    Trunk: conv5 → ReLU → maxpool2 → [conv3 → ReLU → maxpool2] × 2 → conv3 → ReLU (no padding,
    so the convolutionalized network equals the classifier slid over the image exactly). For a
    ``patch_size`` that is a multiple of 8 every patch pixel is used (receptive field = patch;
    64 px → trunk output 4×4); the head is Flatten → Linear(2·width·side², hidden) → ReLU →
    Dropout → Linear. About 7 kFLOP per input pixel once convolutionalized (width 16).
    """
    w1, w2 = width, 2 * width
    trunk = nn.Sequential(
        nn.Conv2d(in_channels, w1, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(w1, w2, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(w2, w2, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(w2, w2, 3), nn.ReLU(inplace=True),
    )
    side = ((((patch_size - 4) // 2 - 2) // 2 - 2) // 2) - 2
    if side < 1:
        raise ValueError(f"patch_size {patch_size} is too small for patch_classifier (min 40)")
    head = nn.Sequential(
        nn.Flatten(), nn.Linear(w2 * side * side, hidden), nn.ReLU(inplace=True),
        nn.Dropout(0.2), nn.Linear(hidden, classes),
    )
    return nn.Sequential(trunk, head)


def small_fcn(in_channels: int = 3, classes: int = 2, width: int = 32) -> nn.Sequential:
    """DESIGN §5's reference FCN: 3×3 'same' convs 3→32→64→64, two max-pools, 1×1 head."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(2 * width, classes, 1),
    )


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "patch_classifier": patch_classifier,
    "small_fcn": small_fcn,
}


def bundled_names() -> list[str]:
    """Names of the bundles shipped inside the package (folders holding a model.json)."""
    return sorted(p.parent.name for p in BUNDLED_DIR.glob("*/model.json"))
