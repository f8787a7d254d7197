"""What viewers show of a heatmap: one colour per class, and the OME-Zarr ``omero`` block.

Class ``i`` has colour ``PALETTE[i mod 20]`` (matplotlib's tab20 order: ten strong colours,
then their light variants) everywhere: the PNG preview, the ``omero`` channels napari and
OMERO read, and the ``classification.color`` of QuPath GeoJSON annotations.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PALETTE", "class_colour", "omero_metadata"]

#: Class colours (RGB), cycled when there are more classes.
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
], dtype=np.uint8)


def class_colour(index: int) -> tuple[int, int, int]:
    """RGB colour of class ``index`` (``PALETTE[index mod len(PALETTE)]``)."""
    r, g, b = (int(v) for v in PALETTE[index % len(PALETTE)])
    return r, g, b


def omero_metadata(classes: list[str], dtype: str = "float32") -> dict[str, Any]:
    """The NGFF ``omero`` block: one channel per class, labelled with its name, coloured
    with :func:`class_colour` (hex ``RRGGBB``), additive, window ``[0, 1]`` of the
    probability (``[0, 255]`` for uint8 stores, which hold ``round(p · 255)``)."""
    top = 255 if dtype == "uint8" else 1
    channels = [{
        "label": str(name), "color": "{:02X}{:02X}{:02X}".format(*class_colour(i)),
        "active": True, "coefficient": 1, "family": "linear", "inverted": False,
        "window": {"min": 0, "max": top, "start": 0, "end": top},
    } for i, name in enumerate(classes)]
    return {"channels": channels, "rdefs": {"model": "color", "defaultT": 0, "defaultZ": 0}}
