#!/bin/bash
# A cohort on one multi-GPU node.
# Simplest: tilefcn starts a local cluster of one worker per GPU (dask-cuda's LocalCUDACluster
# when installed: pip install dask-cuda), runs the cohort and stops it:
#     tilefcn run slides/ --out-dir heatmaps --gpus 8 --device cuda
# Long-lived instead (several cohorts, one warm cluster), as below.
# Usage: pipelines/cluster/dask_cuda.sh INPUTS... OUT_DIR
set -euo pipefail
out_dir="${@: -1}"
inputs=("${@:1:$#-1}")
file="$(mktemp -d)/scheduler.json"
dask scheduler --scheduler-file "$file" &
scheduler=$!
# one worker process per visible GPU, each offering GPU=1 (one model per GPU)
dask cuda worker --scheduler-file "$file" --resources GPU=1 --nthreads 2 &
workers=$!
trap 'kill $workers $scheduler 2>/dev/null || true' EXIT
while [ ! -s "$file" ]; do sleep 0.5; done
tilefcn run "${inputs[@]}" --out-dir "$out_dir" --device cuda --scheduler-file "$file"
