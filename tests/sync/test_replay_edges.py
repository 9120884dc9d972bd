"""The replay at the edges: what the state records when a pass dies, what it never takes from a
spool (identity from user tags, out-of-range or ill-typed fields), and records the destination
can never take (quarantined, the run goes on).

Real SQLite stores, real tracker spools; hostile lines are framed with a valid checksum, as a
foreign writer (or an old formula-foundry) could have written them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sqlite3
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formula_foundry.errors import StoreUnavailable
from formula_foundry.sync import SyncReport, load_sync_settings, sync_once
from formula_foundry.sync.commands.cli import main
from formula_foundry.sync.engine.report import Progress
from formula_foundry.tracking.events import CHECKSUM_TAIL

from .conftest import Project

INT64_MAX = 2**63 - 1


def _frame(record: dict[str, Any]) -> bytes:
    """A checksummed line, as ``events.frame`` writes it, for any JSON value (stdlib ``json``
    writes integers beyond 64 bits, which orjson refuses to)."""
    head = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()[:-1]
    return CHECKSUM_TAIL % (head, zlib.crc32(head))


def _segment(
    spool_root: Path, run: str, t: int, records: list[dict[str, Any]], host: str = "otherhost"
) -> tuple[Path, list[int]]:
    """A segment of ``run`` whose writer started at ``t``; returns it and each record's offset."""
    folder = spool_root / run
    folder.mkdir(parents=True, exist_ok=True)
    seg = folder / f"seg-{t}-{host}-7-a1b2c3.jsonl"
    header = {
        "v": 1,
        "s": 0,
        "t": t,
        "k": "segment",
        "format": 1,
        "run": run,
        "host": host,
        "pid": 7,
        "segment": seg.name,
    }
    lines = [_frame(header)]
    for i, rec in enumerate(records):
        lines.append(_frame({"v": 1, "s": i + 1, "t": t + i, **rec}))
    offsets = [sum(len(x) for x in lines[: i + 1]) for i in range(len(records))]
    seg.write_bytes(b"".join(lines))
    return seg, offsets


def _start(name: str, **extra: Any) -> dict[str, Any]:
    return {"k": "run_start", "experiment": "edges", "name": name, "user": "u", **extra}


def _verify(project: Project) -> tuple[int, str]:
    result = CliRunner().invoke(
        main, ["--config", str(project.config), "verify"], prog_name="ff-sync"
    )
    return result.exit_code, result.stdout + result.stderr


def _quarantine(project: Project) -> list[dict[str, Any]]:
    path = project.state_folder() / "quarantine.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n") if line]


def _pass(
    project: Project,
    stale_after_s: float = 3600.0,
    progress: Callable[[Progress], None] | None = None,
    replay: bool = False,
) -> SyncReport:
    s = load_sync_settings(project.config)
    s = dataclasses.replace(s, stale_after_s=stale_after_s)
    return sync_once(s, progress=progress, replay=replay)


def test_a_run_end_reason_becomes_the_end_reason_tag(project: Project) -> None:
    # The tracker gives a reason on SIGTERM ("SIGTERM in Slurm job 12, 0:38 of its time limit
    # left") and to run.end(reason=...); the sync sets it as ff.sync.end_reason with the
    # status, the tag the sync uses for the runs it ends itself. verify leaves ff.sync.* out.
    project.configure()
    _segment(
        project.spool_root,
        "why-0001",
        4_000_000_000_000,
        [_start("why"), {"k": "run_end", "status": "KILLED", "reason": "SIGTERM in job 12"}],
    )
    cwd = os.getcwd()
    os.chdir(project.root)
    try:
        assert _pass(project).exit_code == 0
        run = project.snapshot()["runs"]["why-0001"]
        assert run["status"] == "KILLED"
        assert run["tags"]["ff.sync.end_reason"] == "SIGTERM in job 12"
        assert _verify(project)[0] == 0
        assert _pass(project, replay=True).exit_code == 0  # replayed: the same tag, once
        assert project.snapshot()["runs"]["why-0001"] == run
        # Requeued: a new process resumes the run and finishes it. The reason went with the
        # end it explained; a FINISHED run must not read "SIGTERM".
        resumed = [_start("why", resume=True), {"k": "run_end", "status": "FINISHED"}]
        _segment(project.spool_root, "why-0001", 4_000_000_100_000, resumed)
        assert _pass(project).exit_code == 0
        run = project.snapshot()["runs"]["why-0001"]
        assert run["status"] == "FINISHED"
        assert "ff.sync.end_reason" not in run["tags"]
        assert _verify(project)[0] == 0
    finally:
        os.chdir(cwd)


