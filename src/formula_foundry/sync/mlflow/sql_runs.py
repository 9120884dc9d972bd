"""The few ``MlflowClient`` calls a pass makes, answered by SQL, as MLflow answers them.

:class:`SqlClient` stands in for ``MlflowClient`` inside
:class:`~formula_foundry.sync.mlflow.sql_sink.SqlSink`, so the adapter's own logic (finding and
creating runs and experiments, identity tags, statuses, errors) stays the one of
:class:`~formula_foundry.sync.mlflow.client_sink.MlflowSink`, and only what MLflow's
``SqlAlchemyStore`` writes is repeated here (mlflow/store/tracking/sqlalchemy_store.py and
mlflow/tracking/_tracking_service/client.py of MLflow 3.17): the rows, their defaults
(``runs.source_type`` ``UNKNOWN``, ``user_id`` from ``mlflow.user`` or ``unknown``, the
artifact URI ``<experiment location>/<run id>/artifacts``), the checks (run active, experiment
active, a param never changes, a ``mlflow.runName`` tag renames the run) and the refusals,
worded and coded as MLflow's (:class:`~formula_foundry.sync.mlflow.sql_store.StoreRefusal`).
``tests/sync/test_sql_runs.py`` and ``tests/sync/test_bulk_differential.py`` hold it to
MLflow's client, table by table.

Every other attribute (``log_dict``, artifact uploads, a search it cannot read) is MLflow's
own client, opened the first time one is asked for (:meth:`SqlClient.__getattr__`).
"""

from __future__ import annotations

import os
import posixpath
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from formula_foundry.errors import ValidationError
from formula_foundry.sync.engine.sink import MetricRow
from formula_foundry.sync.mlflow.sql_bulk import write_metrics
from formula_foundry.sync.mlflow.sql_store import SqlStore, StoreRefusal
from formula_foundry.tracking.events import RUN_NAME_TAG, check_key

_INVALID: Final = "INVALID_PARAMETER_VALUE"
_MISSING: Final = "RESOURCE_DOES_NOT_EXIST"
# MLflow's limits (mlflow/utils/validation.py): longer param and tag values are cut (MLflow's
# default, MLFLOW_TRUNCATE_LONG_VALUES), longer names refused.
_PARAM_VALUE_MAX: Final = 6000
_TAG_VALUE_MAX: Final = 8000
_EXPERIMENT_NAME_MAX: Final = 500
_EXPERIMENT_TAG_VALUE_MAX: Final = 20000
# The search MlflowSink.find_run makes: its one tag, quoted as it quotes it.
_TAG_SEARCH: Final = re.compile(r"tags\.`ff\.run_uuid` = '((?:[^'\\]|\\.)*)'")
_EXPERIMENTS_ORDER: Final = "ORDER BY creation_time DESC, experiment_id ASC"  # MLflow's default


@dataclass
class Experiment:
    experiment_id: str
    name: str
    artifact_location: str | None
    lifecycle_stage: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class RunInfo:
    run_id: str
    experiment_id: str
    status: str
    end_time: int | None
    lifecycle_stage: str


@dataclass
class RunData:
    params: dict[str, str]
    tags: dict[str, str]


@dataclass
class Run:
    info: RunInfo
    data: RunData


class Page(list[Any]):
    """One page of a search: every row at once (``token`` ``None``)."""

    token: str | None = None


class ViewType:
    """MLflow's ``ViewType`` as the adapter passes it: deleted rows included."""

    ALL: Final = 3


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check_key(key: str) -> None:
    try:
        check_key(key, "key", "")
    except ValidationError as exc:
        raise StoreRefusal(f"Invalid value {key!r} for parameter 'key': {exc}", _INVALID) from None


def plain_path(location: str | None) -> bool:
    """An absolute path MLflow keeps and joins as a POSIX path (no scheme, no query): the only
    kind of artifact location this module writes; MLflow's client takes the others."""
    return (
        location is not None and location.startswith("/") and not any(c in location for c in ":?#;")
    )


