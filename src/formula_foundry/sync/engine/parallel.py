"""Several runs replayed at once, toward destinations that gain from it.

An ``mlflow server`` spends most of a ``log_batch`` round trip in its own request handling and
ORM work, and PostgreSQL takes concurrent transactions, so a single client leaves them idle
most of the time. SQLite allows one writer: concurrent writers would only queue on its lock
(``database is locked`` after 20 s), so SQLite — and any destination not known to gain —
keeps one worker (:func:`workers_for`).

A parallel pass (:func:`replay_parallel`) has two phases:

1. **Resolve** — in the calling thread, with the pass's own sink, every pending run is found
   or created in the destination, largest pending data first (the pass lasts as long as its
   slowest worker, so the long runs start early). A parent is created before its children by
   the resolver itself, with ``mlflow.parentRunId``, so no worker ever creates a run, and two
   workers cannot race to create the same parent;
2. **Replay** — ``n`` worker threads take the runs as soon as they are resolved (a lookup and
   a create per run are round trips too: they overlap the replay of the runs before), and
   replay them, one run at a time each, each run wholly in one worker (its events stay in
   spool order). Every worker has its *own* sink from the sink factory (MLflow clients and
   store sessions are not shared across threads by us) and its own
   :class:`~formula_foundry.sync.engine.report.SyncReport`, merged into the pass's report at the
   end. The sync state and the quarantine log are shared; they lock themselves.

Progress is still recorded per segment only after the destination committed the batch.
When a worker fails — the destination stays unavailable through its retries
(:class:`~formula_foundry.errors.StoreUnavailable`), or anything unexpected — the others
stop before their next call to the destination (their batch in flight completes and is
recorded), and the first failure is raised in the calling thread: the pass exits 75 as a
single-threaded pass would. A KeyboardInterrupt in the calling thread stops the workers the
same way, then propagates.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from formula_foundry.config import Settings
from formula_foundry.sync.engine.destination import Destination
from formula_foundry.sync.engine.report import Progress, ProgressFn, SyncReport
from formula_foundry.sync.engine.retry import RetryPolicy
from formula_foundry.sync.engine.runs import RunResolver, SyncContext
from formula_foundry.sync.engine.scan import SegmentFile
from formula_foundry.sync.engine.sink import (
    ArtifactRef,
    BatchLimits,
    DestinationRejected,
    MetricRow,
    RemoteRun,
    RunSpec,
    Sink,
)

# Destinations that take concurrent writers. ``postgres`` is SQLAlchemy's old spelling.
_JOIN_SLICE_S: Final = 0.2


def workers_for(settings: Settings) -> int:
    """How many runs a pass replays at once into ``settings``' destination."""
    if Destination.parse(settings.backend_store_uri).takes_parallel_runs:
        return max(1, settings.sync_workers)
    return 1


class PassStopped(Exception):
    """Another worker failed (or the pass was interrupted): stop before the next call.

    Deliberately not a :class:`StoreUnavailable` (which the retry policy would retry) nor a
    :class:`DestinationRejected` (which the replayer would report against the run).
    """


