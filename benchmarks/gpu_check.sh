#!/usr/bin/env bash
# The GPU check of benchmarks/RESULTS.md: one command, one table (a few minutes on an H100/H200).
# Needs a CUDA build of torch in .venv (make TORCH_SPEC=torch==X setup, or any torch already there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
test -x "$PY" || PY=python3
"$PY" -c "import distil" 2>/dev/null || "$PY" -m pip install --quiet -e .
exec "$PY" benchmarks/gpu_check.py --device cuda "$@"
