"""The tracker: starts runs (new, nested, resumed, attached) whose handles spool every call.

Nothing here talks to MLflow or a database; ``ff-sync`` replays the spools later. The run
handle and its hot path are :mod:`formula_foundry.tracking.run`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from formula_foundry.errors import (
    FormulaFoundryError,
    RunStateError,
    ValidationError,
)
from formula_foundry.tracking.events import (
    K_HEARTBEAT,
    K_RUN_START,
    K_TAGS,
    MAX_EXPERIMENT_NAME_LENGTH,
    MAX_RUN_NAME_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    RUN_NAME_TAG,
    check_name,
    string_value,
)
from formula_foundry.tracking.liveness import (
    install_excepthook,
    install_sigterm,
    sigterm_ending,
    start_heartbeat,
    terminating,
)
from formula_foundry.tracking.resume import (
    RunOrigin,
    check_run_id,
    find_origin,
    give_back_ff_run_id,
    take_ff_run_id,
)
from formula_foundry.tracking.run import _V, Run, _EndedWriter, _NullWriter, _valid_tag_key
from formula_foundry.tracking.scheduler import job_facts, job_from_env
from formula_foundry.tracking.spool_writer import (
    SegmentWriter,
    flush_all,
    hostname,
    now_ms,
    utf8_text,
)

if TYPE_CHECKING:
    from formula_foundry.config import Settings


@runtime_checkable
class ManifestLike(Protocol):
    """What ``start_run(manifest=...)`` needs: tags describing the run's provenance."""

    def to_tags(self) -> Mapping[str, str]: ...


class RunArtifactsLike(Protocol):
    """What ``start_run(run_artifacts=...)`` needs: the substrate run's id and folder.

    If the object also has ``link_tracking_run(spool_run_id, experiment, run_name)``, it is called
    so the run directory records which tracking runs used it.
    """

    @property
    def run_id(self) -> str: ...

    @property
    def run_dir(self) -> Path: ...


def _user() -> str:
    import getpass  # deferred: only start_run needs it

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or "unknown"


