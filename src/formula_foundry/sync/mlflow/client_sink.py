"""The MLflow destination: the only module of the sync that writes through ``mlflow``.

It is imported only when a pass has something to send, so an idle pass never pays for
``import mlflow``. Every method is idempotent (see docs/sync.md for why each write is):

* runs are found by their tag ``ff.run_uuid`` (deleted runs included) before one is created,
  and the tag is written by ``create_run`` itself, in the run's own transaction;
* experiments are got, created, and got again if another writer created them meanwhile;
  in SQL stores they get an explicit artifact location under ``tracking.artifact_root``;
* metrics carry their original timestamp and step, params are checked against what the run
  has, tags and statuses are last-write-wins and replayed in event order;
* artifact references are small JSON documents written with ``log_dict`` (same path, same
  content on a retry); one whose document cannot be written for a local reason (a path that
  is both a file and a folder, a name too long, permissions) is refused alone
  (:class:`~formula_foundry.sync.engine.sink.RecordRejected`), never taken for an outage;
* the destination's identity tags (:mod:`formula_foundry.sync.engine.destination_id`) live on the
  ``Default`` experiment, or, where that one is deleted or cannot be tagged, on
  :data:`~formula_foundry.sync.engine.destination_id.FALLBACK_EXPERIMENT`.

MLflow errors become :class:`~formula_foundry.errors.StoreUnavailable` (retry later),
:class:`~formula_foundry.errors.ConfigError` (login refused, driver missing: see
:mod:`formula_foundry.sync.mlflow.store_access`) or a
:class:`~formula_foundry.sync.engine.sink.DestinationRejected` subclass; messages never carry a
password.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from formula_foundry.config import Settings
from formula_foundry.errors import (
    ConfigError,
    FormulaFoundryError,
    MlflowMissing,
)
from formula_foundry.redact import redact_uri
from formula_foundry.sync.engine.destination import INSTALL_HINT, SQL_SCHEMES, scheme_of
from formula_foundry.sync.engine.refusals import local_refusal, quoted, shorten_quoted
from formula_foundry.sync.engine.report import one_line
from formula_foundry.sync.engine.sink import (
    MLFLOW_LIMITS,
    ArtifactRef,
    DestinationRejected,
    MetricRow,
    ModelSink,
    RecordRejected,
    RemoteRun,
    RunMissing,
    RunSpec,
    Sink,
    StoredParamConflict,
    artifact_ref_file,
)
from formula_foundry.sync.mlflow.artifact_delete import delete_run_artifacts, delete_superseded
from formula_foundry.sync.mlflow.identity import IdentityTags
from formula_foundry.sync.mlflow.internals import create_sqlite_store, rest_poster
from formula_foundry.sync.mlflow.lean_imports import OPT_OUT_ENV, hidden_module
from formula_foundry.sync.mlflow.local_upload import LocalRoot
from formula_foundry.sync.mlflow.rest_batch import log_batch_body
from formula_foundry.sync.mlflow.store_access import (
    access_error,
    prepare_mlflow_env,
    probe_database,
)

T = TypeVar("T")


def _experiment_dir(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
    if slug != name:
        import hashlib

        slug = f"{slug[:80]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return slug


class MlflowSink(IdentityTags):
    """Writes replayed events into one MLflow tracking URI (SQL store or server)."""

    limits = MLFLOW_LIMITS
    # A console's live parts (engine/console_upload.py); what a later file at the same path
    # supersedes across sync.upload_max_bytes (engine/uploads.py).
    delete_artifacts, delete_superseded = delete_run_artifacts, delete_superseded

    def __init__(self, uri: str, artifact_root: Path) -> None:
        try:
            import mlflow  # noqa: F401
            from mlflow import MlflowClient
            from mlflow.entities import Metric, Param, RunTag, ViewType
        except ImportError as exc:
            hidden = hidden_module(exc)
            if hidden is not None:
                raise ConfigError(
                    f"MLflow needs {hidden!r}, which ff-sync hides from MLflow to save memory; "
                    f"run again with {OPT_OUT_ENV}=1"
                ) from None
            raise MlflowMissing(
                f"MLflow is not installed ({exc}); on the sync host run: {INSTALL_HINT}"
            ) from None
        prepare_mlflow_env()
        self._Metric, self._Param, self._RunTag, self._ViewType = Metric, Param, RunTag, ViewType
        self.uri = uri
        self.description = redact_uri(uri)
        self.scheme = scheme_of(uri)
        self._artifact_root = artifact_root.absolute()
        self._experiments: dict[str, str] = {}
        self._local_roots: dict[str, LocalRoot | None] = {}
        self._exp_ids: list[str] | None = None  # all experiment ids, read once per pass
        self._identity_exp: str | None = None  # where identity_tags found the tags
        if self.scheme == "sqlite":
            self._call("open the store", self._prepare_sqlite)
        elif self.scheme in SQL_SCHEMES:
            self._call("open the store", lambda: probe_database(uri))
        # Open the store now (the client does), so an unreachable destination fails here.
        self._client = self._call("open the store", lambda: MlflowClient(tracking_uri=uri))
        store = self._call("open the store", lambda: self._client._tracking_client.store)
        # The store's log_batch skips the client's per-metric re-wrapping (~10% of the cost);
        # batches are already within the limits the client would split them into.
        self._log_batch: Callable[..., Any] = getattr(store, "log_batch", None) or (
            lambda mlflow_run_id, metrics, params, tags: self._client.log_batch(
                mlflow_run_id, metrics=metrics, params=params, tags=tags
            )
        )
        # Toward a server: the same request without the protobuf round trip (rest_batch.py).
        self._post_batch = rest_poster(store)

    # -- errors ---------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except FormulaFoundryError:
            raise
        except Exception as exc:
            err = self.classify(exc, what)
            if err is None:
                raise
            raise err from exc

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` against this destination, its failures mapped as for every write here
        (``what`` names it in errors); the bulk path's own writes go through it."""
        return self._call(what, fn)

    def tracking_store(self) -> object:
        """MLflow's tracking store behind the client (the bulk path reads its engine)."""
        return self._call("open the store", lambda: self._client._tracking_client.store)

    def classify(self, exc: BaseException, what: str) -> FormulaFoundryError | None:
        """Map an exception from MLflow (or its drivers) to our families; None: a bug."""
        access = access_error(exc, what, self.uri)
        if access is not None:
            return access
        code = getattr(exc, "error_code", None)
        if code is None:
            return None
        first = shorten_quoted((str(exc).strip().splitlines() or [""])[0])
        text = one_line(first, self.uri, limit=600)
        if what == "open the store":
            # Nothing was written yet: the store itself is refused (e.g. MLflow 3's refusal of
            # file:// stores) — the user's to fix, with MLflow's whole message.
            return ConfigError(f"{self.description}: MLflow refused the store: {text}")
        if code == "INVALID_PARAMETER_VALUE" and "Changing param values is not allowed" in text:
            return StoredParamConflict(f"{self.description} refused {what}: {text}")
        if code == "RESOURCE_DOES_NOT_EXIST":
            return RunMissing(f"{self.description} has no such run ({what}): {text}")
        return DestinationRejected(f"{self.description} refused {what}: {text}")

    # -- store preparation ----------------------------------------------------------------

    def _prepare_sqlite(self) -> None:
        create_sqlite_store(self.uri, self._artifact_root, self.description)

    # -- runs and experiments -------------------------------------------------------------

    def _experiment_id(self, name: str, create: bool) -> str | None:
        if name in self._experiments:
            return self._experiments[name]
        exp = self._call(
            f"get experiment {quoted(name)}", lambda: self._client.get_experiment_by_name(name)
        )
        if exp is None and create:
            location = (
                str(self._artifact_root / _experiment_dir(name))
                if self.scheme in SQL_SCHEMES
                else None
            )
            try:
                new_id = self._call(
                    f"create experiment {quoted(name)}",
                    lambda: self._client.create_experiment(name, artifact_location=location),
                )
            except DestinationRejected as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
                    raise
                self._exp_ids = None  # another writer created it: list them all again
            else:
                if self._exp_ids is not None:
                    self._exp_ids.append(str(new_id))
                self._experiments[name] = str(new_id)
                return str(new_id)
            exp = self._call(
                f"get experiment {quoted(name)}",
                lambda: self._client.get_experiment_by_name(name),
            )
        if exp is None:
            return None
        if exp.lifecycle_stage != "active":
            if not create:
                return str(exp.experiment_id)  # its runs can still be found
            raise DestinationRejected(
                f"experiment {quoted(name)} (id {exp.experiment_id}) is deleted in "
                f"{self.description}; "
                f"restore it (mlflow experiments restore --experiment-id {exp.experiment_id}) "
                "or remove it for good, then run ff-sync again"
            )
        self._experiments[name] = str(exp.experiment_id)  # only active ones are remembered
        return str(exp.experiment_id)

    def find_run(self, spool_run_id: str, experiment: str | None) -> RemoteRun | None:
        # Every experiment, deleted ones too: a renamed experiment must not hide a run (the
        # name in the spool is only a hint) and a duplicate would follow.
        if self._exp_ids is None:
            self._exp_ids = self._all_experiment_ids()
        ids = self._exp_ids
        quoted = spool_run_id.replace("\\", "\\\\").replace("'", "\\'")
        query = f"tags.`ff.run_uuid` = '{quoted}'"
        found: list[Any] = []
        for i in range(0, len(ids), 100):
            chunk = ids[i : i + 100]
            found.extend(
                self._call(
                    f"look up run {spool_run_id}",
                    partial(
                        self._client.search_runs,
                        chunk,
                        query,
                        run_view_type=self._ViewType.ALL,
                        max_results=2,
                    ),
                )
            )
        if not found:
            return None
        found.sort(key=lambda r: r.info.run_id)
        first = found[0]
        return RemoteRun(
            first.info.run_id,
            str(first.info.experiment_id),
            first.info.status,
            tuple(r.info.run_id for r in found[1:]),
        )

    def _all_experiment_ids(self) -> list[str]:
        ids: list[str] = []
        token: str | None = None
        while True:
            page = self._call(
                "list experiments",
                partial(
                    self._client.search_experiments,
                    view_type=self._ViewType.ALL,
                    max_results=1000,
                    page_token=token,
                ),
            )
            ids.extend(str(e.experiment_id) for e in page)
            token = page.token
            if not token:
                return ids

    def create_run(self, spec: RunSpec) -> RemoteRun:
        exp_id = self._experiment_id(spec.experiment, create=True)
        if exp_id is None:  # pragma: no cover - create=True returns an id or raises
            raise DestinationRejected(f"experiment {spec.experiment!r} could not be created")
        tags = spec.creation_tags()
        run = self._call(
            f"create run {spec.spool_run_id}",
            lambda: self._client.create_run(
                exp_id, start_time=spec.start_time, tags=tags, run_name=spec.name
            ),
        )
        return RemoteRun(run.info.run_id, exp_id, run.info.status)

    def get_params(self, mlflow_run_id: str) -> dict[str, str]:
        run = self._call(f"read run {mlflow_run_id}", lambda: self._client.get_run(mlflow_run_id))
        return dict(run.data.params)

    # -- writes ---------------------------------------------------------------------------

    def log_batch(
        self,
        mlflow_run_id: str,
        metrics: Sequence[MetricRow],
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> None:
        post = self._post_batch
        if post is not None:
            body = log_batch_body(mlflow_run_id, metrics, params, tags)
            self._call(f"log a batch to run {mlflow_run_id}", lambda: post(body))
            return
        metric, param, tag = self._Metric, self._Param, self._RunTag
        ms = [metric(k, v, t, s) for k, v, t, s in metrics]
        ps = [param(k, v) for k, v in params]
        ts = [tag(k, v) for k, v in tags]
        self._call(
            f"log a batch to run {mlflow_run_id}",
            lambda: self._log_batch(mlflow_run_id, ms, ps, ts),
        )

    def log_artifact_ref(self, mlflow_run_id: str, ref: ArtifactRef) -> None:
        path = artifact_ref_file(ref.path)
        what = f"write {quoted(path)} of run {mlflow_run_id}"
        try:
            self._client.log_dict(mlflow_run_id, ref.to_json(), path)
        except FormulaFoundryError:
            raise
        except Exception as exc:
            local = local_refusal(exc)
            if local is not None:
                raise RecordRejected(
                    f"{self.description} cannot store the artifact reference {quoted(ref.path)}"
                    f" of run {mlflow_run_id} ({quoted(path)}): {local}"
                ) from exc
            err = self.classify(exc, what)
            if err is None:
                raise
            raise err from exc

    def _find_local_root(self, mlflow_run_id: str) -> LocalRoot | None:  # see local_root
        from formula_foundry.sync.mlflow.internals import local_artifact_root

        what = f"open the artifacts of run {mlflow_run_id}"
        return self.call(what, lambda: local_artifact_root(self._client, mlflow_run_id))

    def upload_artifacts(
        self, mlflow_run_id: str, files: Sequence[tuple[ArtifactRef, Path]]
    ) -> list[tuple[ArtifactRef, str]]:
        from formula_foundry.sync.mlflow.artifact_upload import upload_artifacts

        return upload_artifacts(self, self._client, mlflow_run_id, files)

    def delete_tag(self, mlflow_run_id: str, key: str) -> None:
        client = self._client

        def attempt() -> None:
            try:
                client.delete_tag(mlflow_run_id, key)
            except Exception as exc:
                # Deleted by an earlier pass that died before recording it: done already.
                if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                if key in client.get_run(mlflow_run_id).data.tags:
                    raise

        self._call(f"delete tag {quoted(key)} of run {mlflow_run_id}", attempt)

    def set_status(self, mlflow_run_id: str, status: str, end_time: int | None) -> None:
        if status == "RUNNING" or end_time is None:  # reopened, or ended without a time
            self._call(
                f"set run {mlflow_run_id} {status}",
                lambda: self._client.update_run(mlflow_run_id, status=status),
            )
            return
        self._call(
            f"end run {mlflow_run_id}",
            lambda: self._client.set_terminated(mlflow_run_id, status=status, end_time=end_time),
        )

    def model_sink(self) -> ModelSink:
        """The logged-model calls of this destination (sync/mlflow/models.py), through MLflow's
        own client whatever writes the runs (sql_sink writes them in SQL)."""
        from mlflow import MlflowClient, entities

        from formula_foundry.sync.mlflow.models import ModelWriter

        if "_models" not in self.__dict__:
            client = self._call("open the store", lambda: MlflowClient(tracking_uri=self.uri))
            out: ModelSink = ModelWriter(self, client, entities)
            self.__dict__["_models"] = out
        writer: ModelSink = self.__dict__["_models"]
        return writer

    def close(self) -> None:
        pass


def open_sink(settings: Settings) -> Sink:
    """The sink for ``settings``' destination: direct SQL for known schemas (mlflow/sql_sink.py)."""
    from formula_foundry.sync.mlflow.sql_sink import open_sink as open_direct_or_mlflow

    return open_direct_or_mlflow(settings)
