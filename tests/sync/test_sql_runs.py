"""``SqlSink`` answers every call of the replay as ``MlflowSink`` (MLflow's own client) does.

Each example draws a sequence of sink calls — runs created in new or existing experiments,
batches of params (odd keys, values at and over MLflow's length limit, changed values), tags
(renames by ``mlflow.runName``, empty ones), metrics, statuses, tag deletions, identity tags —
with runs and experiments deleted in between, behind the sinks' backs. The same calls go to
a SQL sink and to MLflow's sink, each on its own copy of one migrated SQLite store: every
answer (a value, or the error class and message) and then every table must be the same.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from formula_foundry.sync.engine.sink import DestinationRejected, RunSpec
from formula_foundry.sync.mlflow.client_sink import MlflowSink
from formula_foundry.sync.mlflow.sql_sink import SqlSink
from formula_foundry.sync.mlflow.sql_store import open_store

from .test_bulk_differential import _restore, tables


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly migrated store, created once; each example starts from a copy of it."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path_factory.mktemp("sql-runs-template")
    store = SqlAlchemyStore(f"sqlite:///{folder / 'template.db'}", str(folder / "artifacts"))  # type: ignore[no-untyped-call]
    store.engine.dispose()
    return folder / "template.db"


T0 = 1_700_000_000_000
KEYS = ("lr", "a b", "x:y", "dir/sub.k", "\u00fc", "mlflow.runName", "mlflow.note.content")
values = st.sampled_from(("", "1", "2", "v" * 6000, "w" * 6001)) | st.text(max_size=6)
run_i = st.integers(0, 2)
call = st.one_of(
    st.tuples(
        st.just("run"),
        run_i,
        st.sampled_from(("exp-a", "exp b/2", "Default")),
        st.text(min_size=1, max_size=5),
    ),
    st.tuples(
        st.just("batch"),
        run_i,
        st.dictionaries(st.sampled_from(KEYS[:5]), values, max_size=3),
        st.dictionaries(st.sampled_from(KEYS), values, max_size=3),
        st.lists(
            st.tuples(st.sampled_from(KEYS[:3]), st.floats(width=64), st.integers(0, 3)), max_size=3
        ),
    ),
    st.tuples(
        st.just("status"),
        run_i,
        st.sampled_from(("RUNNING", "FINISHED", "KILLED")),
        st.none() | st.just(T0 + 7),
    ),
    st.tuples(st.just("untag"), run_i, st.sampled_from(KEYS)),
    st.tuples(st.just("delete"), run_i),
    st.tuples(st.just("drop_experiment"), st.sampled_from(("exp-a", "exp b/2"))),
    st.tuples(st.just("find"), run_i),
    st.tuples(st.just("params"), run_i),
    st.tuples(st.just("identity"), st.sampled_from(("a", "b")), st.text(max_size=5)),
)


class Side:
    """One sink and what its answers are normalised with."""

    def __init__(self, sink: MlflowSink, db: Path) -> None:
        self.sink, self.db = sink, db
        self.ids: dict[str, str] = {}  # MLflow run id -> spool run id

    def norm(self, value: object) -> str:
        text = str(value).replace(self.sink.description, "<store>")
        for mlflow_id, spool_id in self.ids.items():
            text = text.replace(mlflow_id, spool_id)
        return text

    def sql(self, statement: str, *params: object) -> None:
        con = sqlite3.connect(self.db)
        with con:
            con.execute(statement, params)
        con.close()


def _answer(side: Side, spools: list[str], op: tuple[Any, ...]) -> str:
    sink, kind = side.sink, op[0]
    mlflow_id = (
        {s: m for m, s in side.ids.items()}.get(spools[op[1]], "0" * 32)
        if kind
        in (
            "batch",
            "status",
            "untag",
            "delete",
            "params",
        )
        else ""
    )
    try:
        if kind == "run":
            spec = RunSpec(spools[op[1]], op[2], op[3], T0 + op[1], "me", "host", "src")
            found = sink.find_run(spec.spool_run_id, op[2])
            run = found or sink.create_run(spec)
            side.ids[run.mlflow_run_id] = spec.spool_run_id
            return side.norm((found is None, run.status))
        if kind == "batch":
            metrics = [(k, v, T0, s) for k, v, s in op[4]]
            sink.log_batch(mlflow_id, metrics, list(op[2].items()), list(op[3].items()))
        elif kind == "status":
            sink.set_status(mlflow_id, op[2], op[3])
        elif kind == "untag":
            sink.delete_tag(mlflow_id, op[2])
        elif kind == "delete":
            side.sql("UPDATE runs SET lifecycle_stage = 'deleted' WHERE run_uuid = ?", mlflow_id)
        elif kind == "drop_experiment":
            side.sql("UPDATE experiments SET lifecycle_stage = 'deleted' WHERE name = ?", op[1])
            sink._experiments.pop(op[1], None)  # as a new pass: nothing remembered
        elif kind == "find":
            return side.norm(sink.find_run(spools[op[1]], None))
        elif kind == "params":
            return side.norm(sorted(sink.get_params(mlflow_id).items()))
        else:
            sink.set_identity_tag(f"ff.sync.test.{op[1]}", op[2])
            return side.norm(sorted(sink.identity_tags().items()))
    except DestinationRejected as exc:
        return side.norm(f"{type(exc).__name__}: {exc}")
    return "ok"


# The refusals: writes to a deleted run, a changed param, a run in a deleted experiment, a
# missing tag, a missing run; and a rename, an empty rename, values over the limits.
REFUSALS: list[tuple[Any, ...]] = [
    ("run", 0, "exp-a", "r0"),
    ("batch", 0, {"lr": "1", "a b": "v" * 6001}, {"mlflow.runName": "new", "x:y": ""}, []),
    ("batch", 0, {"lr": "2"}, {"mlflow.runName": ""}, [("lr", 1.0, 0)]),
    ("params", 0),
    ("untag", 0, "dir/sub.k"),
    ("status", 0, "FINISHED", T0 + 7),
    ("batch", 0, {}, {"phase": "after end"}, []),
    ("delete", 0),
    ("batch", 0, {}, {}, [("lr", 2.0, 1)]),
    ("status", 0, "RUNNING", None),
    ("untag", 0, "x:y"),
    ("find", 0),
    ("params", 1),
    ("drop_experiment", "exp-a"),
    ("run", 1, "exp-a", "r1"),
    ("identity", "a", "1"),
]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(calls=st.lists(call, min_size=1, max_size=25))
@example(calls=REFUSALS)
def test_the_sql_sink_answers_and_writes_as_mlflows_client(
    template: Path, calls: list[tuple[Any, ...]]
) -> None:
    folder = template.parent
    sides = []
    for name in ("sql-side.db", "mlflow-side.db"):
        _restore(template, folder / name)
    uri = f"sqlite:///{folder / 'sql-side.db'}"
    store = open_store(uri)
    assert store is not None
    sides.append(Side(SqlSink(uri, folder / "artifacts", store), folder / "sql-side.db"))
    mlflow_db = folder / "mlflow-side.db"
    sides.append(Side(MlflowSink(f"sqlite:///{mlflow_db}", folder / "artifacts"), mlflow_db))
    spools = [uuid.uuid4().hex for _ in range(3)]
    try:
        for op in calls:
            answers = [_answer(side, spools, op) for side in sides]
            assert answers[0] == answers[1], op
    finally:
        for side in sides:
            side.sink.close()
    only = set(spools)
    assert tables(f"sqlite:///{folder / 'sql-side.db'}", only) == tables(
        f"sqlite:///{mlflow_db}", only
    )


def test_an_end_time_of_zero_means_now_as_in_mlflow(template: Path, tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    _restore(template, db)
    store = open_store(f"sqlite:///{db}")
    assert store is not None
    sink = SqlSink(f"sqlite:///{db}", tmp_path / "artifacts", store)
    run = sink.create_run(RunSpec(uuid.uuid4().hex, "e", "n", T0, "me", "host", "src"))
    before = int(time.time() * 1000)
    sink.set_status(run.mlflow_run_id, "FINISHED", 0)
    sink.close()
    con = sqlite3.connect(db)
    ((end,),) = con.execute("SELECT end_time FROM runs WHERE run_uuid = ?", (run.mlflow_run_id,))
    con.close()
    assert end >= before


@pytest.mark.parametrize("uri_tail", ["missing.db", "store.db?timeout=5"])
def test_a_store_it_cannot_open_as_mlflow_would_is_left_to_mlflow(
    template: Path, tmp_path: Path, uri_tail: str
) -> None:
    _restore(template, tmp_path / "store.db")
    assert open_store(f"sqlite:///{tmp_path / 'store.db'}") is not None
    assert open_store(f"sqlite:///{tmp_path / uri_tail}") is None
