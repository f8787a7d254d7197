"""Write the synthetic training data of the bundled models (deterministic seeds).

    python pipelines/make_training_data.py build/training-data

tissue: slides seeds 1-3, 4096², JPEG (what scanners write), seeds 2 and 3 with pen marks and
bubbles (labelled background). landcover: scenes seeds 1-3, 2048², uint16 zlib. Seeds from
1001 on are kept for evaluation (pipelines/evaluate_bundled.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tilefcn.synthetic import write_scene, write_slide

SLIDES = [(1, False), (2, True), (3, True)]  # (seed, pen marks and bubbles)
SCENES = [1, 2, 3]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for seed, artefacts in SLIDES:
        path = out / f"slide-{seed}.ome.tif"
        write_slide(path, (4096, 4096), seed=seed, compression="jpeg", levels=1, pen=artefacts,
                    bubbles=artefacts)
        print(path)
    for seed in SCENES:
        path = out / f"scene-{seed}.tif"
        write_scene(path, (2048, 2048), seed=seed)
        print(path)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/training-data"))
