"""Which batch job a process belongs to, read once from the scheduler's environment.

A run's ``run_start`` records it (``"job": "slurm:<SLURM_JOB_ID>"``), so ``ff-sync`` can ask the
scheduler whether the job behind an open run has ended
(:mod:`formula_foundry.sync.engine.scheduler`) instead of waiting for the run to go silent.
``SLURM_JOB_ID`` is the job's own id, distinct per array task, and kept across requeues.
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


# The job's facts a run is tagged with at start (docs/tracker.md, "Scheduler facts"): tag name
# -> the variable the scheduler sets in every process of the job. Read once per start_run
# from the environment: no command, no I/O.
JOB_FACTS: Final = {
    "slurm.job_id": "SLURM_JOB_ID",
    "slurm.job_name": "SLURM_JOB_NAME",
    "slurm.array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm.array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm.step_id": "SLURM_STEP_ID",
    "slurm.restart_count": "SLURM_RESTART_COUNT",
    "slurm.nodelist": "SLURM_JOB_NODELIST",
    "slurm.partition": "SLURM_JOB_PARTITION",
    "slurm.account": "SLURM_JOB_ACCOUNT",
    "slurm.cluster": "SLURM_CLUSTER_NAME",
    "slurm.ntasks": "SLURM_NTASKS",
    "slurm.cpus_per_task": "SLURM_CPUS_PER_TASK",
    "slurm.gpus": "SLURM_GPUS",
    "slurm.gpus_on_node": "SLURM_GPUS_ON_NODE",
    "pbs.job_id": "PBS_JOBID",
    "pbs.job_name": "PBS_JOBNAME",
    "pbs.queue": "PBS_QUEUE",
    "pbs.array_index": "PBS_ARRAY_INDEX",
    "lsf.job_id": "LSB_JOBID",
    "lsf.job_name": "LSB_JOBNAME",
    "lsf.queue": "LSB_QUEUE",
    "lsf.array_index": "LSB_JOBINDEX",
}
# A fact longer than this (a node list of thousands of hosts) is left out, not cut.
_MAX_FACT_LENGTH: Final = 1000


def job_facts(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The tags of :data:`JOB_FACTS` whose variables are set (non-empty) in ``environ``."""
    env = os.environ if environ is None else environ
    facts = {}
    for tag, var in JOB_FACTS.items():
        value = env.get(var, "")
        if value and len(value) <= _MAX_FACT_LENGTH and "\x00" not in value:
            facts[tag] = value
    return facts
