#!/usr/bin/env bash
# One-command install of the engine, server, CLI and web page (the `web` extra: MedSAM2 without
# Slicer), and with --test everything the test suite needs (the test extra and Debian's chromium,
# nginx and Mesa EGL). Last, `medsam2` is linked onto PATH (scripts/link_command.sh).
# Python: the active virtualenv/conda env, else the project's .venv (scripts/python_env.sh).
# Order matters: torch first (the pinned CPU wheel, so nothing pulls a multi-GB CUDA build),
# then sam2 1.1.0 from source without build isolation (its build needs the torch just installed)
# and without its declared dependencies (they name torchvision, which would replace torch by a
# CUDA build), then this project in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
WITH_TESTS=0
[ "${1:-}" = "--test" ] && WITH_TESTS=1

pip_install() {  # pip install, quiet; on success only what is news to a user, on failure everything
  local log
  log=$(mktemp)
  if ! "$PY" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    return 1
  fi
  # pip's resolver reports sam2's skipped torchvision as an ERROR although nothing failed; say it
  # once, calmly, below. Locations missing from this machine's pip config are not news either.
  grep -vE "sam2 1\.1\.0 requires torchvision|dependency resolver does not currently take into account|is ignored: it is neither a file nor a directory|^\s*$" "$log" || true
  rm -f "$log"
}

TORCH_SPEC=${MEDSAM2_TORCH_SPEC:-torch==2.13.0}
if ! "$PY" -c "import torch, numpy" 2>/dev/null; then
  echo "Installing $TORCH_SPEC"
  pip_install "$TORCH_SPEC" "numpy>=1.24.4"  # numpy first too: sam2's own requirement, which --no-deps skips
fi
if ! "$PY" -c "import sam2.sam2_video_predictor" 2>/dev/null; then
  echo "Installing sam2 1.1.0 (from source, without its CUDA extension)"
  pip_install setuptools wheel
  SAM2_BUILD_CUDA=0 pip_install --no-build-isolation --no-deps sam2==1.1.0
  pip_install "hydra-core>=1.3.2" "iopath>=0.1.10" "tqdm>=4.66.1" "pillow>=9.4.0"
  echo "Note: torchvision is skipped on purpose (sam2's video predictor does not use it, and it would replace torch by a CUDA build)."
fi
if [ $WITH_TESTS = 1 ]; then
  bash scripts/install_system_test_deps.sh
  pip_install -e ".[test,web]"
else
  pip_install -e ".[web]"
fi
echo "MedSAM2 is installed in $("$PY" -c 'import sys; print(sys.prefix)')"
bash scripts/link_command.sh
