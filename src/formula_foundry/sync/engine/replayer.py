"""Replay the new events of one run into a sink, recording progress only after each commit.

For each run, the destination run is found or created first
(:mod:`formula_foundry.sync.engine.runs`), then its pending segments are read in merge order
(writer start time), each from where the last pass stopped, and events become batches:

* ``params``/``metrics``/``tags`` accumulate, in event order, into one batch within the sink's
  limits; an event larger than a batch is split, and progress stays before it until its
  last part is committed;
* ``artifact_ref`` becomes a small JSON document, sent right after the batch it follows;
  ``artifact`` (a logged file) is uploaded in a batch of files alone (``uploads``); one the
  destination can never take (``RecordRejected``) is quarantined as ``refused``, the run goes on;
* ``run_end``, ``tag_delete``, ``model_*`` (``models``) and a ``run_start`` reopening a run are
  barriers: the batch goes first, then the status or deletion, so the destination sees spool order.

After each commit the segment's progress moves to the end of the last event it covered. The
run's record in the state (status, end time, last sign of life) is saved as soon as the
destination acknowledged a status, and before any segment progress that covers it: a pass
that dies later never forgets a run's end (which later passes would not read again).
Invalid records, reserved tags and param conflicts are quarantined; the run goes on.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Any, Final

import orjson

from formula_foundry.errors import SpoolCorrupt, UnsupportedSpoolVersion
from formula_foundry.sync.engine.batch import Batch, Cursor
from formula_foundry.sync.engine.console_files import console_seen
from formula_foundry.sync.engine.models import FILE_KINDS, other_event
from formula_foundry.sync.engine.params import new_params, resend_without_conflicts
from formula_foundry.sync.engine.payloads import (
    InvalidRecord,
    PayloadChecker,
    check_time,
    run_end,
    run_start_problem,
)
from formula_foundry.sync.engine.report import Progress, ProgressFn
from formula_foundry.sync.engine.runs import RunContext, RunResolver, SyncContext
from formula_foundry.sync.engine.scan import SegmentFile, unreadable_reason
from formula_foundry.sync.engine.sink import (
    DestinationRejected,
    RecordRejected,
    RunMissing,
    StoredParamConflict,
)
from formula_foundry.sync.engine.stale import end_run, reopen, revive
from formula_foundry.sync.engine.sync_state import RunRecord, SegmentProgress
from formula_foundry.sync.engine.uploads import ObjectUnavailable, upload, wait_for_object
from formula_foundry.tracking.events import (
    INT64_MAX,
    INT64_MIN,
    K_ARTIFACT_REF,
    K_METRICS,
    K_PARAMS,
    K_RUN_END,
    K_RUN_START,
    K_TAG_DELETE,
    K_TAGS,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
)
from formula_foundry.tracking.spool_reader import Event, SegmentReader

_REFS_PER_BATCH: Final = 100
_FILES_PER_UPLOAD: Final = 100  # files per upload: a pass killed mid-upload resends at most these


class _Blocked(Exception):
    """The destination refused something of this run: the run stops for this pass."""


class Replayer:
    """Replays pending segments, run by run (see the module docstring)."""

    # False: every metric event takes the checked path (the test pinning the fast path to it).
    fast_metrics = True

    def __init__(
        self,
        cx: SyncContext,
        resolver: RunResolver,
        progress_fn: ProgressFn | None = None,
        runs_total: int = 0,
    ) -> None:
        self.cx, self.resolver = cx, resolver
        self.sink, self.report = cx.sink, cx.report
        self.progress_fn, self.runs_total, self.runs_done = progress_fn, runs_total, 0
        self.check = PayloadChecker()
        self._saved_runs: dict[str, RunRecord] = {}  # each run's record as last saved

    def replay_run(self, spool_run_id: str, pending: list[SegmentFile]) -> None:
        """Replay ``pending`` segments of one run; refusals are reported, not raised."""
        try:
            try:
                self._replay_run(spool_run_id, pending)
            except RunMissing as exc:
                # The destination lost the run we had mapped (restored backup, purge):
                # forget what we knew and send the whole run again, once.
                self.report.warnings.append(f"run {spool_run_id}: {exc}; resending the whole run")
                self.resolver.forget(spool_run_id)
                self._replay_run(spool_run_id, self.cx.files_by_run.get(spool_run_id, pending))
        except _Blocked:
            pass
        except DestinationRejected as exc:
            self.report.blocked.append(f"run {spool_run_id}: {exc}")
        self.runs_done += 1

    def _replay_run(self, spool_run_id: str, pending: list[SegmentFile]) -> None:
        ctx = self.resolver.ensure_run(spool_run_id)
        if ctx is None:
            return
        self.report.runs += 1
        self._saved_runs[spool_run_id] = ctx.record()  # as the state has it (or just saved it)
        try:
            if revive(self.sink, self.cx.state, ctx.record(), self.cx.policy):
                ctx.status = "RUNNING"  # the sync had ended it as dead: it is alive after all
                self._save_run(ctx)
            for seg in sorted(pending, key=lambda s: s.order):
                self._segment(ctx, seg)
            self._save_run(ctx)
        finally:
            self._saved_runs.pop(spool_run_id, None)

    def _save_run(self, ctx: RunContext) -> None:
        """Save the run's record if it changed: what the destination acknowledged, at once."""
        rec = ctx.record()
        if self._saved_runs.get(ctx.spool_run_id) != rec:
            self.resolver.save_run(ctx)
            self._saved_runs[ctx.spool_run_id] = rec

    # -- one segment ----------------------------------------------------------------------

    def _segment(self, ctx: RunContext, seg: SegmentFile) -> None:
        sid = ctx.spool_run_id
        prog = self.cx.progress.get(seg.rel) or SegmentProgress(seg.rel, sid)
        cur = Cursor(ctx, seg, prog)
        if seg.size < prog.offset:
            # Spool files only grow: this one was replaced or cut. What was synced stays.
            self.report.warnings.append(
                f"{seg.path} is {seg.size} bytes, shorter than the {prog.offset} already synced; "
                "it is not read again (ff-sync --replay resends everything)"
            )
            self._flush(cur, size_seen=seg.size)
            return
        reader = SegmentReader(seg.path, prog.offset, prog.line, prog.last_seq)
        self.report.segments += 1
        try:
            self._items(cur, reader)
        except ObjectUnavailable as exc:
            wait_for_object(self.report, cur, exc)
            return
        except (UnsupportedSpoolVersion, SpoolCorrupt) as exc:
            kind = "version" if isinstance(exc, UnsupportedSpoolVersion) else "header"
            self.cx.quarantine(sid, seg.path, 1, 0, kind, str(exc))
            cur.batch, cur.pos, cur.saved = Batch(), (0, 0, -1), (-1, -1, -1)
            self._flush(cur, size_seen=seg.size)
            return
        except OSError as exc:
            self.report.unreadable.append(
                f"run {sid}: {seg.path}: {unreadable_reason(exc)}; not synced, retried next pass"
            )
            if cur.batch.files:
                cur.batch, cur.pos = Batch(), cur.saved  # uploaded when the segment is read
            self._flush(cur)
            return
        except DestinationRejected as exc:
            if isinstance(exc, RunMissing):
                raise
            self.cx.quarantine(sid, seg.path, cur.saved[1] + 1, cur.saved[0], "refused", str(exc))
            self.report.blocked.append(f"run {sid}: {exc}")
            raise _Blocked() from exc
        if cur.batch.files:
            try:
                self._flush(cur)  # the segment's last files: uploaded before its end is recorded
            except ObjectUnavailable as exc:
                wait_for_object(self.report, cur, exc)
                return
        clean = reader.tail == "clean"
        cur.pos = (reader.end_offset, reader.end_line, reader.last_seq)
        cur.done = cur.done and clean
        self._flush(cur, size_seen=reader.end_offset if clean else max(seg.size, reader.end_offset))

    def _items(self, cur: Cursor, reader: SegmentReader) -> None:
        """Every event and problem of the segment, in order, into batches and the quarantine."""
        ctx, path = cur.ctx, cur.seg.path
        sid = ctx.spool_run_id
        lim = self.sink.limits
        max_metrics, max_total = lim.metrics, lim.total
        keys_ok = self.check.keys_ok
        fast = self.fast_metrics
        after_problem = False
        items = iter(reader)
        first = next(items, None)
        run = (reader.header or {}).get("run")
        if first is not None and run != sid:
            raise SpoolCorrupt(f"{path}:1: the header names run {run!r}, not {sid}")
        for item in itertools.chain((first,) if first is not None else (), items):
            if isinstance(item, Event):
                after_problem = False
                # The fast path: a one-point metric event that fits the current batch, checked
                # inline (one method call per event costs more than the check). It must take
                # exactly what PayloadChecker.metric_rows takes: tests/sync/test_fast_path.py.
                if fast and item.kind == K_METRICS:
                    data = item.data
                    d = data.get("d")
                    b = cur.batch
                    if type(d) is dict and len(d) == 1 and b.n < max_total:
                        ((key, value),) = d.items()
                        step, t = data.get("step", 0), item.t
                        if (
                            type(value) is float
                            and key in keys_ok
                            and type(step) is int
                            and INT64_MIN <= step <= INT64_MAX
                            and 0 <= t <= INT64_MAX
                            and len(b.metrics) < max_metrics
                        ):
                            b.metrics.append((key, value, t, step))
                            b.n += 1
                            b.events += 1
                            cur.pos = (item.end, item.line, item.seq)
                            if t > ctx.last_t:
                                ctx.last_t = t
                            continue
                try:
                    self._event(cur, item)
                except InvalidRecord as exc:
                    raw = orjson.dumps(item.data)
                    self.cx.quarantine(sid, path, item.line, item.offset, "invalid", str(exc), raw)
                    cur.pos = (item.end, item.line, item.seq)
                continue
            if not (item.kind == "sequence" and after_problem):
                # A sequence gap right after a damaged line is that line's: reported once.
                self.cx.quarantine(
                    sid, path, item.line, item.offset, item.kind, item.reason, item.raw
                )
            after_problem = True

    def _event(self, cur: Cursor, ev: Event) -> None:
        kind, ctx = ev.kind, cur.ctx
        check_time(ev)
        if ev.t > ctx.last_t:
            ctx.last_t = ev.t
        if kind in FILE_KINDS:  # a run's files, and a model's (uploads, models)
            self._file(cur, ev)
            return
        if cur.batch.files:
            self._flush(cur)  # files travel in batches of their own
        if kind == K_METRICS:
            self._add(cur, ev, K_METRICS, self.check.metric_rows(ev))
        elif kind == K_PARAMS:
            self._add(cur, ev, K_PARAMS, self._new_params(cur, ev))
        elif kind == K_TAGS:
            tags, reserved = self.check.tags(ev, MAX_TAG_VALUE_LENGTH)
            if reserved is not None:
                raw = orjson.dumps(ev.data)
                path = cur.seg.path
                self.cx.quarantine(
                    ctx.spool_run_id, path, ev.line, ev.offset, "reserved", reserved, raw
                )
            self._add(cur, ev, K_TAGS, tags)
        elif kind == K_ARTIFACT_REF:
            cur.batch.refs.append((self.check.artifact_ref(ev), ev))
            self._advance(cur, ev)
            if len(cur.batch.refs) >= _REFS_PER_BATCH:
                self._flush(cur)
        elif kind == K_RUN_END:
            status, end, why = run_end(ev)
            self._flush(cur)
            end_run(self.sink, ctx.mlflow_run_id, status, end, why, self.cx.policy)
            ctx.status, ctx.end_time, cur.done = status, end, True
            # Saved before the progress past the run_end: no later pass reads it again.
            self._save_run(ctx)
            self._advance(cur, ev)
            self._flush(cur)
        elif kind == K_TAG_DELETE:
            keys = self.check.tag_keys(ev)
            self._flush(cur)  # the writes before it reach the destination first
            for key in keys:
                self.cx.call(partial(self.sink.delete_tag, ctx.mlflow_run_id, key))
            self._advance(cur, ev)
            self._flush(cur)
        elif kind == K_RUN_START:
            problem = run_start_problem(ev)
            if problem is not None:
                raise InvalidRecord(problem)
            if isinstance(job := ev.data.get("job"), str) and job:  # sync/engine/scheduler.py
                self.cx.state.save_job(ctx.spool_run_id, job)
            if ctx.status != "RUNNING" and ev.data.get("resume") is not False:
                # Another process resumed the run after it had ended: it runs again. The run's
                # own first start ("resume": false), read again when everything is resent,
                # reopens nothing; a start without the flag (hand-written spools) does.
                self._flush(cur)
                reopen(self.sink, ctx.mlflow_run_id, self.cx.policy)
                ctx.status = "RUNNING"
                self._save_run(ctx)
            self._advance(cur, ev)
        else:  # logged models (models); the segment header, heartbeats: nothing to send
            console_seen(self.cx.state.folder, ctx.spool_run_id, cur.seg, ev)
            other_event(self.cx, cur, ev, self._flush)

    def _file(self, cur: Cursor, ev: Event) -> None:
        ref = self.check.artifact(ev)
        b = cur.batch
        if b.size() or b.refs:
            self._flush(cur)  # so that a missing object stops the segment right before it
        b = cur.batch
        b.files.append((ref, ev))
        # Full for the fast metric path: a metric event after it takes the checked path.
        b.n = self.sink.limits.total
        self._advance(cur, ev)
        if len(b.files) >= _FILES_PER_UPLOAD:
            self._flush(cur)

    @staticmethod
    def _advance(cur: Cursor, ev: Event) -> None:
        cur.pos = (ev.end, ev.line, ev.seq)
        cur.batch.events += 1

    # -- batching -------------------------------------------------------------------------

    def _add(self, cur: Cursor, ev: Event, kind: str, items: list[Any]) -> None:
        lim = self.sink.limits
        while items:
            b = cur.batch
            total = lim.total - b.size()
            if kind == K_METRICS:
                room = min(total, lim.metrics - len(b.metrics))
            elif kind == K_PARAMS:
                room = min(total, lim.params - len(b.params))
            else:
                room = min(total, lim.tags - len(b.tags))
            if len(items) > room and b.size():
                self._flush(cur)  # progress stays before this event
                continue
            part, items = items[:room], items[room:]
            if kind == K_METRICS:
                b.metrics.extend(part)
            elif kind == K_PARAMS:
                for key, value in part:
                    b.params[key] = value
                    b.param_src[key] = ev
            else:
                for key, value in part:
                    b.tags[key] = value
            b.n = b.size()
            if items:
                self._flush(cur)  # an event larger than a batch: its first parts
        self._advance(cur, ev)

    def _flush(self, cur: Cursor, size_seen: int = -1) -> None:
        """Send the batch, then record the position it reaches (``size_seen`` -1: mid-file)."""
        b, ctx = cur.batch, cur.ctx
        if b.files:
            upload(self.cx, cur)
        if b.metrics or b.params or b.tags:
            self._send(cur)
        for ref, ev in b.refs:
            try:
                self.cx.call(partial(self.sink.log_artifact_ref, ctx.mlflow_run_id, ref))
            except RecordRejected as exc:
                raw = orjson.dumps(ev.data)
                path = cur.seg.path
                self.cx.quarantine(
                    ctx.spool_run_id, path, ev.line, ev.offset, "refused", str(exc), raw
                )
        self.report.events += b.events
        self.report.metrics += len(b.metrics)
        cur.batch = Batch()
        if cur.pos == cur.saved and size_seen == -1:
            return
        self.cx.quarantine_log.sync()
        self._save_run(ctx)  # status and last sign of life first: progress never outruns them
        prog = SegmentProgress(cur.seg.rel, ctx.spool_run_id, *cur.pos, size_seen, cur.done)
        self.cx.state.save_segment(prog)
        self.cx.progress[cur.seg.rel] = prog
        cur.saved = cur.pos
        if self.progress_fn is not None:
            done, total, rep = self.runs_done, self.runs_total, self.report
            self.progress_fn(Progress(done, total, rep.events, rep.metrics, ctx.spool_run_id))

    def _send(self, cur: Cursor) -> None:
        b, ctx, sink = cur.batch, cur.ctx, self.sink
        try:
            self.cx.call(
                lambda: sink.log_batch(
                    ctx.mlflow_run_id, b.metrics, list(b.params.items()), list(b.tags.items())
                )
            )
        except StoredParamConflict:
            resend_without_conflicts(self.cx, cur)

    def _new_params(self, cur: Cursor, ev: Event) -> list[tuple[str, str]]:
        return new_params(self.cx, cur, ev, self.check.strings(ev, MAX_PARAM_VALUE_LENGTH))
