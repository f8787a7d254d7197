#!/usr/bin/env bash
# Reproduce the bundled models `tissue` and `landcover` from scratch, deterministically:
# synthetic training data (pipelines/make_training_data.py), then `tilefcn train` into
# tilefcn/models/<name>/. Run from anywhere: bash pipelines/train_bundled.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DATA=${1:-build/training-data}

tilefcn_cli() {
    if command -v tilefcn >/dev/null 2>&1; then
        tilefcn "$@"
    else
        python -c 'from tilefcn.cli import main; main(prog_name="tilefcn")' "$@"
    fi
}

python pipelines/make_training_data.py "$DATA"

tilefcn_cli train \
    "$DATA"/slide-1.ome.tif "$DATA"/slide-1.mask.tif \
    "$DATA"/slide-2.ome.tif "$DATA"/slide-2.mask.tif \
    "$DATA"/slide-3.ome.tif "$DATA"/slide-3.mask.tif \
    --classes background,tissue,dense --epochs 8 --seed 0 --samples-per-class 2000 \
    --out tilefcn/models/tissue --overwrite

tilefcn_cli train \
    "$DATA"/scene-1.tif "$DATA"/scene-1.mask.tif \
    "$DATA"/scene-2.tif "$DATA"/scene-2.mask.tif \
    "$DATA"/scene-3.tif "$DATA"/scene-3.mask.tif \
    --classes water,vegetation,soil,built,cloud --epochs 8 --seed 0 --samples-per-class 2000 \
    --out tilefcn/models/landcover --overwrite

ls -l tilefcn/models/tissue tilefcn/models/landcover
