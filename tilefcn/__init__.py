"""tilefcn: exact, out-of-core fully convolutional inference on gigapixel scans.

Public names are imported lazily so that ``tilefcn --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Geometry": "tilefcn.geometry",
    "measure_geometry": "tilefcn.measure",
    "convolutionalize": "tilefcn.convert",
    "bilinear_upsample": "tilefcn.convert",
    "load_model": "tilefcn.modelio",
    "save_bundle": "tilefcn.modelio",
    "Model": "tilefcn.modelio",
    "open_scan": "tilefcn.read",
    "ScanInfo": "tilefcn.read",
    "predict": "tilefcn.graph",
    "run": "tilefcn.job",
}

__all__ = [  # noqa: RUF022 - grouped by what they do
    "__version__", "Geometry", "measure_geometry", "convolutionalize", "bilinear_upsample",
    "load_model", "save_bundle", "Model", "open_scan", "ScanInfo", "predict", "run",
]

if TYPE_CHECKING:  # pragma: no cover
    from tilefcn.convert import bilinear_upsample, convolutionalize
    from tilefcn.geometry import Geometry
    from tilefcn.graph import predict
    from tilefcn.job import run
    from tilefcn.measure import measure_geometry
    from tilefcn.modelio import Model, load_model, save_bundle
    from tilefcn.read import ScanInfo, open_scan


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tilefcn' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
