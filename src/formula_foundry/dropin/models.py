"""MLflow 3 logged models of ``spool:`` runs: recorded in their run's spool, read back from it.

A model belongs to the run that logs it (its source run): every change to it — creation with
its params and tags, more params and tags, a deleted tag, the run's metrics linked to it, the
run listing it among its outputs, finalisation — is one ``model_*`` event in that run's spool,
written by the run's writer in this process (:mod:`formula_foundry.dropin.run_book`), so one
reader, one sync and the same guarantees serve runs and models. The model's files are
``model_artifact`` events, their bytes in the content-addressed artifact store
(:mod:`formula_foundry.dropin.run_files`); ``ff-sync`` creates the model under the run's
destination run and uploads them into it (:mod:`formula_foundry.sync.engine.models`).

Model ids have MLflow's form (``m-`` and 32 hex digits) and are drawn here. Each model is also
recorded as ``<spool>/.models/<model id>.json`` (its run and experiment), written once, so
that another process finds the run whose spool holds it (``models:/<id>`` on the node).
Reading a model back folds its events with the sync's own reading
(:mod:`formula_foundry.tracking.model_events`): the node shows what ``ff-sync`` will make.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, TypeAlias

import orjson

from formula_foundry.dropin.experiments import Experiment
from formula_foundry.dropin.points import check_step, check_time, valid_key
from formula_foundry.dropin.run_book import RunBook
from formula_foundry.errors import ArtifactNotFound, ParamConflictError, ValidationError
from formula_foundry.sync.engine.payloads import InvalidRecord, PayloadChecker
from formula_foundry.sync.engine.scan import scan_run
from formula_foundry.sync.engine.sink import ArtifactRef
from formula_foundry.tracking import model_events
from formula_foundry.tracking.events import (
    FORMAT_VERSION,
    K_MODEL_ARTIFACT,
    K_MODEL_END,
    K_MODEL_METRICS,
    K_MODEL_OUTPUT,
    K_MODEL_PARAMS,
    K_MODEL_START,
    K_MODEL_TAG_DELETE,
    K_MODEL_TAGS,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    MODEL_END_STATUSES,
    MODEL_KINDS,
    RESERVED_TAG_PREFIX,
    check_model_id,
    metric_value,
    string_value,
)
from formula_foundry.tracking.model_events import ModelMetric, fold_model_event, metric_dataset
from formula_foundry.tracking.spool_reader import Event, SegmentReader
from formula_foundry.tracking.spool_writer import now_ms

RECORDS: Final = ".models"
_V: Final = FORMAT_VERSION
# A logged model as ``get_logged_model`` shows it: its files are objects of the artifact store.
ModelState: TypeAlias = model_events.ModelState[ArtifactRef]


def new_model_id() -> str:
    return f"m-{uuid.uuid4().hex}"


_BOOKS: dict[Path, ModelBook] = {}


def model_book(runs: RunBook) -> ModelBook:
    """The :class:`ModelBook` of the run book's spool root in this process (one per root, as
    for runs: the tracking store and the artifact repositories share it)."""
    book = _BOOKS.get(runs.root)
    if book is None or book.runs is not runs:
        book = _BOOKS[runs.root] = ModelBook(runs)
    return book


class ModelBook:
    """The logged models of one spool root, as this process writes and reads them."""

    def __init__(self, runs: RunBook) -> None:
        self.runs = runs
        self.folder = runs.root / RECORDS
        self._known: dict[str, ModelState] = {}
        self._lock = threading.Lock()

    # -- writing ---------------------------------------------------------------------------

    def create(
        self,
        experiment: Experiment,
        run_id: str | None,
        name: str,
        model_type: str | None,
        params: Iterable[tuple[object, object]],
        tags: Iterable[tuple[object, object]],
    ) -> ModelState:
        """A new model of run ``run_id``: its ``model_start`` and its record, PENDING."""
        if not run_id:
            raise ValidationError(
                f"logged model {name!r}: a spool records models logged by a run; start a run "
                "first (mlflow.start_run()) or pass source_run_id"
            )
        live = self.runs.live(run_id)  # a run that is not in the spool gets no model
        model_id = new_model_id()
        checked_params = _strings(params, model_id, "param", MAX_PARAM_VALUE_LENGTH)
        checked_tags = _strings(tags, model_id, "tag", MAX_TAG_VALUE_LENGTH)
        t = now_ms()
        state = ModelState(
            model_id, run_id, experiment.name, name, t, model_type, "PENDING", t,
            dict(checked_params), dict(checked_tags),
        )  # fmt: skip
        self._write_record(state)
        record = {
            "v": _V, "s": 0, "t": t, "k": K_MODEL_START, "model": model_id,
            "experiment": experiment.name, "name": name, "model_type": model_type,
            "params": state.params, "tags": state.tags,
        }  # fmt: skip
        with live.lock:
            live.writer.append(record)
            live.writer.flush()  # buffered durability too: a returned call is on disk
        with self._lock:
            self._known[model_id] = state
        return state

    def log_params(self, model_id: str, params: Iterable[tuple[object, object]]) -> None:
        state = self.get(model_id)
        checked = _strings(params, model_id, "param", MAX_PARAM_VALUE_LENGTH)
        new: dict[str, str] = {}
        for key, value in checked:
            old = state.params.get(key, new.get(key))
            if old is not None and old != value:
                raise ParamConflictError(
                    f"logged model {model_id}: param {key!r} is already {old!r}; cannot change "
                    f"it to {value!r} (a model's params are write-once, as in MLflow)"
                )
            if old is None:
                new[key] = value
        if new:
            self._append(state, {"k": K_MODEL_PARAMS, "d": new})
            state.params.update(new)

    def set_tags(self, model_id: str, tags: Iterable[tuple[object, object]]) -> None:
        state = self.get(model_id)
        checked = dict(_strings(tags, model_id, "tag", MAX_TAG_VALUE_LENGTH))
        if checked:
            self._append(state, {"k": K_MODEL_TAGS, "d": checked})
            state.tags.update(checked)

    def delete_tag(self, model_id: str, key: object) -> None:
        state = self.get(model_id)
        if not isinstance(key, str) or key not in state.tags:
            raise ArtifactNotFound(f"No tag with key {key!r} found for model with ID {model_id!r}.")
        self._append(state, {"k": K_MODEL_TAG_DELETE, "keys": [key]})
        del state.tags[key]

    def finalize(self, model_id: str, status: str) -> ModelState:
        state = self.get(model_id)
        if status not in MODEL_END_STATUSES:
            raise ValidationError(
                f"logged model {model_id}: a model is finalized READY or FAILED, not {status!r}"
            )
        self._append(state, {"k": K_MODEL_END, "status": status})
        state.status = status
        return state

    def log_output(self, run_id: str, model_id: str, step: object) -> None:
        state = self._of_run(run_id, model_id, "log_outputs")
        s = check_step(step, model_id, run_id)
        self._append(state, {"k": K_MODEL_OUTPUT, "step": s})

    def log_metrics(self, run_id: str, model_id: str, points: list[ModelMetric]) -> None:
        """Metric points of run ``run_id`` linked to the model: one event per step, time and
        dataset (the event names the dataset its points were computed on)."""
        state = self._of_run(run_id, model_id, "log_metric(model_id=...)")
        by_step: dict[tuple[int, int, tuple[str, str] | None], dict[str, float | str]] = {}
        for key, value, t, step, ds_name, ds_digest in points:
            k = valid_key(key, "metric", run_id)
            try:
                dataset = metric_dataset(ds_name, ds_digest)
            except ValidationError as exc:
                raise ValidationError(f"run {run_id}: metric {k!r}: {exc}") from None
            at = (check_step(step, k, run_id), check_time(t, k, run_id), dataset)
            by_step.setdefault(at, {})[k] = metric_value(value, k, run_id)
        records = []
        for (s, t, dataset), d in by_step.items():
            record = {"v": _V, "s": 0, "t": t, "k": K_MODEL_METRICS, "model": model_id, "step": s}
            if dataset is not None:
                record["dataset_name"], record["dataset_digest"] = dataset
            records.append({**record, "d": d})
        live = self.runs.live(state.run_id)
        with live.lock:
            live.writer.append_many(records)
            live.writer.flush()
        state.metrics.extend(
            ModelMetric(k, float(v), t, s, *(dataset or (None, None)))
            for (s, t, dataset), d in by_step.items()
            for k, v in d.items()
        )

    def add_files(self, state: ModelState, records: list[dict[str, Any]]) -> None:
        """Record files already in the artifact store as the model's (run_files.RunFiles)."""
        for record in records:
            record["k"], record["model"] = K_MODEL_ARTIFACT, state.model_id
        live = self.runs.live(state.run_id)
        with live.lock:
            live.writer.append_many(records)  # one write: the whole folder or none of it
            live.writer.flush()
        for record in records:
            state.files[record["path"]] = ArtifactRef(
                record["path"], record["digest"], record["size"], record["store"], record["t"]
            )

    def _append(self, state: ModelState, fields: dict[str, Any]) -> None:
        t = now_ms()
        live = self.runs.live(state.run_id)
        with live.lock:
            live.writer.append({"v": _V, "s": 0, "t": t, "model": state.model_id, **fields})
            live.writer.flush()
        state.updated = t

    def _of_run(self, run_id: str, model_id: str, call: str) -> ModelState:
        state = self.get(model_id)
        if state.run_id != run_id:
            raise ValidationError(
                f"{call}: logged model {model_id} belongs to run {state.run_id}, not {run_id}; "
                "a spool links a model to the run that logged it only"
            )
        return state

    # -- reading ---------------------------------------------------------------------------

    def get(self, model_id: object) -> ModelState:
        """The model: as this process knows it, else read from its run's spool."""
        known = self._known.get(model_id) if isinstance(model_id, str) else None
        if known is not None:
            return known
        try:
            mid = check_model_id(model_id)
        except ValidationError:
            mid = None
        record = self._read_record(mid) if mid else None
        state = read_models(self.runs.root, record[0]).get(mid) if record and mid else None
        if state is None or mid is None:
            raise ArtifactNotFound(
                f"Logged model with ID '{model_id}' not found in the spool {self.runs.root}."
            )
        with self._lock:
            return self._known.setdefault(mid, state)

    def search(self, experiments: set[str]) -> list[ModelState]:
        """Every model of these experiments (by name) the spool holds."""
        try:
            names = sorted(os.listdir(self.folder))
        except OSError:
            names = []
        runs: set[str] = set()
        for name in names:
            if name.endswith(".json") and not name.startswith("."):
                record = self._read_record(name[: -len(".json")])
                if record is not None and record[1] in experiments:
                    runs.add(record[0])
        out: dict[str, ModelState] = {}
        for run in sorted(runs):
            for mid, state in read_models(self.runs.root, run).items():
                out[mid] = self._known.get(mid, state)
        return [s for s in out.values() if s.experiment in experiments]

    def _write_record(self, state: ModelState) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{state.model_id}.json"
        tmp = self.folder / f".{state.model_id}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        tmp.write_bytes(orjson.dumps({"run": state.run_id, "experiment": state.experiment}))
        try:
            os.replace(tmp, final)  # the id is fresh: nobody else writes this record
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _read_record(self, model_id: str) -> tuple[str, str] | None:
        try:
            doc = orjson.loads((self.folder / f"{model_id}.json").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        run, exp = (doc.get("run"), doc.get("experiment")) if isinstance(doc, dict) else (0, 0)
        return (run, exp) if isinstance(run, str) and isinstance(exp, str) else None


def read_models(root: Path, run_id: str) -> dict[str, ModelState]:
    """The models whose events the run's spool holds, folded in merge order by the sync's own
    reading (:mod:`formula_foundry.tracking.model_events`): what it quarantines is skipped."""
    models: dict[str, ModelState] = {}
    check = PayloadChecker()
    for seg in scan_run(root, run_id):
        try:
            for item in SegmentReader(seg.path, 0, 0, -1):
                if isinstance(item, Event) and item.kind in MODEL_KINDS:
                    with contextlib.suppress(InvalidRecord, ValidationError, TypeError):
                        fold_model_event(models, run_id, item, check)
        except (OSError, Exception):  # an unreadable or foreign segment: what was read stays
            continue
    return models


def _strings(
    items: Iterable[tuple[object, object]], model_id: str, what: str, limit: int
) -> list[tuple[str, str]]:
    out = []
    for key, value in items:
        k = valid_key(key, what, model_id)
        if k.startswith(RESERVED_TAG_PREFIX):
            raise ValidationError(
                f"logged model {model_id}: {what} {k!r} is reserved: names starting with "
                f"{RESERVED_TAG_PREFIX!r} carry the model's identity and are written by ff-sync"
            )
        text = value if isinstance(value, str) else str(value)
        out.append((k, string_value(text, k, what, limit, model_id)))
    return out
