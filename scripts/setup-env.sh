#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install mnnpipe with the given extras, pinned by
# requirements/lock.txt. Usage: scripts/setup-env.sh VENV_DIR EXTRAS   e.g. .venv kfp,airflow,dev
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
extras=${2:-}
# CPython 3.11.5+ (the lock pins releases that need it): $PYTHON, else the first fit on PATH.
pick_python() {
  for candidate in ${PYTHON:-} python3.11 python3 "$HOME/.pyenv/shims/python3.11"; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(not ((3, 11, 5) <= sys.version_info[:3] < (3, 12)))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "setup-env: no CPython 3.11.5+ (3.11.x) found; set PYTHON=/path/to/python3.11" >&2
  return 1
}
if [ ! -x "$venv/bin/python" ]; then
  python=$(pick_python)
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
# torch==2.13.0 is the CPU build (a looser pin would pull a multi-GB CUDA build).
spec="."
[ -n "$extras" ] && spec=".[$extras]"
"$venv/bin/python" -m pip install --quiet -c requirements/lock.txt -e "$spec"
