"""Which batch job a process belongs to, read once from the scheduler's environment.

A run's ``run_start`` records it (``"job": "slurm:<SLURM_JOB_ID>"``), so ``ff-sync`` can ask the
scheduler whether the job behind an open run has ended (:mod:`formula_foundry.sync.scheduler`)
instead of waiting for the run to go silent. ``SLURM_JOB_ID`` is the job's own id, distinct per
array task, and kept across requeues.
"""

from __future__ import annotations

import os
from typing import Final

SLURM: Final = "slurm"


def job_from_env() -> str | None:
    """``"slurm:<id>"`` inside a Slurm job, else None."""
    job_id = os.environ.get("SLURM_JOB_ID", "")
    return f"{SLURM}:{job_id}" if job_id.isascii() and job_id.isdigit() else None
