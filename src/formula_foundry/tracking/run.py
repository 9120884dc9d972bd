"""The run handle: every ``log_*`` call validates, frames and writes one event to the run's spool.

The hot path (``log_metric`` and friends) does no other I/O, takes no lock shared between
processes and imports nothing heavy. :mod:`formula_foundry.tracking.tracker` starts runs and
hands these out.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson

from formula_foundry.errors import (
    ParamConflictError,
    RunStateError,
    ValidationError,
)
from formula_foundry.quiet_threads import signals_deferred
from formula_foundry.tracking.events import (
    END_STATUSES,
    FORMAT_VERSION,
    INT64_MAX,
    INT64_MIN,
    K_ARTIFACT,
    K_ARTIFACT_REF,
    K_METRICS,
    K_PARAMS,
    K_RUN_END,
    K_TAGS,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    check_key,
    check_name,
    int64,
    metric_value,
    reserved_tag_reason,
    string_value,
)
from formula_foundry.tracking.resume import (
    Logged,
    read_logged,
)
from formula_foundry.tracking.spool_writer import (
    SegmentWriter,
    now_ms,
)

if TYPE_CHECKING:
    from formula_foundry.tracking.console import ConsoleCapture
    from formula_foundry.tracking.system_metrics import SystemSampler
    from formula_foundry.tracking.tracker import Tracker

_V = FORMAT_VERSION
_KEY_CACHE_LIMIT = 1 << 16
# Keys that passed check_key, with their JSON spelling (the metric hot path writes it as is).
# The rules are the same for params, metrics and tags.
_key_json: dict[str, bytes] = {}
_dumps = orjson.dumps
_time_ns = time.time_ns
_STR_TYPE = frozenset({str})
_FLOAT_TYPE = frozenset({float})


# Keys that passed the tag rules too (not reserved for the sync): the tag path's own cache,
# since a metric or param may well be named ``ff.x``.
_tag_keys: set[str] = set()
# The logical path of an artifact reference becomes the document ``<path>.json`` (ff-sync).
_REF_DOC_SUFFIX = ".json"
_NAME_MAX = 255


def _valid_key(key: object, what: str, run: str) -> str:
    """Check ``key`` with MLflow's rules and remember it; return it as an exact ``str``."""
    checked = check_key(key, what, run)
    if len(_key_json) < _KEY_CACHE_LIMIT:
        _key_json[checked] = _dumps(checked)
    return checked


def _valid_tag_key(key: object, run: str) -> str:
    """Check a tag key: MLflow's rules, and not one of the tags ff-sync owns."""
    checked = _valid_key(key, "tag", run)
    reason = reserved_tag_reason(checked)
    if reason is not None:
        raise ValidationError(f"run {run}: {reason}")
    if len(_tag_keys) < _KEY_CACHE_LIMIT:
        _tag_keys.add(checked)
    return checked


class _NullWriter:
    """Writer of the no-op mode: validation still runs, nothing is written."""

    path = None

    def append(self, record: dict[str, Any]) -> None:
        pass

    def append_many(self, records: list[dict[str, Any]]) -> None:
        pass

    def append_metric(self, t: int, step: int, key_json: bytes, value_json: bytes) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def end(self, status: str) -> None:
        pass


