"""Run identity: map each spooled run to exactly one destination run, whatever was lost.

Lookup order for a run: the sync state (``runs`` table) → the destination, by the tag
``ff.run_uuid`` (deleted runs included) → create it from its ``run_start`` event. Creation is
serialised by the destination's ``sync.lock`` between passes and by the resolver's lock between
the workers of a pass, and every attempt after a failure looks the run up again first, so a
create that committed before its answer was lost is never repeated.

A nested run needs its parent's destination id for ``mlflow.parentRunId``: the parent is
created first, wherever its events are. A parent found nowhere (not in the spool, the state
or the destination) makes the child wait, until the child is older than
``sync.stale_after_s``; then the child is created unlinked, keeps ``ff.parent_run_uuid``, and
is linked as soon as its parent is created.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final, TypeVar

from formula_foundry.errors import SpoolCorrupt, SpoolError, UnsupportedSpoolVersion
from formula_foundry.sync.engine.payloads import InvalidRecord, run_spec
from formula_foundry.sync.engine.quarantine_log import QuarantineLog
from formula_foundry.sync.engine.report import SyncReport
from formula_foundry.sync.engine.retry import RetryPolicy
from formula_foundry.sync.engine.scan import SegmentFile, unreadable_reason
from formula_foundry.sync.engine.sink import (
    DestinationRejected,
    RemoteRun,
    RunMissing,
    RunSpec,
    Sink,
)
from formula_foundry.sync.engine.sync_state import (
    RunRecord,
    SegmentProgress,
    SyncState,
)
from formula_foundry.tracking.events import K_RUN_START
from formula_foundry.tracking.spool_reader import Event, Problem, SegmentReader

T = TypeVar("T")
_RAW_LIMIT: Final = 200


@dataclass
class RunContext:
    """A run during a pass: its destination id, last status sent, params known to be there."""

    spool_run_id: str
    mlflow_run_id: str
    experiment_id: str
    status: str
    parent_spool_run_id: str | None = None
    parent_linked: bool = True
    last_t: int = 0
    end_time: int | None = None
    params: dict[str, str] | None = None  # None: not fetched from the destination yet

    @classmethod
    def from_record(cls, rec: RunRecord) -> RunContext:
        """The context of a run the sync state already maps."""
        return cls(**{name: getattr(rec, name) for name in _RECORD_FIELDS})

    def record(self) -> RunRecord:
        """What the sync state keeps of this run."""
        return RunRecord(**{name: getattr(self, name) for name in _RECORD_FIELDS})


# Both converters walk RunRecord's fields, so a field added to it without a RunContext
# counterpart fails the first conversion rather than being silently dropped.
_RECORD_FIELDS: Final = tuple(f.name for f in dataclasses.fields(RunRecord))


@dataclass
class SyncContext:
    """What every part of one pass shares."""

    sink: Sink
    state: SyncState
    progress: dict[str, SegmentProgress]
    quarantine_log: QuarantineLog
    report: SyncReport
    policy: RetryPolicy
    files_by_run: dict[str, list[SegmentFile]]
    stale_after_s: float
    # Logged files above this size get a reference document instead of an upload.
    upload_max_bytes: int | None = None

    def call(self, fn: Callable[[], T]) -> T:
        """Call the sink with the retry policy."""
        return self.policy.call(fn)

    def quarantine(
        self,
        spool_run_id: str,
        path: Path,
        line: int,
        offset: int,
        kind: str,
        reason: str,
        raw: bytes = b"",
    ) -> None:
        """Report a record that cannot be synced (once per file and offset) and count it."""
        self.quarantine_log.add(
            {
                "run": spool_run_id,
                "file": str(path),
                "line": line,
                "offset": offset,
                "kind": kind,
                "reason": reason,
                "raw": raw[:_RAW_LIMIT].decode("utf-8", "backslashreplace"),
                "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
        self.report.add_problem(f"{path}:{line} (byte {offset}): {kind}: {reason}")
        if kind == "param_conflict":
            self.report.conflicts += 1


@dataclass(frozen=True)
class _Start:
    spec: RunSpec
    seg: SegmentFile
    event: Event


@dataclass
class _Search:
    """What looking for a run's ``run_start`` found: the event, or why there is none."""

    start: _Start | None = None
    why: list[str] = dataclasses.field(default_factory=list)
    # Segments that can give nothing (broken header, unknown format, another run's header):
    # (segment, quarantine kind, reason).
    set_aside: list[tuple[SegmentFile, str, str]] = dataclasses.field(default_factory=list)
    # Damaged records met on the way (one may have been the run_start): reported if the run
    # must wait, since the replay that would report them never reads a run it cannot create.
    damaged: list[tuple[SegmentFile, Problem]] = dataclasses.field(default_factory=list)
    unreadable: list[str] = dataclasses.field(default_factory=list)


