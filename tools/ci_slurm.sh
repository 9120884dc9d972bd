#!/usr/bin/env bash
# Install what the Slurm end-to-end tests (tests/slurm, marker `slurm`) need: Debian's slurm-wlm
# (slurmctld, slurmd, sbatch, ...) and munge. Idempotent: does nothing when both are installed.
# It only installs; the tests start (and stop) a throw-away single-node Slurm of their own, with
# their own slurm.conf under a temporary folder, and never touch /etc/slurm or a running cluster.
# Usage: ./tools/ci_slurm.sh
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if have slurmctld && have slurmd && have sbatch && have munged && have munge; then
  exit 0
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
# The packages' own services may try to start (and fail without a slurm.conf) in containers;
# that is harmless: the tests start the daemons themselves.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  slurm-wlm munge >/dev/null
have slurmctld && have slurmd && have sbatch && have munged
