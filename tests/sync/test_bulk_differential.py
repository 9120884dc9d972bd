"""The direct SQL path writes exactly what MLflow's own client writes.

With ``sync.bulk`` on, a store whose schema is known is written by SQL without MLflow
(``SqlSink``: runs, experiments, params, tags, statuses, identity tags, metrics in bulk); with
it off, through MLflow's client. Each example spools arbitrary events with the real tracker
(several runs and keys, odd param and tag keys and values, renames, ends with a reason and
resumes of the child run, repeated and out-of-order steps, equal steps with other
timestamps or values, NaN, ±inf, -0.0, params set twice), in phases; after each phase both
destinations are synced with the real library pass (``sync_once``): one with ``sync.bulk``
on, one with it off. Some passes
"crash" after committing (their progress is thrown away), so the next pass sends those
batches again; batch sizes are drawn too, so the two paths cut the stream differently.
Then the two databases must hold the same rows, table by table (runs, metrics,
latest_metrics, params, tags, experiments and their tags).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from formula_foundry.config import Settings, load_settings
from formula_foundry.errors import ParamConflictError, ValidationError
from formula_foundry.sync import sync_once
from formula_foundry.sync.engine.destination import destination_key
from formula_foundry.sync.engine.sink import BatchLimits, DestinationRejected
from formula_foundry.sync.mlflow.client_sink import MlflowSink, open_sink
from formula_foundry.sync.mlflow.sql_bulk import as_flushed, fold_latest, sql_rows
from formula_foundry.sync.mlflow.sql_sink import SqlSink, open_sql_sink
from formula_foundry.sync.mlflow.sql_store import KNOWN_REVISIONS
from formula_foundry.tracking.tracker import Tracker

_ENV = ("FF_CONFIG", "FF_SPOOL_ROOT", "MLFLOW_TRACKING_URI", "FF_TRACKING_DISABLED")
KEYS = ("loss", "acc", "a/b")
# Zeros and NaN (stored as 0) tie on (step, timestamp, value): which one wins is the subtle part.
VALUES = (0.0, -0.0, math.nan, 0.0, math.nan, 1.0, -1.5, 1e308, math.inf, -math.inf)
T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A freshly migrated store, created once; each example starts from a copy of it."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path_factory.mktemp("bulk-template")
    db = folder / "template.db"
    store = SqlAlchemyStore(f"sqlite:///{db}", str(folder / "artifacts"))  # type: ignore[no-untyped-call]
    store.engine.dispose()
    with pytest.MonkeyPatch.context() as mp:
        for name in _ENV:
            mp.delenv(name, raising=False)
        mp.chdir(folder)
        yield db


def _restore(template: Path, db: Path) -> None:
    """Reset ``db`` to the template through SQLite, so MLflow's pooled connections follow."""
    src, dst = sqlite3.connect(template), sqlite3.connect(db)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def _settings(work: Path, uri: str, bulk: bool) -> Settings:
    base = load_settings(None, start=work)
    return dataclasses.replace(
        base,
        backend_store_uri=uri,
        artifact_root=work / "artifacts",
        spool_root=work / "runs",
        sync_state_dir=work / f"sync-{'bulk' if bulk else 'plain'}",
        durability="write",
        sync_bulk=bulk,
        sync_retries=0,
    )


def _state_folder(s: Settings) -> Path:
    return s.sync_state_dir / destination_key(s.backend_store_uri)


def _pass(s: Settings, crash: bool) -> None:
    """One pass; a crash keeps what the destination committed but forgets the progress."""
    folder = _state_folder(s)
    saved = folder.parent / (folder.name + ".saved")
    if crash and folder.exists():
        shutil.copytree(folder, saved)
    report = sync_once(s)
    assert not report.blocked, report.summary()
    if crash and saved.exists():
        shutil.rmtree(folder)
        saved.rename(folder)


# -- the store, as comparable rows -----------------------------------------------------------


def _f(value: float) -> str:
    return repr(float(value))


