"""The runs this process logs through the drop-in: their spool writers and what they hold.

Every write is checked with the tracker's rules (:mod:`formula_foundry.tracking.events`) and
becomes the tracker's events, written by the tracker's :class:`SegmentWriter`: one call, one
``os.write``, in the kernel before the call returns. A run keeps in memory what ``get_run``
answers (params, tags, the latest point of each metric, status), so reading the active run
never re-reads the spool; metric history is read back from the spool when asked for.

A run this process did not create is opened on first use: its state is read from the spool
once (:mod:`formula_foundry.dropin.spool_runs`), then a new segment of its own is written —
with a resuming ``run_start`` when MLflow resumes it (``update_run_info(RUNNING)``, as
``mlflow.start_run(run_id=...)`` does), without one when code merely logs into it.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from formula_foundry.dropin.experiments import Experiment, ExperimentBook
from formula_foundry.dropin.points import MetricRow, newer
from formula_foundry.dropin.points import batch_latest as _batch_latest
from formula_foundry.dropin.points import check_step as _step
from formula_foundry.dropin.points import check_time as _time
from formula_foundry.dropin.points import key_json as _key_json
from formula_foundry.dropin.points import merge_pending as _merge_pending
from formula_foundry.dropin.points import metric_groups as _metric_groups
from formula_foundry.dropin.points import valid_key as _valid_key
from formula_foundry.dropin.spool_runs import RunState, read_run
from formula_foundry.errors import ParamConflictError, RunStateError, ValidationError
from formula_foundry.tracking.events import (
    CREATION_SYSTEM_TAGS,
    END_STATUSES,
    FORMAT_VERSION,
    INT64_MAX,
    INT64_MIN,
    K_METRICS,
    K_PARAMS,
    K_RUN_END,
    K_RUN_START,
    K_TAG_DELETE,
    K_TAGS,
    MAX_PARAM_VALUE_LENGTH,
    MAX_RUN_NAME_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    RUN_NAME_TAG,
    SOURCE_TYPES,
    check_name,
    int64,
    metric_value,
    reserved_tag_reason,
    string_value,
)
from formula_foundry.tracking.liveness import install_sigterm, start_heartbeat
from formula_foundry.tracking.resume import (
    check_run_id,
    find_origin,
    give_back_ff_run_id,
    take_ff_run_id,
)
from formula_foundry.tracking.scheduler import job_from_env
from formula_foundry.tracking.spool_writer import (
    SegmentWriter,
    hostname,
    is_segment_name,
    now_ms,
    utf8_text,
)

_V: Final = FORMAT_VERSION
# Tags MLflow's clients put on a new run that the spool carries in run_start instead (the
# sync writes them back from there, as it does for tracker runs).
PARENT_TAG: Final = "mlflow.parentRunId"
USER_TAG: Final = "mlflow.user"
SOURCE_NAME_TAG: Final = "mlflow.source.name"
SOURCE_TYPE_TAG: Final = "mlflow.source.type"
_dumps = orjson.dumps


_BOOKS: dict[Path, RunBook] = {}
_BOOKS_LOCK = threading.Lock()


def _books_after_fork() -> None:
    global _BOOKS_LOCK
    _BOOKS_LOCK = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_books_after_fork)


@dataclass
class LiveRun:
    """A run this process writes: its identity, what get_run answers, and its writer."""

    state: RunState
    writer: SegmentWriter
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The run's segments other processes write, (name, size), when ``state`` was last read
    # from the spool (None: not known, read it again on the next look).
    others: tuple[tuple[str, int], ...] | None = ()


def run_book(root: Path, durability: str, heartbeat_s: float) -> RunBook:
    """The :class:`RunBook` of the spool ``root`` in this process, made on first use.

    MLflow builds a tracking store per URI (``spool:``, ``spool:///abs`` may name one folder)
    and an artifact repository per run; all of them write a run through this one book, so a
    process has one writer, one segment and one in-memory state per run. The first caller's
    durability and heartbeat settings hold for the process (they come from the same settings).
    """
    with _BOOKS_LOCK:
        book = _BOOKS.get(root)
        if book is None:
            book = RunBook(root, ExperimentBook(root), durability, heartbeat_s)
            _BOOKS[root] = book
        return book


class RunBook:
    """The runs this process writes into one spool root (see :func:`run_book`)."""

    def __init__(
        self, root: Path, experiments: ExperimentBook, durability: str, heartbeat_s: float
    ):
        self.root = root
        self.experiments = experiments
        self.durability = durability
        self.heartbeat_s = heartbeat_s
        self._live: dict[str, LiveRun] = {}
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork)

    # -- runs ------------------------------------------------------------------------------

    def create(
        self,
        experiment: Experiment,
        user: str | None,
        start_time: int | None,
        tags: dict[str, str],
        run_name: str | None,
        default_name: Callable[[], str],
    ) -> RunState:
        """Start a new run: a ``run_start`` and, if any, its tags, in one write.

        ``$FF_RUN_ID`` names the process's first top-level run, as for the tracker: a requeued
        job running unmodified MLflow code continues that run (new segment, same run) instead
        of starting another.
        """
        env_id = os.environ.get("FF_RUN_ID") if PARENT_TAG not in tags else None
        if not env_id:
            return self._create(experiment, user, start_time, tags, run_name, default_name, None)
        run_id = take_ff_run_id(env_id)
        try:
            existing = read_run(self.root, run_id)
            if existing is None or not existing.started:
                return self._create(
                    experiment, user, start_time, tags, run_name, default_name, run_id
                )
            return self._continue(existing, experiment, tags, run_name)
        except BaseException:
            give_back_ff_run_id()  # this start failed: the name is still free
            raise

    def _continue(
        self, state: RunState, experiment: Experiment, tags: dict[str, str], run_name: str | None
    ) -> RunState:
        """``$FF_RUN_ID``'s run exists: resume it, with this start's own tags and name."""
        if experiment.name != state.experiment and experiment.experiment_id != "0":
            raise ValidationError(
                f"FF_RUN_ID={state.run_id} belongs to experiment {state.experiment!r}; cannot "
                f"continue it in {experiment.name!r}"
            )
        own = {
            k: v
            for k, v in tags.items()
            if k not in (RUN_NAME_TAG, PARENT_TAG, USER_TAG, SOURCE_NAME_TAG, SOURCE_TYPE_TAG)
        }
        checked = _checked_tags(own, state.run_id)
        live = LiveRun(state, self._writer(state.run_id), others=None)
        with self._lock:
            self._live[state.run_id] = live
        self._reopen(live)
        self._register(live, owner=True)
        name = tags.get(RUN_NAME_TAG) or run_name
        if name and name != state.name:
            self.rename(state.run_id, name)
        if checked:
            self.log_batch(state.run_id, [], [], list(checked.items()))
        return state

    def _create(
        self,
        experiment: Experiment,
        user: str | None,
        start_time: int | None,
        tags: dict[str, str],
        run_name: str | None,
        default_name: Callable[[], str],
        run_id: str | None,
    ) -> RunState:
        tags = dict(tags)
        tag_name = tags.get(RUN_NAME_TAG)
        if run_name and tag_name and run_name != tag_name:  # MLflow's store refuses it so
            raise ValidationError(
                "Both 'run_name' argument and 'mlflow.runName' tag are specified, but with "
                f"different values (run_name='{run_name}', mlflow.runName='{tag_name}')."
            )
        # MLflow's store draws a random name only for a run without one (a seeded script
        # must see the same random numbers either way).
        name = _run_name(tags.pop(RUN_NAME_TAG, "") or run_name or default_name())
        # The client adds these tags only where the fluent API resolved them; the run gets
        # exactly those (run_start's system_tags).
        given = [k for k in CREATION_SYSTEM_TAGS if tags.get(k)]
        parent: str | None = tags.pop(PARENT_TAG, "") or None
        if parent is not None:
            parent = check_run_id(parent)
            # The parent's first segment heads are enough (its spool may be large).
            if parent not in self._live and find_origin(self.root, parent) is None:
                raise ValidationError(f"parent run {parent} is not in the spool {self.root}")
        user = utf8_text(tags.pop(USER_TAG, "") or user or "unknown")
        source = utf8_text(tags.pop(SOURCE_NAME_TAG, "") or _default_source())
        source_type = tags.pop(SOURCE_TYPE_TAG, "") or "LOCAL"
        if source_type not in SOURCE_TYPES:
            raise ValidationError(
                f"tag {SOURCE_TYPE_TAG}={source_type!r}: MLflow knows only "
                + ", ".join(sorted(SOURCE_TYPES))
            )
        run_id = run_id or uuid.uuid4().hex
        checked = _checked_tags(tags, run_id)
        t = (
            now_ms()
            if start_time is None
            else int64(start_time, "start_time", "<run>", run_id, minimum=1)
        )
        state = RunState(
            run_id=run_id,
            experiment=experiment.name,
            name=name,
            user=user,
            start_time=t,
            parent=parent,
            tags={
                **{
                    k: v
                    for k, v in (
                        (USER_TAG, user),
                        (SOURCE_NAME_TAG, source),
                        (SOURCE_TYPE_TAG, source_type),
                    )
                    if k in given
                },
                RUN_NAME_TAG: name,
                **({PARENT_TAG: parent} if parent else {}),
                **checked,
            },
        )
        live = LiveRun(state, self._writer(run_id))
        start = self._run_start(state, t, resume=False, source=source, source_type=source_type)
        start["system_tags"] = given
        records = [start]
        if checked:
            records.append({"v": _V, "s": 0, "t": t, "k": K_TAGS, "d": checked})
        live.writer.append_many(records)
        self._register(live, owner=True)
        return state

    def get(self, run_id: str) -> RunState | None:
        """The run's state: from memory if this process writes it, else read from the spool."""
        live = self._live.get(run_id)
        if live is not None:
            with live.lock:
                if live.state.pending is not None:
                    _merge_pending(live.state)
                self._fold_others(live)
            return live.state
        if not isinstance(run_id, str) or not run_id or "/" in run_id or run_id.startswith("."):
            return None
        return read_run(self.root, run_id)

    def _fold_others(self, live: LiveRun) -> None:
        """Read the run again from the spool if other processes wrote into it since it was
        last read (workers resumed it): this process's answers (``get_run``, ``search_runs``)
        must not be older than the spool. Its own events are flushed first (``buffered``)."""
        run_id = live.state.run_id
        others = _other_segments(self.root / run_id, live.writer.path)
        if others == live.others:
            return
        live.writer.flush()
        fresh = read_run(self.root, run_id)
        if fresh is not None:
            fresh.opened_here = live.state.opened_here
            live.state = fresh
        live.others = others

    def live(self, run_id: str, *, resume: bool = False) -> LiveRun:
        """The run as this process writes it; opened from the spool on first use."""
        live = self._live.get(run_id)
        if live is not None:
            if resume and live.state.status != "RUNNING":
                self._reopen(live)
                live.state.opened_here = True
            return live
        with self._lock:
            live = self._live.get(run_id)
            if live is None:
                others = _other_segments(self.root / check_run_id(run_id), None)
                state = read_run(self.root, run_id)
                if state is None or not state.started:
                    raise RunStateError(f"run {run_id} is not in the spool {self.root}")
                live = LiveRun(state, self._writer(run_id), others=others)
                self._live[run_id] = live
                opened = True
            else:
                opened = False
        if resume and (opened or live.state.status != "RUNNING"):
            self._reopen(live)
        self._register(live, owner=resume)
        return live

    def _reopen(self, live: LiveRun) -> None:
        state = live.state
        with live.lock:
            t = now_ms()
            live.writer.append(self._run_start(state, t, resume=True))
            state.status, state.end_time = "RUNNING", None

    def end(
        self, run_id: str, status: str, end_time: int | None, reason: str | None = None
    ) -> None:
        if status not in END_STATUSES:
            raise ValidationError(
                f"run {run_id}: a spool run can be set to RUNNING, FINISHED, FAILED or KILLED, "
                f"not {status!r}"
            )
        live = self.live(run_id)
        record: dict[str, Any] = {"v": _V, "s": 0, "t": now_ms(), "k": K_RUN_END, "status": status}
        if end_time is None:
            record["end_time"] = None  # MLflow's update_run(status=...) sets no end time
        else:
            record["t"] = int64(end_time, "end_time", "<run>", run_id, minimum=1)
        if reason is not None:
            record["reason"] = reason
        with live.lock:
            live.writer.append(record)
            # Durability "buffered": the run's events reach the file at its end, as the
            # tracker's do (a process that then leaves by os._exit or SIGTERM keeps them).
            live.writer.flush()
            live.state.status, live.state.end_time = (
                status,
                (None if end_time is None else record["t"]),
            )

    def rename(self, run_id: str, name: str) -> None:
        live = self.live(run_id)
        name = _run_name(name)
        with live.lock:
            live.writer.append(
                {"v": _V, "s": 0, "t": now_ms(), "k": K_TAGS, "d": {RUN_NAME_TAG: name}}
            )
            live.state.name = name
            live.state.tags[RUN_NAME_TAG] = name

    def delete_tag(self, run_id: str, key: object) -> None:
        """Delete a tag: MLflow's rule (it must be set), then a ``tag_delete`` event."""
        live = self._live.get(run_id) or self.live(run_id)
        if not isinstance(key, str) or key not in live.state.tags:
            raise RunStateError(f"No tag with name: {key} in run with id {run_id}")
        k = _valid_key(key, "tag", run_id)
        reason = reserved_tag_reason(k)
        if reason is not None:
            raise ValidationError(f"run {run_id}: {reason}")
        with live.lock:
            live.writer.append({"v": _V, "s": 0, "t": now_ms(), "k": K_TAG_DELETE, "keys": [k]})
            del live.state.tags[k]

    def flush(self, run_id: str) -> None:
        """Write what a buffered writer of this run holds, so a read of the spool sees it."""
        live = self._live.get(run_id)
        if live is not None:
            live.writer.flush()

    def _end_killed(self, reason: str) -> None:
        self.end_all("KILLED", reason)

    def end_all(self, status: str, reason: str | None = None) -> None:
        """End every run this process created or resumed and has not ended (SIGTERM)."""
        for live in list(self._live.values()):
            if live.state.status == "RUNNING" and live.state.opened_here:
                try:
                    self.end(live.state.run_id, status, now_ms(), reason)
                except Exception:  # one failing run must not keep the others open
                    continue

    # -- writes ----------------------------------------------------------------------------

    def log_metric(
        self, run_id: str, key: str, value: object, timestamp: object, step: object
    ) -> None:
        """One point: the tracker's hot path (one line, one write)."""
        try:
            kj = _key_json[key]
        except (KeyError, TypeError):
            kj = _dumps(_valid_key(key, "metric", run_id))
        if value.__class__ is float and value - value == 0.0:
            v: float = value
            vj = _dumps(value)
        else:
            vj = _dumps(metric_value(value, key, run_id))
            v = float(value)  # type: ignore[arg-type]
        s: int = (
            step
            if step.__class__ is int and INT64_MIN <= step <= INT64_MAX
            else _step(step, key, run_id)
        )
        t: int = (
            timestamp
            if timestamp.__class__ is int and 0 <= timestamp <= INT64_MAX
            else _time(timestamp, key, run_id)
        )
        live = self._live.get(run_id) or self.live(run_id)
        live.writer.append_metric(t, s, kj, vj)
        # The writer serialises the write itself; the run's lock only guards the latest point
        # (a maximum: updates commute, so they need not be atomic with the write). Explicit
        # acquire/release: a ``with`` costs twice as much on this path.
        lock = live.lock
        lock.acquire()
        try:
            latest = live.state.latest
            old = latest.get(key)
            if old is None or s > old[0] or (s == old[0] and newer((s, t, v), old)):
                latest[key] = (s, t, v)
        finally:
            lock.release()

    def log_group(self, run_id: str, t: int, s: int, d: dict[str, float]) -> bool:
        """``log_metrics`` as the fluent API sends it, as one event, without the general path's
        per-point checks; False (nothing written) if it is not that: a run this process
        already writes, keys checked before, finite values, ``t`` and ``s`` in range.

        The caller gives ``t``, ``s`` as ``int`` and every value as ``float`` (exact types).
        """
        live = self._live.get(run_id)
        if (
            live is None
            or not d.keys() <= _key_json.keys()
            or not (0 <= t <= INT64_MAX and INT64_MIN <= s <= INT64_MAX)
        ):
            return False
        total = sum(d.values())  # finite only if every value is: NaN and ±inf need a spelling
        if total - total != 0.0:
            return False
        try:
            dj = _dumps(d)
        except TypeError:  # a str subclass equal to a known key: the general path converts it
            return False
        live.writer.append_metric_events([(t, s, dj)])
        # Training logs the same keys at a rising step: each group then supersedes the one
        # before, and only the newest needs merging into the latest points, when they are read
        # (merging every group key by key cost as much as its write).
        lock = live.lock
        lock.acquire()
        try:
            state = live.state
            pending = state.pending
            if pending is not None and not (s > pending[1] and d.keys() >= pending[2].keys()):
                _merge_pending(state)
            state.pending = (t, s, d)
        finally:
            lock.release()
        return True

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[MetricRow],
        params: list[tuple[object, object]],
        tags: list[tuple[object, object]],
    ) -> None:
        """A whole batch, checked before anything is written, then written in one write.

        ``metrics``: (key, value, timestamp, step) of each point. As in MLflow, the values are
        checked before the run is looked up.
        """
        checked_params = _checked_params(params, run_id)
        checked_tags = _checked_tags_list(tags, run_id)
        groups, rising = _metric_groups(metrics, run_id) if metrics else ([], True)
        live = self._live.get(run_id) or self.live(run_id)
        state = live.state
        new_params = self._params(state, checked_params)
        if not new_params and not checked_tags:
            if not groups:
                return
            # Metrics only (MlflowClient.log_batch): the events are framed without the records.
            live.writer.append_metric_events([(t, s, _dumps(d)) for t, s, d in groups])
        else:
            records: list[dict[str, Any]] = []
            if new_params:
                records.append({"v": _V, "s": 0, "t": now_ms(), "k": K_PARAMS, "d": new_params})
            records.extend(
                {"v": _V, "s": 0, "t": t, "k": K_METRICS, "step": s, "d": d} for t, s, d in groups
            )
            if checked_tags:
                records.append(
                    {"v": _V, "s": 0, "t": now_ms(), "k": K_TAGS, "d": dict(checked_tags)}
                )
            with live.lock:
                live.writer.append_many(records)
                state.params.update(new_params)
                for key, value in checked_tags:
                    state.tags[key] = value
                    if key == RUN_NAME_TAG:
                        state.name = value
        if groups:
            points = _batch_latest(groups, rising)
            with live.lock:
                latest = state.latest
                for key, point in points.items():
                    old = latest.get(key)
                    if old is None or newer(point, old):
                        latest[key] = point

    def _params(self, state: RunState, params: list[tuple[str, str]]) -> dict[str, str]:
        run_id = state.run_id
        out: dict[str, str] = {}
        for k, text in params:
            old = state.params.get(k)
            if old is not None and old != text:
                raise ParamConflictError(
                    f"run {run_id}: param {k!r} is already {old!r}; cannot change it to "
                    f"{text!r} (params are write-once; log values that change as metrics or tags)"
                )
            if old is None:
                out[k] = text
        return out

    # -- plumbing --------------------------------------------------------------------------

    def _writer(self, run_id: str) -> SegmentWriter:
        return SegmentWriter(self.root, run_id, self.durability)

    def _register(self, live: LiveRun, *, owner: bool) -> None:
        # The process that created or resumed a run ends it (at SIGTERM); one that only logs
        # into it (another rank, a worker) never does.
        live.state.opened_here = live.state.opened_here or owner
        with self._lock:
            self._live[live.state.run_id] = live
        start_heartbeat(self.heartbeat_s, self._beat)
        install_sigterm(self, self._end_killed)

    def _beat(self) -> None:
        for live in list(self._live.values()):
            if live.state.status == "RUNNING":
                with live.lock:
                    live.writer.append({"v": _V, "s": 0, "t": now_ms(), "k": "heartbeat"})
                    live.writer.flush()  # buffered mode: the sign of life reaches the file now

    def _run_start(
        self,
        state: RunState,
        t: int,
        *,
        resume: bool,
        source: str | None = None,
        source_type: str | None = None,
    ) -> dict[str, Any]:
        argv = [utf8_text(arg) for arg in sys.argv]
        record: dict[str, Any] = {
            "v": _V,
            "s": 0,
            "t": t,
            "k": K_RUN_START,
            "run": state.run_id,
            "experiment": state.experiment,
            "name": state.name,
            "parent": state.parent,
            "user": state.user,
            "host": utf8_text(hostname()),
            "pid": os.getpid(),
            "source": source or state.tags.get(SOURCE_NAME_TAG) or _default_source(),
            "command": argv,
            "resume": resume,
        }
        kind = source_type or state.tags.get(SOURCE_TYPE_TAG)
        if kind and kind != "LOCAL":
            record["source_type"] = kind
        job = job_from_env()
        if job is not None:
            record["job"] = job
        return record

    def _after_fork(self) -> None:
        # A forked child writes its own segments (the writers reopen themselves); the runs it
        # inherited are still known, but it is not the process that ends them.
        self._lock = threading.Lock()
        for live in self._live.values():
            live.lock = threading.Lock()
            live.state.opened_here = False


