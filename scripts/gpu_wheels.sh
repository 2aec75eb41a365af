#!/usr/bin/env bash
# Gather, into .whl/ (git-ignored), the pure-Python wheels that a bare GPU host with PyTorch lacks
# for `scripts/gpu_bench.sh`: sam2 1.1.0 (built here from its source, without its CUDA extension),
# hydra-core and its omegaconf/antlr4 runtime, iopath, slicerio and pynrrd (the bench volume).
# Run it here, where pip can reach the package index; carry .whl/ to the GPU host.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
# versions this project is tested with (scripts/install.sh installs the same)
SAM2_BUILD_CUDA=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl \
  sam2==1.1.0 antlr4-python3-runtime==4.9.3 iopath==0.1.10
$PY -m pip download -q --no-deps --only-binary=:all: -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 slicerio==1.4.0 pynrrd==1.1.3
ls -1 .whl
