"""The MLflow destination without MLflow: a SQL store whose schema the direct writes know.

A pass that finds a few new events used to spend ~1.8 s importing MLflow and opening its store
before writing a handful of rows. :class:`SqlSink` is
:class:`~formula_foundry.sync.mlflow.client_sink.MlflowSink` — the same logic for runs,
experiments, identity tags, statuses and errors — over
:class:`~formula_foundry.sync.mlflow.sql_runs.SqlClient`, which answers its client calls by
SQL, with metric batches inserted in bulk (:mod:`~formula_foundry.sync.mlflow.sql_bulk`).
MLflow is imported only when something needs it (an artifact reference document, a logged
model, an upload into anything but a folder on this host, an experiment whose artifact
location is a URI), through an ``MlflowSink`` opened then: its client answers those calls, its
errors are today's. Files into a run's local artifact root go by MLflow's protocol without it
(:mod:`~formula_foundry.sync.mlflow.local_upload`).

:func:`open_sql_sink` returns ``None`` for a store it cannot open exactly as MLflow uses it
(:func:`~formula_foundry.sync.mlflow.sql_store.open_store`): the caller opens MLflow's sink
(which creates or migrates the store, or says what is wrong) and may try again with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from formula_foundry.config import Settings
from formula_foundry.errors import FormulaFoundryError, StoreUnavailable
from formula_foundry.redact import redact_uri
from formula_foundry.sync.engine.destination import scheme_of
from formula_foundry.sync.engine.report import one_line
from formula_foundry.sync.engine.sink import DestinationRejected, MetricRow, Sink
from formula_foundry.sync.mlflow.client_sink import MlflowSink
from formula_foundry.sync.mlflow.local_upload import MLFLOW_TEMP_PREFIX, LocalRoot
from formula_foundry.sync.mlflow.sql_bulk import BULK_LIMITS
from formula_foundry.sync.mlflow.sql_runs import SqlClient, ViewType, plain_path
from formula_foundry.sync.mlflow.sql_store import SqlStore, open_store
from formula_foundry.sync.mlflow.store_access import access_error


class SqlSink(MlflowSink):
    """An :class:`MlflowSink` whose client calls are SQL (see the module docstring)."""

    limits = BULK_LIMITS

    def __init__(
        self, uri: str, artifact_root: Path, store: SqlStore, fallback: MlflowSink | None = None
    ) -> None:
        # Not MlflowSink.__init__: that one imports MLflow and opens its store.
        self.uri, self.description, self.scheme = uri, redact_uri(uri), scheme_of(uri)
        self._artifact_root = artifact_root.absolute()
        self._experiments: dict[str, str] = {}
        self._local_roots: dict[str, LocalRoot | None] = {}
        self._exp_ids: list[str] | None = None
        self._identity_exp: str | None = None
        self._ViewType = cast(Any, ViewType)  # only .ALL is read: SqlClient ignores it
        self._store = store
        self._mlflow = fallback
        self._client: Any = SqlClient(store, lambda: self._mlflow_sink()._client)

    def _mlflow_sink(self) -> MlflowSink:
        """MLflow's own sink on the same store, opened the first time something needs it."""
        if self._mlflow is None:
            self._mlflow = MlflowSink(self.uri, self._artifact_root)
        return self._mlflow

    def _find_local_root(self, mlflow_run_id: str) -> LocalRoot | None:
        # The run's artifact URI by SQL: a plain path (what this sink writes) is a local root,
        # uploaded into without MLflow — a pass of files alone never imports it.
        rows = self.call(
            f"open the artifacts of run {mlflow_run_id}",
            lambda: self._store.rows(
                "SELECT artifact_uri FROM runs WHERE run_uuid = ?", (mlflow_run_id,)
            ),
        )
        if rows and plain_path(rows[0][0]):
            return LocalRoot(Path(rows[0][0]), MLFLOW_TEMP_PREFIX)
        return super()._find_local_root(mlflow_run_id)

    def tracking_store(self) -> object:
        return self._mlflow_sink().tracking_store()

    def classify(self, exc: BaseException, what: str) -> FormulaFoundryError | None:
        """The driver's errors as MLflow's store reports them (``OperationalError`` retried,
        any other database error a refusal); the rest as :class:`MlflowSink` maps it."""
        errors = self._store.errors
        if not isinstance(exc, errors.Error):
            return super().classify(exc, what)
        access = access_error(exc, what, self.uri)  # login refused, unreachable, locked
        if access is not None:
            return access
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        text = one_line(first, self.uri, limit=600)
        if isinstance(exc, (errors.OperationalError, errors.InterfaceError)):
            return StoreUnavailable(f"{self.description} is unavailable ({what}): {text}")
        if isinstance(exc, errors.IntegrityError):
            # Another writer inserted the same row between our read and our insert (MLflow's
            # store retries the same race): the retry reads it, compares.
            return StoreUnavailable(f"{self.description}: a concurrent write ({what}): {text}")
        return DestinationRejected(f"{self.description} refused {what}: {text}")

    def log_batch(
        self,
        mlflow_run_id: str,
        metrics: Sequence[MetricRow],
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> None:
        client: SqlClient = self._client
        self._call(
            f"log a batch to run {mlflow_run_id}",
            lambda: client.log_batch(mlflow_run_id, metrics, params, tags),
        )

    def close(self) -> None:
        self._store.close()
        if self._mlflow is not None:
            self._mlflow.close()


def open_sql_sink(settings: Settings, fallback: MlflowSink | None = None) -> SqlSink | None:
    """A :class:`SqlSink` on ``settings``' destination, or ``None`` (see the module)."""
    store = open_store(settings.backend_store_uri)
    if store is None:
        return None
    return SqlSink(settings.backend_store_uri, settings.artifact_root, store, fallback)


def open_sink(settings: Settings) -> Sink:
    """A :class:`SqlSink` where the store allows it and ``sync.bulk`` is on, else
    :class:`MlflowSink` (``client_sink.open_sink``, the engine's default sink, comes here)."""
    if settings.sync_bulk:
        direct = open_sql_sink(settings)
        if direct is not None:
            return direct
    sink = MlflowSink(settings.backend_store_uri, settings.artifact_root)
    # MLflow has now created or migrated the store if it had to: direct writes from here on.
    return (open_sql_sink(settings, sink) or sink) if settings.sync_bulk else sink