def tables(uri: str, only: set[str]) -> dict[str, list[tuple[Any, ...]]]:
    """The rows of the runs ``only`` (spool run ids), with MLflow's run ids replaced by those."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    engine = sa.create_engine(uri, poolclass=NullPool)
    try:
        with engine.connect() as con:
            return _rows(con, only)
    finally:
        engine.dispose()


def _rows(con: Any, only: set[str]) -> dict[str, list[tuple[Any, ...]]]:
    import sqlalchemy as sa

    def q(sql: str) -> list[Any]:
        return list(con.execute(sa.text(sql)))

    ff = {r: v for r, v in q("SELECT run_uuid, value FROM tags WHERE key = 'ff.run_uuid'")}
    ff = {r: v for r, v in ff.items() if v in only}
    out: dict[str, list[tuple[Any, ...]]] = {}
    out["runs"] = sorted(
        (ff[r[0]], *r[1:-1], r[-1].replace(r[0], "<run>"))
        for r in q(
            "SELECT r.run_uuid, r.name, r.source_type, r.source_name, r.entry_point_name, "
            "r.source_version, r.user_id, r.status, r.start_time, r.end_time, "
            "r.lifecycle_stage, r.deleted_time, e.name, r.artifact_uri FROM runs r "
            "JOIN experiments e ON e.experiment_id = r.experiment_id"
        )
        if r[0] in ff
    )
    names = {r[-3] for r in out["runs"]} | {"Default"}
    out["experiments"] = sorted(
        r
        for r in q("SELECT name, artifact_location, lifecycle_stage, workspace FROM experiments")
        if r[0] in names
    )
    # Identity tags name each state folder (its id, its path): the same tags up to those.
    states = [r for r in q("SELECT key, value FROM experiment_tags") if r[0].startswith("ff.")]
    ids = {k.rsplit(".", 1)[1] for k, _ in states if k.startswith("ff.sync.state.")}
    out["experiment_tags"] = sorted(
        (
            functools.reduce(lambda t, i: t.replace(i, "<state>"), ids, k),
            re.sub(
                r'"owner":"[^"]*"',
                "",
                functools.reduce(lambda t, i: t.replace(i, "<state>"), ids, v),
            ),
        )
        for k, v in states
    )
    for table in ("metrics", "latest_metrics"):
        # The sign of a zero in latest_metrics depends, in MLflow itself, on where the stream
        # was cut into batches (an in-batch -0.0 -> 0.0 is inserted as 0.0, across batches the
        # ORM sees "no change" and keeps -0.0; PostgreSQL keeps the sign, SQLite does not), so
        # it is compared up to that sign; everything else, and every metrics row, exactly.
        zero = 0.0 if table == "latest_metrics" else None
        out[table] = sorted(
            (ff[run], key, _f(value if zero is None else value + zero), t, step, bool(nan))
            for run, key, value, t, step, nan in q(
                f"SELECT run_uuid, key, value, timestamp, step, is_nan FROM {table}"
            )
            if run in ff
        )
    out["params"] = sorted(
        (ff[r], k, v) for r, k, v in q("SELECT run_uuid, key, value FROM params") if r in ff
    )
    out["tags"] = sorted(
        (ff[r], k, ff.get(v, v) if k == "mlflow.parentRunId" else v)
        for r, k, v in q("SELECT run_uuid, key, value FROM tags")
        if r in ff
    )
    return out


# -- event sequences --------------------------------------------------------------------------

metric_op = st.tuples(
    st.just("m"),
    st.sampled_from(KEYS),
    st.sampled_from(VALUES) | st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.integers(-1, 2),
    st.integers(0, 2),
)
multi_op = st.tuples(
    st.just("ms"),
    st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), min_size=1),
    st.integers(-1, 2),
    st.integers(0, 2),
)
# Keys MLflow takes that are easy to get wrong (space, colon, slash, dot, non-ASCII letters);
# values of any text, empty, or at MLflow's length limits.
ODD_KEYS = ("lr", "seed", "a b", "x:y", "dir/sub.k", "\u00fc-k\u00e9")
text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=8)
param_op = st.tuples(
    st.just("p"), st.sampled_from(ODD_KEYS), st.sampled_from(("1", "2", "", "v" * 6000)) | text
)
tag_op = st.tuples(
    st.just("t"),
    st.sampled_from(("phase", "note", *ODD_KEYS[2:], "mlflow.runName", "mlflow.note.content")),
    st.sampled_from(("x", "y", "", "w" * 8000)) | text,
)
# The child run ends (with a status and maybe a reason) and another process resumes it.
# (A reason is non-blank text: Run.end refuses a blank one before anything is written.)
reason = text.filter(str.strip)
resume_op = st.tuples(
    st.just("r"), st.sampled_from(("FINISHED", "FAILED", "KILLED")), st.none() | reason
)
op = st.tuples(
    st.integers(0, 2),
    st.one_of(metric_op, metric_op, metric_op, multi_op, param_op, tag_op, resume_op),
)
phase = st.tuples(st.lists(op, max_size=30), st.booleans())
scenario = st.fixed_dictionaries(
    {
        "phases": st.lists(phase, min_size=1, max_size=3),
        "bulk_batch": st.integers(1, 40),
        "plain_batch": st.integers(1, 40),
        "replay_at_end": st.booleans(),
    }
)


def _apply(run: Any, item: tuple[Any, ...]) -> None:
    kind = item[0]
    if kind == "r":
        return  # run_scenario's
    if kind == "m":
        run.log_metric(item[1], item[2], step=item[3], timestamp=T0 + item[4])
    elif kind == "ms":
        run.log_metrics(item[1], step=item[2], timestamp=T0 + item[3])
    elif kind == "p":
        # The tracker refuses a changed value, and what MLflow would refuse.
        with contextlib.suppress(ParamConflictError, ValidationError):
            run.log_param(item[1], item[2])
    else:
        with contextlib.suppress(ValidationError):  # a value the tracker refuses
            run.set_tag(item[1], item[2])


def _limits(n: int, params: int) -> BatchLimits:
    return BatchLimits(metrics=n, params=min(n, params), tags=min(n, params), total=n)


def run_scenario(bulk_uri: str, plain_uri: str, work: Path, sc: dict[str, Any]) -> None:
    """Spool and sync ``sc`` into both stores, then compare the runs it made."""
    bulk, plain = _settings(work, bulk_uri, True), _settings(work, plain_uri, False)
    tracker = Tracker(bulk)
    parent = tracker.start_run(run_name="parent", experiment_name="diff")
    child = tracker.start_run(run_name="child", nested=True, experiment_name="diff-2")
    runs = [parent, child]
    mp = pytest.MonkeyPatch()
    mp.setattr(SqlSink, "limits", _limits(sc["bulk_batch"], 100))
    mp.setattr(MlflowSink, "limits", _limits(sc["plain_batch"], 100))
    try:
        for i, (ops, crash) in enumerate(sc["phases"]):
            for which, item in ops:
                if item[0] == "r":
                    runs[1].end(item[1], reason=item[2] or None)
                    runs[1] = tracker.start_run(nested=True, run_id=runs[1].run_id)
                    child = runs[1]
                    continue
                _apply(runs[min(which, len(runs) - 1)], item)
            if i == len(sc["phases"]) - 1:
                child.end("FAILED")
                parent.end()
            for s in (bulk, plain):
                _pass(s, crash)
        if sc["replay_at_end"]:
            for s in (bulk, plain):
                sync_once(s, replay=True)
    finally:
        mp.undo()
        tracker.end_all()
    mine = {parent.run_id, child.run_id}
    assert tables(bulk_uri, mine) == tables(plain_uri, mine)


# Ties at the greatest (step, timestamp, value), within a batch and across passes: the first
# to arrive must stay in latest_metrics (NaN and 0.0 both store 0, -0.0 equals 0.0).
TIES: dict[str, Any] = {
    "phases": [
        (
            [
                (0, ("m", "loss", math.nan, 2, 2)),
                (0, ("m", "loss", 0.0, 2, 2)),
                (0, ("m", "acc", -0.0, 1, 1)),
                (0, ("ms", {"acc": 0.0, "loss": -0.0}, 2, 2)),
                (1, ("m", "a/b", 0.0, 0, 0)),
            ],
            True,
        ),
        ([(0, ("m", "acc", math.nan, 1, 1)), (1, ("m", "a/b", math.nan, 0, 0))], False),
    ],
    "bulk_batch": 40,
    "plain_batch": 1,
    "replay_at_end": True,
}

# A stored 0.0 moved to a greater step by -0.0: MLflow's ORM writes only the columns that
# changed (!=), so the row keeps 0.0 (see as_flushed; tables() compares up to that sign).
SIGNED_ZERO: dict[str, Any] = {
    "phases": [
        ([(0, ("m", "loss", 0.0, 1, 0)), (0, ("m", "acc", -0.0, 1, 0))], False),
        ([(0, ("m", "loss", -0.0, 2, 1)), (0, ("m", "acc", 0.0, 2, 1))], False),
        ([(0, ("ms", {"loss": 0.0, "acc": -0.0}, 2, 2))], True),
    ],
    "bulk_batch": 40,
    "plain_batch": 40,
    "replay_at_end": True,
}


@settings(
    max_examples=int(os.environ.get("FF_DIFF_EXAMPLES", "20")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(sc=scenario)
@example(sc=TIES)
@example(sc=SIGNED_ZERO)
def test_bulk_path_writes_what_log_batch_writes(template: Path, sc: dict[str, Any]) -> None:
    # The same two files for every example: MLflow opens a store once per URI and process.
    bulk_db, plain_db = template.parent / "bulk.db", template.parent / "plain.db"
    _restore(template, bulk_db)
    _restore(template, plain_db)
    with tempfile.TemporaryDirectory(dir=template.parent) as tmp:
        run_scenario(f"sqlite:///{bulk_db}", f"sqlite:///{plain_db}", Path(tmp), sc)


# -- choosing the path ------------------------------------------------------------------------


def _sink_kind(work: Path, db: Path | str, bulk: bool) -> type:
    uri = db if isinstance(db, str) else f"sqlite:///{db}"
    sink = open_sink(_settings(work, uri, bulk))
    try:
        return type(sink)
    finally:
        sink.close()


def test_known_schema_gets_the_direct_path_and_sync_bulk_false_is_honoured(
    template: Path, tmp_path: Path
) -> None:
    db = tmp_path / "store.db"
    shutil.copy(template, db)
    assert _sink_kind(tmp_path, db, bulk=True) is SqlSink
    assert _sink_kind(tmp_path, db, bulk=False) is MlflowSink


def test_unknown_schema_revision_falls_back_to_mlflow(template: Path, tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    shutil.copy(template, db)
    s = _settings(tmp_path, f"sqlite:///{db}", True)
    inner = MlflowSink(s.backend_store_uri, s.artifact_root)
    direct = open_sql_sink(s, inner)
    assert direct is not None
    direct.close()
    # As a newer MLflow's migration would (MLflow itself then refuses the store: not tested).
    con = sqlite3.connect(db)
    with con:
        con.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    con.close()
    assert open_sql_sink(s) is None
    assert open_sql_sink(s, inner) is None


def test_a_deleted_run_refuses_bulk_metrics_as_it_refuses_log_batch(
    template: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    reports = {}
    for bulk in (True, False):
        work = tmp_path / str(bulk)
        db = work / "store.db"
        work.mkdir()
        shutil.copy(template, db)
        s = _settings(work, f"sqlite:///{db}", bulk)
        run = Tracker(s).start_run(run_name="doomed", experiment_name="diff")
        run.log_metric("loss", 1.0, step=0)
        assert sync_once(s).exit_code == 0
        client = MlflowClient(tracking_uri=s.backend_store_uri)
        (found,) = client.search_runs(
            [client.get_experiment_by_name("diff").experiment_id],  # type: ignore[union-attr]
            f"tags.`ff.run_uuid` = '{run.run_id}'",
        )
        client.delete_run(found.info.run_id)
        run.log_metric("loss", 0.5, step=1)
        run.end()
        report = sync_once(s)
        ids = {str(db): "DB", run.run_id: "RUN", found.info.run_id: "MLFLOW_RUN"}
        reports[bulk] = [
            functools.reduce(lambda t, kv: t.replace(*kv), ids.items(), line)
            for line in report.blocked
        ]
        steps = [row[4] for row in tables(s.backend_store_uri, {run.run_id})["metrics"]]
        assert steps == [0]  # nothing written after the deletion
    assert reports[True] and reports[True] == reports[False]
    assert "must be in the 'active' state" in reports[True][0]


def test_a_run_deleted_while_a_batch_waits_for_the_lock_gets_none_of_it(
    template: Path, tmp_path: Path
) -> None:
    # The run is checked inside the batch's own write transaction: a writer holding the lock
    # that deletes the run before it lets go leaves the batch refused, not written to it.
    db = tmp_path / "store.db"
    shutil.copy(template, db)
    s = _settings(tmp_path, f"sqlite:///{db}", True)
    run = Tracker(s).start_run(run_name="raced", experiment_name="diff")
    run.log_metric("loss", 1.0, step=0)
    assert sync_once(s).exit_code == 0
    con = sqlite3.connect(db, isolation_level=None)
    ((mlflow_run_id,),) = con.execute(
        "SELECT run_uuid FROM tags WHERE key = 'ff.run_uuid' AND value = ?", (run.run_id,)
    )
    sink = open_sink(s)
    assert isinstance(sink, SqlSink)
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            sink.log_batch(mlflow_run_id, [("loss", 2.0, T0, 1)], (), ())
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    con.execute("BEGIN IMMEDIATE")
    writer = threading.Thread(target=write)
    writer.start()
    writer.join(0.5)  # long enough to reach the run's check (before the fix it passed here)
    con.execute("UPDATE runs SET lifecycle_stage = 'deleted' WHERE run_uuid = ?", (mlflow_run_id,))
    con.execute("COMMIT")
    writer.join()
    sink.close()
    (error,) = outcome
    assert isinstance(error, DestinationRejected), error
    assert "must be in the 'active' state" in str(error)
    steps = [row[0] for row in con.execute("SELECT step FROM metrics")]
    latest = list(con.execute("SELECT step, value FROM latest_metrics"))
    con.close()
    assert steps == [0] and latest == [(0, 1.0)]


def test_known_revision_is_the_installed_mlflow_head() -> None:
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    script = ScriptDirectory.from_config(_get_alembic_config("sqlite://"))  # type: ignore[no-untyped-call]
    assert set(script.get_heads()) <= KNOWN_REVISIONS


@pytest.fixture(scope="module")
def pg_template(template: Path) -> Iterator[tuple[str, str]]:
    """A throw-away PostgreSQL cluster: its admin URI, and a database MLflow migrated."""
    from tests._services import migrated_template, postgres_cluster

    with postgres_cluster() as admin:
        yield admin, migrated_template(admin, template.parent / "pg-scratch")


@pytest.fixture(scope="module")
def pg_pair(template: Path, pg_template: tuple[str, str]) -> tuple[str, str]:
    """Two migrated PostgreSQL databases: bulk and log_batch."""
    from tests._services import create_database

    admin, name = pg_template
    pair = create_database(admin, template=name), create_database(admin, template=name)
    assert _sink_kind(template.parent, pair[0], bulk=True) is SqlSink
    return pair


@pytest.mark.postgres
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(sc=scenario)
@example(sc=SIGNED_ZERO)
@example(sc=TIES)
def test_bulk_path_on_postgresql_writes_what_log_batch_writes(
    pg_pair: tuple[str, str], template: Path, sc: dict[str, Any]
) -> None:
    # No reset between examples: each compares only the runs it made.
    with tempfile.TemporaryDirectory(dir=template.parent) as tmp:
        run_scenario(*pg_pair, Path(tmp), sc)


@pytest.mark.postgres
def test_bulk_path_without_temporary_tables_writes_what_log_batch_writes(
    template: Path, pg_template: tuple[str, str]
) -> None:
    # A user who may not create temporary tables (the bulk path's staging table for COPY)
    # gets the rows inserted as bound values instead: the same store.
    import psycopg

    from tests._services import create_database

    admin, name = pg_template
    bulk_uri, plain_uri = (create_database(admin, template=name) for _ in range(2))
    database, role = bulk_uri.rsplit("/", 1)[1], f"ff_no_temp_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(bulk_uri, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
        conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
        conn.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")
        row = conn.execute(
            "SELECT has_database_privilege(%s, current_database(), 'TEMPORARY')", (role,)
        ).fetchone()
    assert row == (False,)
    user_uri = re.sub(r"://[^@/]*@", f"://{role}@", bulk_uri, count=1)
    assert _sink_kind(template.parent, user_uri, bulk=True) is SqlSink
    with tempfile.TemporaryDirectory(dir=template.parent) as tmp:
        run_scenario(user_uri, plain_uri, Path(tmp), TIES)


def test_a_stored_zero_keeps_its_sign_when_an_equal_value_replaces_it() -> None:
    stored = ("k", 0.0, 0, 1, False, "r")
    moved = as_flushed(("k", -0.0, 1, 2, False, "r"), stored)
    assert math.copysign(1.0, moved[1]) == 1.0 and moved[2:4] == (1, 2)
    assert as_flushed(("k", 3.0, 1, 2, False, "r"), stored)[1] == 3.0
    new = as_flushed(("k", -0.0, 1, 2, False, "r"), None)
    assert math.copysign(1.0, new[1]) == -1.0


def test_fold_keeps_the_first_of_equal_points_and_needs_strictly_greater() -> None:
    rows = sql_rows("r", [("k", 1.0, 5, 2), ("k", math.nan, 5, 2), ("k", 0.0, 5, 2)])
    assert rows[1] == ("k", 0.0, 5, 2, True, "r")
    latest, changed = fold_latest(rows, {})
    assert latest["k"] == ("k", 1.0, 5, 2, False, "r") and changed == {"k"}
    inf = sql_rows("r", [("k", math.inf, 0, 0), ("k", -math.inf, 0, 0)])
    assert [r[1] for r in inf] == [1.7976931348623157e308, -1.7976931348623157e308]
