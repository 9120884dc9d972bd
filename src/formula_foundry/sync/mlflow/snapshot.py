"""A comparable dump of what an MLflow tracking store holds, keyed by spool run id.

``snapshot(uri)`` reads every experiment and run and returns plain JSON-ready data in which
nothing depends on the store's own ids, so two stores synced from the same spools compare
equal exactly when they hold the same things:

* ``experiments``: name → lifecycle stage and tags (not the sync's own identity tags
  ``ff.sync.*`` nor its fallback identity experiment: they say which sync wrote, not what);
* ``runs``: ``ff.run_uuid`` → experiment name, run name, status, start/end time, lifecycle
  stage, params, tags (minus :data:`VOLATILE_TAGS`), parent's ``ff.run_uuid``, full metric
  histories (``get_metric_history``, sorted by step, timestamp, value), latest metrics, and
  the JSON of each artifact reference;
* ``duplicates``: spool run ids with more than one MLflow run (should always be empty);
* ``untracked_runs``: number of runs without ``ff.run_uuid`` (not written by ff-sync).

Floats are written with ``repr`` so NaN compares equal to NaN. Read-only; imports MLflow
when called. :class:`StoreReader` is the streaming, run-at-a-time reader ``ff-sync verify``
uses (a whole-store dump would hold every metric of every run at once).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

from formula_foundry.errors import ConfigError, FormulaFoundryError, MlflowMissing
from formula_foundry.redact import redact_uri
from formula_foundry.sync.engine.destination import INSTALL_HINT, SQL_SCHEMES, scheme_of
from formula_foundry.sync.engine.destination_id import FALLBACK_EXPERIMENT, TAG_PREFIX
from formula_foundry.sync.engine.sink import ARTIFACT_REF_DIR, RunMissing
from formula_foundry.sync.mlflow.model_snapshot import ModelReader
from formula_foundry.sync.mlflow.store_access import (
    access_error,
    prepare_mlflow_env,
    probe_database,
)

T = TypeVar("T")

VOLATILE_TAGS: Final = frozenset({"mlflow.parentRunId", "mlflow.log-model.history"})
DATASET_FIELDS: Final = ("name", "digest", "source_type", "source", "schema", "profile")


def _f(value: float) -> str:
    return repr(float(value))


def snapshot(tracking_uri: str, *, artifacts: bool = True) -> dict[str, Any]:
    """Dump the store at ``tracking_uri`` (see the module docstring)."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments: dict[str, Any] = {}
    names: dict[str, str] = {}
    token: str | None = None
    while True:
        exps = client.search_experiments(view_type=ViewType.ALL, max_results=1000, page_token=token)
        for exp in exps:
            names[exp.experiment_id] = exp.name
            if exp.name == FALLBACK_EXPERIMENT:
                continue
            experiments[exp.name] = {
                "lifecycle_stage": exp.lifecycle_stage,
                "tags": {
                    k: v
                    for k, v in exp.tags.items()
                    if not k.startswith("mlflow.") and not k.startswith(TAG_PREFIX)
                },
            }
        token = exps.token
        if not token:
            break

    all_runs: list[Any] = []
    ids = sorted(names)
    for i in range(0, len(ids), 100):
        token = None
        while True:
            page = client.search_runs(
                ids[i : i + 100],
                run_view_type=ViewType.ALL,
                max_results=1000,
                page_token=token,
            )
            all_runs.extend(page)
            token = page.token
            if not token:
                break

    uuid_of = {r.info.run_id: r.data.tags.get("ff.run_uuid") for r in all_runs}
    runs: dict[str, Any] = {}
    seen: dict[str, list[str]] = {}
    untracked = 0
    for run in all_runs:
        spool_run_id = run.data.tags.get("ff.run_uuid")
        if spool_run_id is None:
            untracked += 1
            continue
        seen.setdefault(spool_run_id, []).append(run.info.run_id)
        if spool_run_id in runs:
            continue
        runs[spool_run_id] = _run(client, run, names, uuid_of, artifacts)
    return {
        "experiments": experiments,
        "runs": runs,
        "duplicates": {k: sorted(v) for k, v in seen.items() if len(v) > 1},
        "untracked_runs": untracked,
    }