# -- 1. a pass that dies after a run's end keeps its end status ------------------------------


def test_a_pass_that_dies_after_the_end_status_keeps_it(project: Project) -> None:
    """``run_end`` is in the run's first segment; a worker's later segment is still being
    replayed when the store goes away (a real lock) and the pass exits 75. The state must
    still say FINISHED: later passes never read that run_end again, and dead-run detection
    must not take the run for a silent one."""
    project.configure(retries=0, backoff=0.01)
    run = project.spool(
        """
        import time
        with tracker.start_run(run_name="main") as r:
            r.log_metric("m", 1.0)
            time.sleep(0.02)  # the worker's segment starts later: merged after this one
            w = tracker.attach_run(r.run_id)  # a forked worker, another rank
            for i in range(25_000):  # more than one batch, even through the bulk SQL path
                w.log_metric("w", float(i), step=i)
            w.end()
        print(r.run_id)
        """
    ).strip()
    segs = sorted((project.spool_root / run).glob("seg-*.jsonl"))
    assert len(segs) == 2 and b'"k":"run_end"' in segs[0].read_bytes()

    holder: list[sqlite3.Connection] = []

    def lock_after_the_first_worker_batch(p: Progress) -> None:
        if p.metrics > 1 and not holder:  # the main segment (1 point) and a batch are in
            db = sqlite3.connect(project.db, isolation_level=None)
            db.execute("BEGIN EXCLUSIVE")
            holder.append(db)

    try:
        with pytest.raises(StoreUnavailable, match="database is locked"):
            _pass(project, stale_after_s=0.001, progress=lock_after_the_first_worker_batch)
    finally:
        for db in holder:
            db.execute("ROLLBACK")
            db.close()
    state = sqlite3.connect(project.state_folder() / "state.sqlite3")
    try:
        ((status,),) = state.execute("SELECT status FROM runs WHERE run_uuid = ?", (run,))
    finally:
        state.close()
    assert status == "FINISHED"

    # The rest of the worker's segment, then a pass where the run is due for dead-run
    # detection (nothing of it pending, silent for longer than --stale-after).
    assert _pass(project, stale_after_s=0.001).exit_code == 0
    last = _pass(project, stale_after_s=0.001)
    assert last.exit_code == 0 and last.stale == []
    snap = project.snapshot()["runs"][run]
    assert snap["status"] == "FINISHED"
    assert len(snap["metrics"]["w"]) == 25_000
    assert _verify(project)[0] == 0


# -- 2. user tags never forge identity -------------------------------------------------------


