# Sourced by the other scripts: sets PY to the Python this project installs into and runs with.
#  - MEDSAM2_PYTHON, if set, is used as it is;
#  - inside an active virtualenv or conda env, that env's python;
#  - otherwise the project's own .venv (created here on first use). A system Python is left alone:
#    on Debian 12+/Ubuntu 23.04+ it is "externally managed" (PEP 668) and pip refuses to write to it.
# sam2 needs Python >= 3.10.
_medsam2_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${MEDSAM2_PYTHON:-}" ]; then
  PY=$MEDSAM2_PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  PY=$VIRTUAL_ENV/bin/python
elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
  PY=$CONDA_PREFIX/bin/python
else
  PY=$_medsam2_root/.venv/bin/python
  if [ ! -x "$PY" ]; then
    base=${MEDSAM2_BASE_PYTHON:-python3}
    if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "MedSAM2 needs Python 3.10 or later (sam2 1.1.0 does); '$base' is $("$base" --version 2>&1)." >&2
      echo "Install a newer Python and run again with MEDSAM2_BASE_PYTHON=/path/to/python3." >&2
      exit 1
    fi
    echo "Creating the project's virtual environment in $_medsam2_root/.venv (from $("$base" --version 2>&1))"
    if ! "$base" -m venv "$_medsam2_root/.venv" 2>/dev/null; then
      rm -rf "$_medsam2_root/.venv"
      if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        # Debian/Ubuntu ship venv support as a separate package
        ver=$("$base" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        apt-get install -y -qq "python$ver-venv" >/dev/null || apt-get install -y -qq python3-venv >/dev/null
        "$base" -m venv "$_medsam2_root/.venv"
      else
        echo "'$base -m venv' failed. On Debian/Ubuntu: sudo apt-get install python3-venv, then run again." >&2
        exit 1
      fi
    fi
  fi
fi
export PY
