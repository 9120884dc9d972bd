"""An in-memory destination for the fast tier: the replay engine without MLflow.

:class:`MemorySink` implements :class:`formula_foundry.sync.Sink` with MLflow's semantics for
each write as the sync relies on them (docs/sync.md, ../shared/guide/mlflow-facts.md): a
metric point is stored once however often it is sent, a param is write-once (another value
is a :class:`StoredParamConflict`), tags are last-write-wins, deleting an absent tag is done
already, a terminal status sets the end time. It is not a model of MLflow for the contract
tests (they run against real stores, tests/sync/): it is what lets the engine's own logic
(batching, barriers, progress, crash recovery, stale runs) be tested in milliseconds.

``fail_at``: the calls (1-based, counted over every write and read) that raise
:class:`StoreUnavailable` instead of running — a store going down at that exact point. With
``after=True`` the write is applied first and the acknowledgement is lost (the process died
between the destination's commit and the sync state's), the harder of the two crash points.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from formula_foundry.errors import StoreUnavailable
from formula_foundry.sync.engine.sink import (
    MLFLOW_LIMITS,
    ArtifactRef,
    BatchLimits,
    MetricRow,
    ModelSpec,
    RemoteRun,
    RunDataset,
    RunMissing,
    RunSpec,
    StoredParamConflict,
)
from formula_foundry.tracking.events import MODEL_ID_TAG

T = TypeVar("T")


@dataclass
class MemoryRun:
    """One destination run, as MLflow would hold it."""

    mlflow_run_id: str
    experiment: str
    name: str
    start_time: int
    status: str = "RUNNING"
    end_time: int | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    # key -> {(step, timestamp, value)}: a point sent twice is stored once.
    metrics: dict[str, set[tuple[int, int, float | str]]] = field(default_factory=dict)
    refs: dict[str, dict[str, object]] = field(default_factory=dict)
    # Uploaded files: artifact path -> bytes (a file uploaded again is replaced).
    files: dict[str, bytes] = field(default_factory=dict)
    # Inputs: (name, digest) -> the dataset as first logged (MLflow keeps one input per dataset
    # and run, with its first tags); the destination ids of the models the run used.
    datasets: dict[tuple[str, str], RunDataset] = field(default_factory=dict)
    model_inputs: set[str] = field(default_factory=set)


@dataclass
class MemoryModel:
    """One destination logged model, as MLflow would hold it."""

    model_id: str
    experiment: str
    name: str
    source_run: str
    model_type: str | None
    status: str = "PENDING"
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    # (key, step, timestamp, value, (dataset name, digest) or None)
    metrics: set[tuple[str, int, int, float | str, tuple[str, str] | None]] = field(
        default_factory=set
    )
    outputs: dict[str, int] = field(default_factory=dict)  # run -> step
    files: dict[str, bytes] = field(default_factory=dict)


class MemoryModels:
    """The model calls of a :class:`MemorySink` (its ``model_sink()``), counted and failing
    with the sink's calls."""

    def __init__(self, sink: MemorySink) -> None:
        self.sink = sink

    def _model(self, model_id: str) -> MemoryModel:
        return self.sink.models[model_id]

    def find_model(self, spool_model_id: str, experiment: str | None) -> str | None:
        def find() -> str | None:
            found = [
                m.model_id
                for m in self.sink.models.values()
                if m.tags.get(MODEL_ID_TAG) == spool_model_id
            ]
            return min(found) if found else None

        return self.sink._call("find_model", find)

    def create_model(self, spec: ModelSpec) -> str:
        def create() -> str:
            model_id = f"mm{next(self.sink._ids):04d}"
            run = self.sink._run(spec.mlflow_run_id)
            self.sink.models[model_id] = MemoryModel(
                model_id, run.experiment, spec.name, spec.mlflow_run_id, spec.model_type,
                params=dict(spec.params), tags=spec.creation_tags(),
            )  # fmt: skip
            return model_id

        return self.sink._call("create_model", create)

    def log_model_params(self, model_id: str, params: Sequence[tuple[str, str]]) -> None:
        def write() -> None:
            model = self._model(model_id)
            for key, value in params:
                assert model.params.setdefault(key, value) == value, f"model param {key}"

        self.sink._call("log_model_params", write)

    def set_model_tags(self, model_id: str, tags: Sequence[tuple[str, str]]) -> None:
        self.sink._call("set_model_tags", lambda: self._model(model_id).tags.update(tags))

    def delete_model_tag(self, model_id: str, key: str) -> None:
        self.sink._call("delete_model_tag", lambda: self._model(model_id).tags.pop(key, None))

    def log_model_metrics(
        self,
        mlflow_run_id: str,
        model_id: str,
        metrics: Sequence[MetricRow],
        dataset: tuple[str, str] | None = None,
    ) -> None:
        def write() -> None:
            self.sink._run(mlflow_run_id)
            for key, value, t, step in metrics:
                v: float | str = "NaN" if value != value else value
                self._model(model_id).metrics.add((key, step, t, v, dataset))

        self.sink._call("log_model_metrics", write)

    def log_model_output(self, mlflow_run_id: str, model_id: str, step: int) -> None:
        def write() -> None:
            self._model(model_id).outputs.setdefault(mlflow_run_id, step)

        self.sink._call("log_model_output", write)

    def finalize_model(self, model_id: str, status: str) -> None:
        def write() -> None:
            self._model(model_id).status = status

        self.sink._call("finalize_model", write)

    def upload_model_artifacts(
        self, model_id: str, files: Sequence[tuple[ArtifactRef, Path]]
    ) -> list[tuple[ArtifactRef, str]]:
        for ref, local in files:  # one call per file, as for a run's files

            def write(ref: ArtifactRef = ref, local: Path = local) -> None:
                self._model(model_id).files[ref.path] = local.read_bytes()

            self.sink._call("upload_model_artifact", write)
        return []

    def log_inputs(
        self, mlflow_run_id: str, datasets: Sequence[RunDataset], model_ids: Sequence[str]
    ) -> None:
        def write() -> None:
            run = self.sink._run(mlflow_run_id)
            for ds in datasets:
                run.datasets.setdefault((ds.name, ds.digest), ds)
            run.model_inputs.update(self._model(m).model_id for m in model_ids)

        self.sink._call("log_inputs", write)