def test_forged_identity_tags_are_quarantined_and_never_merge_runs(project: Project) -> None:
    victim, other = project.spool(
        """
        with tracker.start_run(run_name="victim") as v:
            v.log_metric("v", 1.0)
        with tracker.start_run(run_name="other") as o:
            o.log_metric("o", 1.0)
        print(v.run_id, o.run_id)
        """
    ).split()
    t = 4_000_000_000_000
    # A whole run spooled by an old tracker: its initial tags (the tags event right after
    # run_start) forge the victim's identity and a parent link.
    forger = "forger-0001"
    _, start_offsets = _segment(
        project.spool_root,
        forger,
        t,
        [
            _start("forger"),
            {"k": "tags", "d": {"ff.run_uuid": victim, "mlflow.parentRunId": "x", "team": "a"}},
            {"k": "metrics", "step": 0, "d": {"f": 2.0}},
            {"k": "run_end", "status": "FINISHED"},
        ],
    )
    # A later writer of an existing run, with set_tag("ff.run_uuid", ...) in it.
    _, late_offsets = _segment(
        project.spool_root,
        other,
        t + 10,
        [
            {"k": "tags", "d": {"ff.run_uuid": victim, "note": "kept"}},
            {"k": "metrics", "step": 1, "d": {"o": 3.0}},
        ],
    )

    first = project.sync()
    assert first.exit_code == 1, first.problems
    for _ in range(2):
        assert project.sync(replay=True).exit_code == 1

    snap = project.snapshot()
    assert snap["duplicates"] == {}
    runs = snap["runs"]
    assert set(runs) == {victim, other, forger}
    assert set(runs[victim]["metrics"]) == {"v"}
    assert set(runs[forger]["metrics"]) == {"f"}
    assert set(runs[other]["metrics"]) == {"o"}
    assert runs[forger]["tags"]["team"] == "a"
    assert runs[other]["tags"]["note"] == "kept"
    for uuid, r in runs.items():
        assert r["tags"]["ff.run_uuid"] == uuid
        assert "mlflow.parentRunId" not in r["tags"]

    reserved = [q for q in _quarantine(project) if q["kind"] == "reserved"]
    assert sorted((q["run"], q["offset"]) for q in reserved) == sorted(
        [(forger, start_offsets[1]), (other, late_offsets[0])]
    )
    assert all("'ff.run_uuid' is reserved" in q["reason"] for q in reserved)
    assert "'mlflow.parentRunId' is reserved" in next(
        q["reason"] for q in reserved if q["run"] == forger
    )
    code, out = _verify(project)
    assert code == 0, out


# -- 8. a record the destination can never take is quarantined; the run goes on --------------


def _ref(path: str, i: int) -> dict[str, Any]:
    digest = "sha256:" + format(i, "064x")
    return {"k": "artifact_ref", "path": path, "digest": digest, "size": i, "store": "/s"}


def test_artifact_documents_that_cannot_be_written_are_refused_not_outages(
    project: Project,
) -> None:
    long = "b" * 252  # a valid component; its document, <component>.json, is too long a name
    run = "refs-0001"
    _, offsets = _segment(
        project.spool_root,
        run,
        4_000_000_000_000,
        [
            _start("refs"),
            _ref("a", 1),
            _ref("a.json/x", 2),  # ff_artifact_refs/a.json is a file already: ENOTDIR
            _ref(f"d/{long}", 3),  # ENAMETOOLONG
            _ref("ok/c", 4),
            {"k": "metrics", "step": 0, "d": {"m": 1.0}},
            {"k": "run_end", "status": "FINISHED"},
        ],
    )
    report = project.sync()
    assert report.exit_code == 1, (report.blocked, report.problems)
    assert not report.blocked
    refused = [q for q in _quarantine(project) if q["kind"] == "refused"]
    assert sorted(q["offset"] for q in refused) == [offsets[2], offsets[3]]
    assert all(q["run"] == run and q["reason"] for q in refused)
    snap = project.snapshot()["runs"][run]
    docs = ["ff_artifact_refs/a.json", "ff_artifact_refs/ok/c.json"]
    assert sorted(snap["artifact_refs"]) == docs
    assert snap["status"] == "FINISHED" and "m" in snap["metrics"]

    assert project.sync().idle  # nothing left over: the next pass has nothing to do
    project.spool('with tracker.start_run(run_name="later") as r:\n    r.log_metric("l", 1.0)')
    after = project.sync()
    assert after.exit_code == 0 and after.quarantined == 0
    assert any(r["name"] == "later" for r in project.snapshot()["runs"].values())
    assert len([q for q in _quarantine(project) if q["kind"] == "refused"]) == 2
    code, out = _verify(project)
    assert code == 0, out


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only folder")
def test_an_unwritable_artifact_folder_refuses_the_reference_only(project: Project) -> None:
    run = "refs-0002"
    _segment(
        project.spool_root,
        run,
        4_000_000_000_000,
        [_start("refs"), _ref("x", 1), {"k": "run_end", "status": "FINISHED"}],
    )
    assert project.sync().exit_code == 0  # creates the run and its artifact folder
    artifacts = project.root / "data" / "mlflow" / "artifacts"
    folders = [p for p in artifacts.rglob("ff_artifact_refs") if p.is_dir()]
    assert folders
    late, offsets = _segment(
        project.spool_root,
        run,
        4_000_000_000_100,
        [_ref("y", 2), {"k": "metrics", "step": 0, "d": {"m": 1.0}}],
        host="thirdhost",
    )
    for folder in folders:
        folder.chmod(0o555)
    try:
        report = project.sync()
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert report.exit_code == 1 and not report.blocked
    reports = _quarantine(project)
    assert [(q["kind"], q["file"], q["offset"]) for q in reports] == [
        ("refused", str(late), offsets[0])
    ]
    assert "permission denied" in reports[0]["reason"].lower()
    assert "m" in project.snapshot()["runs"][run]["metrics"]