class SqlClient:
    """``MlflowClient``'s calls of a pass, by SQL (see the module docstring)."""

    def __init__(self, store: SqlStore, real: Callable[[], Any]) -> None:
        self.store = store
        self._real_factory, self._real_client = real, None

    def __getattr__(self, name: str) -> Any:
        # Only reached for what this class does not define: MLflow's own client, opened now.
        if name.startswith("__"):
            raise AttributeError(name)
        if self._real_client is None:
            self._real_client = self._real_factory()
        return getattr(self._real_client, name)

    # -- experiments ----------------------------------------------------------------------

    def _experiment(self, where: str, key: object) -> Experiment | None:
        rows = self.store.rows(
            "SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments "
            f"WHERE {where} = ?",
            (key,),
        )
        if not rows:
            return None
        eid, name, location, stage = rows[0]
        tags = self.store.rows(
            "SELECT key, value FROM experiment_tags WHERE experiment_id = ?", (eid,)
        )
        return Experiment(str(eid), name, location, stage, dict(tags))

    def get_experiment_by_name(self, name: str) -> Experiment | None:
        return self._experiment("name", name)

    def get_experiment(self, experiment_id: str) -> Experiment:
        exp = self._experiment("experiment_id", int(experiment_id))
        if exp is None:
            raise StoreRefusal(f"No Experiment with id={int(experiment_id)} exists", _MISSING)
        return exp

    def _active_experiment(self, experiment_id: str) -> Experiment:
        exp = self.get_experiment(experiment_id)
        if exp.lifecycle_stage != "active":
            raise StoreRefusal(
                f"The experiment {exp.experiment_id} must be in the 'active' state. "
                f"Current state is {exp.lifecycle_stage}.",
                _INVALID,
            )
        return exp

    def search_experiments(self, **_: Any) -> Page:
        """Every experiment's id (deleted ones too), in MLflow's order, as one page."""
        rows = self.store.rows(f"SELECT experiment_id FROM experiments {_EXPERIMENTS_ORDER}")
        return Page(Experiment(str(r[0]), "", None, "") for r in rows)

    def create_experiment(self, name: str, artifact_location: str | None = None) -> str:
        if not plain_path(artifact_location):
            return str(self._real.create_experiment(name, artifact_location=artifact_location))
        if not isinstance(name, str) or name == "":
            raise StoreRefusal(f"Invalid experiment name: '{name}'", _INVALID)
        if len(name) > _EXPERIMENT_NAME_MAX:
            raise StoreRefusal(
                f"'name' exceeds the maximum length of {_EXPERIMENT_NAME_MAX} characters", _INVALID
            )
        limit = int(os.environ.get("MLFLOW_ARTIFACT_LOCATION_MAX_LENGTH", "2048"))
        if len(str(artifact_location)) > limit:
            raise StoreRefusal(
                "Invalid artifact path length. The length of the artifact path cannot be "
                f"greater than {limit} characters. To configure this limit, please set the "
                "MLFLOW_ARTIFACT_LOCATION_MAX_LENGTH environment variable.",
                _INVALID,
            )
        now = _now_ms()
        try:
            with self.store.write():
                (eid,) = self.store.execute(
                    "INSERT INTO experiments (name, artifact_location, lifecycle_stage, "
                    "creation_time, last_update_time, workspace) VALUES (?, ?, ?, ?, ?, ?) "
                    "RETURNING experiment_id",
                    (name, artifact_location, "active", now, now, "default"),
                ).fetchone()
        except self.store.errors.IntegrityError as exc:
            raise StoreRefusal(
                f"Experiment(name={name}) already exists. Error: {exc}", "RESOURCE_ALREADY_EXISTS"
            ) from None
        return str(eid)

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        _check_key(key)
        if len(value) > _EXPERIMENT_TAG_VALUE_MAX:
            raise StoreRefusal(
                f"'value' exceeds the maximum length of {_EXPERIMENT_TAG_VALUE_MAX} characters",
                _INVALID,
            )
        with self.store.write():
            exp = self._active_experiment(experiment_id)
            self.store.execute(
                "INSERT INTO experiment_tags (key, value, experiment_id) VALUES (?, ?, ?) "
                "ON CONFLICT (key, experiment_id) DO UPDATE SET value = excluded.value",
                (key, value, int(exp.experiment_id)),
            )

    # -- runs -----------------------------------------------------------------------------

    def _active_run(self, run_id: str) -> None:
        rows = self.store.rows("SELECT lifecycle_stage FROM runs WHERE run_uuid = ?", (run_id,))
        if not rows:
            raise StoreRefusal(f"Run with id={run_id} not found", _MISSING)
        stage = rows[0][0]
        if stage != "active":
            raise StoreRefusal(
                f"The run {run_id} must be in the 'active' state. Current state is {stage}.",
                _INVALID,
            )

    def get_run(self, run_id: str) -> Run:
        rows = self.store.rows(
            "SELECT experiment_id, status, end_time, lifecycle_stage FROM runs WHERE run_uuid = ?",
            (run_id,),
        )
        if not rows:
            raise StoreRefusal(f"Run with id={run_id} not found", _MISSING)
        eid, status, end_time, stage = rows[0]
        params = self.store.rows("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,))
        tags = self.store.rows("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,))
        info = RunInfo(run_id, str(eid), status, end_time, stage)
        return Run(info, RunData(dict(params), dict(tags)))

    def search_runs(self, experiment_ids: Sequence[str], query: str, **kw: Any) -> list[Any]:
        """The runs tagged ``ff.run_uuid`` as asked (the one search the adapter makes), in
        MLflow's order (newest start first, then id), at most ``max_results``."""
        found = _TAG_SEARCH.fullmatch(query)
        if found is None:
            return list(self._real.search_runs(experiment_ids, query, **kw))
        value = re.sub(r"\\(.)", r"\1", found.group(1))
        ids = [int(e) for e in experiment_ids]
        if not ids:
            return []
        rows = self.store.rows(
            "SELECT r.run_uuid, r.experiment_id, r.status, r.end_time, r.lifecycle_stage "
            "FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            f"WHERE t.key = ? AND t.value = ? AND r.experiment_id IN ({', '.join('?' * len(ids))}) "
            "ORDER BY r.start_time DESC, r.run_uuid LIMIT ?",
            ("ff.run_uuid", value, *ids, int(kw.get("max_results", 1000))),
        )
        return [Run(RunInfo(r, str(e), s, t, st), RunData({}, {})) for r, e, s, t, st in rows]

    def create_run(
        self, experiment_id: str, start_time: int | None, tags: dict[str, str], run_name: str
    ) -> Run:
        exp = self.get_experiment(experiment_id)
        if not plain_path(exp.artifact_location):
            return self._real.create_run(  # type: ignore[no-any-return]
                experiment_id, start_time=start_time, tags=tags, run_name=run_name
            )
        tag_name = tags.get(RUN_NAME_TAG)
        if run_name and tag_name and run_name != tag_name:
            raise StoreRefusal(
                "Both 'run_name' argument and 'mlflow.runName' tag are specified, but with "
                f"different values (run_name='{run_name}', mlflow.runName='{tag_name}').",
                _INVALID,
            )
        name = run_name or tag_name
        if not name:  # MLflow would make one up: its words, not ours
            return self._real.create_run(  # type: ignore[no-any-return]
                experiment_id, start_time=start_time, tags=tags, run_name=run_name
            )
        rows = dict(tags) if tag_name else {**tags, RUN_NAME_TAG: name}
        run_id = uuid.uuid4().hex
        artifact_uri = posixpath.join(str(exp.artifact_location), f"{run_id}/artifacts")
        with self.store.write():
            self._active_experiment(experiment_id)
            self.store.execute(
                "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, "
                "user_id, status, start_time, end_time, source_version, lifecycle_stage, "
                "artifact_uri, experiment_id, deleted_time) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, NULL)",
                (
                    run_id,
                    name,
                    "UNKNOWN",
                    "",
                    "",
                    tags.get("mlflow.user", "unknown"),
                    "RUNNING",
                    start_time or _now_ms(),
                    "",
                    "active",
                    artifact_uri,
                    int(exp.experiment_id),
                ),
            )
            if rows:
                self.store.executemany(
                    "INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?)",
                    [(k, v, run_id) for k, v in rows.items()],
                )
        return Run(RunInfo(run_id, exp.experiment_id, "RUNNING", None, "active"), RunData({}, rows))

    def _update_run_info(self, run_id: str, status: str, end_time: int | None) -> None:
        with self.store.write():
            self._active_run(run_id)
            if end_time is None:
                sql = "UPDATE runs SET status = ? WHERE run_uuid = ?"
                self.store.execute(sql, (status, run_id))
            else:
                self.store.execute(
                    "UPDATE runs SET status = ?, end_time = ? WHERE run_uuid = ?",
                    (status, end_time, run_id),
                )

    def update_run(self, run_id: str, status: str) -> None:
        self.get_run(run_id)  # MLflow's client reads the run first: a missing one is refused so
        self._update_run_info(run_id, status, None)

    def set_terminated(self, run_id: str, status: str, end_time: int | None) -> None:
        self._update_run_info(run_id, status or "FINISHED", end_time or _now_ms())

    def delete_tag(self, run_id: str, key: str) -> None:
        with self.store.write():
            self._active_run(run_id)
            gone = self.store.execute(
                "DELETE FROM tags WHERE run_uuid = ? AND key = ?", (run_id, key)
            ).rowcount
        if not gone:
            raise StoreRefusal(f"No tag with name: {key} in run with id {run_id}", _MISSING)

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[MetricRow],
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> None:
        """``log_batch`` in one write transaction: the run checked, then, in MLflow's order,
        params (a changed one refuses the whole batch before anything is written), metrics,
        tags (last write wins; ``mlflow.runName`` renames the run, an empty one is ignored)."""
        for key, _ in (*params, *tags):
            _check_key(key)
        params = [(k, v[:_PARAM_VALUE_MAX]) for k, v in params]
        tags = [(k, v[:_TAG_VALUE_MAX]) for k, v in tags]
        # The run's check inside the transaction proves every row's foreign key (see write()).
        with self.store.write(foreign_keys=False):
            self._active_run(run_id)
            if params:
                self._log_params(run_id, params)
            if metrics:
                write_metrics(self.store, run_id, metrics)
            for key, value in tags:
                if key == RUN_NAME_TAG:
                    if not value:
                        continue
                    sql = "UPDATE runs SET name = ? WHERE run_uuid = ?"
                    self.store.execute(sql, (value, run_id))
                self.store.execute(
                    "INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?) "
                    "ON CONFLICT (key, run_uuid) DO UPDATE SET value = excluded.value",
                    (key, value, run_id),
                )

    def _log_params(self, run_id: str, params: Sequence[tuple[str, str]]) -> None:
        existing = dict(
            self.store.rows("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,))
        )
        changed = [
            {"key": k, "old_value": existing[k], "new_value": v}
            for k, v in params
            if k in existing and existing[k] != v
        ]
        if changed:
            raise StoreRefusal(
                "Changing param values is not allowed. Params were already"
                f" logged='{changed}' for run ID='{run_id}'.",
                _INVALID,
            )
        new = [(k, v, run_id) for k, v in params if k not in existing]
        if new:
            sql = "INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)"
            self.store.executemany(sql, new)

    @property
    def _real(self) -> Any:
        if self._real_client is None:
            self._real_client = self._real_factory()
        return self._real_client
