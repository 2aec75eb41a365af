#!/usr/bin/env bash
# Install (idempotent, test extras and system packages included) and run the whole test suite;
# exits non-zero on any failure. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
source scripts/python_env.sh
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
