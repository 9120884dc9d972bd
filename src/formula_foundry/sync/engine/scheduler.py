"""The scheduler's word on open runs: is the batch job behind each one still alive?

A run whose ``run_start`` named its job (``"job": "slurm:<id>"``, see
:mod:`formula_foundry.tracking.scheduler`) need not wait ``sync.stale_after_s`` of silence to
be judged: where ``squeue`` answers on the sync host, one query per pass covers every open run.

* The job has ended (COMPLETED without a run end, CANCELLED, FAILED, TIMEOUT, NODE_FAIL,
  PREEMPTED, OUT_OF_MEMORY, BOOT_FAIL, DEADLINE): the run is ended KILLED in this pass, its end
  time its last sign of life, with the job's state as the tag ``ff.sync.end_reason``.
* The job is pending (a requeued job waiting to start again), running, suspended or
  completing: the run stays open however long it is silent.
* The scheduler does not know the job (purged from its memory) or names a state not listed
  here, does not answer, or is not installed here: the silence rule
  (:mod:`formula_foundry.sync.engine.stale`) decides, as before.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Final

from formula_foundry.sync.engine.sync_state import RunRecord
from formula_foundry.tracking.scheduler import SLURM

ENDED: Final = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
# Alive: the job may still write to the run (a requeued job waits in PENDING, REQUEUE_HOLD or
# SPECIAL_EXIT). A state in neither set (a newer Slurm's) keeps no run open: silence decides.
ALIVE: Final = frozenset(
    {
        "COMPLETING",
        "CONFIGURING",
        "PENDING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "RESV_DEL_HOLD",
        "RUNNING",
        "SIGNALING",
        "SPECIAL_EXIT",
        "STAGE_OUT",
        "STOPPED",
        "SUSPENDED",
    }
)
_TIMEOUT_S: Final = 15.0


@dataclass
class Verdict:
    """What the scheduler said about the open runs of one pass."""

    ended: dict[str, str] = field(default_factory=dict)  # run → end reason
    alive: set[str] = field(default_factory=set)  # runs whose job is still alive
    warning: str | None = None  # the scheduler was asked and did not answer


def slurm_states(job_ids: Iterable[str], timeout_s: float = _TIMEOUT_S) -> dict[str, str] | None:
    """Job id → Slurm state for the jobs ``squeue`` still knows; None if it did not answer."""
    ids = sorted(set(job_ids), key=int)
    squeue = shutil.which("squeue")
    if not ids or squeue is None:
        return {} if ids else None
    try:
        done = subprocess.run(
            [squeue, "--noheader", "--states=all", "--format=%A|%T", "--jobs=" + ",".join(ids)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        # Every id unknown (all purged) is an error to squeue; anything else is no answer.
        return {} if "Invalid job id" in done.stderr else None
    states: dict[str, str] = {}
    for line in done.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id.isdigit() and state:
            states[job_id] = state.split()[0].rstrip("+")
    return states


def ask(live: Collection[RunRecord], jobs: dict[str, str]) -> Verdict:
    """One scheduler query for every open run that names a Slurm job."""
    verdict = Verdict()
    prefix = SLURM + ":"
    slurm = {
        r.spool_run_id: job[len(prefix) :]
        for r in live
        if (job := jobs.get(r.spool_run_id, "")).startswith(prefix) and job[len(prefix) :].isdigit()
    }
    if not slurm or shutil.which("squeue") is None:
        return verdict
    states = slurm_states(slurm.values())
    if states is None:
        verdict.warning = "squeue did not answer; open runs are judged by their silence alone"
        return verdict
    for spool_run_id, job_id in slurm.items():
        state = states.get(job_id)
        if state in ENDED:
            verdict.ended[spool_run_id] = f"slurm job {job_id} {state}"
        elif state in ALIVE:
            verdict.alive.add(spool_run_id)
    return verdict
