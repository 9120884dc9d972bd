"""Dead runs: a run that went silent without an end event is ended as KILLED by the sync.

Every event the sync replays — heartbeats included — moves the run's last sign of life
(``runs.last_t`` in the sync state). At the end of each pass, a run whose last synced status
is RUNNING, whose segments did not grow during this pass, and whose last sign of life is older
than ``sync.stale_after_s`` (``ff-sync --stale-after``) is set to KILLED in the destination
with ``end_time`` = its last sign of life. The state records that the sync ended it
(``stale_ended``), so the next passes leave it alone and
:mod:`formula_foundry.sync.commands.gc` does not take it for a finished run.

Where the run's ``run_start`` named its batch job and the scheduler answers on the sync host,
its word comes first (:mod:`formula_foundry.sync.engine.scheduler`): a run whose job has ended is
ended in the pass that learns it, with the job's state as its ``ff.sync.end_reason`` tag; a
run whose job is pending or running is left open however long it is silent.

If events of the run arrive later — the job was requeued and resumed the run, or a process
that was only stopped (SIGSTOP, a hung file system) goes on — the run becomes RUNNING again
(:func:`revive`, before its new events are replayed) and its own end event ends it for real.

:func:`find_stale` only reads the sync state, so an idle pass that finds nothing stale never
opens the destination (nor imports MLflow).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection
from functools import partial

from formula_foundry.sync.engine.report import SyncReport
from formula_foundry.sync.engine.retry import RetryPolicy
from formula_foundry.sync.engine.sink import DestinationRejected, RunMissing, Sink
from formula_foundry.sync.engine.sync_state import RunRecord, SyncState
from formula_foundry.tracking.events import END_REASON_TAG

KILLED = "KILLED"


def find_stale(
    state: SyncState, stale_after_s: float, busy: Collection[str], now_s: float | None = None
) -> list[RunRecord]:
    """RUNNING runs silent for more than ``stale_after_s``, except those in ``busy``."""
    now_ms = int((time.time() if now_s is None else now_s) * 1000)
    limit = now_ms - int(stale_after_s * 1000)
    return sorted(
        (r for r in state.live_runs() if r.spool_run_id not in busy and r.last_t < limit),
        key=lambda r: (r.last_t, r.spool_run_id),
    )


def revive(sink: Sink, state: SyncState, run: RunRecord, policy: RetryPolicy) -> bool:
    """New events for a run the sync ended as dead: make it RUNNING again; True if it was."""
    if run.status != KILLED or not state.is_stale_ended(run.spool_run_id, run.last_t):
        return False
    reopen(sink, run.mlflow_run_id, policy)
    return True


def end_run(
    sink: Sink,
    mlflow_run_id: str,
    status: str,
    end_time: int | None,
    reason: str | None,
    policy: RetryPolicy,
) -> None:
    """Set a run's final status; the reason first, as the tag ``ff.sync.end_reason`` (a crash
    between the two leaves the run open, and the next pass sets both again)."""
    if reason is not None:
        policy.call(partial(sink.log_batch, mlflow_run_id, [], [], [(END_REASON_TAG, reason)]))
    policy.call(partial(sink.set_status, mlflow_run_id, status, end_time))


def reopen(sink: Sink, mlflow_run_id: str, policy: RetryPolicy) -> None:
    """Make an ended run RUNNING again. The reason it ended with (``ff.sync.end_reason``) went
    with that end: a requeued job's run that then finishes must not read "SIGTERM"."""
    policy.call(partial(sink.delete_tag, mlflow_run_id, END_REASON_TAG))
    policy.call(partial(sink.set_status, mlflow_run_id, "RUNNING", None))


def end_stale(
    sink: Sink,
    state: SyncState,
    runs: list[RunRecord],
    report: SyncReport,
    policy: RetryPolicy,
    reasons: dict[str, str] | None = None,
) -> None:
    """Set each run KILLED at its last sign of life, then record that the sync ended it.

    ``reasons``: the scheduler's word on runs whose job has ended (engine/scheduler.py), noted
    on the run as the tag ``ff.sync.end_reason`` before its status changes.
    """
    reasons = reasons or {}
    for rec in runs:
        reason = reasons.get(rec.spool_run_id)
        try:
            end_run(sink, rec.mlflow_run_id, KILLED, rec.last_t, reason, policy)
        except RunMissing:
            state.forget_run(rec.spool_run_id)  # resent (and re-judged) by the next pass
            report.warnings.append(f"run {rec.spool_run_id}: gone from the destination; resending")
            continue
        except DestinationRejected as exc:
            report.blocked.append(f"run {rec.spool_run_id}: cannot mark it KILLED: {exc}")
            continue
        ended = dataclasses.replace(rec, status=KILLED, end_time=rec.last_t)
        state.mark_stale_ended(ended)
        report.stale.append(rec.spool_run_id)
        when = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(rec.last_t / 1000))
        why = f"{reason}, last sign of life {when}" if reason else f"no sign of life since {when}"
        report.warnings.append(f"run {rec.spool_run_id}: {why} and no end event; marked KILLED")