def _run(
    client: Any,
    run: Any,
    names: dict[str, str],
    uuid_of: dict[str, str | None],
    artifacts: bool,
) -> dict[str, Any]:
    info, data = run.info, run.data
    history: dict[str, list[list[Any]]] = {}
    for key in sorted(data.metrics):
        points = client.get_metric_history(info.run_id, key)
        history[key] = sorted([m.step, m.timestamp, _f(m.value)] for m in points)
    parent_id = data.tags.get("mlflow.parentRunId")
    out: dict[str, Any] = {
        "experiment": names.get(info.experiment_id),
        "name": info.run_name,
        "status": info.status,
        "lifecycle_stage": info.lifecycle_stage,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "params": dict(sorted(data.params.items())),
        "tags": {k: v for k, v in sorted(data.tags.items()) if k not in VOLATILE_TAGS},
        "parent": uuid_of.get(parent_id) if parent_id else None,
        "metrics": history,
        "latest_metrics": {k: _f(v) for k, v in sorted(data.metrics.items())},
    }
    if artifacts:
        out["artifact_refs"] = _refs(client, info.run_id)
    return out


def _refs(client: Any, mlflow_run_id: str) -> dict[str, Any]:
    refs: dict[str, Any] = {}
    pending = [ARTIFACT_REF_DIR]
    files: list[str] = []
    while pending:
        for item in client.list_artifacts(mlflow_run_id, pending.pop()):
            (pending if item.is_dir else files).append(item.path)
    if not files:
        return refs
    with tempfile.TemporaryDirectory(prefix="ff-snapshot-") as tmp, _no_progress_bars():
        for path in sorted(files):
            local = client.download_artifacts(mlflow_run_id, path, tmp)
            refs[path] = json.loads(Path(local).read_text(encoding="utf-8"))
    return refs


def _files(client: Any, mlflow_run_id: str) -> dict[str, tuple[int, str]]:
    """Artifact path → (size, ``sha256:<hex>``) of every file of the run, reference documents
    aside; each file downloaded (to a temporary folder) and hashed."""
    pending: list[str | None] = [None]
    files: list[str] = []
    while pending:
        for item in client.list_artifacts(mlflow_run_id, pending.pop()):
            if item.path == ARTIFACT_REF_DIR:
                continue
            (pending if item.is_dir else files).append(item.path)
    out: dict[str, tuple[int, str]] = {}
    with tempfile.TemporaryDirectory(prefix="ff-verify-") as tmp, _no_progress_bars():
        for path in sorted(files):
            local = Path(client.download_artifacts(mlflow_run_id, path, tmp))
            digest = hashlib.sha256()
            with local.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            out[path] = (local.stat().st_size, "sha256:" + digest.hexdigest())
            local.unlink()
    return out


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar on stderr for every download where tqdm is installed;
    ``ff-sync verify`` prints its report and nothing else."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# -- streaming reads for ``ff-sync verify`` ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredRun:
    """One destination run as ``ff-sync verify`` compares it (its metrics are read apart)."""

    mlflow_run_id: str
    experiment: str | None
    name: str
    status: str
    start_time: int | None
    end_time: int | None
    lifecycle_stage: str
    params: dict[str, str]
    tags: dict[str, str]
    metric_keys: frozenset[str]
    # (name, digest, source_type, source, schema, profile, {input tag: value}) of each dataset
    # input, and the model ids of its model inputs (mlflow/model_snapshot.py compares them).
    datasets: tuple[tuple[Any, ...], ...] = ()
    model_inputs: frozenset[str] = frozenset()


