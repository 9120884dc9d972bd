"""One sync pass: lock the destination, find what is new, replay it, report.

``sync_once(settings)`` is what ``ff-sync`` runs. In order:

1. check the destination URI and that MLflow is installed (without importing it);
2. take ``<state dir>/<destination key>/sync.lock`` (wait up to ``sync.lock_timeout_s``, then
   :class:`~formula_foundry.errors.SyncLocked`, exit 75): one pass per destination at a time;
3. scan the spool root — a ``stat`` per segment, no file opened — and compare each size with
   the size the state last saw. Nothing changed (and, for SQLite, the store file still is the
   one the state describes: :func:`~formula_foundry.sync.engine.destination_id.sqlite_problem`):
   return at once, without importing MLflow;
4. open the destination (with retries) and check that it is the one the state describes
   and that no other state folder syncs this spool into it
   (:mod:`formula_foundry.sync.engine.destination_id`): a lost or restored destination gets
   everything again, another owner is refused (exit 2); then replay the pending segments run
   by run, runs ordered by their oldest pending segment (parents are created before children
   anyway); toward a server (HTTP, PostgreSQL) ``sync.workers`` runs at a time
   (:mod:`formula_foundry.sync.engine.parallel`), toward SQLite one;
5. end dead runs: RUNNING runs silent for ``sync.stale_after_s``, or whose batch job the
   scheduler says has ended, become KILLED (:mod:`formula_foundry.sync.engine.stale`,
   :mod:`formula_foundry.sync.engine.scheduler`). Step 3 opens the destination for them too;
6. bring the captured consoles up to date (:mod:`formula_foundry.sync.engine.console_upload`);
   step 3 opens the destination for what an earlier pass left undone there too.

A first pass that fails before the destination was claimed (driver missing, store refused)
leaves no state folder behind. A destination that stays unavailable through
``sync.retries`` retries ends the pass with :class:`~formula_foundry.errors.StoreUnavailable`
(exit 75); what was committed before is recorded, nothing after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path

from formula_foundry.config import Settings, load_settings, resolve_store_uri
from formula_foundry.errors import ConfigError, MlflowMissing, SyncError, SyncLocked
from formula_foundry.ids import is_run_id
from formula_foundry.sync.engine.console_upload import console_owed, upload_console
from formula_foundry.sync.engine.destination import INSTALL_HINT, Destination
from formula_foundry.sync.engine.destination_id import (
    SPOOL_TAG,
    DestinationMarks,
    IdentitySink,
    decide,
    owner_label,
    spool_key,
    sqlite_path,
    sqlite_problem,
    state_tag,
)
from formula_foundry.sync.engine.parallel import replay_parallel, workers_for
from formula_foundry.sync.engine.quarantine_log import QuarantineLog
from formula_foundry.sync.engine.report import ProgressFn, SyncReport
from formula_foundry.sync.engine.retry import RetryPolicy
from formula_foundry.sync.engine.runs import RunResolver, SyncContext
from formula_foundry.sync.engine.scan import SegmentFile, scan_spool_report
from formula_foundry.sync.engine.scheduler import Verdict, ask
from formula_foundry.sync.engine.sink import IdentityUnavailable, Sink
from formula_foundry.sync.engine.stale import end_stale, find_stale
from formula_foundry.sync.engine.sync_state import (
    LOCK_FILE,
    QUARANTINE_FILE,
    SegmentProgress,
    SyncState,
    prepare_folder,
)

SinkFactory = Callable[[Settings], Sink]


def load_sync_settings(
    config: Path | str | None = None,
    *,
    tracking_uri: str | None = None,
    spool_root: Path | str | None = None,
) -> Settings:
    """Settings from the config file and environment, then the command-line overrides."""
    settings = load_settings(config)
    changes: dict[str, object] = {}
    if tracking_uri is not None:
        if not tracking_uri.strip():
            raise ConfigError("--tracking-uri must not be empty")
        changes["backend_store_uri"] = resolve_store_uri(tracking_uri, Path.cwd())
    if spool_root is not None:
        changes["spool_root"] = Path(spool_root).expanduser().absolute()
    return dataclasses.replace(settings, **changes) if changes else settings  # type: ignore[arg-type]


def check_destination(uri: str) -> None:
    """Reject a tracking URI ff-sync cannot use, before any work."""
    Destination.parse(uri)


def mlflow_sink(settings: Settings) -> Sink:
    """The default sink factory: the MLflow client adapter (imports mlflow)."""
    from formula_foundry.sync.mlflow.client_sink import open_sink

    return open_sink(settings)


def sync_once(
    settings: Settings,
    *,
    replay: bool = False,
    progress: ProgressFn | None = None,
    sink_factory: SinkFactory | None = None,
    retry: RetryPolicy | None = None,
) -> SyncReport:
    """Sync everything pending under ``settings.spool_root`` into the configured destination.

    ``replay=True`` first forgets this destination's progress, so everything is sent again
    (after restoring the destination from a backup); the result is the same state.
    Raises :class:`SyncLocked` or :class:`StoreUnavailable` (exit 75), :class:`ConfigError` or
    :class:`MlflowMissing` (exit 2); everything else ends up in the report.
    """
    started = time.monotonic()
    destination = Destination.parse(settings.backend_store_uri)
    if sink_factory is None and importlib.util.find_spec("mlflow") is None:
        raise MlflowMissing(f"MLflow is not installed on this host; run: {INSTALL_HINT}")
    dest = destination.shown
    fresh = not (settings.sync_state_dir / destination.key).exists()
    folder = prepare_folder(settings.sync_state_dir, destination.key, dest)
    report = SyncReport(destination=dest, state_folder=folder)
    policy = retry or RetryPolicy(settings.sync_retries, settings.sync_backoff_s)

    import filelock

    lock = filelock.FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=settings.sync_lock_timeout_s)
    except filelock.Timeout:
        raise SyncLocked(
            f"another ff-sync is syncing to {dest} (lock {folder / LOCK_FILE} still held after "
            f"{settings.sync_lock_timeout_s:g} s); try again later"
        ) from None
    unused = False
    try:
        state = SyncState(folder)
        try:
            _pass(settings, state, report, replay, progress, sink_factory or mlflow_sink, policy)
        except sqlite3.Error as exc:
            raise SyncError(f"sync state {state.path}: {exc}") from None
        except BaseException:
            # A failed first attempt (driver missing, store refused, a typo) leaves nothing
            # behind: an empty state folder would only hold back ff-sync gc.
            with contextlib.suppress(sqlite3.Error):
                unused = fresh and state.identity()[0] is None and not state.has_progress()
            raise
        finally:
            state.close()
    finally:
        lock.release()
        if unused:
            shutil.rmtree(folder, ignore_errors=True)
    report.seconds = time.monotonic() - started
    report.mlflow_imported = "mlflow" in sys.modules
    return report


def _pass(
    settings: Settings,
    state: SyncState,
    report: SyncReport,
    replay: bool,
    progress_fn: ProgressFn | None,
    sink_factory: SinkFactory,
    policy: RetryPolicy,
) -> None:
    if replay:
        state.reset()
    files, unscanned = _scan(settings, report)
    progress = state.segments()
    pending = _pending(files, progress)
    # One scheduler query per pass (engine/scheduler.py): here when nothing is pending, else
    # after the replay, so runs created in this pass are judged too.
    verdict = _ask_scheduler(state, unscanned, report) if not pending and not replay else None
    alive = verdict.alive if verdict is not None else set()
    stale = find_stale(state, settings.stale_after_s, pending.keys() | unscanned | alive)
    idle = not pending and not stale and not replay and not (verdict and verdict.ended)
    if idle and not console_owed(state):
        state_id, generation = state.identity()
        uri = settings.backend_store_uri
        problem = sqlite_problem(
            uri, state_id, generation, state.has_progress(), settings.spool_root
        )
        if problem is None:
            report.idle = True
            if not settings.spool_root.is_dir():
                report.warnings.append(f"spool root {settings.spool_root} does not exist")
            return
    created = _new_sqlite_store(settings.backend_store_uri, report)
    sink = policy.call(lambda: sink_factory(settings))
    try:
        identity = None
        if isinstance(sink, IdentitySink):
            try:
                identity = _check_identity(settings, state, report, sink, replay, created, policy)
            except IdentityUnavailable as exc:
                report.warnings.append(
                    f"{exc}: the checks for a lost destination and for a second state folder "
                    "are off for this destination"
                )
        if identity is not None and identity[2]:  # the state was reset: all is pending
            progress = {}
            pending = _pending(files, progress)
        files_by_run: dict[str, list[SegmentFile]] = {}
        for seg in files:
            files_by_run.setdefault(seg.spool_run_id, []).append(seg)
        cx = SyncContext(
            sink=sink,
            state=state,
            progress=progress,
            quarantine_log=QuarantineLog(report.state_folder / QUARANTINE_FILE),
            report=report,
            policy=policy,
            files_by_run=files_by_run,
            stale_after_s=settings.stale_after_s,
            upload_max_bytes=settings.sync_upload_max_bytes,
        )
        _replay(cx, lambda: sink_factory(settings), workers_for(settings), pending, progress_fn)
        _end_dead(cx, settings, unscanned, pending.keys(), verdict)
        upload_console(cx, files)  # after the runs it ends: their consoles become final
        if identity is not None and isinstance(sink, IdentitySink):
            # Again at the end: a backup taken during this pass is then older than the state.
            with contextlib.suppress(IdentityUnavailable):
                _bump(sink, state, identity[0], identity[1] + 1, report, policy)
    finally:
        sink.close()


def _scan(settings: Settings, report: SyncReport) -> tuple[list[SegmentFile], set[str]]:
    """The spool's segments, and the runs with a folder that could not be read."""
    scan = scan_spool_report(settings.spool_root)
    files = scan.segments
    # Named on every pass, never followed nor fatal; their runs are not judged dead meanwhile.
    report.unreadable += [s.describe() for s in scan.skipped]
    odd = sorted({f.spool_run_id for f in files if not is_run_id(f.spool_run_id)})
    if odd:
        files = [f for f in files if f.spool_run_id not in odd]
        report.warnings += [
            f"ignored spool folder {settings.spool_root / n}: not a run id" for n in odd
        ]
    return files, scan.skipped_runs


