#!/usr/bin/env bash
# Put `medsam2` on the PATH of new shells, so the README's `medsam2 ...` lines work as written after
# scripts/install.sh (which runs this last). The command lives in the project's environment
# ($PY's bin folder, e.g. .venv/bin); a symbolic link to it goes into the first folder of $PATH we
# may write to, preferring ~/.local/bin, then /usr/local/bin (Debian's PATH for root has it). If no
# folder on PATH is writable, the link goes into ~/.local/bin and we say how to add that to PATH.
# MEDSAM2_BIN_DIR chooses the folder. An existing `medsam2` that is not ours is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
target="$(cd "$(dirname "$PY")" && pwd)/medsam2"
[ -x "$target" ] || { echo "link_command.sh: $target is missing: run bash scripts/install.sh first" >&2; exit 1; }

on_path() { case ":$PATH:" in *":$1:"*) return 0 ;; *) return 1 ;; esac; }

if on_path "$(dirname "$target")"; then  # an activated virtualenv or conda env: already there
  echo "medsam2 is on your PATH ($target)"
  exit 0
fi
if [ -n "${MEDSAM2_BIN_DIR:-}" ]; then
  dir=$MEDSAM2_BIN_DIR
else
  dir=
  for candidate in "$HOME/.local/bin" /usr/local/bin; do
    if on_path "$candidate" && { [ -w "$candidate" ] || { [ ! -e "$candidate" ] && [ -w "$(dirname "$candidate")" ]; }; }; then
      dir=$candidate
      break
    fi
  done
  dir=${dir:-$HOME/.local/bin}
fi
mkdir -p "$dir"
link="$dir/medsam2"
if [ -e "$link" ] || [ -L "$link" ]; then
  if [ "$(readlink "$link" || true)" != "$target" ]; then
    echo "Left $link alone (it is not a link to this installation); run $target, or remove $link and run again." >&2
    exit 0
  fi
fi
ln -sfn "$target" "$link"
if on_path "$dir"; then
  echo "Linked $link -> $target: \`medsam2\` works in new shells."
else
  echo "Linked $link -> $target, but $dir is not on your PATH: add it (echo 'export PATH=\"$dir:\$PATH\"' >> ~/.bashrc, then open a new shell), or run $target."
fi