class Tracker:
    """Starts runs that spool under ``settings.spool_root``. Get one with :func:`get_tracker`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._local = threading.local()
        self._active: dict[int, Run] = {}
        self._active_lock = threading.Lock()
        _all_trackers.add(self)

    def _after_fork_in_child(self) -> None:
        # As in MLflow, a forked child starts with no active run: its runs are its own, and
        # it never ends its parent's runs at exit. Handles it inherited still work; their
        # events go to a segment of the child's own.
        for run in self._active.values():
            # A parent thread ending the run at fork time left its lock held for good here.
            run._end_lock = threading.RLock()
        self._local = threading.local()
        self._active = {}
        self._active_lock = threading.Lock()

    @property
    def disabled(self) -> bool:
        return self.settings.disabled

    def _stack(self) -> list[Run]:
        """This thread's active runs, innermost last. A run ended by another thread (or by
        SIGTERM) is still listed here; it is dropped on the next look, never taken as active."""
        stack: list[Run] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        if stack and any(isinstance(r._writer, _EndedWriter) for r in stack):
            stack[:] = [r for r in stack if not isinstance(r._writer, _EndedWriter)]
        return stack

    def active_run(self) -> Run | None:
        """The innermost active run of this thread, if any."""
        stack = self._stack()
        return stack[-1] if stack else None

    def start_run(
        self,
        run_name: str | None = None,
        experiment_name: str | None = None,
        nested: bool = False,
        tags: Mapping[str, Any] | None = None,
        manifest: ManifestLike | None = None,
        run_artifacts: RunArtifactsLike | None = None,
        description: str | None = None,
        run_id: str | None = None,
        log_system_metrics: bool | None = None,
        capture_output: bool | None = None,
    ) -> Run:
        """Start a run and return its handle (also a context manager).

        ``nested=True`` makes it a child of this thread's innermost active run. Starting a
        second top-level run while one is active in this thread is an error, as in MLflow.

        ``run_id`` (or ``$FF_RUN_ID`` for a top-level run) continues that run if its spool
        exists — a requeued job resuming its run: a new segment, same run — and otherwise
        starts a new run with that id. A resumed run knows the params spooled before and
        refuses a changed value (:class:`ParamConflictError`). ``$FF_RUN_ID`` names one run:
        only the process's first top-level run takes it; a second is a :class:`RunStateError`.

        Without ``experiment_name`` a nested run goes to its parent's experiment, a top-level
        one to ``tracking.default_experiment``.

        ``log_system_metrics``: sample CPU, memory, disk, network and the job's GPUs into the
        run in the background (docs/observability.md). ``None``: ``$FF_SYSTEM_METRICS``, else
        ``tracking.system_metrics``, for a top-level run; a nested run samples only if asked.

        ``capture_output``: tee this process's stdout and stderr (file descriptors 1 and 2:
        C extensions and child processes too) into the run's spool until it ends
        (docs/observability.md). ``None``: ``$FF_CAPTURE_OUTPUT``, else
        ``tracking.capture_output``, for a top-level run; a nested run captures only if asked.
        """
        _check_flag("log_system_metrics", log_system_metrics)
        _check_flag("capture_output", capture_output)
        stack = self._stack()
        parent = stack[-1] if stack else None
        if parent is not None and not nested:
            raise RunStateError(
                f"run {parent.run_id} ({parent.run_name!r}) is still active in this thread; "
                "end it first, or pass nested=True to start a child run"
            )
        # A child lands in its parent's experiment, so the MLflow UI shows it under its parent.
        if experiment_name is not None:
            experiment = experiment_name
        else:
            experiment = parent.experiment_name if parent else self.settings.default_experiment
        check_name("experiment_name", experiment, MAX_EXPERIMENT_NAME_LENGTH)
        if run_name is not None:
            check_name("run_name", run_name, MAX_RUN_NAME_LENGTH)
        env_run_id = run_id is None and parent is None and os.environ.get("FF_RUN_ID")
        if env_run_id:
            run_id = take_ff_run_id(env_run_id)
        try:
            return self._start(
                run_id,
                run_name,
                experiment_name,
                experiment,
                parent,
                tags=tags,
                manifest=manifest,
                run_artifacts=run_artifacts,
                description=description,
                log_system_metrics=log_system_metrics,
                capture_output=capture_output,
            )
        except BaseException:
            if env_run_id:
                give_back_ff_run_id()  # this start failed: the name is still free
            raise

    def _start(
        self,
        run_id: str | None,
        run_name: str | None,
        experiment_name: str | None,
        experiment: str,
        parent: Run | None,
        *,
        tags: Mapping[str, Any] | None,
        manifest: ManifestLike | None,
        run_artifacts: RunArtifactsLike | None,
        description: str | None,
        log_system_metrics: bool | None,
        capture_output: bool | None,
    ) -> Run:
        """The part of :meth:`start_run` after the names and ``FF_RUN_ID`` are settled."""
        resumed = run_id is not None and not self.settings.disabled
        who = self._identity(run_id, run_name, experiment_name, experiment)
        initial = _initial_tags(tags, manifest, run_artifacts, description, who.run_id)
        # Validate the initial tags through the same rules as set_tags before anything is written.
        checked = {
            _valid_tag_key(k, who.run_id): string_value(
                v, k, "tag", MAX_TAG_VALUE_LENGTH, who.run_id
            )
            for k, v in initial.items()
        }
        if who.renamed:  # the run keeps its first start's name unless the tag changes it (MLflow)
            checked[RUN_NAME_TAG] = who.run_name
        writer: SegmentWriter | _NullWriter = (
            _NullWriter()
            if self.settings.disabled
            else SegmentWriter(self.settings.spool_root, who.run_id, self.settings.durability)
        )
        if who.origin is not None:
            parent_id = who.origin.parent
        else:
            parent_id = parent.run_id if parent else None
        run = Run(self, who.run_id, who.run_name, who.experiment, parent_id, writer)
        if resumed:
            run._unread = self.settings.spool_root
        # Link first: if the run directory cannot record the run, nothing is spooled, rather
        # than a run that was started and can never be ended.
        if run_artifacts is not None and not self.settings.disabled:
            link = getattr(run_artifacts, "link_tracking_run", None)
            if callable(link):
                link(who.run_id, who.experiment, who.run_name)
        writer.append(_run_start_event(run, resume=who.origin is not None))
        if checked:
            writer.append({"v": _V, "s": 0, "t": now_ms(), "k": K_TAGS, "d": checked})
        self._stack().append(run)
        self._register(run)
        if log_system_metrics is None:  # the settings speak for top-level runs only
            log_system_metrics = parent is None and self.settings.system_metrics
        if log_system_metrics:
            self._sample(run, attached=False, resumed=who.origin is not None)
        if capture_output is None:  # the same: the settings speak for top-level runs only
            capture_output = parent is None and self.settings.capture_output
        if capture_output:
            self._capture(run)
        return run

    def _identity(
        self,
        run_id: str | None,
        run_name: str | None,
        experiment_name: str | None,
        experiment: str,
    ) -> _Identity:
        """The run's id, name and experiment: new, or those of the run ``run_id`` continues
        (its experiment cannot change; a new name renames it)."""
        if run_id is None:
            run_id = uuid.uuid4().hex
            return _Identity(run_id, run_name or f"run-{run_id[:8]}", experiment, None, False)
        run_id = check_run_id(run_id)
        origin = find_origin(self.settings.spool_root, run_id)
        if origin is None:
            return _Identity(run_id, run_name or f"run-{run_id[:8]}", experiment, None, False)
        if experiment_name is not None and experiment_name != origin.experiment:
            raise ValidationError(
                f"run {run_id} belongs to experiment {origin.experiment!r}; cannot resume "
                f"it in {experiment_name!r}"
            )
        renamed = run_name is not None and run_name != origin.run_name
        name = run_name or origin.run_name or f"run-{run_id[:8]}"
        return _Identity(run_id, name, origin.experiment, origin, renamed)

    def attach_run(
        self, run_id: str, *, log_system_metrics: bool = False, capture_output: bool = False
    ) -> Run:
        """Log into a run started elsewhere (another rank, a pool worker): a segment of its own.

        The handle never ends the run: leaving its ``with`` block (or ``end()``) only closes
        this process's segment; the process that started the run ends it.

        ``log_system_metrics=True``: this process samples its host and GPUs into the run too,
        under names of its own (``system/<host>-rank<N>/...``; docs/observability.md). The
        settings never turn it on here: workers inherit them, and would repeat one host's
        series once per worker.

        ``capture_output=True``: this process's stdout and stderr go into the run too (its
        own segment says which host and process); never from the settings, for the same
        reason.
        """
        _check_flag("log_system_metrics", log_system_metrics)
        _check_flag("capture_output", capture_output)
        run_id = check_run_id(run_id)
        if self.settings.disabled:
            # Nothing is spooled, so there is nothing to find: the handle logs nowhere, as
            # every disabled run does (a pipeline with workers runs unchanged in tests).
            run = Run(
                self,
                run_id,
                f"run-{run_id[:8]}",
                self.settings.default_experiment,
                None,
                _NullWriter(),
            )
            run._attached = True
            self._register(run)
            return run
        origin = find_origin(self.settings.spool_root, run_id)
        if origin is None:
            raise RunStateError(
                f"run {run_id} has no spool under {self.settings.spool_root}; start it first "
                "(or check FF_SPOOL_ROOT / the config the workers see)"
            )
        writer = SegmentWriter(self.settings.spool_root, run_id, self.settings.durability)
        run = Run(self, run_id, origin.run_name, origin.experiment, origin.parent, writer)
        run._unread = self.settings.spool_root
        run._attached = True
        self._register(run)
        if log_system_metrics:
            self._sample(run, attached=True, resumed=True)
        if capture_output:
            self._capture(run)
        return run

    def _sample(self, run: Run, *, attached: bool, resumed: bool) -> None:
        """Start the run's system-metrics sampler (not in disabled mode: nothing is written)."""
        if self.settings.disabled:
            return
        # Deferred: only a run that samples loads the sampler (and, in its thread, psutil).
        from formula_foundry.tracking.system_metrics import sample_run

        run._sampler = sample_run(run, self.settings, attached=attached, resumed=resumed)

    def _capture(self, run: Run) -> None:
        """Start the run's console capture (not in disabled mode: nothing is written)."""
        if self.settings.disabled:
            return
        # Deferred: only a run that captures loads the capture (and ctypes, for fflush).
        from formula_foundry.tracking.console import capture_run

        run._console = capture_run(run, self.settings)

    def _register(self, run: Run) -> None:
        with self._active_lock:
            self._active[id(run)] = run
        if not self.settings.disabled:
            start_heartbeat(self.settings.heartbeat_s, self._beat)
            install_sigterm(self, self._end_killed)
            install_excepthook(self, self._end_all_because)
            if terminating():
                # A SIGTERM came while the run started: its ender may have looked at the active
                # runs before this one was among them, and the process dies next.
                with contextlib.suppress(RunStateError):
                    run.end("KILLED", reason="SIGTERM")

    def _beat(self) -> None:
        with self._active_lock:
            runs = list(self._active.values())
        for run in runs:
            writer = run._writer
            if isinstance(writer, SegmentWriter):
                writer.append({"v": _V, "s": 0, "t": now_ms(), "k": K_HEARTBEAT})
                # Buffered mode: the sign of life (and what was logged before it) reaches the
                # file now, or a quiet run would look dead to ff-sync until 64 KiB piled up.
                writer.flush()

    def _has_active(self) -> bool:
        with self._active_lock:
            return bool(self._active)

    def _end_killed(self, reason: str) -> None:
        self.end_all("KILLED", reason=reason)

    def _end_all_because(self, status: str, reason: str) -> None:
        self.end_all(status, reason=reason)

    def _forget(self, run: Run) -> None:
        stack = self._stack()
        if run in stack:
            stack.remove(run)
        with self._active_lock:
            self._active.pop(id(run), None)

    def end_all(self, status: str = "FINISHED", *, reason: str | None = None) -> None:
        """End every run still active in this process (children first)."""
        with self._active_lock:
            runs = list(self._active.values())
        for run in reversed(runs):
            with contextlib.suppress(RunStateError):
                run.end(status, reason=reason)