# -- 9. every field read from a spool is range- and type-checked -----------------------------

BIG_INTS = st.sampled_from([2**63, 2**64 - 1, 2**64, 2**70, -(2**63) - 1, -(2**70)])
NOT_INT = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.lists(st.integers(), max_size=2),
)
NOT_STR = st.one_of(
    st.integers(),
    BIG_INTS,
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)
NOT_OBJECT = st.one_of(
    st.integers(),
    BIG_INTS,
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.lists(st.text(max_size=3), max_size=2),
    st.just({}),
)
HUGE = st.integers(min_value=10_000, max_value=60_000).map(lambda n: "x" * n)
BAD_INT64 = st.one_of(BIG_INTS, NOT_INT)
BAD_SIZE = st.one_of(BIG_INTS, NOT_INT, st.integers(max_value=-1))
BAD_METRIC_VALUE = st.one_of(
    st.booleans(),
    st.none(),
    st.text(max_size=5).filter(lambda s: s not in ("NaN", "Infinity", "-Infinity")),
    st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=2),
    st.dictionaries(
        st.text(max_size=3), st.floats(allow_nan=False, allow_infinity=False), max_size=2
    ),
)
BAD_STATUS = st.one_of(NOT_STR, HUGE, st.sampled_from(["RUNNING", "DONE", "finished", ""]))


def _hostile(kind: str, field: str, value: Any) -> dict[str, Any]:
    """One record of ``kind`` whose ``field`` is ``value`` (every other field is valid)."""
    base: dict[str, dict[str, Any]] = {
        "metrics": {"k": "metrics", "step": 3, "d": {"h": 1.0}},
        "params": {"k": "params", "d": {"hp": "1"}},
        "tags": {"k": "tags", "d": {"ht": "1"}},
        "artifact_ref": _ref("h/file", 5),
        "run_end": {"k": "run_end", "status": "FINISHED"},
        "run_start": _start("again"),
        "heartbeat": {"k": "heartbeat"},
    }
    rec = dict(base[kind])
    if field == "value":
        rec["d"] = {next(iter(rec["d"])): value}
    else:
        rec[field] = value
    return rec


