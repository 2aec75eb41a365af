#!/usr/bin/env bash
# Fresh machine -> a segmentation: install (unless this checkout is installed already), then segment
# slicerio's chest CT from one click in each lung.
#   bash scripts/demo.sh                    real MedSAM2 weights (downloaded once, sha256-pinned, cached)
#   bash scripts/demo.sh --checkpoint FILE  the same with a checkpoint file you have (no download)
#   bash scripts/demo.sh --random-weights   offline smoke run: random weights, meaningless masks, says so
# OUT=path.seg.nrrd chooses the output (default demo_output/chest_lungs.seg.nrrd).
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { sed -n '4,7p' "$0" | sed 's/^# \{0,1\}/  /'; }

MODE=download
CKPT=
while [ $# -gt 0 ]; do
  case "$1" in
    --random-weights) [ "$MODE" = download ] || { echo "demo.sh: give --random-weights or --checkpoint, not both" >&2; exit 2; }
                      MODE=random ;;
    --checkpoint|--checkpoint=*)
      [ "$MODE" = download ] || { echo "demo.sh: give --random-weights or --checkpoint, not both" >&2; exit 2; }
      if [ "$1" = --checkpoint ]; then
        [ $# -ge 2 ] || { echo "demo.sh: --checkpoint needs a FILE" >&2; exit 2; }
        CKPT=$2; shift
      else
        CKPT=${1#--checkpoint=}
      fi
      MODE=file ;;
    -h|--help) echo "usage:"; usage; exit 0 ;;
    *) echo "demo.sh: unknown argument '$1'; usage:" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

source scripts/python_env.sh
# Installed from this checkout already (a re-run, or offline): skip the install, which needs the network.
if "$PY" -c "import os, sys, torch, sam2.sam2_video_predictor, slicerio, trame_slicer, medsam2
sys.exit(os.path.realpath(os.path.dirname(medsam2.__file__)) != os.path.realpath('MedSAM2Slicer/medsam2'))" 2>/dev/null; then
  echo "MedSAM2 is installed in $("$PY" -c 'import sys; print(sys.prefix)') (bash scripts/install.sh updates it)"
else
  bash scripts/install.sh
fi

medsam2() { "$PY" -m medsam2.cli "$@"; }
MODEL=$("$PY" -c "from medsam2.options import DEFAULT_MODEL; print(DEFAULT_MODEL)")
CT=$("$PY" -c "import slicerio, pathlib; print(pathlib.Path(slicerio.__file__).parent / 'data' / 'CTChest4.nrrd')")
OUT=${OUT:-demo_output/chest_lungs.seg.nrrd}
mkdir -p "$(dirname "$OUT")"

ARGS=()
case "$MODE" in
  random) ARGS=(--random-weights) ;;  # the cached test checkpoint every verb's --random-weights uses
  download)
    if ! medsam2 download "$MODEL"; then
      read -r FILE URL < <("$PY" -c "from medsam2.models.registry import get_spec; s = get_spec('$MODEL'); print(s.filename, s.url)")
      {
        echo
        echo "The demo could not download the $MODEL weights (why: above). Two ways on:"
        echo "  bash scripts/demo.sh --random-weights     the same job offline, on random weights (meaningless masks; it says so)"
        echo "  bash scripts/demo.sh --checkpoint FILE    with $FILE copied from a machine that can reach $URL"
      } >&2
      exit 1
    fi ;;
esac

[ -n "$CKPT" ] && ARGS=(--checkpoint "$CKPT")
medsam2 segment "$CT" --prompts Resources/demo/chest_prompts.json --output "$OUT" --overwrite \
  --model "$MODEL" ${ARGS[@]+"${ARGS[@]}"}
echo "Wrote $OUT (open it in 3D Slicer together with $CT)"
