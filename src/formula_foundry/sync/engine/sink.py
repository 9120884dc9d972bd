"""What the replay engine needs from a destination, and what a destination may answer.

The engine (:mod:`formula_foundry.sync.engine.replayer`) talks to a :class:`Sink`; the MLflow client
adapter (:mod:`formula_foundry.sync.mlflow.client_sink`) is the one implementation today. A bulk SQL
path for metrics or a parallel HTTP path plugs in by implementing the same protocol (its
``limits`` may allow larger batches). The types here are plain values, so this module
imports nothing heavy.

Every call a sink accepts must be idempotent: the engine re-sends whatever it had not yet
recorded as acknowledged when a pass was interrupted. A sink reports failures with:

* :class:`~formula_foundry.errors.StoreUnavailable` — the destination is down, locked or
  overloaded; the engine retries with backoff, then stops the pass (exit 75).
* :class:`StoredParamConflict` — a param already has another value in the destination.
* :class:`RunMissing` — the destination no longer has the run the engine mapped.
* :class:`DestinationRejected` — any other refusal; it concerns one run, which is left where
  it was while the others go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from formula_foundry.errors import EXIT_PARTIAL, SyncError
from formula_foundry.tracking.events import CREATION_SYSTEM_TAGS, MODEL_ID_TAG

# (key, value, timestamp ms, step): one metric point, as the spool recorded it.
MetricRow = tuple[str, float, int, int]


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """The most one ``log_batch`` call may carry (MLflow's REST limits by default)."""

    metrics: int = 1000
    params: int = 100
    tags: int = 100
    total: int = 1000


MLFLOW_LIMITS: Final = BatchLimits()


@dataclass(frozen=True, slots=True)
class RunSpec:
    """Everything needed to create the destination run of one spooled run."""

    spool_run_id: str
    experiment: str
    name: str
    start_time: int
    user: str
    host: str
    source: str
    parent_spool_run_id: str | None = None
    parent_mlflow_run_id: str | None = None
    source_type: str = "LOCAL"
    # Which of mlflow.user / mlflow.source.name / mlflow.source.type the run gets.
    system_tags: frozenset[str] = frozenset(CREATION_SYSTEM_TAGS)

    def creation_tags(self) -> dict[str, str]:
        """The tags the run is created with (``verify`` expects the same), in this order;
        tag events of the run override them."""
        system = {
            "mlflow.user": self.user,
            "mlflow.source.name": self.source,
            "mlflow.source.type": self.source_type,
        }
        tags = {
            "ff.run_uuid": self.spool_run_id,
            "ff.host": self.host,
            **{k: v for k, v in system.items() if k in self.system_tags},
            "mlflow.runName": self.name,
        }
        if self.parent_spool_run_id:
            tags["ff.parent_run_uuid"] = self.parent_spool_run_id
        if self.parent_mlflow_run_id:
            tags["mlflow.parentRunId"] = self.parent_mlflow_run_id
        return tags


@dataclass(frozen=True, slots=True)
class RemoteRun:
    """A run as the destination knows it. ``duplicates`` lists other runs with the same tag."""

    mlflow_run_id: str
    experiment_id: str
    status: str
    duplicates: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ArtifactRef:
    """An artifact reference: the object stays in the artifact store, MLflow gets this."""

    path: str
    digest: str
    size: int
    store: str
    t: int
    # A file logged to be uploaded that sync.upload_max_bytes turned into a reference: its
    # document says so (ABOVE_LIMIT), so that a smaller file logged later at the same path
    # replaces it, where a reference the program logged itself stays.
    above_limit: bool = False

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "kind": "formula-foundry/artifact-ref",
            "version": 1,
            "logical_path": self.path,
            "digest": self.digest,
            "size_bytes": self.size,
            "store_root": self.store,
            "logged_at_ms": self.t,
        }
        if self.above_limit:
            doc[ABOVE_LIMIT[0]] = ABOVE_LIMIT[1]
        return doc


# The key and value a reference document written for sync.upload_max_bytes carries.
ABOVE_LIMIT: Final = ("referenced_by", "sync.upload_max_bytes")


ARTIFACT_REF_DIR: Final = "ff_artifact_refs"


def artifact_ref_file(logical_path: str) -> str:
    """Where the JSON of a reference lives among the run's artifacts."""
    return f"{ARTIFACT_REF_DIR}/{logical_path}.json"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Everything needed to create the destination model of one spooled logged model."""

    spool_model_id: str
    experiment: str  # by name, as runs
    mlflow_run_id: str  # its source run in the destination
    name: str
    model_type: str | None
    params: tuple[tuple[str, str], ...]
    tags: tuple[tuple[str, str], ...]

    def creation_tags(self) -> dict[str, str]:
        """The model's tags, with ``ff.model_id``: how a replay finds it again."""
        return {**dict(self.tags), MODEL_ID_TAG: self.spool_model_id}


