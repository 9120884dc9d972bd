"""A SQL tracking store opened without MLflow or SQLAlchemy, for the direct writes.

``import mlflow`` and opening its store cost ~1.8 s of every pass that has anything to send,
more than the pass itself when a cron job finds a few new events. Stores whose schema is one
the direct writes know (:data:`KNOWN_REVISIONS`) are opened here instead: a bare ``sqlite3``
connection, or ``psycopg`` for PostgreSQL (the driver MLflow's ``postgresql://`` URIs use).

:func:`open_store` opens only what it can open exactly as MLflow would use it, and answers
``None`` for everything else, so the caller goes through MLflow, which creates, migrates or
refuses the store with its own words: a SQLite file that does not exist yet, a URI with
query options or another driver, a schema of another revision, a store MLflow itself would
still change on opening (no ``Default`` experiment) or refuse (experiments in other
workspaces), and any failure to connect. Nothing here imports MLflow or SQLAlchemy.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any, Final

from formula_foundry.sync.engine.destination import scheme_of
from formula_foundry.sync.engine.destination_id import sqlite_path

# The schema heads the direct writes were checked against (MLflow 3.17's). A store migrated by
# a newer MLflow may have moved a table: it goes through MLflow's client instead.
KNOWN_REVISIONS: Final = frozenset({"dc11669786a5"})
# The driver spellings of a PostgreSQL URI whose connection psycopg opens as SQLAlchemy would.
_PG_DRIVERS: Final = frozenset({"postgresql", "postgresql+psycopg"})
# MLflow's SQLite sessions wait this long for a lock ("PRAGMA busy_timeout = 20000").
_SQLITE_BUSY_S: Final = 20.0


class SqlStore:
    """One DB-API connection to a known store, in autocommit mode: each write is one explicit
    transaction (:meth:`write`), each read its own statement."""

    def __init__(self, conn: Any, sqlite: bool, errors: Any) -> None:
        self.conn, self.sqlite = conn, sqlite
        # The driver's exception module (PEP 249 names: Error, OperationalError, ...).
        self.errors = errors
        self._spelled: dict[str, str] = {}

    def sql(self, statement: str) -> str:
        """``statement`` with its ``?`` placeholders in the driver's style (``%s``: psycopg)."""
        if self.sqlite:
            return statement
        spelled = self._spelled.get(statement)
        if spelled is None:
            spelled = self._spelled[statement] = statement.replace("?", "%s")
        return spelled

    def execute(self, statement: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(self.sql(statement), params)

    def executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        if self.sqlite:
            self.conn.executemany(statement, rows)
        else:
            with self.conn.cursor() as cur:
                cur.executemany(self.sql(statement), rows)

    def rows(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(self.execute(statement, params).fetchall())

    @contextlib.contextmanager
    def write(self, foreign_keys: bool = True) -> Iterator[None]:
        """One write transaction; on SQLite taken at once (``BEGIN IMMEDIATE``), so what it
        reads first (is the run active?) holds until its commit. ``foreign_keys=False``: the
        caller proved every row's run exists inside the transaction (SQLite's per-row lookup
        saved; it can only be switched outside a transaction)."""
        if not self.sqlite:
            with self.conn.transaction():
                yield
            return
        if not foreign_keys:
            self.conn.execute("PRAGMA foreign_keys = OFF")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # gone with the connection already
                    self.conn.execute("ROLLBACK")
                raise
        finally:
            if not foreign_keys:
                self.conn.execute("PRAGMA foreign_keys = ON")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


def open_store(uri: str) -> SqlStore | None:
    """The store of ``uri`` opened for the direct writes, or ``None`` (see the module)."""
    scheme = scheme_of(uri)
    if scheme == "sqlite":
        store = _open_sqlite(uri)
    elif scheme == "postgresql" and uri.split("://", 1)[0].lower() in _PG_DRIVERS:
        store = _open_postgresql(uri)
    else:
        return None
    if store is None:
        return None
    try:
        if _as_mlflow_would_open_it(store):
            return store
    except Exception:  # a table missing, a store being migrated: MLflow decides
        pass
    store.close()
    return None


def _open_sqlite(uri: str) -> SqlStore | None:
    db = sqlite_path(uri)
    # Query options are SQLAlchemy's to interpret; a missing file is MLflow's to create.
    if db is None or "?" in uri or not db.is_file():
        return None
    try:
        conn = sqlite3.connect(
            db, timeout=_SQLITE_BUSY_S, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error:
        return None
    return SqlStore(conn, True, sqlite3)


def _open_postgresql(uri: str) -> SqlStore | None:
    try:
        import psycopg
    except ImportError:
        return None
    # libpq reads the same URI as SQLAlchemy once the driver suffix is gone; a URI it reads
    # otherwise fails here and gets MLflow's path (and its error messages).
    conninfo = "postgresql://" + uri.split("://", 1)[1]
    try:
        conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=10)
    except Exception:  # unreachable, login refused: MLflow's path says so
        return None
    return SqlStore(conn, False, psycopg)


def _as_mlflow_would_open_it(store: SqlStore) -> bool:
    """A known revision, and nothing MLflow's ``SqlAlchemyStore`` would change or refuse when
    it opens the store (``_initialize_store_state``)."""
    revisions = [r[0] for r in store.rows("SELECT version_num FROM alembic_version")]
    if len(revisions) != 1 or revisions[0] not in KNOWN_REVISIONS:
        return False
    default = store.rows("SELECT 1 FROM experiments WHERE experiment_id = 0")
    others = store.rows(
        "SELECT 1 FROM experiments WHERE workspace IS NOT NULL AND workspace != ?", ("default",)
    )
    return bool(default) and not others


class StoreRefusal(Exception):
    """A refusal worded and coded (``error_code``) as MLflow's store words it, so that the
    adapter maps it exactly as it maps MLflow's own (``MlflowSink.classify``)."""

    def __init__(self, message: str, error_code: str) -> None:
        super().__init__(message)
        self.error_code = error_code
