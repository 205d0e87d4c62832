#!/usr/bin/env bash
# README command one: set up from the project's own files, then run the whole compression
# pipeline (distill -> prune -> convert -> quantize -> benchmark) on the bundled digits data,
# with artifacts in a local folder (default ./mnnpipe-demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh .venv
exec .venv/bin/mnnpipe demo --workdir "${1:-mnnpipe-demo}"
