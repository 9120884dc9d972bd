#!/usr/bin/env bash
# Set up a virtualenv (if needed) and run the demo pipeline end to end on the default SQLite store:
# log runs through the tracker (spools under data/runs), sync them with ff-sync into
# data/mlflow/mlruns.db, and print how to open the MLflow UI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[tracking]'
exec .venv/bin/python tools/demo.py "$@"
