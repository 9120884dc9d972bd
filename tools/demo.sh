#!/usr/bin/env bash
# Set up a virtualenv (if needed) and run the demo pipeline end to end on the default SQLite store:
# log runs through the tracker (spools under data/runs), sync them with ff-sync into
# data/mlflow/mlruns.db, and print how to open the MLflow UI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { printf 'demo: %s\n' "$*"; }
if [ ! -x .venv/bin/python ]; then
  say "creating the virtualenv .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
say "installing formula-foundry with MLflow into .venv (about 2 minutes the first time; quiet)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[tracking]'
say "running tools/demo.py: tracker and unmodified MLflow code log to data/runs, ff-sync replays"
exec .venv/bin/python tools/demo.py "$@"