class _EndedWriter:
    """Stands in for the writer once a run has ended, so the hot path needs no state check."""

    def __init__(self, spool_run_id: str, status: str) -> None:
        self._msg = f"run {spool_run_id} has ended ({status}); cannot log {{what}} to it"

    def append(self, record: dict[str, Any]) -> None:
        data, kind = record.get("d"), record.get("k")
        if isinstance(data, dict):
            what = f"{kind} {', '.join(map(repr, data))}"
        elif kind == K_ARTIFACT_REF:
            what = f"artifact reference {record.get('path')!r}"
        elif kind == K_ARTIFACT:
            what = f"artifact {record.get('path')!r}"
        else:
            what = f"{kind} events"
        raise RunStateError(self._msg.format(what=what))

    def append_many(self, records: list[dict[str, Any]]) -> None:
        self.append(records[0])

    def append_metric(self, t: int, step: int, key_json: bytes, value_json: bytes) -> None:
        raise RunStateError(self._msg.format(what=f"{K_METRICS} {orjson.loads(key_json)!r}"))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class Run:
    """A handle on one tracked run; use it as a context manager.

    Leaving the ``with`` block normally ends the run FINISHED, an exception ends it FAILED (and
    propagates), ``KeyboardInterrupt`` ends it KILLED.
    """

    def __init__(
        self,
        tracker: Tracker,
        run_id: str,
        run_name: str,
        experiment_name: str,
        parent_run_id: str | None,
        writer: SegmentWriter | _NullWriter,
    ) -> None:
        self._tracker = tracker
        self.run_id = run_id
        self.run_name = run_name
        self.experiment_name = experiment_name
        self.parent_run_id = parent_run_id
        self._writer: SegmentWriter | _NullWriter | _EndedWriter = writer
        self._params: dict[str, str] = {}
        # Artifact reference documents of this run (``<path>.json``) and the folders their
        # paths need, each with a reference that uses it: a name cannot be both.
        self._ref_files: dict[str, str] = {}
        self._ref_dirs: dict[str, str] = {}
        # A resumed or attached run: the spool root whose earlier segments of this run hold
        # params and references not read yet. Read on the first call that needs them, so the
        # ranks and loader workers that only log metrics never read the whole spool.
        self._unread: Path | None = None
        self._attached = False
        # The system-metrics sampler of this run, if it has one (tracking/system_metrics.py).
        self._sampler: SystemSampler | None = None
        # The console capture of this run, if it has one (tracking/console.py).
        self._console: ConsoleCapture | None = None
        # Held while the run ends: a SIGTERM's ender thread, the at-exit end, an excepthook and
        # the program may end it at once, and exactly one of them may write its run_end (the
        # others wait, then find it ended). Re-entrant: an end interrupted in its own thread
        # (KeyboardInterrupt mid-end) is finished by the excepthook's end of that thread.
        self._end_lock = threading.RLock()
        self.status = "RUNNING"

    def __repr__(self) -> str:
        return (
            f"Run(run_id={self.run_id!r}, run_name={self.run_name!r}, "
            f"experiment={self.experiment_name!r}, status={self.status!r})"
        )

    @property
    def spool_path(self) -> Path | None:
        """This process's segment file of the run (``None`` in no-op mode)."""
        w = self._writer
        return w.path if isinstance(w, SegmentWriter) else None

    # -- metrics ---------------------------------------------------------------------------

    def log_metric(
        self, key: str, value: float, step: int | None = None, timestamp: int | None = None
    ) -> None:
        """Log one metric point. ``timestamp`` is in milliseconds since the epoch."""
        # The hot path: a cached key, a finite float, no step or an int one, the current time.
        try:
            kj = _key_json[key]
        except (KeyError, TypeError):
            kj = _dumps(_valid_key(key, "metric", self.run_id))
        if type(value) is float and value - value == 0.0:
            vj = _dumps(value)
        else:
            vj = _dumps(metric_value(value, key, self.run_id))
        if step is None:
            s = 0
        elif type(step) is int and INT64_MIN <= step <= INT64_MAX:
            s = step
        else:
            s = int64(step, "step", key, self.run_id)
        t = (
            _time_ns() // 1_000_000
            if timestamp is None
            else int64(timestamp, "timestamp", key, self.run_id, minimum=0)
        )
        self._writer.append_metric(t, s, kj, vj)

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None, timestamp: int | None = None
    ) -> None:
        """Log several metrics at one step and time, as one event."""
        run = self.run_id
        data: Mapping[str, float | str]
        if (
            # Fast path, checked in C: a plain dict of known str keys and finite floats (a
            # non-finite value makes the sum NaN or infinite) is serialised as it is.
            metrics.__class__ is dict
            and _key_json.keys() >= metrics.keys()
            and set(map(type, metrics)) <= _STR_TYPE
            and set(map(type, metrics.values())) <= _FLOAT_TYPE
            and (total := sum(metrics.values())) - total == 0.0
        ):
            data = metrics
        else:
            data = checked = {}
            for key, value in _items(metrics, "metrics", run):
                if key.__class__ is not str or key not in _key_json:
                    key = _valid_key(key, "metric", run)
                checked[key] = (
                    value
                    if type(value) is float and value - value == 0.0
                    else metric_value(value, key, run)
                )
        if not data:
            return
        if step is None:
            s = 0
        elif type(step) is int and INT64_MIN <= step <= INT64_MAX:
            s = step
        else:
            s = int64(step, "step", "<batch>", run)
        t = (
            _time_ns() // 1_000_000
            if timestamp is None
            else int64(timestamp, "timestamp", "<batch>", run, minimum=0)
        )
        self._writer.append({"v": _V, "s": 0, "t": t, "k": K_METRICS, "step": s, "d": data})

    # -- params ----------------------------------------------------------------------------

    def log_param(self, key: str, value: Any) -> None:
        """Log a param (stored as ``str(value)``); a param is write-once per run."""
        if key.__class__ is not str or key not in _key_json:
            key = _valid_key(key, "param", self.run_id)
        self.log_params({key: value})

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log several params as one event; all are checked before anything is written."""
        run = self.run_id
        if self._unread is not None:
            self._catch_up()
        data: dict[str, str] = {}
        for key, value in _items(params, "params", run):
            if key.__class__ is not str or key not in _key_json:
                key = _valid_key(key, "param", run)
            text = string_value(value, key, "param", MAX_PARAM_VALUE_LENGTH, run)
            old = self._params.get(key, data.get(key))
            if old is not None and old != text:
                raise ParamConflictError(
                    f"run {run}: param {key!r} is already {old!r}; cannot change it to "
                    f"{text!r} (params are write-once; log values that change as metrics or tags)"
                )
            data[key] = text
        new = {k: v for k, v in data.items() if k not in self._params}
        if not new:
            return
        self._writer.append({"v": _V, "s": 0, "t": now_ms(), "k": K_PARAMS, "d": new})
        self._params.update(new)

    # -- tags ------------------------------------------------------------------------------

    def set_tag(self, key: str, value: Any) -> None:
        """Set a tag (stored as ``str(value)``); the last value set wins.

        Tags ff-sync writes itself (``ff.*``, ``mlflow.parentRunId``, ``mlflow.user``,
        ``mlflow.source.name``, ``mlflow.source.type``) are refused.
        """
        if key.__class__ is not str or key not in _tag_keys:
            key = _valid_tag_key(key, self.run_id)
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set several tags as one event."""
        run = self.run_id
        data: dict[str, str] = {}
        for key, value in _items(tags, "tags", run):
            if key.__class__ is not str or key not in _tag_keys:
                key = _valid_tag_key(key, run)
            data[key] = string_value(value, key, "tag", MAX_TAG_VALUE_LENGTH, run)
        if data:
            self._writer.append({"v": _V, "s": 0, "t": now_ms(), "k": K_TAGS, "d": data})

    # -- artifact files --------------------------------------------------------------------

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file (or every file under a folder) as an artifact of this run.

        The bytes go into the artifact store (``artifacts.store_root``: content-addressed,
        stored once however often they are logged) and the spool records where they belong;
        ``ff-sync`` uploads them into the MLflow run's artifacts at ``<artifact_path>/<name>``
        (a folder's files at ``<artifact_path>/<folder name>/<path inside it>``), as
        ``mlflow.log_artifact`` would.
        Use :meth:`log_artifact_reference` for files that stay in the store and only need to
        be named in MLflow.
        """
        if isinstance(self._writer, _NullWriter):
            return
        if isinstance(self._writer, _EndedWriter):
            self._writer.append({"k": K_ARTIFACT, "path": str(local_path)})
        if not isinstance(local_path, (str, os.PathLike)):
            raise ValidationError(
                f"run {self.run_id}: log_artifact needs a file or folder path, got {local_path!r}"
            )
        from formula_foundry.substrate import ArtifactStore
        from formula_foundry.tracking.artifact_files import artifact_prefix, artifact_records

        if os.path.isdir(local_path):
            # As MLflow's log_artifact: a folder keeps its name under ``artifact_path``.
            name = Path(local_path).resolve().name
            artifact_path = artifact_prefix(artifact_path, self.run_id) + name
        store = ArtifactStore(self._tracker.settings.artifact_store_root)
        records = artifact_records(store, local_path, artifact_path, self.run_id)
        if records:
            self._writer.append_many(records)  # one write: the whole folder or none of it

    # -- artifact references ---------------------------------------------------------------

    def log_artifact_reference(
        self,
        logical_path: Any,
        digest: str | None = None,
        size_bytes: int | None = None,
        *,
        store_root: Path | str | None = None,
    ) -> None:
        """Record that this run produced ``logical_path``, stored in the artifact store.

        Accepts either the three fields or an entry returned by ``ArtifactStore.add_file``
        (anything with ``path``, ``digest`` and ``size_bytes``). Only the reference is
        logged — never a copy of the object.
        """
        from formula_foundry.substrate import Digest, validate_logical_path

        run = self.run_id
        if digest is None and size_bytes is None and hasattr(logical_path, "digest"):
            entry = logical_path
            logical_path, digest, size_bytes = entry.path, entry.digest, entry.size_bytes
            if store_root is None:
                # The store the entry came from holds the object, whatever the config says.
                store_root = getattr(entry, "store_root", None)
        if not isinstance(logical_path, str):
            raise ValidationError(
                f"run {run}: artifact reference logical_path must be a str, got {logical_path!r}"
            )
        try:
            path = validate_logical_path(logical_path)
            parsed = Digest.parse(str(digest))
        except ValidationError as exc:
            raise ValidationError(
                f"run {run}: artifact reference {logical_path!r}: {exc}"
            ) from None
        if self._unread is not None:
            self._catch_up()
        doc_dirs = self._check_ref_layout(path)
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < 0:
            raise ValidationError(
                f"run {run}: artifact reference {logical_path!r}: size_bytes must be an "
                f"integer >= 0, got {size_bytes!r}"
            )
        store = (
            Path(store_root)
            if store_root is not None
            else self._tracker.settings.artifact_store_root
        )
        self._writer.append(
            {
                "v": _V,
                "s": 0,
                "t": now_ms(),
                "k": K_ARTIFACT_REF,
                "path": path,
                "digest": str(parsed),
                "size": size_bytes,
                "store": str(store.absolute()),
            }
        )
        self._remember_ref(path, doc_dirs)

    def _check_ref_layout(self, path: str) -> list[str]:
        """Refuse a reference whose document ff-sync could never write; return its folders.

        The document is ``ff_artifact_refs/<path>.json``: its name must fit NAME_MAX, and
        within the run no name may be both a document and a folder of another document
        (``a`` → ``a.json``, then ``a.json/x`` needs a folder ``a.json``).
        """
        run = self.run_id
        parts = path.split("/")
        doc_name = parts[-1] + _REF_DOC_SUFFIX
        if len(doc_name.encode("utf-8")) > _NAME_MAX:
            raise ValidationError(
                f"run {run}: artifact reference {path!r}: its document name "
                f"{doc_name[:20]!r}... would be {len(doc_name.encode('utf-8'))} bytes (file "
                f"systems allow {_NAME_MAX}; ff-sync stores the reference as <path>.json)"
            )
        dirs = _folders_of(path)
        other = self._ref_dirs.get(path + _REF_DOC_SUFFIX)
        clash = path + _REF_DOC_SUFFIX
        if other is None:
            for d in dirs:
                other = self._ref_files.get(d)
                if other is not None:
                    clash = d
                    break
        if other is not None:
            raise ValidationError(
                f"run {run}: artifact reference {path!r} conflicts with reference {other!r} "
                f"of this run: ff-sync stores each as <path>.json, and {clash!r} would have to "
                "be both a file and a folder"
            )
        return dirs

    def _remember_ref(self, path: str, dirs: list[str]) -> None:
        self._ref_files.setdefault(path + _REF_DOC_SUFFIX, path)
        for d in dirs:
            self._ref_dirs.setdefault(d, path)

    def _catch_up(self) -> None:
        root, self._unread = self._unread, None
        if root is not None:
            self._load_logged(read_logged(root, self.run_id))

    def _load_logged(self, logged: Logged) -> None:
        """Take what earlier processes of this run spooled: their params and references."""
        self._params.update(logged.params)
        for path in logged.artifact_paths:
            self._remember_ref(path, _folders_of(path))

    # -- lifecycle -------------------------------------------------------------------------

    def end(self, status: str = "FINISHED", *, reason: str | None = None) -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED). Ending twice is an error.

        ``reason``: why it ended, in a few words; ``ff-sync`` sets it as the run's tag
        ``ff.sync.end_reason``. A SIGTERM ends active runs KILLED with a reason of its own.
        """
        if status not in END_STATUSES:
            raise ValidationError(
                f"run {self.run_id}: end status must be FINISHED, FAILED or KILLED, got {status!r}"
            )
        if reason is not None:
            check_name(f"run {self.run_id}: end reason", reason, MAX_TAG_VALUE_LENGTH)
        with self._end_lock:
            if isinstance(self._writer, _EndedWriter):
                raise RunStateError(f"run {self.run_id} has already ended ({self.status})")
            sampler, self._sampler = self._sampler, None
            if sampler is not None:
                sampler.stop()  # its last, partial window goes in before the run_end event
            console, self._console = self._console, None
            if console is not None:
                console.stop()  # the fds back, and the last chunk in before the run_end event
            writer = self._writer
            # From the run_end's write to the swap, no Ctrl-C: interrupted in between, the run
            # would still look active and the excepthook's end write a second run_end.
            with signals_deferred():
                if self._attached:
                    # An attached worker detaches; ending the run is its owner's business.
                    writer.end("detached")
                    self._writer = _EndedWriter(self.run_id, "detached")
                    self._tracker._forget(self)
                    return
                record: dict[str, Any] = {
                    "v": _V,
                    "s": 0,
                    "t": now_ms(),
                    "k": K_RUN_END,
                    "status": status,
                }
                if reason is not None:
                    record["reason"] = reason
                writer.append(record)
                # Closed for good: a thread that fetched the writer before the swap below gets
                # RunStateError, not a new segment after the run_end.
                writer.end(status)
                self.status = status
                self._writer = _EndedWriter(self.run_id, status)
                self._tracker._forget(self)

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        elif issubclass(exc_type, SystemExit) and getattr(exc, "code", 1) in (0, None):
            status = "FINISHED"
        else:
            status = "FAILED"
        # Under the end lock: a SIGTERM ending the run meanwhile is no error of the block.
        with self._end_lock:
            if not isinstance(self._writer, _EndedWriter):
                self.end(status)


def _folders_of(path: str) -> list[str]:
    """The folders ``a``, ``a/b`` that the logical path ``a/b/c`` lies in."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _items(mapping: Mapping[str, Any], what: str, run: str) -> Any:
    if not isinstance(mapping, Mapping):
        raise ValidationError(
            f"run {run}: {what} must be a mapping of key to value, got {type(mapping).__name__}"
        )
    return mapping.items()
