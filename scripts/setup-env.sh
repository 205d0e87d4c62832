#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install mnnpipe with the given extras, pinned by
# requirements/lock.txt. Usage: scripts/setup-env.sh VENV_DIR EXTRAS   e.g. .venv kfp,airflow,dev
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
extras=${2:-}
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
# torch==2.13.0 is the CPU build (a looser pin would pull a multi-GB CUDA build).
spec="."
[ -n "$extras" ] && spec=".[$extras]"
"$venv/bin/python" -m pip install --quiet -c requirements/lock.txt -e "$spec"
