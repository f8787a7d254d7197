"""Seeded synthetic scans: brightfield whole slides and 4-band satellite scenes.

Every pixel is a pure function of ``(seed, shape, y, x)``: smooth fields are fractal value noise
on hashed lattices, evaluated on a global 8-px node grid and interpolated; texture is an integer
hash of the coordinates; nuclei sit on two jittered 16-px grids whose cells decide everything from
their own hash. So any window can be made alone, output does not depend on the tile size, and
writers stream tiles to tifffile (peak memory independent of the image size). Class thresholds
are calibrated per ``(seed, shape)`` on a coarse sample. Slides are pyramidal OME-TIFFs with the
reduced levels as SubIFDs (tifffile's pyramid pattern; OpenSlide only sees levels in top-level
pages), drawn at subsampled coordinates with damped texture: they look right but are not exact
averages of level 0. Pen marks and bubbles are artefacts, labelled background.
"""

from tilefcn.synthetic.scene import SCENE_CLASSES, scene_tile, write_scene
from tilefcn.synthetic.slide import SLIDE_CLASSES, slide_tile, write_slide
from tilefcn.synthetic.tiffout import SyntheticScan

__all__ = ["SCENE_CLASSES", "SLIDE_CLASSES", "SyntheticScan", "scene_tile", "slide_tile",
           "write_scene", "write_slide"]
