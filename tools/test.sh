#!/usr/bin/env bash
# Set up the development environment (if needed) and run the whole test suite with lint and types.
# Usage: ./tools/test.sh [pytest args...]
# The sync suite runs on SQLite, PostgreSQL and an mlflow server, the recipes on a real Slurm;
# for a quick SQLite-only run:
#   ./tools/test.sh -m "not postgres and not server and not slurm"
#   ./tools/test.sh --fast        # the fast tier (under 2 minutes; no PostgreSQL, no Slurm)
set -euo pipefail
cd "$(dirname "$0")/.."
FAST=0
if [ "${1:-}" = "--fast" ]; then
  FAST=1
  shift
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
if [ "$FAST" = 1 ]; then
  .venv/bin/ruff check src tests tools
  .venv/bin/ruff format --check src tests tools
  .venv/bin/mypy
  exec .venv/bin/python -m pytest -n "${FF_TEST_WORKERS:-2}" --dist loadgroup \
    -m "fast and not postgres and not slurm" "$@"
fi
# The destination tests start one throw-away PostgreSQL cluster (Debian's server; as the
# postgres user when run as root) and one mlflow server on 127.0.0.1 per session themselves;
# make sure the PostgreSQL server binaries exist.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi
# The Slurm end-to-end tests (tests/slurm) start a throw-away single-node Slurm themselves;
# make sure Debian's slurm-wlm and munge are installed.
./tools/ci_slurm.sh
.venv/bin/ruff check src tests tools
.venv/bin/ruff format --check src tests tools
.venv/bin/mypy
# Two pytest-xdist workers by default (FF_TEST_WORKERS=0 for one process): most tests wait on
# subprocesses, services and the scheduler, so two workers halve the wall time even on 2 cores.
# Each worker starts its own PostgreSQL cluster and mlflow server; the Slurm tests share one
# worker (xdist_group "slurm") and so one cluster.
exec .venv/bin/python -m pytest -n "${FF_TEST_WORKERS:-2}" --dist loadgroup "$@"