def _default_source() -> str:
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "<python>"
    return utf8_text(argv0)


def _run_name(name: object) -> str:
    return check_name("run name", name, MAX_RUN_NAME_LENGTH)


def _checked_tags(tags: dict[str, str], run_id: str) -> dict[str, str]:
    # A new run's tags: MLflow's stores take any value there and keep its text.
    return dict(
        _checked_tags_list(
            ((k, v if isinstance(v, str) else str(v)) for k, v in tags.items()), run_id
        )
    )


def _checked_tags_list(tags: Iterable[tuple[object, object]], run_id: str) -> list[tuple[str, str]]:
    out = []
    for key, value in tags:
        k = _valid_key(key, "tag", run_id)
        reason = reserved_tag_reason(k)
        if reason is not None:
            raise ValidationError(f"run {run_id}: {reason}")
        text = _store_text(value, k, run_id)
        out.append((k, string_value(text, k, "tag", MAX_TAG_VALUE_LENGTH, run_id)))
    return out


def _checked_params(params: Iterable[tuple[object, object]], run_id: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, value in params:
        k = _valid_key(key, "param", run_id)
        if k in seen:
            raise ValidationError(
                f"run {run_id}: param {k!r} appears twice in one batch; log it once"
            )
        seen.add(k)
        out.append(
            (
                k,
                string_value(
                    _store_text(value, k, run_id), k, "param", MAX_PARAM_VALUE_LENGTH, run_id
                ),
            )
        )
    return out


def _store_text(value: object, key: str, run_id: str) -> str:
    """A param or tag value as MLflow's store takes it: text (its clients convert with str())."""
    if isinstance(value, str):
        return value
    raise TypeError(
        f"run {run_id}: {key!r} value {value!r} is a {type(value).__name__}, not str "
        "(mlflow.log_param/set_tag convert values with str(); build Param/RunTag with text)"
    )


def _other_segments(folder: Path, own: Path | None) -> tuple[tuple[str, int], ...]:
    """The run's segment files but ``own``, with their sizes: what other processes wrote."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return ()
    out = []
    for entry in entries:
        if is_segment_name(entry.name) and (own is None or entry.name != own.name):
            try:
                out.append((entry.name, entry.stat(follow_symlinks=False).st_size))
            except OSError:
                continue
    return tuple(sorted(out))
