#!/usr/bin/env bash
# The CUDA measurements of docs/performance.md, in one run on a GPU host.
#   here:      bash scripts/gpu_wheels.sh          (wheels the host lacks, into .whl/)
#   GPU host:  bash scripts/gpu_bench.sh OUTDIR    (tables and JSON into OUTDIR)
# Three tables, each written as soon as it is done (a time limit keeps what finished):
#   1. medsam2_latest at 512 px, 20 and 200 slices, as users run it on CUDA (bf16, encode-ahead);
#   2. float32 on both sides without encode-ahead: the equality check on this GPU;
#   3. our engine torch.compile'd (compile time shown apart).
# TABLES picks some (default "default float32 compiled"): a device call is limited to 10 minutes,
# so e.g. TABLES="default float32" in one call and TABLES=compiled in the next.
# SMOKE=1 runs the same steps tiny, on the CPU, to check the kit itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-gpu-bench}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
if [ -d .whl ] && ! $PY -c "import sam2, hydra, slicerio" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/medsam2-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/medsam2-site
fi
export PYTHONPATH="$PWD/MedSAM2Slicer${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then
  common=(--device cpu --model sam2.1_hiera_tiny --image-size 128)
  big=(--slices 6)
  small=(--slices 6)
else
  common=(--device cuda --model medsam2_latest)
  big=(--slices 20,200)
  small=(--slices 200)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUTDIR/gpu.txt"
fi
$PY -c "import torch, sam2; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUTDIR/gpu.txt"
bench() {  # name, then bench arguments
  local name=$1; shift
  echo "== $name: medsam2 bench $*"
  $PY -m medsam2.cli bench "$@" --json "$OUTDIR/$name.json" 2>&1 | tee "$OUTDIR/$name.txt"
}
status=0
for table in ${TABLES:-default float32 compiled}; do
  case $table in
    default) bench cuda-default "${common[@]}" "${big[@]}" || status=1 ;;
    float32) MEDSAM2_PREFETCH=0 bench cuda-float32 "${common[@]}" "${small[@]}" --precision float32 || status=1 ;;
    compiled) bench cuda-compiled "${common[@]}" "${small[@]}" --compile || status=1 ;;
    *) echo "unknown table $table (default, float32, compiled)"; status=1 ;;
  esac
done
exit $status