class MemorySink:
    """A destination in a dict; thread-safe (the parallel pass shares one)."""

    description = "memory://"

    def __init__(
        self,
        limits: BatchLimits = MLFLOW_LIMITS,
        fail_at: Collection[int] = (),
        after: bool = False,
    ) -> None:
        self.limits = limits
        self.runs: dict[str, MemoryRun] = {}
        self.models: dict[str, MemoryModel] = {}
        self.calls: list[str] = []
        self._fail_at = set(fail_at)
        self._after = after
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    def factory(self) -> Callable[[object], MemorySink]:
        """A ``sink_factory`` for :func:`formula_foundry.sync.sync_once` returning this sink."""
        return lambda _settings: self

    # -- the calls ----------------------------------------------------------------------

    def _call(self, name: str, fn: Callable[[], T]) -> T:
        with self._lock:
            self.calls.append(name)
            n = len(self.calls)
            if n in self._fail_at and not self._after:
                raise StoreUnavailable(f"memory sink: down at call {n} ({name})")
            result = fn()
            if n in self._fail_at:
                raise StoreUnavailable(f"memory sink: acknowledgement of call {n} ({name}) lost")
            return result

    def _run(self, mlflow_run_id: str) -> MemoryRun:
        run = self.runs.get(mlflow_run_id)
        if run is None:
            raise RunMissing(f"memory sink: no run {mlflow_run_id}")
        return run

    def find_run(self, spool_run_id: str, experiment: str | None) -> RemoteRun | None:
        def find() -> RemoteRun | None:
            found = [r for r in self.runs.values() if r.tags.get("ff.run_uuid") == spool_run_id]
            if not found:
                return None
            first = found[0]
            others = tuple(r.mlflow_run_id for r in found[1:])
            return RemoteRun(first.mlflow_run_id, first.experiment, first.status, others)

        return self._call("find_run", find)

    def create_run(self, spec: RunSpec) -> RemoteRun:
        def create() -> RemoteRun:
            mlflow_run_id = f"m{next(self._ids):04d}"
            run = MemoryRun(mlflow_run_id, spec.experiment, spec.name, spec.start_time)
            run.tags.update(spec.creation_tags())
            self.runs[mlflow_run_id] = run
            return RemoteRun(mlflow_run_id, spec.experiment, run.status)

        return self._call("create_run", create)

    def get_params(self, mlflow_run_id: str) -> dict[str, str]:
        return self._call("get_params", lambda: dict(self._run(mlflow_run_id).params))

    def log_batch(
        self,
        mlflow_run_id: str,
        metrics: Sequence[MetricRow],
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> None:
        lim = self.limits
        assert len(metrics) <= lim.metrics and len(params) <= lim.params, "batch over limits"
        assert len(tags) <= lim.tags and len(metrics) + len(params) + len(tags) <= lim.total

        def write() -> None:
            run = self._run(mlflow_run_id)
            for key, value in params:
                old = run.params.get(key)
                if old is not None and old != value:
                    raise StoredParamConflict(f"param {key!r}: {old!r} != {value!r}")
            # All or nothing, as one MLflow transaction.
            run.params.update(params)
            run.tags.update(tags)
            for key, value, t, step in metrics:
                v: float | str = "NaN" if value != value else value
                run.metrics.setdefault(key, set()).add((step, t, v))

        self._call("log_batch", write)

    def log_artifact_ref(self, mlflow_run_id: str, ref: ArtifactRef) -> None:
        def write() -> None:
            self._run(mlflow_run_id).refs[ref.path] = ref.to_json()

        self._call("log_artifact_ref", write)

    def upload_artifacts(
        self, mlflow_run_id: str, files: Sequence[tuple[ArtifactRef, Path]]
    ) -> list[tuple[ArtifactRef, str]]:
        # One call per file, as MLflow's client makes one request per file: a failure can
        # land between two files of one upload.
        for ref, local in files:

            def write(ref: ArtifactRef = ref, local: Path = local) -> None:
                self._run(mlflow_run_id).files[ref.path] = local.read_bytes()

            self._call("upload_artifact", write)
        return []

    def delete_tag(self, mlflow_run_id: str, key: str) -> None:
        self._call("delete_tag", lambda: self._run(mlflow_run_id).tags.pop(key, None))

    def set_status(self, mlflow_run_id: str, status: str, end_time: int | None) -> None:
        def write() -> None:
            run = self._run(mlflow_run_id)
            run.status = status
            run.end_time = None if status == "RUNNING" else end_time

        self._call("set_status", write)

    def close(self) -> None:
        pass

    def model_sink(self) -> MemoryModels:
        return MemoryModels(self)

    # -- reading it back ----------------------------------------------------------------

    def by_spool_run_id(self) -> dict[str, MemoryRun]:
        """The runs by their spool run id (``ff.run_uuid``); fails on a duplicate."""
        out: dict[str, MemoryRun] = {}
        for run in self.runs.values():
            uuid = run.tags["ff.run_uuid"]
            assert uuid not in out, f"two destination runs for spool run {uuid}"
            out[uuid] = run
        return out

    def comparable(self) -> dict[str, Any]:
        """Everything but the destination's own run ids, for comparing two sinks."""
        return {
            uuid: {
                "experiment": r.experiment,
                "name": r.name,
                "start_time": r.start_time,
                "status": r.status,
                "end_time": r.end_time,
                "params": dict(r.params),
                "tags": dict(r.tags),
                "metrics": {k: set(v) for k, v in r.metrics.items()},
                "refs": dict(r.refs),
                "files": dict(r.files),
            }
            for uuid, r in self.by_spool_run_id().items()
        }