class _Identity(NamedTuple):
    run_id: str
    run_name: str
    experiment: str
    origin: RunOrigin | None  # the spooled run this start continues
    renamed: bool


def _run_start_event(run: Run, *, resume: bool) -> dict[str, Any]:
    """The ``run_start`` event of ``run`` (docs/spool-format.md)."""
    # Text the job did not choose (a non-UTF-8 file name in argv, $USER) never fails it.
    argv = [utf8_text(arg) for arg in sys.argv]
    start: dict[str, Any] = {
        "v": _V,
        "s": 0,
        "t": now_ms(),
        "k": K_RUN_START,
        "run": run.run_id,
        "experiment": run.experiment_name,
        "name": run.run_name,
        "parent": run.parent_run_id,
        "user": utf8_text(_user()),
        "host": utf8_text(hostname()),
        "pid": os.getpid(),
        "source": argv[0] if argv and argv[0] else "<python>",
        "command": argv,
        "resume": resume,
    }
    job = job_from_env()
    if job is not None:
        start["job"] = job  # ff-sync asks the scheduler about it (sync/engine/scheduler.py)
    return start


def _check_flag(name: str, value: object) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValidationError(f"{name} must be True, False or None, got {value!r}")


def _initial_tags(
    tags: Mapping[str, Any] | None,
    manifest: ManifestLike | None,
    run_artifacts: RunArtifactsLike | None,
    description: str | None,
    run_id: str,
) -> dict[str, Any]:
    # The batch job's facts first: anything the caller passes overrides them.
    out: dict[str, Any] = job_facts()
    if manifest is not None:
        to_tags = getattr(manifest, "to_tags", None)
        if not callable(to_tags):
            raise ValidationError(
                f"run {run_id}: manifest must offer to_tags() -> dict[str, str], got "
                f"{type(manifest).__name__}"
            )
        out.update(to_tags())
    if run_artifacts is not None:
        sub_id, sub_dir = (
            getattr(run_artifacts, "run_id", None),
            getattr(run_artifacts, "run_dir", None),
        )
        if not isinstance(sub_id, str) or sub_dir is None:
            raise ValidationError(
                f"run {run_id}: run_artifacts must offer run_id (str) and run_dir (path), got "
                f"{type(run_artifacts).__name__}"
            )
        out["substrate_run_id"] = sub_id
        out["substrate_run_dir"] = str(Path(sub_dir).absolute())
    if description is not None:
        out["mlflow.note.content"] = description
    if tags is not None:
        if not isinstance(tags, Mapping):
            raise ValidationError(
                f"run {run_id}: tags must be a mapping, got {type(tags).__name__}"
            )
        out.update(tags)
    return out


