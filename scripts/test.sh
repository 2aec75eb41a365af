#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
exec $PY -m pytest -q -p no:cacheprovider "$@"
