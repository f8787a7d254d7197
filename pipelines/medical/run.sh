#!/usr/bin/env bash
# Tissue regions of a whole-slide image: heatmap, preview PNG and QuPath annotations.
#
#   pipelines/medical/run.sh [SLIDE] [OUT_STEM]
#
# Without SLIDE, a synthetic H&E-like slide (SIZE² px, default 4096, 0.25 µm/px) is written to
# ${WORK:-./medical-demo}/slide.ome.tif first. The bundled `tissue` model (background, tissue,
# dense) runs with --mask auto (glass is not computed; its outputs are NaN) and writes
#   OUT_STEM.heatmap.zarr          OME-Zarr heatmap (napari: napari --plugin napari-ome-zarr …)
#   OUT_STEM.heatmap.preview.png   thumbnail + argmax colours, legend, µm scale bar
#   OUT_STEM.regions.geojson       tissue and dense regions as QuPath annotations
# (OUT_STEM defaults to the slide's path without its suffixes). Extra arguments for
# `tilefcn run` go in TILEFCN_ARGS (e.g. "--mpp 1.0", "--workers 8", "--device cuda");
# for `tilefcn export` in EXPORT_ARGS (e.g. "--threshold 0.5", "--level 1").
set -euo pipefail
work="${WORK:-./medical-demo}"
slide="${1:-}"
if [[ -z "$slide" ]]; then
    mkdir -p "$work"
    slide="$work/slide.ome.tif"
    [[ -f "$slide" ]] || python -c "import sys; from tilefcn.synthetic import write_slide; \
write_slide(sys.argv[1], (int(sys.argv[2]),) * 2, seed=2026)" "$slide" "${SIZE:-4096}"
fi
name="$(basename "$slide")"
stem="${2:-$(dirname "$slide")/${name%%.*}}"
# shellcheck disable=SC2086  # TILEFCN_ARGS / EXPORT_ARGS are split on purpose
tilefcn run "$slide" --model tissue --mask auto --preview --out "$stem.heatmap.zarr" \
    --overwrite ${TILEFCN_ARGS:-}
# shellcheck disable=SC2086
tilefcn export "$stem.heatmap.zarr" --geojson "$stem.regions.geojson" --class tissue \
    --class dense --overwrite ${EXPORT_ARGS:-}
echo "$stem.regions.geojson"
