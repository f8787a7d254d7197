#!/usr/bin/env bash
# Reproduce the bundled models `tissue` and `landcover` from scratch, deterministically:
# synthetic training data (pipelines/make_training_data.py), then `tilefcn train` into
# tilefcn/models/<name>/. Run from anywhere:
#   bash pipelines/train_bundled.sh [DATA_DIR] [all|tissue|landcover]
# `tissue` is trained with stain augmentation (random stain vectors H&E..IHC, colour jitter,
# blur, JPEG re-encoding: tilefcn/augment.py) so it generalises to real brightfield scans;
# pipelines/evaluate_bundled.py --real measures that on real images never used here.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DATA=${1:-build/training-data}
WHICH=${2:-all}
TISSUE_OUT=${TISSUE_OUT:-tilefcn/models/tissue}  # e.g. build/tissue-new, to compare first

tilefcn_cli() {
    if command -v tilefcn >/dev/null 2>&1; then
        tilefcn "$@"
    else
        python -c 'from tilefcn.cli import main; main(prog_name="tilefcn")' "$@"
    fi
}

python pipelines/make_training_data.py "$DATA"

if [[ $WHICH == all || $WHICH == tissue ]]; then
tilefcn_cli train \
    "$DATA"/slide-1.ome.tif "$DATA"/slide-1.mask.tif \
    "$DATA"/slide-2.ome.tif "$DATA"/slide-2.mask.tif \
    "$DATA"/slide-3.ome.tif "$DATA"/slide-3.mask.tif \
    --classes background,tissue,dense --epochs 12 --seed 0 --samples-per-class 3000 \
    --stain-augment --out "$TISSUE_OUT" --overwrite
fi

if [[ $WHICH == all || $WHICH == landcover ]]; then
tilefcn_cli train \
    "$DATA"/scene-1.tif "$DATA"/scene-1.mask.tif \
    "$DATA"/scene-2.tif "$DATA"/scene-2.mask.tif \
    "$DATA"/scene-3.tif "$DATA"/scene-3.mask.tif \
    --classes water,vegetation,soil,built,cloud --epochs 8 --seed 0 --samples-per-class 2000 \
    --out tilefcn/models/landcover --overwrite
fi

ls -l "$TISSUE_OUT" tilefcn/models/landcover