@dataclass(frozen=True, slots=True)
class RunDataset:
    """A dataset a run used (MLflow's ``DatasetInput``): the dataset and the input's tags."""

    name: str
    digest: str
    source_type: str
    source: str
    schema: str | None
    profile: str | None
    tags: tuple[tuple[str, str], ...]


class DestinationRejected(SyncError):
    """The destination refused a write for a reason retrying will not fix."""

    exit_code = EXIT_PARTIAL


class StoredParamConflict(DestinationRejected):
    """A param of the batch already has another value in the destination.

    Not :class:`~formula_foundry.errors.ParamConflictError`, which the tracker raises in the
    logging process; this one is the destination's answer during a sync.
    """


class RunMissing(DestinationRejected):
    """The destination has no run with the id the sync state maps the spooled run to."""


class RecordRejected(DestinationRejected):
    """The destination can never take this one record (e.g. an artifact document whose path
    it cannot create): the record is quarantined with this reason and the run goes on."""


class IdentityUnavailable(SyncError):
    """This user may not read or tag the experiment that keeps the destination's identity (a
    server with per-experiment permissions): the pass goes on without the identity checks."""


class Sink(Protocol):
    """A destination the engine replays into. ``description`` never contains a password."""

    description: str
    limits: BatchLimits

    def find_run(self, spool_run_id: str, experiment: str | None) -> RemoteRun | None:
        """The run tagged ``ff.run_uuid = spool_run_id`` (deleted ones too), or ``None``."""
        ...

    def create_run(self, spec: RunSpec) -> RemoteRun:
        """Create the run (and its experiment if needed), tagged with ``spec.spool_run_id``."""
        ...

    def get_params(self, mlflow_run_id: str) -> dict[str, str]:
        """The params the run already has."""
        ...

    def log_batch(
        self,
        mlflow_run_id: str,
        metrics: Sequence[MetricRow],
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> None:
        """Write one batch within ``limits``; returns once the destination committed it."""
        ...

    def log_artifact_ref(self, mlflow_run_id: str, ref: ArtifactRef) -> None:
        """Write the reference's small JSON document among the run's artifacts."""
        ...

    def upload_artifacts(
        self, mlflow_run_id: str, files: Sequence[tuple[ArtifactRef, Path]]
    ) -> list[tuple[ArtifactRef, str]]:
        """Upload each local file to ``ref.path`` among the run's artifacts, replacing what is
        there; return once the destination holds every file whole. The files it can never
        take come back with the reason (quarantined, the run goes on); a failure retrying may
        fix raises ``StoreUnavailable``."""
        ...

    def delete_tag(self, mlflow_run_id: str, key: str) -> None:
        """Delete tag ``key`` of the run; a tag that is not there is already deleted."""
        ...

    def set_status(self, mlflow_run_id: str, status: str, end_time: int | None) -> None:
        """Set the run's status; a terminal status also sets its end time."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class ModelSink(Protocol):
    """What the replay of logged models needs from a destination (sync/engine/models.py): a
    sink that takes them has a ``model_sink()`` method returning one.

    As for runs, every call is idempotent: a model is found by its tag ``ff.model_id`` before
    one is created, and each write may be sent again after a crash."""

    def find_model(self, spool_model_id: str, experiment: str | None) -> str | None:
        """The destination id of the model tagged ``ff.model_id = spool_model_id``: in the
        experiment of that name first, then in every experiment."""
        ...

    def create_model(self, spec: ModelSpec) -> str:
        """Create the model (PENDING) with its params and tags, ``ff.model_id`` among them, in
        one write; return its destination id."""
        ...

    def log_model_params(self, model_id: str, params: Sequence[tuple[str, str]]) -> None:
        """Add the params the model lacks (a model's params are write-once)."""
        ...

    def set_model_tags(self, model_id: str, tags: Sequence[tuple[str, str]]) -> None: ...

    def delete_model_tag(self, model_id: str, key: str) -> None:
        """Delete tag ``key``; a tag that is not there is already deleted."""
        ...

    def log_model_metrics(
        self,
        mlflow_run_id: str,
        model_id: str,
        metrics: Sequence[MetricRow],
        dataset: tuple[str, str] | None = None,
    ) -> None:
        """Metric points of the run, linked to the model and computed on ``dataset`` (its
        name and digest), if any."""
        ...

    def log_model_output(self, mlflow_run_id: str, model_id: str, step: int) -> None:
        """List the model among the run's outputs, once."""
        ...

    def finalize_model(self, model_id: str, status: str) -> None: ...

    def upload_model_artifacts(
        self, model_id: str, files: Sequence[tuple[ArtifactRef, Path]]
    ) -> list[tuple[ArtifactRef, str]]:
        """``upload_artifacts`` into the model's artifact location."""
        ...

    def log_inputs(
        self, mlflow_run_id: str, datasets: Sequence[RunDataset], model_ids: Sequence[str]
    ) -> None:
        """The run's inputs: datasets (one per (name, digest) in the experiment, one input per
        run, the input's tags those of its first logging) and models (destination ids)."""
        ...
