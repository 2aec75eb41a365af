#!/usr/bin/env bash
# One-command install of the engine, server, CLI and test tools into the current Python.
# Order matters: torch first (the pinned CPU wheel, so nothing pulls a multi-GB CUDA build),
# then sam2 1.1.0 from source without build isolation (its build needs the torch just installed),
# then this project in editable mode with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${MEDSAM2_TORCH_SPEC:-torch==2.13.0}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "$TORCH_SPEC"
fi
if ! $PY -c "import sam2.sam2_video_predictor" 2>/dev/null; then
  $PY -m pip install -q setuptools wheel
  SAM2_BUILD_CUDA=0 $PY -m pip install -q --no-build-isolation --no-deps sam2==1.1.0
  $PY -m pip install -q "hydra-core>=1.3.2" "iopath>=0.1.10" "tqdm>=4.66.1" "pillow>=9.4.0"
fi
$PY -m pip install -q -e ".[test]"