class StoreReader:
    """Read-only, run-at-a-time access to a tracking store, keyed by ``ff.run_uuid``.

    :meth:`index` holds one id per run, never a run's data; :meth:`run`,
    :meth:`metric_points` and :meth:`artifact_refs` read one run when asked, so a verify
    holds at most one run's metrics. Every failure to reach the store is raised as
    :class:`~formula_foundry.errors.StoreUnavailable` naming the destination (password
    redacted); an SQLite file that does not exist is a :class:`ConfigError` ("no store at
    <path>": a typo, not an outage) — never created.
    """

    def __init__(self, uri: str) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError as exc:
            raise MlflowMissing(
                f"MLflow is not installed ({exc}); on this host run: {INSTALL_HINT}"
            ) from None
        prepare_mlflow_env()
        self.uri = uri
        self.description = redact_uri(uri)
        self._check_reachable()
        self._client: Any = self._call("open the store", lambda: MlflowClient(tracking_uri=uri))
        self._call("open the store", lambda: self._client._tracking_client.store)
        self._experiments: dict[str, str] = {}

    def _check_reachable(self) -> None:
        scheme = scheme_of(self.uri)
        if scheme == "sqlite":
            path = self.uri[len("sqlite:///") :].split("?", 1)[0]
            if path and not path.startswith(":memory:") and not Path(path).is_file():
                raise ConfigError(
                    f"{self.description}: no store at {Path(path).absolute()} (no such file; "
                    "check the tracking URI)"
                )
        elif scheme in SQL_SCHEMES:
            self._call("open the store", lambda: probe_database(self.uri))

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except FormulaFoundryError:
            raise
        except Exception as exc:
            err = access_error(exc, what, self.uri)
            if err is not None:
                raise err from None
            raise

    def index(self) -> dict[str, list[str]]:
        """``ff.run_uuid`` → the ids of the runs carrying it (deleted runs included)."""
        from mlflow.entities import ViewType

        token: str | None = None
        while True:
            page = self._call(
                "list experiments",
                partial(
                    self._client.search_experiments,
                    view_type=ViewType.ALL,
                    max_results=1000,
                    page_token=token,
                ),
            )
            self._experiments.update({str(e.experiment_id): e.name for e in page})
            token = page.token
            if not token:
                break
        found: dict[str, list[str]] = {}
        ids = sorted(self._experiments)
        for i in range(0, len(ids), 100):
            token = None
            while True:
                runs = self._call(
                    "list runs",
                    partial(
                        self._client.search_runs,
                        ids[i : i + 100],
                        "tags.`ff.run_uuid` != ''",
                        run_view_type=ViewType.ALL,
                        max_results=1000,
                        page_token=token,
                    ),
                )
                for r in runs:
                    spool_run_id = r.data.tags.get("ff.run_uuid")
                    if spool_run_id:
                        found.setdefault(spool_run_id, []).append(r.info.run_id)
                token = runs.token
                if not token:
                    break
        return {k: sorted(v) for k, v in found.items()}

    def run(self, mlflow_run_id: str) -> StoredRun:
        """The run's info, params and tags (``RunMissing`` if it is gone)."""
        try:
            run = self._call(
                f"read run {mlflow_run_id}", lambda: self._client.get_run(mlflow_run_id)
            )
        except Exception as exc:
            if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                raise RunMissing(f"{self.description} has no run {mlflow_run_id}") from None
            raise
        info, data, inputs = run.info, run.data, run.inputs
        datasets = tuple(
            (
                *(getattr(i.dataset, f) for f in DATASET_FIELDS),
                {t.key: t.value for t in i.tags},
            )
            for i in (getattr(inputs, "dataset_inputs", None) or ())
        )
        models = getattr(inputs, "model_inputs", None) or ()
        return StoredRun(
            mlflow_run_id=info.run_id,
            experiment=self._experiments.get(str(info.experiment_id)),
            name=info.run_name,
            status=info.status,
            start_time=info.start_time,
            end_time=info.end_time,
            lifecycle_stage=info.lifecycle_stage,
            params=dict(data.params),
            tags=dict(data.tags),
            metric_keys=frozenset(data.metrics),
            datasets=datasets,
            model_inputs=frozenset(m.model_id for m in models),
        )

    def metric_points(self, mlflow_run_id: str, key: str) -> list[tuple[int, int, float]]:
        """Every stored point of one metric: ``(step, timestamp, value)``."""
        points = self._call(
            f"read metric {key!r} of run {mlflow_run_id}",
            lambda: self._client.get_metric_history(mlflow_run_id, key),
        )
        return [(int(m.step), int(m.timestamp), float(m.value)) for m in points]

    def artifact_files(self, mlflow_run_id: str) -> dict[str, tuple[int, str]]:
        """Artifact path → (size, digest) of each uploaded file (downloaded and hashed)."""
        return self._call(
            f"read the artifacts of run {mlflow_run_id}",
            lambda: _files(self._client, mlflow_run_id),
        )

    def models(self) -> ModelReader:
        """The store's logged models, read one at a time (mlflow/model_snapshot.py)."""
        from mlflow.artifacts import download_artifacts

        download = partial(download_artifacts, tracking_uri=self.uri)
        return ModelReader(self._client, self._call, download, self._experiments, _no_progress_bars)

    def artifact_refs(self, mlflow_run_id: str) -> dict[str, Any]:
        """Logical path → the artifact reference document stored for it."""
        docs = self._call(
            f"read the artifact references of run {mlflow_run_id}",
            lambda: _refs(self._client, mlflow_run_id),
        )
        prefix, suffix = f"{ARTIFACT_REF_DIR}/", ".json"
        return {
            p[len(prefix) : -len(suffix)] if p.startswith(prefix) and p.endswith(suffix) else p: d
            for p, d in docs.items()
        }