class StoppableSink:
    """A worker's sink: refuses to start a call once the pass is stopping."""

    def __init__(self, inner: Sink, stop: threading.Event) -> None:
        self.inner, self._stop = inner, stop
        self.description = inner.description
        self.limits: BatchLimits = inner.limits

    def _check(self) -> None:
        if self._stop.is_set():
            raise PassStopped("the pass is stopping")

    def find_run(self, spool_run_id: str, experiment: str | None) -> RemoteRun | None:
        self._check()
        return self.inner.find_run(spool_run_id, experiment)

    def create_run(self, spec: RunSpec) -> RemoteRun:
        self._check()
        return self.inner.create_run(spec)

    def get_params(self, mlflow_run_id: str) -> dict[str, str]:
        self._check()
        return self.inner.get_params(mlflow_run_id)

    def log_batch(
        self,
        mlflow_run_id: str,
        metrics: Sequence[MetricRow],
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> None:
        self._check()
        self.inner.log_batch(mlflow_run_id, metrics, params, tags)

    def log_artifact_ref(self, mlflow_run_id: str, ref: ArtifactRef) -> None:
        self._check()
        self.inner.log_artifact_ref(mlflow_run_id, ref)

    def upload_artifacts(
        self, mlflow_run_id: str, files: Sequence[tuple[ArtifactRef, Path]]
    ) -> list[tuple[ArtifactRef, str]]:
        self._check()
        return self.inner.upload_artifacts(mlflow_run_id, files)

    def delete_tag(self, mlflow_run_id: str, key: str) -> None:
        self._check()
        self.inner.delete_tag(mlflow_run_id, key)

    def set_status(self, mlflow_run_id: str, status: str, end_time: int | None) -> None:
        self._check()
        self.inner.set_status(mlflow_run_id, status, end_time)

    def close(self) -> None:
        self.inner.close()


def _worker_policy(policy: RetryPolicy, stop: threading.Event) -> RetryPolicy:
    """The pass's policy, whose backoff ends early when the pass is stopping."""
    if policy.sleep is time.sleep:

        def wait(seconds: float) -> None:
            stop.wait(seconds)

        return dataclasses.replace(policy, sleep=wait)
    outer = policy.sleep  # a test's clock: keep it, only skip it once stopping

    def sleep(seconds: float) -> None:
        if not stop.is_set():
            outer(seconds)

    return dataclasses.replace(policy, sleep=sleep)


class _Worker:
    """One thread: its own sink, context, report and replayer."""

    def __init__(self, pool: _Pool, index: int) -> None:
        self.pool, self.index = pool, index
        self.report = SyncReport(pool.cx.report.destination, pool.cx.report.state_folder)
        self.runs_done = 0
        self.thread = threading.Thread(target=self._main, name=f"ff-sync-{index}", daemon=False)

    def _main(self) -> None:
        pool = self.pool
        try:
            policy = _worker_policy(pool.cx.policy, pool.stop)
            inner = policy.call(pool.sink_factory)
            sink = StoppableSink(inner, pool.stop)
            try:
                from formula_foundry.sync.engine.replayer import Replayer

                cx = dataclasses.replace(pool.cx, sink=sink, report=self.report, policy=policy)
                replayer = Replayer(cx, pool.resolver, pool.emit, pool.runs_total)
                while not pool.stop.is_set():
                    spool_run_id = pool.next_run()
                    if spool_run_id is None:
                        break
                    try:
                        replayer.replay_run(spool_run_id, pool.pending[spool_run_id])
                    finally:
                        self.runs_done = replayer.runs_done
            finally:
                sink.close()
        except PassStopped:
            pass
        except BaseException as exc:  # re-raised by the calling thread
            pool.fail(exc)


class _Pool:
    def __init__(
        self,
        cx: SyncContext,
        resolver: RunResolver,
        sink_factory: Callable[[], Sink],
        pending: dict[str, list[SegmentFile]],
        progress_fn: ProgressFn | None,
        runs_total: int,
    ) -> None:
        self.cx, self.resolver, self.sink_factory = cx, resolver, sink_factory
        self.pending, self.progress_fn = pending, progress_fn
        self.runs_total, self.runs_done_before = runs_total, 0
        self.stop = threading.Event()
        self._queue: collections.deque[str] = collections.deque()
        self._closed = False  # the resolver has handed over every run it will
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)
        self._errors: list[BaseException] = []
        self.workers: list[_Worker] = []

    def add_worker(self) -> _Worker:
        worker = _Worker(self, len(self.workers))
        with self._lock:  # emit() sums over the workers meanwhile
            self.workers = [*self.workers, worker]
        return worker

    def push(self, spool_run_id: str) -> None:
        """Hand a resolved run to the workers (first pushed, first taken)."""
        with self._lock:
            self._queue.append(spool_run_id)
            self._more.notify()

    def close(self) -> None:
        """No more runs: workers end once the queue is empty."""
        with self._lock:
            self._closed = True
            self._more.notify_all()

    def skipped(self) -> None:
        """A run that waits or was refused counts as done for the progress display."""
        with self._lock:
            self.runs_done_before += 1

    def next_run(self) -> str | None:
        """The next resolved run; ``None`` once the pass is over or stopping."""
        with self._lock:
            while not self._queue and not self._closed and not self.stop.is_set():
                self._more.wait()
            if self.stop.is_set() or not self._queue:
                return None
            return self._queue.popleft()

    def halt(self) -> None:
        """Stop every worker before its next call to the destination."""
        self.stop.set()
        with self._lock:
            self._more.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)
        self.halt()

    def first_error(self) -> BaseException | None:
        with self._lock:
            return self._errors[0] if self._errors else None

    def emit(self, p: Progress) -> None:
        """Progress of the whole pass, from whichever worker committed a batch."""
        if self.progress_fn is None:
            return
        # One caller at a time, so a display callback need not be thread-safe; counters only
        # grow, so figures read under the lock never go backwards from one call to the next.
        with self._lock:
            done = self.runs_done_before + sum(w.runs_done for w in self.workers)
            events = sum(w.report.events for w in self.workers)
            metrics = sum(w.report.metrics for w in self.workers)
            self.progress_fn(Progress(done, self.runs_total, events, metrics, p.spool_run_id))


def replay_parallel(
    cx: SyncContext,
    resolver: RunResolver,
    sink_factory: Callable[[], Sink],
    order: list[str],
    pending: dict[str, list[SegmentFile]],
    progress_fn: ProgressFn | None,
    workers: int,
) -> None:
    """Resolve every run of ``order`` here, while up to ``workers`` threads replay them."""

    def pending_bytes(spool_run_id: str) -> int:
        total = 0
        for seg in pending[spool_run_id]:
            prog = cx.progress.get(seg.rel)
            total += seg.size - (prog.offset if prog else 0)
        return total

    position = {run: i for i, run in enumerate(order)}
    by_size = sorted(order, key=lambda run: (-pending_bytes(run), position[run]))
    pool = _Pool(cx, resolver, sink_factory, pending, progress_fn, len(order))
    try:
        for spool_run_id in by_size:
            if pool.stop.is_set():
                break
            try:
                ctx = resolver.ensure_run(spool_run_id)
            except DestinationRejected as exc:
                cx.report.blocked.append(f"run {spool_run_id}: {exc}")
                ctx = None
            if ctx is None:
                pool.skipped()  # waits or refused: reported by the resolver, as a serial pass
                continue
            pool.push(spool_run_id)
            if len(pool.workers) < workers:  # one more thread per resolved run, up to n
                pool.add_worker().thread.start()
        pool.close()
        for w in pool.workers:
            # A timed join keeps the calling thread responsive to KeyboardInterrupt.
            while w.thread.is_alive():
                w.thread.join(_JOIN_SLICE_S)
    except BaseException:
        pool.halt()
        for w in pool.workers:
            w.thread.join()
        raise
    finally:
        cx.report.workers = max(1, len(pool.workers))
        for w in pool.workers:
            cx.report.merge(w.report)
    error = pool.first_error()
    if error is not None:
        raise error