_WAIT: Final = "\0wait"


class RunResolver:
    """Finds or creates the destination run of each spooled run (see the module docstring).

    Shared by the workers of a parallel pass: one reentrant lock (parents are resolved
    recursively) serialises every lookup and creation, which is what keeps a spooled run to
    one destination run. Its calls go through ``cx.sink``, which only it uses during a pass.
    """

    def __init__(self, cx: SyncContext) -> None:
        self.cx = cx
        self.runs: dict[str, RunContext] = {}
        self._lock = threading.RLock()

    def ensure_run(self, spool_run_id: str, chain: tuple[str, ...] = ()) -> RunContext | None:
        """The run's context, creating the destination run if needed; None: it must wait."""
        ctx = self.runs.get(spool_run_id)
        if ctx is not None:
            return ctx  # the common case in workers: resolved before they started, no lock
        with self._lock:
            return self._ensure_run(spool_run_id, chain)

    def _ensure_run(self, spool_run_id: str, chain: tuple[str, ...]) -> RunContext | None:
        ctx = self.runs.get(spool_run_id)
        if ctx is not None:
            return ctx
        rec = self.cx.state.run(spool_run_id)
        if rec is not None:
            ctx = RunContext.from_record(rec)
            self.runs[spool_run_id] = ctx
            return ctx
        search = self._find_start(spool_run_id)
        start = search.start
        experiment = start.spec.experiment if start else None
        remote = self.cx.call(lambda: self.cx.sink.find_run(spool_run_id, experiment))
        created = False
        parent_spool_run_id = start.spec.parent_spool_run_id if start else None
        parent_id: str | None = None
        if remote is None:
            if start is None:
                self._set_aside(spool_run_id, search)
                self.cx.report.unreadable += search.unreadable
                because = "; ".join(search.why) or "no run_start event in its segments yet"
                self.cx.report.waiting.append(f"run {spool_run_id}: {because}; will retry")
                return None
            if parent_spool_run_id:
                found = self._parent_id(parent_spool_run_id, start, (*chain, spool_run_id))
                if found == _WAIT:
                    self.cx.report.waiting.append(
                        f"run {spool_run_id}: its parent run {parent_spool_run_id} is neither "
                        f"in the spool nor in {self.cx.sink.description} yet; will retry"
                    )
                    return None
                parent_id = found
            spec = dataclasses.replace(start.spec, parent_mlflow_run_id=parent_id)
            remote, created = self._find_or_create(spec)
        if remote.duplicates:
            self.cx.report.warnings.append(
                f"run {spool_run_id} has several runs in {self.cx.sink.description} "
                f"({remote.mlflow_run_id}, {', '.join(remote.duplicates)}); "
                f"syncing into {remote.mlflow_run_id}"
            )
        ctx = RunContext(
            spool_run_id,
            remote.mlflow_run_id,
            remote.experiment_id,
            remote.status,
            parent_spool_run_id=parent_spool_run_id,
            parent_linked=not created or parent_spool_run_id is None or parent_id is not None,
            last_t=start.event.t if start else 0,
            params={} if created else None,
        )
        self.runs[spool_run_id] = ctx
        self.save_run(ctx)
        if created:
            self._link_children(ctx)
        return ctx

    def save_run(self, ctx: RunContext) -> None:
        self.cx.state.save_run(ctx.record())

    def forget(self, spool_run_id: str) -> None:
        """Drop what the state knows about a run, so it is found or created and sent anew."""
        with self._lock:
            self.cx.state.forget_run(spool_run_id)
            self.runs.pop(spool_run_id, None)
            # Only this run's own segments, one atomic pop each: other workers update the
            # progress of their runs meanwhile, so iterating the whole dict could fail. Progress
            # of a segment no longer on disk is never read, so leaving it in memory is harmless.
            for seg in self.cx.files_by_run.get(spool_run_id, []):
                self.cx.progress.pop(seg.rel, None)

    # -- internals ------------------------------------------------------------------------

    def _find_or_create(self, spec: RunSpec) -> tuple[RemoteRun, bool]:
        """Create the run the caller has just looked for; a retry looks again first (a create
        that timed out may have committed), so a flaky destination gets no duplicate."""
        tries = 0

        def attempt() -> tuple[RemoteRun, bool]:
            nonlocal tries
            tries += 1
            if tries > 1:
                found = self.cx.sink.find_run(spec.spool_run_id, spec.experiment)
                if found is not None:
                    return found, False
            return self.cx.sink.create_run(spec), True

        return self.cx.call(attempt)

    def _parent_id(self, parent: str, start: _Start, chain: tuple[str, ...]) -> str | None:
        if parent in chain:
            return None  # a cycle can only come from damaged data: do not link
        if parent in self.cx.files_by_run or self.cx.state.run(parent) is not None:
            pctx = self.ensure_run(parent, chain)
            if pctx is not None:
                return pctx.mlflow_run_id
        else:
            remote = self.cx.call(lambda: self.cx.sink.find_run(parent, None))
            if remote is not None:
                return remote.mlflow_run_id
        age_s = time.time() - start.event.t / 1000.0
        return None if age_s > self.cx.stale_after_s else _WAIT

    def _link_children(self, ctx: RunContext) -> None:
        for child in self.cx.state.unlinked_children(ctx.spool_run_id):
            tag = [("mlflow.parentRunId", ctx.mlflow_run_id)]
            try:
                self.cx.call(partial(self.cx.sink.log_batch, child.mlflow_run_id, [], [], tag))
            except RunMissing:
                self.forget(child.spool_run_id)  # recreated, linked, by its own next pass
                continue
            except DestinationRejected as exc:
                self.cx.report.warnings.append(f"run {child.spool_run_id}: cannot link it: {exc}")
                continue
            self.cx.state.mark_linked(child.spool_run_id)
            if child.spool_run_id in self.runs:
                self.runs[child.spool_run_id].parent_linked = True

    def _find_start(self, spool_run_id: str) -> _Search:
        """The run's ``run_start`` event, from whichever of its segments holds it.

        Without one, also why: the segments it could not use. A segment whose header is
        broken, of an unknown format or names another run (a copied file) gives no run_start
        — a copied segment must not create a ghost run. If a run_start is found, the replay
        meets those segments, and unreadable ones, and reports them itself; if the run must
        wait, :meth:`_set_aside` does.
        """
        search = _Search()
        for seg in self.cx.files_by_run.get(spool_run_id, []):
            prog = self.cx.progress.get(seg.rel)
            if prog is not None and prog.size_seen == seg.size:
                # Read to its end while the run had no destination run: set aside whole.
                search.why.append(f"{seg.path} was quarantined before (see the quarantine report)")
                continue
            reader = SegmentReader(seg.path)
            after_problem = False
            try:
                for item in reader:
                    run = (reader.header or {}).get("run")
                    if run != spool_run_id:
                        raise SpoolCorrupt(
                            f"{seg.path}:1: the header names run {run!r}, not {spool_run_id}"
                        )
                    if isinstance(item, Problem):
                        # As the replay: a gap right after a damaged line is that line's.
                        if not (item.kind == "sequence" and after_problem):
                            search.damaged.append((seg, item))
                        after_problem = True
                        continue
                    after_problem = False
                    if item.kind == K_RUN_START:
                        spec = _spec(spool_run_id, item)
                        if spec is not None:
                            return _Search(_Start(spec, seg, item))
                        self.cx.quarantine(
                            spool_run_id,
                            seg.path,
                            item.line,
                            item.offset,
                            "invalid",
                            "run_start lacks a valid experiment, name or time",
                        )
            except UnsupportedSpoolVersion as exc:
                search.set_aside.append((seg, "version", str(exc)))
            except SpoolError as exc:
                search.set_aside.append((seg, "header", str(exc)))
            except OSError as exc:
                search.why.append(f"{seg.path}: {unreadable_reason(exc)}")
                search.unreadable.append(
                    f"run {spool_run_id}: {seg.path}: {unreadable_reason(exc)}"
                )
        return search

    def _set_aside(self, spool_run_id: str, search: _Search) -> None:
        """Quarantine the segments of a waiting run that can give nothing, once: the replay
        never reads them (the run is not created), so their progress is set to their end."""
        for seg, problem in search.damaged:
            self.cx.quarantine(
                spool_run_id,
                seg.path,
                problem.line,
                problem.offset,
                problem.kind,
                problem.reason,
                problem.raw,
            )
        if search.damaged:
            seg, problem = search.damaged[0]
            search.why.append(
                f"{len(search.damaged)} damaged records in its segments (first: "
                f"{seg.path}:{problem.line}: {problem.reason})"
            )
        for seg, kind, reason in search.set_aside:
            self.cx.quarantine(spool_run_id, seg.path, 1, 0, kind, reason)
            search.why.append(f"{seg.path} is quarantined ({kind})")
        if not search.set_aside:
            return
        self.cx.quarantine_log.sync()  # reported before progress moves past them
        for seg, _, _ in search.set_aside:
            prog = SegmentProgress(seg.rel, spool_run_id, size_seen=seg.size)
            self.cx.state.save_segment(prog)
            self.cx.progress[seg.rel] = prog


def _spec(spool_run_id: str, ev: Event) -> RunSpec | None:
    try:
        return run_spec(spool_run_id, ev)
    except InvalidRecord:
        return None
