"""Bulk metric writes straight into MLflow's SQL schema (SQLite, PostgreSQL).

MLflow's ``log_batch`` spends ~100 µs per metric in its ORM; an ``executemany`` of the same
rows costs a few µs. :class:`BulkSink` wraps an :class:`MlflowSink`: runs, experiments,
params, tags, statuses and artifacts still go through MLflow; only metrics are inserted here,
each batch in one committed transaction that also maintains ``latest_metrics``.

What MLflow's ``SqlAlchemyStore`` does for metrics (``_log_metrics_once``,
``_update_latest_metrics_if_necessary``), and this module repeats, checked by
``tests/sync/test_bulk_differential.py``:

* the run must exist and be ``active`` (a FINISHED run accepts metrics, a deleted one not);
* NaN is stored as ``value 0, is_nan true``, ±inf as ±1.7976931348623157e308;
* a row already present (same primary key) is left alone, so replays are no-ops;
* per key, ``latest_metrics`` holds the first point, in arrival order, whose
  ``(step, timestamp, value)`` (stored value) is strictly greater than every earlier one.
  Points already stored never beat it, so folding them in again changes nothing: the
  result does not depend on how the points were cut into batches.

The schema is MLflow's private business: the bulk path is used only when the store's
``alembic_version`` is one this module was tested against; otherwise ``open_bulk`` returns
the plain sink. Imports SQLAlchemy, not MLflow.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from formula_foundry.errors import StoreUnavailable
from formula_foundry.sync.engine.destination import BULK_SCHEMES
from formula_foundry.sync.engine.sink import (
    ArtifactRef,
    BatchLimits,
    MetricRow,
    RemoteRun,
    RunSpec,
)

if TYPE_CHECKING:  # client_sink imports this module when it opens a bulk sink
    from formula_foundry.sync.mlflow.client_sink import MlflowSink

# The schema heads this module was checked against (MLflow 3.17's). A store migrated by a
# newer MLflow may have moved metrics elsewhere: it goes through log_batch instead.
KNOWN_REVISIONS: Final = frozenset({"dc11669786a5"})
# Params and tags keep MLflow's per-call limits: they still go through log_batch.
BULK_LIMITS: Final = BatchLimits(metrics=20_000, params=100, tags=100, total=20_000)
_KEYS_PER_QUERY: Final = 500  # MLflow's own chunk: bounded bind parameters on every database
_DOUBLE_MAX: Final = 1.7976931348623157e308

log = logging.getLogger(__name__)


def _metric_table(name: str) -> sa.TableClause:
    """``metrics`` and ``latest_metrics`` share these columns (the rest stay MLflow's)."""
    return sa.table(
        name,
        sa.column("key", sa.String),
        sa.column("value", sa.Float),
        sa.column("timestamp", sa.BigInteger),
        sa.column("step", sa.BigInteger),
        sa.column("is_nan", sa.Boolean),
        sa.column("run_uuid", sa.String),
    )


_METRICS = _metric_table("metrics")
_LATEST = _metric_table("latest_metrics")
_RUNS = sa.table("runs", sa.column("run_uuid", sa.String), sa.column("lifecycle_stage"))
_SQLITE_INSERT: Final = (
    "INSERT OR IGNORE INTO metrics (key, value, timestamp, step, is_nan, run_uuid) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
# A batch of finite values of a run whose id is plain (letters and digits: MLflow's are 32 hex
# digits), so it can be spelled in the statement: ``% mlflow_run_id``.
_SQLITE_INSERT_FINITE: Final = (
    "INSERT OR IGNORE INTO metrics (key, value, timestamp, step, is_nan, run_uuid) "
    "VALUES (?, ?, ?, ?, 0, '%s')"
)
# Each connection's own table for the rows of a batch (emptied at every commit).
_PG_STAGED: Final = (
    "SELECT to_regclass('pg_temp.ff_metrics_batch'), "
    "has_database_privilege(current_database(), 'TEMPORARY')"
)
_PG_STAGE: Final = (
    "CREATE TEMPORARY TABLE ff_metrics_batch (key VARCHAR(250), value DOUBLE PRECISION, "
    "timestamp BIGINT, step BIGINT, is_nan BOOLEAN, run_uuid VARCHAR(32)) ON COMMIT DELETE ROWS"
)
_PG_COPY: Final = (
    "COPY ff_metrics_batch (key, value, timestamp, step, is_nan, run_uuid) FROM STDIN "
    "(FORMAT BINARY)"
)
_PG_FROM_STAGE: Final = (
    "INSERT INTO metrics (key, value, timestamp, step, is_nan, run_uuid) SELECT key, value, "
    "timestamp, step, is_nan, run_uuid FROM ff_metrics_batch ON CONFLICT DO NOTHING"
)
_PLAIN_ID: Final = re.compile(r"[0-9A-Za-z]{1,64}")
_KEY: Final = operator.itemgetter(0)
_VALUE: Final = operator.itemgetter(1)

# (key, stored value, timestamp, step, is_nan, run_uuid): one row of ``metrics``.
SqlRow = tuple[str, float, int, int, bool, str]
# A SqlRow, or a MetricRow whose value is finite (stored as it is): what fold_latest compares.
_Row = TypeVar("_Row", bound=tuple[Any, ...])


class _StoreRefusal(Exception):
    """A refusal worded and coded as MLflow's store words it, for ``MlflowSink.classify``."""

    def __init__(self, message: str, error_code: str) -> None:
        super().__init__(message)
        self.error_code = error_code


def sql_rows(mlflow_run_id: str, metrics: Sequence[MetricRow]) -> list[SqlRow]:
    """The rows MLflow would store: NaN as 0 + is_nan, ±inf clamped to the largest double."""
    rows: list[SqlRow] = []
    append = rows.append
    isinf = math.isinf
    for key, value, t, step in metrics:
        if value != value:
            append((key, 0.0, t, step, True, mlflow_run_id))
        elif isinf(value):
            append((key, _DOUBLE_MAX if value > 0 else -_DOUBLE_MAX, t, step, False, mlflow_run_id))
        else:
            append((key, value, t, step, False, mlflow_run_id))
    return rows


def _all_finite(metrics: Sequence[MetricRow]) -> bool:
    """Whether no value is NaN or ±inf (stored otherwise, see sql_rows). A float sum is finite
    only if every term is: NaN and ±inf propagate (inf - inf is NaN); an overflow of finite
    terms gives inf, which only sends the batch the long way."""
    return math.isfinite(sum(map(_VALUE, metrics)))


def _as_sql(row: tuple[Any, ...], mlflow_run_id: str) -> SqlRow:
    """A folded row as a SqlRow (a metric row of a finite batch is stored as it is)."""
    return (*row, False, mlflow_run_id) if len(row) == 4 else row


def fold_latest(rows: Sequence[_Row], latest: dict[str, _Row]) -> tuple[dict[str, _Row], set[str]]:
    """Fold ``rows`` into ``latest`` like MLflow (strictly greater replaces); changed keys.

    SQL rows, or metric rows of finite values (stored as they are): both begin with ``key,
    value, timestamp, step``, all that the fold compares."""
    before = dict(latest)
    get = latest.get
    for row in rows:
        key = row[0]
        cur = get(key)
        # (step, timestamp, value) > the current one's, spelled out: most points win on step.
        if cur is None or (
            row[3] > cur[3] or (row[3] == cur[3] and (row[2], row[1]) > (cur[2], cur[1]))
        ):
            latest[key] = row
    changed = {key for key, row in latest.items() if row is not before.get(key)}
    return latest, changed


def as_flushed(row: SqlRow, stored: SqlRow | None) -> SqlRow:
    """The row MLflow's ORM leaves in the database when it moves ``stored`` to ``row``.

    The ORM writes only the columns whose new value differs (``!=``) from the loaded one, so
    an existing ``0.0`` replaced by ``-0.0`` stays ``0.0`` (PostgreSQL keeps the sign of
    zero, SQLite does not: only the PostgreSQL differential test sees this).
    """
    if stored is None or row[1] != stored[1]:
        return row
    return (row[0], stored[1], *row[2:])


class BulkSink:
    """An :class:`MlflowSink` whose metrics are inserted in bulk (see the module docstring)."""

    limits = BULK_LIMITS

    def __init__(self, inner: MlflowSink, engine: Engine) -> None:
        self.inner, self.engine = inner, engine
        self.description = inner.description
        self._sqlite = engine.dialect.name == "sqlite"

    # -- everything but metrics: MLflow's client --------------------------------------------

    def find_run(self, spool_run_id: str, experiment: str | None) -> RemoteRun | None:
        return self.inner.find_run(spool_run_id, experiment)

    def create_run(self, spec: RunSpec) -> RemoteRun:
        return self.inner.create_run(spec)

    def get_params(self, mlflow_run_id: str) -> dict[str, str]:
        return self.inner.get_params(mlflow_run_id)

    def log_artifact_ref(self, mlflow_run_id: str, ref: ArtifactRef) -> None:
        self.inner.log_artifact_ref(mlflow_run_id, ref)

    def upload_artifacts(
        self, mlflow_run_id: str, files: Sequence[tuple[ArtifactRef, Path]]
    ) -> list[tuple[ArtifactRef, str]]:
        return self.inner.upload_artifacts(mlflow_run_id, files)

    def delete_tag(self, mlflow_run_id: str, key: str) -> None:
        self.inner.delete_tag(mlflow_run_id, key)

    def set_status(self, mlflow_run_id: str, status: str, end_time: int | None) -> None:
        self.inner.set_status(mlflow_run_id, status, end_time)

    def identity_tags(self) -> dict[str, str]:
        return self.inner.identity_tags()

    def set_identity_tag(self, key: str, value: str) -> None:
        self.inner.set_identity_tag(key, value)

    def close(self) -> None:
        self.inner.close()

    # -- batches --------------------------------------------------------------------------

    def log_batch(
        self,
        mlflow_run_id: str,
        metrics: Sequence[MetricRow],
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> None:
        # MLflow's order: params (a conflict stops the batch before any metric), metrics, tags.
        if params:
            self.inner.log_batch(mlflow_run_id, (), params, ())
        if metrics:
            what = f"log a batch to run {mlflow_run_id}"
            self.inner.call(what, lambda: self._write_metrics(mlflow_run_id, metrics))
        if tags:
            self.inner.log_batch(mlflow_run_id, (), (), tags)

    def _write_metrics(self, mlflow_run_id: str, metrics: Sequence[MetricRow]) -> None:
        try:
            self._write_metrics_once(mlflow_run_id, metrics)
        except sa.exc.IntegrityError as exc:
            # Another writer created one of the run's latest_metrics rows between our read and
            # our insert (MLflow's store retries the same race): the retry reads it, compares.
            why = f"a concurrent write to run {mlflow_run_id} ({type(exc).__name__})"
            raise StoreUnavailable(f"{self.description}: {why}") from None

    def _write_metrics_once(self, mlflow_run_id: str, metrics: Sequence[MetricRow]) -> None:
        # Finite values are stored as they are: the metric rows themselves are the SQL rows,
        # the constant columns spelled in the statement (no copy, two binds fewer per row).
        plain = self._sqlite and _all_finite(metrics) and _PLAIN_ID.fullmatch(mlflow_run_id)
        # A list either way: SQLAlchemy would take a tuple for the parameters of one row.
        rows: list[Any] = list(metrics) if plain else sql_rows(mlflow_run_id, metrics)
        if not self._sqlite:
            with self.engine.begin() as conn:
                self._check_run(conn, mlflow_run_id)
                self._insert_core(conn, rows)
                self._fold_into_latest(conn, mlflow_run_id, rows)
            return
        insert = _SQLITE_INSERT_FINITE % mlflow_run_id if plain else _SQLITE_INSERT
        with self.engine.connect() as conn:
            # One write transaction from the run's check to the commit (pysqlite would begin
            # only at the insert): no other writer can delete or end the run in between, so
            # the check proves the foreign key SQLite would otherwise look up for every row.
            fk = conn.exec_driver_sql("PRAGMA foreign_keys").scalar()
            conn.exec_driver_sql("PRAGMA foreign_keys = OFF")
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                self._check_run(conn, mlflow_run_id)
                conn.exec_driver_sql(insert, rows)
                self._fold_into_latest(conn, mlflow_run_id, rows)
                conn.commit()
            finally:
                conn.rollback()  # after a failure; a no-op after the commit
                conn.exec_driver_sql(f"PRAGMA foreign_keys = {1 if fk else 0}")

    def _fold_into_latest(
        self, conn: Connection, mlflow_run_id: str, rows: Sequence[tuple[Any, ...]]
    ) -> None:
        keys = sorted(set(map(_KEY, rows)))
        stored = self._read_latest(conn, mlflow_run_id, keys)
        latest, changed = fold_latest(rows, dict[str, tuple[Any, ...]](stored))
        final = [
            as_flushed(_as_sql(latest[k], mlflow_run_id), stored.get(k)) for k in sorted(changed)
        ]
        self._write_latest(conn, [r for r in final if r != stored.get(r[0])], set(stored))

    @staticmethod
    def _check_run(conn: Connection, mlflow_run_id: str) -> None:
        query = sa.select(_RUNS.c.lifecycle_stage).where(_RUNS.c.run_uuid == mlflow_run_id)
        stages = conn.execute(query).scalars().all()
        if not stages:
            raise _StoreRefusal(f"Run with id={mlflow_run_id} not found", "RESOURCE_DOES_NOT_EXIST")
        if stages[0] != "active":
            raise _StoreRefusal(
                f"The run {mlflow_run_id} must be in the 'active' state. "
                f"Current state is {stages[0]}.",
                "INVALID_PARAMETER_VALUE",
            )

    @staticmethod
    def _insert_core(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        # psycopg 3: the rows copied (binary) into this connection's temporary table (if it has
        # it, or may create it), then inserted from it in one statement: 1/25 of the client's
        # CPU of bound rows, for about the same time of the server.
        raw = conn.connection.dbapi_connection
        cursor: Any = raw.cursor() if raw is not None else None
        copies = hasattr(cursor, "copy")
        staged, may = cursor.execute(_PG_STAGED).fetchone() if copies else (None, False)
        if staged is None and not may:  # another driver, or no temporary tables: bound rows
            from sqlalchemy.dialects.postgresql import insert

            names = ("key", "value", "timestamp", "step", "is_nan", "run_uuid")
            stmt = insert(_METRICS).on_conflict_do_nothing()
            conn.execute(stmt, [dict(zip(names, row, strict=True)) for row in rows])
            return
        with cursor:
            if staged is None:
                cursor.execute(_PG_STAGE)
            with cursor.copy(_PG_COPY) as copy:
                copy.set_types(["varchar", "float8", "int8", "int8", "bool", "varchar"])
                for row in rows:
                    copy.write_row(row)
            cursor.execute(_PG_FROM_STAGE)

    def _read_latest(
        self, conn: Connection, mlflow_run_id: str, keys: list[str]
    ) -> dict[str, SqlRow]:
        found: dict[str, SqlRow] = {}
        c = _LATEST.c
        for i in range(0, len(keys), _KEYS_PER_QUERY):
            query = (
                sa.select(c.key, c.value, c.timestamp, c.step, c.is_nan)
                .where(c.run_uuid == mlflow_run_id, c.key.in_(keys[i : i + _KEYS_PER_QUERY]))
                .order_by(c.key)
            )
            if not self._sqlite:
                query = query.with_for_update()  # as MLflow: no concurrent writer in between
            for key, value, t, step, is_nan in conn.execute(query):
                found[key] = (key, value, t, step, bool(is_nan), mlflow_run_id)
        return found

    @staticmethod
    def _write_latest(conn: Connection, rows: list[SqlRow], known: set[str]) -> None:
        # Sorted keys: rows are locked in the same order as MLflow locks them (no deadlock).
        c = _LATEST.c
        updates = [_latest_params(r) for r in rows if r[0] in known]
        inserts = [_latest_params(r) for r in rows if r[0] not in known]
        if updates:
            stmt = (
                sa.update(_LATEST)
                .where(c.run_uuid == sa.bindparam("b_run_uuid"), c.key == sa.bindparam("b_key"))
                .values(
                    value=sa.bindparam("b_value"),
                    timestamp=sa.bindparam("b_timestamp"),
                    step=sa.bindparam("b_step"),
                    is_nan=sa.bindparam("b_is_nan"),
                )
            )
            conn.execute(stmt, updates)
        if inserts:
            conn.execute(sa.insert(_LATEST), [{k[2:]: v for k, v in p.items()} for p in inserts])


def _latest_params(row: SqlRow) -> dict[str, Any]:
    key, value, t, step, is_nan, mlflow_run_id = row
    return {
        "b_key": key,
        "b_value": value,
        "b_timestamp": t,
        "b_step": step,
        "b_is_nan": is_nan,
        "b_run_uuid": mlflow_run_id,
    }


def schema_revision(engine: Engine) -> str | None:
    """The store's alembic revision (``None``: no or several rows)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    return str(rows[0]) if len(rows) == 1 else None


def open_bulk(inner: MlflowSink) -> MlflowSink | BulkSink:
    """``inner`` with bulk metrics when its store's schema is a known one, else ``inner``."""
    if inner.scheme not in BULK_SCHEMES:
        return inner
    store = inner.tracking_store()
    engine = getattr(store, "engine", None)
    if not isinstance(engine, Engine) or engine.dialect.name not in BULK_SCHEMES:
        return inner
    revision = inner.call("read the schema revision", lambda: schema_revision(engine))
    if revision not in KNOWN_REVISIONS:
        log.info("schema revision %s is not one the bulk path knows: using log_batch", revision)
        return inner
    return BulkSink(inner, engine)