def _pending(
    files: list[SegmentFile], progress: dict[str, SegmentProgress]
) -> dict[str, list[SegmentFile]]:
    """Per run, its segments with something the destination has not acknowledged."""
    pending: dict[str, list[SegmentFile]] = {}
    for seg in files:
        seen = progress.get(seg.rel)
        if seen is None or seen.size_seen != seg.size:
            pending.setdefault(seg.spool_run_id, []).append(seg)
    return pending


def _new_sqlite_store(uri: str, report: SyncReport) -> bool:
    """True (with a warning naming it) if this pass is about to create a SQLite store."""
    db = sqlite_path(uri)
    try:
        created = db is not None and not db.exists()
    except OSError:
        return False  # cannot look: opening the store says what is wrong
    if created and db is not None:
        report.warnings.append(
            f"creating a new MLflow store at {db.absolute()} (no file there yet; if the path "
            "is a typo, delete that file and its state folder and fix the tracking URI)"
        )
    return created


def _replay(
    cx: SyncContext,
    new_sink: Callable[[], Sink],
    workers: int,
    pending: dict[str, list[SegmentFile]],
    progress_fn: ProgressFn | None,
) -> None:
    """Replay every pending run, oldest first; several at once toward a server."""
    resolver = RunResolver(cx)
    order = sorted(pending, key=lambda run: (min(s.order for s in pending[run]), run))
    workers = min(workers, len(order))
    cx.report.workers = workers
    if workers > 1:
        replay_parallel(cx, resolver, new_sink, order, pending, progress_fn, workers)
        return
    from formula_foundry.sync.engine.replayer import Replayer

    replayer = Replayer(cx, resolver, progress_fn, len(pending))
    for spool_run_id in order:
        replayer.replay_run(spool_run_id, pending[spool_run_id])


