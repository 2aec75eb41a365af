#!/usr/bin/env bash
# Fresh machine -> a segmentation: install everything, then segment slicerio's chest CT from two clicks.
#   bash scripts/demo.sh                  # real MedSAM2 weights (downloaded once, sha256-pinned, cached)
#   bash scripts/demo.sh --random-weights # offline smoke run: random weights, meaningless masks, says so
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
CT=$($PY -c "import slicerio, pathlib; print(pathlib.Path(slicerio.__file__).parent / 'data' / 'CTChest4.nrrd')")
OUT=${OUT:-demo_output/chest_lungs.seg.nrrd}
mkdir -p "$(dirname "$OUT")"
if [ "${1:-}" = "--random-weights" ]; then
  CKPT=demo_output/random_tiny_512.pt
  $PY -c "from medsam2.testing import write_random_checkpoint as w; w('$CKPT', 'medsam2_latest', image_size=512)"
  medsam2 segment "$CT" --prompts Resources/demo/chest_prompts.json --output "$OUT" --overwrite \
    --model medsam2_latest --checkpoint "$CKPT"
else
  medsam2 segment "$CT" --prompts Resources/demo/chest_prompts.json --output "$OUT" --overwrite \
    --model medsam2_latest
fi
echo "Wrote $OUT (open it in 3D Slicer together with $CT)"