_trackers: dict[tuple[str, ...], Tracker] = {}
_trackers_lock = threading.Lock()
_all_trackers: weakref.WeakSet[Tracker] = weakref.WeakSet()


def get_tracker(config: Path | str | None = None) -> Tracker:
    """Return the process's tracker for ``config`` (default: the discovered configuration).

    Settings are read once per configuration and environment; the same tracker is returned
    on later calls, so nesting works across modules.
    """
    from formula_foundry.config import load_settings  # deferred: keeps the import cheap

    settings = load_settings(config)
    key = (
        str(settings.config_path),
        str(settings.spool_root),
        settings.durability,
        str(settings.disabled),
        settings.default_experiment,
    )
    with _trackers_lock:
        tracker = _trackers.get(key)
        # Changed settings (mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI, say) make a new
        # tracker only once this one has no active run: the job's runs keep their tracker, so
        # active_run() and nesting go on, and the process's exit ends them.
        if tracker is None or (tracker.settings != settings and not tracker._has_active()):
            tracker = _trackers[key] = Tracker(settings)
        return tracker


# How long the at-exit end waits for a SIGTERM's end of the runs (its parts are bounded: the
# scheduler's answer 3 s, the console's last chunk 5 s, the sampler's last window).
_SIGTERM_WAIT_S = 15.0


def _end_at_exit() -> None:
    # A SIGTERM that came as the program finished ends the runs KILLED: wait for that end
    # (runs it could not end in time end KILLED here), never FINISHED beside it.
    status, reason = "FINISHED", None
    if sigterm_ending(_SIGTERM_WAIT_S):
        status, reason = "KILLED", "SIGTERM"
    # Every tracker of the process: one replaced in _trackers by a later get_tracker() with
    # other settings (mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI) still has its runs.
    for tracker in list(_all_trackers):
        try:
            tracker.end_all(status, reason=reason)
        except FormulaFoundryError as exc:  # nobody can catch it at exit: one line, not a trace
            with contextlib.suppress(OSError, ValueError):
                print(f"formula-foundry tracker: {exc}", file=sys.stderr)
    flush_all()


def _reset_after_fork() -> None:
    global _trackers_lock
    _trackers_lock = threading.Lock()
    for tracker in list(_all_trackers):
        tracker._after_fork_in_child()


atexit.register(_end_at_exit)
os.register_at_fork(after_in_child=_reset_after_fork)