def _end_dead(
    cx: SyncContext,
    settings: Settings,
    unscanned: set[str],
    replayed: Collection[str],
    verdict: Verdict | None,
) -> None:
    """Dead runs (engine/stale.py), judged after the replay: those whose job has ended,
    whatever the silence; and silent ones, except those that grew during this pass or whose
    job the scheduler says is alive."""
    state, report = cx.state, cx.report
    if verdict is None:
        verdict = _ask_scheduler(state, unscanned, report)
    busy = set(replayed) | unscanned | verdict.alive | verdict.ended.keys()
    dead = [r for r in state.live_runs() if r.spool_run_id in verdict.ended]
    dead += find_stale(state, settings.stale_after_s, busy)
    end_stale(cx.sink, state, dead, report, cx.policy, verdict.ended)


def _ask_scheduler(state: SyncState, unscanned: set[str], report: SyncReport) -> Verdict:
    live = [r for r in state.live_runs() if r.spool_run_id not in unscanned]
    verdict = ask(live, state.jobs()) if live else Verdict()
    if verdict.warning:
        report.warnings.append(verdict.warning)
    return verdict


def _check_identity(
    settings: Settings,
    state: SyncState,
    report: SyncReport,
    sink: IdentitySink,
    replay: bool,
    created: bool,
    policy: RetryPolicy,
) -> tuple[str, int, bool]:
    """Compare the destination's identity with the state, act on it, raise the generation
    (destination first, then state). Returns the state id, the generation of this pass, and
    whether the state's progress was forgotten."""
    state_id, generation = state.identity()
    marks = DestinationMarks.parse(policy.call(sink.identity_tags))
    verdict = decide(
        marks,
        state_id=state_id,
        generation=generation,
        has_progress=state.has_progress(),
        created=created,
        spool=settings.spool_root,
        owner=owner_label(report.state_folder),
        replay=replay,
        description=report.destination,
    )
    if verdict.refusal is not None:
        raise ConfigError(verdict.refusal)
    if verdict.warning is not None:
        report.warnings.append(verdict.warning)
    if verdict.reset:
        state.reset()
    sid = verdict.state_id
    mark = marks.states.get(sid)
    new = max(generation, mark.generation if mark is not None else 0) + 1
    _bump(sink, state, sid, new, report, policy)
    key = f"{SPOOL_TAG}{spool_key(settings.spool_root)}"
    if marks.spools.get(spool_key(settings.spool_root)) != sid:
        policy.call(lambda: sink.set_identity_tag(key, sid))
        # Read it back: of two new state folders claiming at once, one learns it lost.
        again = DestinationMarks.parse(policy.call(sink.identity_tags))
        holder = again.spools.get(spool_key(settings.spool_root))
        if holder != sid:
            other = again.states.get(holder or "")
            raise ConfigError(
                f"{report.destination}: another sync state folder "
                f"({other.owner if other else holder}) claimed the spool "
                f"{settings.spool_root} at the same time; run ff-sync again"
            )
    return sid, new, verdict.reset


def _bump(
    sink: IdentitySink,
    state: SyncState,
    state_id: str,
    generation: int,
    report: SyncReport,
    policy: RetryPolicy,
) -> None:
    key, value = state_tag(state_id, generation, owner_label(report.state_folder))
    policy.call(lambda: sink.set_identity_tag(key, value))
    state.set_identity(state_id, generation)