CASES = st.one_of(
    st.tuples(st.just("metrics"), st.just("step"), BAD_INT64),
    st.tuples(st.just("metrics"), st.just("value"), BAD_METRIC_VALUE),
    st.tuples(st.just("metrics"), st.just("d"), NOT_OBJECT),
    st.tuples(st.just("params"), st.just("value"), st.one_of(NOT_STR, HUGE)),
    st.tuples(st.just("params"), st.just("d"), NOT_OBJECT),
    st.tuples(st.just("tags"), st.just("value"), st.one_of(NOT_STR, HUGE)),
    st.tuples(st.just("artifact_ref"), st.just("size"), BAD_SIZE),
    st.tuples(st.just("artifact_ref"), st.just("path"), NOT_STR),
    st.tuples(st.just("artifact_ref"), st.just("digest"), NOT_STR),
    st.tuples(st.just("artifact_ref"), st.just("store"), st.one_of(NOT_STR, st.just(""))),
    st.tuples(st.just("run_end"), st.just("status"), BAD_STATUS),
    st.tuples(
        st.just("run_end"),
        st.just("reason"),
        # reason: null is no reason, not damage
        st.one_of(
            NOT_STR.filter(lambda v: v is not None), HUGE, st.sampled_from(["", " ", "a\x00"])
        ),
    ),
    st.tuples(st.just("run_start"), st.just("experiment"), st.one_of(NOT_STR, st.just(" "))),
    st.tuples(st.just("run_start"), st.just("name"), st.one_of(NOT_STR, st.just(""))),
    st.tuples(
        st.just("run_start"),
        st.just("parent"),
        # parent: null is a top-level run, not damage
        st.one_of(NOT_STR.filter(lambda v: v is not None), st.just("bad id!")),
    ),
    st.tuples(
        st.sampled_from(["heartbeat", "metrics", "run_end", "tags"]),
        st.just("t"),
        st.one_of(BIG_INTS, st.integers(max_value=-1)),
    ),
)


@pytest.fixture(scope="module")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow SQLite store, copied for each example (migrating takes s)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path_factory.mktemp("template")
    db = folder / "mlruns.db"
    store = SqlAlchemyStore(f"sqlite:///{db}", str(folder / "artifacts"))  # type: ignore[no-untyped-call]
    store.engine.dispose()
    return db


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=CASES)
def test_hostile_fields_are_quarantined_as_invalid_and_never_raise(
    case: tuple[str, str, Any], tmp_path: Path, store_template: Path
) -> None:
    kind, field, value = case
    project = Project(Path(tempfile.mkdtemp(dir=tmp_path)))
    project.configure()
    project.db.parent.mkdir(parents=True)
    shutil.copyfile(store_template, project.db)
    run = "hostile-0001"
    t = 4_000_000_000_000
    hostile = _hostile(kind, field, value)
    records: list[dict[str, Any]] = [
        _start("hostile"),
        {"k": "metrics", "step": 0, "d": {"m": 1.0}},
    ]
    if kind == "run_start":  # a resumed run's start, after its end: invalid, it reopens nothing
        records.append({"k": "run_end", "status": "FINISHED"})
    records += [hostile, {"k": "metrics", "step": 1, "d": {"m": 2.0}}]
    if kind != "run_start":
        records.append({"k": "run_end", "status": "FINISHED"})
    _, offsets = _segment(project.spool_root, run, t, records)
    bad_offset = offsets[records.index(hostile)]

    cwd = os.getcwd()
    os.chdir(project.root)
    try:
        report = _pass(project)
        assert report.exit_code in (0, 1), (report.blocked, report.problems)
        assert not report.blocked
        reports = _quarantine(project)
        assert [(q["offset"], q["kind"] in ("invalid", "corrupt")) for q in reports] == [
            (bad_offset, True)
        ], reports
        snap = project.snapshot()["runs"][run]
        assert [v for _, _, v in snap["metrics"]["m"]] == ["1.0", "2.0"]
        assert snap["status"] == "FINISHED"
        code, out = _verify(project)
        assert code == 0, out
        again = _pass(project, replay=True)
        assert again.exit_code == 1 and len(_quarantine(project)) == 1
    finally:
        os.chdir(cwd)
