"""Which batch job a process belongs to, read once from the scheduler's environment.

A run's ``run_start`` records it (``"job": "slurm:<SLURM_JOB_ID>"``), so ``ff-sync`` can ask the
scheduler whether the job behind an open run has ended
(:mod:`formula_foundry.sync.engine.scheduler`) instead of waiting for the run to go silent.
``SLURM_JOB_ID`` is the job's own id, distinct per
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


def sigterm_reason(timeout_s: float = 3.0) -> str:
    """Why a run ends on SIGTERM, for its ``run_end`` ``reason``.

    Inside a Slurm job, SIGTERM comes from ``scancel``, a requeue, preemption, the recipe's
    ``--signal=B:TERM@<lead>`` notice or the time limit itself, and the signal does not say
    which. So the reason states what Slurm says, not a guess: the job and either "its time
    limit reached" (``squeue``'s reason ``TimeLimit``) or how much of its limit was left
    (``%L``; about the notice's lead for the notice). Runs in the thread that ends the runs,
    never in a log call; a scheduler that does not answer within ``timeout_s`` costs the
    detail, not the end event.
    """
    job_id = os.environ.get("SLURM_JOB_ID", "")
    if not (job_id.isascii() and job_id.isdigit()):
        return "SIGTERM"
    return f"SIGTERM in Slurm job {job_id}{_job_detail(job_id, timeout_s)}"


def _job_detail(job_id: str, timeout_s: float) -> str:
    import subprocess  # only on SIGTERM, never on import

    try:
        out = subprocess.run(
            ["squeue", "--noheader", f"--jobs={job_id}", "--format=%L|%r"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    left, _, why = out.stdout.strip().partition("|")
    if out.returncode != 0 or "\n" in why:
        return ""
    if why == "TimeLimit":  # at the limit: %L says INVALID
        return ", its time limit reached"
    # UNLIMITED / INVALID say nothing about a limit.
    return f", {left} of its time limit left" if left[:1].isdigit() else ""
