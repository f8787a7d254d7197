#!/usr/bin/env bash
# Land cover of a satellite scene as a Cloud-Optimized GeoTIFF.
#
#   pipelines/satellite/run.sh [SCENE.tif] [OUT.tif]
#
# Without SCENE, a synthetic demo scene (SIZE² px, default 2048) is written to
# ${WORK:-./satellite-demo}/scene.tif first. The bundled `landcover` model (B, G, R, NIR) runs
# on the scene; --mask auto skips tiles that are only nodata (their outputs are NaN), and the
# heatmap is written as a COG: the scene's CRS and geotransform, one band per class,
# overviews, NaN nodata. Extra arguments for `tilefcn run` go in TILEFCN_ARGS (e.g.
# "--bands 4,3,2,8" for a Sentinel-2 stack, "--nodata 0", "--workers 8"; not "--dtype uint8",
# which has no NaN for the masked outputs).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${WORK:-./satellite-demo}"
scene="${1:-}"
if [[ -z "$scene" ]]; then
    mkdir -p "$work"
    scene="$work/scene.tif"
    [[ -f "$scene" ]] || python "$here/make_scene.py" "$scene" --size "${SIZE:-2048}" >/dev/null
fi
out="${2:-${scene%.*}.landcover.tif}"
# shellcheck disable=SC2086  # TILEFCN_ARGS is split on purpose
tilefcn run "$scene" --model landcover --mask auto --out "$out" --overwrite ${TILEFCN_ARGS:-}
if command -v rio >/dev/null && rio cogeo --help >/dev/null 2>&1; then
    rio cogeo validate "$out"
fi
echo "$out"
