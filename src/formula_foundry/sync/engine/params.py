"""Params a run already has at the destination, and what to do with one that differs.

MLflow refuses to change a logged param. The replay remembers a run's params (fetched once per
pass) and sends only new ones; a spooled value that differs from the stored one is quarantined
as ``param_conflict`` and the rest of the event goes on. When someone else wrote params to the
run meanwhile, the sink's :class:`~formula_foundry.sync.engine.sink.StoredParamConflict` makes
the replay read them again and resend the batch without the conflicting ones.
"""

from __future__ import annotations

import orjson

from formula_foundry.sync.engine.batch import Cursor
from formula_foundry.sync.engine.payloads import conflict_reason
from formula_foundry.sync.engine.runs import SyncContext
from formula_foundry.tracking.spool_reader import Event


def new_params(
    cx: SyncContext, cur: Cursor, ev: Event, items: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The params of ``ev`` (checked ``items``) the destination run does not have yet."""
    ctx = cur.ctx
    if ctx.params is None:
        ctx.params = cx.call(lambda: cx.sink.get_params(ctx.mlflow_run_id))
    known = ctx.params
    new: list[tuple[str, str]] = []
    conflicts: list[str] = []
    for key, value in items:
        old = known.get(key)
        if old is None:
            known[key] = value
            new.append((key, value))
        elif old != value:
            conflicts.append(conflict_reason(key, old, value))
    if conflicts:
        raw = orjson.dumps(ev.data)
        why = "; ".join(conflicts)
        cx.quarantine(
            ctx.spool_run_id, cur.seg.path, ev.line, ev.offset, "param_conflict", why, raw
        )
    return new


def resend_without_conflicts(cx: SyncContext, cur: Cursor) -> None:
    """Send the batch again after a param conflict: the stored params read anew, ours that
    differ quarantined, the rest (metrics and tags included) sent."""
    b, ctx, sink = cur.batch, cur.ctx, cx.sink
    known = cx.call(lambda: sink.get_params(ctx.mlflow_run_id))
    keep: dict[str, str] = {}
    for key, value in b.params.items():
        old = known.get(key)
        if old is None:
            keep[key] = value
        elif old != value:
            src = b.param_src[key]
            why = conflict_reason(key, old, value)
            cx.quarantine(
                ctx.spool_run_id, cur.seg.path, src.line, src.offset, "param_conflict", why
            )
    ctx.params = {**known, **keep}
    cx.call(
        lambda: sink.log_batch(
            ctx.mlflow_run_id, b.metrics, list(keep.items()), list(b.tags.items())
        )
    )
