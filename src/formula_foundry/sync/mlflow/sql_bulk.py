"""Metric batches written straight into MLflow's SQL schema (SQLite, PostgreSQL).

MLflow's ``log_batch`` spends ~100 µs per metric in its ORM; an ``executemany`` of the same
rows costs a few µs. :func:`write_metrics` inserts a batch inside the write transaction of
:class:`~formula_foundry.sync.mlflow.sql_runs.SqlClient` (which checked the run in it) and
maintains ``latest_metrics``, on the store's DB-API connection
(:mod:`~formula_foundry.sync.mlflow.sql_store`).

What MLflow's ``SqlAlchemyStore`` does for metrics (``_log_metrics_once``,
``_update_latest_metrics_if_necessary``), and this module repeats, checked by
``tests/sync/test_bulk_differential.py``:

* NaN is stored as ``value 0, is_nan true``, ±inf as ±1.7976931348623157e308;
* a row already present (same primary key) is left alone, so replays are no-ops;
* per key, ``latest_metrics`` holds the first point, in arrival order, whose
  ``(step, timestamp, value)`` (stored value) is strictly greater than every earlier one.
  Points already stored never beat it, so folding them in again changes nothing: the
  result does not depend on how the points were cut into batches.

Imports neither MLflow nor SQLAlchemy.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
from collections.abc import Sequence
from typing import Any, Final, TypeVar

from formula_foundry.sync.engine.sink import BatchLimits, MetricRow
from formula_foundry.sync.mlflow.sql_store import SqlStore

# Params and tags keep MLflow's per-call limits, so batches are cut as MLflow's client cuts them.
# Metrics: each batch is one commit (two fsyncs on SQLite's rollback journal, tens of ms on a
# busy shared disk); 100k rows amortise them (~10 MB of rows, ~0.3 s of write lock).
BULK_LIMITS: Final = BatchLimits(metrics=50_000, params=100, tags=100, total=50_000)
_KEYS_PER_QUERY: Final = 500  # MLflow's own chunk: bounded bind parameters on every database
_DOUBLE_MAX: Final = 1.7976931348623157e308

_INSERT: Final = (
    "INSERT INTO metrics (key, value, timestamp, step, is_nan, run_uuid) VALUES (?, ?, ?, ?, ?, ?)"
)
_SQLITE_INSERT: Final = _INSERT.replace("INSERT", "INSERT OR IGNORE", 1)
# A batch of finite values of a run whose id is plain (letters and digits: MLflow's are 32 hex
# digits), so it can be spelled in the statement: ``% mlflow_run_id``.
_SQLITE_INSERT_FINITE: Final = (
    "INSERT OR IGNORE INTO metrics (key, value, timestamp, step, is_nan, run_uuid) "
    "VALUES (?, ?, ?, ?, 0, '%s')"
)
# The same rows, _PER_STATEMENT of them in one statement: one sqlite3_step and one call into
# SQLite from Python per _PER_STATEMENT rows instead of per row (~0.8 µs of CPU less per row).
# 4 binds per row: 800 stay within the 999 bound parameters of SQLite before 3.32.
_PER_STATEMENT: Final = 200
_SQLITE_INSERT_FINITE_MANY: Final = (
    "INSERT OR IGNORE INTO metrics (key, value, timestamp, step, is_nan, run_uuid) VALUES "
    + ", ".join(["(?, ?, ?, ?, 0, '%(run)s')"] * _PER_STATEMENT)
)
_PG_INSERT: Final = _INSERT + " ON CONFLICT DO NOTHING"
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
_LATEST_UPDATE: Final = (
    "UPDATE latest_metrics SET value = ?, timestamp = ?, step = ?, is_nan = ? "
    "WHERE run_uuid = ? AND key = ?"
)
_LATEST_INSERT: Final = _INSERT.replace("metrics", "latest_metrics", 1)
_PLAIN_ID: Final = re.compile(r"[0-9A-Za-z]{1,64}")
_KEY: Final = operator.itemgetter(0)
_VALUE: Final = operator.itemgetter(1)

# (key, stored value, timestamp, step, is_nan, run_uuid): one row of ``metrics``.
SqlRow = tuple[str, float, int, int, bool, str]
# A SqlRow, or a MetricRow whose value is finite (stored as it is): what fold_latest compares.
_Row = TypeVar("_Row", bound=tuple[Any, ...])


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


def write_metrics(store: SqlStore, mlflow_run_id: str, metrics: Sequence[MetricRow]) -> None:
    """Insert ``metrics`` of the run and fold them into ``latest_metrics``, inside the caller's
    write transaction, which has checked that the run exists and is active."""
    # Finite values are stored as they are: the metric rows themselves are the SQL rows, the
    # constant columns spelled in the statement (no copy, two binds fewer per row).
    plain = store.sqlite and _all_finite(metrics) and _PLAIN_ID.fullmatch(mlflow_run_id)
    rows: Sequence[tuple[Any, ...]] = metrics if plain else sql_rows(mlflow_run_id, metrics)
    if plain:
        _insert_finite(store, mlflow_run_id, metrics)
    elif store.sqlite:
        store.conn.executemany(_SQLITE_INSERT, rows)
    else:
        _insert_postgresql(store, rows)
    keys = sorted(set(map(_KEY, rows)))
    stored = _read_latest(store, mlflow_run_id, keys)
    latest, changed = fold_latest(rows, dict[str, tuple[Any, ...]](stored))
    final = [as_flushed(_as_sql(latest[k], mlflow_run_id), stored.get(k)) for k in sorted(changed)]
    _write_latest(store, [r for r in final if r != stored.get(r[0])], set(stored))


def _insert_finite(store: SqlStore, mlflow_run_id: str, metrics: Sequence[MetricRow]) -> None:
    # In order, as one row at a time would insert them (the first of equal rows stays).
    whole = len(metrics) - len(metrics) % _PER_STATEMENT
    if whole:
        flat = itertools.chain.from_iterable(metrics[:whole])
        chunks = zip(*[flat] * (4 * _PER_STATEMENT), strict=True)
        store.conn.executemany(_SQLITE_INSERT_FINITE_MANY % {"run": mlflow_run_id}, chunks)
    if whole < len(metrics):
        store.conn.executemany(_SQLITE_INSERT_FINITE % mlflow_run_id, metrics[whole:])


def _insert_postgresql(store: SqlStore, rows: Sequence[tuple[Any, ...]]) -> None:
    # The rows copied (binary) into this connection's temporary table (if it has it, or may
    # create it), then inserted from it in one statement: 1/25 of the client's CPU of bound
    # rows, for about the same time of the server.
    with store.conn.cursor() as cursor:
        staged, may = cursor.execute(_PG_STAGED).fetchone()
        if staged is None and not may:  # no right to temporary tables: bound rows
            cursor.executemany(store.sql(_PG_INSERT), rows)
            return
        if staged is None:
            cursor.execute(_PG_STAGE)
        with cursor.copy(_PG_COPY) as copy:
            copy.set_types(["varchar", "float8", "int8", "int8", "bool", "varchar"])
            for row in rows:
                copy.write_row(row)
        cursor.execute(_PG_FROM_STAGE)


def _read_latest(store: SqlStore, mlflow_run_id: str, keys: list[str]) -> dict[str, SqlRow]:
    found: dict[str, SqlRow] = {}
    # As MLflow on PostgreSQL: the rows locked, no concurrent writer in between.
    lock = "" if store.sqlite else " FOR UPDATE"
    for i in range(0, len(keys), _KEYS_PER_QUERY):
        chunk = keys[i : i + _KEYS_PER_QUERY]
        query = (
            "SELECT key, value, timestamp, step, is_nan FROM latest_metrics "
            f"WHERE run_uuid = ? AND key IN ({', '.join('?' * len(chunk))}) ORDER BY key{lock}"
        )
        for key, value, t, step, is_nan in store.rows(query, (mlflow_run_id, *chunk)):
            found[key] = (key, value, t, step, bool(is_nan), mlflow_run_id)
    return found


def _write_latest(store: SqlStore, rows: list[SqlRow], known: set[str]) -> None:
    # Sorted keys: rows are locked in the same order as MLflow locks them (no deadlock).
    updates = [(v, t, step, nan, run, key) for key, v, t, step, nan, run in rows if key in known]
    inserts = [r for r in rows if r[0] not in known]
    if updates:
        store.executemany(_LATEST_UPDATE, updates)
    if inserts:
        store.executemany(_LATEST_INSERT, inserts)
