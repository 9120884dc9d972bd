"""Destination faults: locked or unreachable stores, lost answers, refused runs.

The outage test runs on every destination; the locked-SQLite test is about SQLite itself.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import pytest

from formula_foundry.config import Settings
from formula_foundry.errors import StoreUnavailable
from formula_foundry.sync import RetryPolicy, RunSpec
from formula_foundry.sync.engine.sink import (
    ArtifactRef,
    DestinationRejected,
    RemoteRun,
    StoredParamConflict,
)
from formula_foundry.sync.mlflow.client_sink import MlflowSink

from .conftest import RICH_SPOOL, Destination, Project


def _segments(project: Project) -> dict[str, tuple[int, int]]:
    path = project.state_folder() / "state.sqlite3"
    if not path.exists():
        return {}
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT rel, byte_offset, size_seen FROM segments").fetchall()
    finally:
        db.close()
    return {rel: (offset, seen) for rel, offset, seen in rows}


def test_a_locked_store_exits_75_loses_nothing_and_the_next_pass_completes(
    project: Project,
) -> None:
    project.configure(retries=0, backoff=0.01)
    project.spool('with tracker.start_run(run_name="first") as r:\n    r.log_metric("m", 1.0)\n')
    assert project.ff_sync().returncode == 0
    project.spool(RICH_SPOOL, "200")
    state_before = _segments(project)
    snap_before = project.snapshot()

    holder = sqlite3.connect(project.db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        result = project.ff_sync()
        took = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.returncode == 75, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"ff-sync: error: {project.uri} is unavailable (")
    assert "database is locked" in line
    assert line.endswith("(gave up after 1 attempt); nothing was lost, run ff-sync again later")
    assert took < 60
    assert _segments(project) == state_before
    assert project.snapshot() == snap_before

    done = project.ff_sync()
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ff-sync: synced: 3 runs, ")
    assert len(project.snapshot()["runs"]) == 4


def test_an_outage_exits_75_loses_nothing_and_the_next_pass_completes(
    project: Project, destination: Destination
) -> None:
    """The destination goes away between two passes (SQLite locked, the PostgreSQL cluster
    stopped, the mlflow server killed) and comes back with the same URI."""
    if destination.outage is None:
        pytest.skip("the destination is an external server the tests cannot stop")
    project.configure(retries=0, backoff=0.01)
    project.spool('with tracker.start_run(run_name="first") as r:\n    r.log_metric("m", 1.0)\n')
    assert project.ff_sync().returncode == 0
    project.spool(RICH_SPOOL, "200")
    state_before = _segments(project)
    snap_before = project.snapshot()

    with destination.outage():
        started = time.monotonic()
        result = project.ff_sync()
        took = time.monotonic() - started
    assert result.returncode == 75, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("ff-sync: error:")]
    assert line.startswith(f"ff-sync: error: {project.uri} is unavailable (")
    assert line.endswith("(gave up after 1 attempt); nothing was lost, run ff-sync again later")
    assert took < 60
    assert _segments(project) == state_before
    assert project.snapshot() == snap_before

    done = project.ff_sync()
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ff-sync: synced: 3 runs, ")
    assert len(project.snapshot()["runs"]) == 4
    assert project.ff_sync().stdout.startswith("ff-sync: nothing new: 0 runs, 0 events")


class Flaky:
    """The real MLflow sink, but the n-th call of a method loses its answer after committing."""

    def __init__(self, inner: MlflowSink, method: str, fail_on: Sequence[int]) -> None:
        self.inner, self.method, self.fail_on = inner, method, set(fail_on)
        self.description, self.limits = inner.description, inner.limits
        self.calls = 0

    def _maybe_fail(self, name: str) -> None:
        if name != self.method:
            return
        self.calls += 1
        if self.calls in self.fail_on:
            raise StoreUnavailable(f"{self.description} is unavailable (test): answer lost")

    def find_run(self, spool_run_id: str, experiment: str | None) -> RemoteRun | None:
        return self.inner.find_run(spool_run_id, experiment)

    def create_run(self, spec: RunSpec) -> RemoteRun:
        run = self.inner.create_run(spec)
        self._maybe_fail("create_run")
        return run

    def get_params(self, mlflow_run_id: str) -> dict[str, str]:
        return self.inner.get_params(mlflow_run_id)

    def log_batch(self, mlflow_run_id: str, metrics: Any, params: Any, tags: Any) -> None:
        self.inner.log_batch(mlflow_run_id, metrics, params, tags)
        self._maybe_fail("log_batch")

    def log_artifact_ref(self, mlflow_run_id: str, ref: ArtifactRef) -> None:
        self.inner.log_artifact_ref(mlflow_run_id, ref)
        self._maybe_fail("log_artifact_ref")

    def delete_tag(self, mlflow_run_id: str, key: str) -> None:
        self.inner.delete_tag(mlflow_run_id, key)
        self._maybe_fail("delete_tag")

    def set_status(self, mlflow_run_id: str, status: str, end_time: int | None) -> None:
        self.inner.set_status(mlflow_run_id, status, end_time)
        self._maybe_fail("set_status")

    def close(self) -> None:
        self.inner.close()


def _flaky(method: str, fail_on: Sequence[int]) -> Any:
    def factory(settings: Settings) -> Flaky:
        return Flaky(
            MlflowSink(settings.backend_store_uri, settings.artifact_root), method, fail_on
        )

    return factory


@pytest.mark.parametrize(
    ("method", "fail_on"),
    [
        ("create_run", [1, 2]),
        ("log_batch", [2, 3, 5]),
        ("set_status", [1]),
        ("log_artifact_ref", [1]),
    ],
)
def test_a_lost_answer_is_retried_without_duplicates(
    project: Project, method: str, fail_on: list[int]
) -> None:
    project.spool(RICH_SPOOL, "3000")
    reference_uri = f"sqlite:///{project.root / 'reference.db'}"
    assert project.sync(tracking_uri=reference_uri).exit_code == 0
    reference = project.snapshot(reference_uri)

    # No retries: the pass stops at the first lost answer, having recorded nothing after it.
    no_retry = RetryPolicy(0, 0.0)
    with pytest.raises(StoreUnavailable, match="answer lost"):
        project.sync(sink_factory=_flaky(method, fail_on), retry=no_retry)
    partial = _segments(project)
    # With retries, the same faults are healed within one pass.
    sleeps: list[float] = []
    policy = RetryPolicy(3, 0.5, sleep=sleeps.append)
    report = project.sync(sink_factory=_flaky(method, fail_on), retry=policy)
    assert report.exit_code == 0
    assert sleeps and set(sleeps) <= {0.5, 1.0, 2.0}
    assert all(_segments(project)[rel][0] >= off for rel, (off, _) in partial.items())
    assert project.snapshot() == reference


def test_retry_policy_doubles_its_delay_and_names_the_attempts() -> None:
    waits: list[float] = []
    calls = []

    def down() -> None:
        calls.append(1)
        raise StoreUnavailable("sqlite:///x is unavailable (log): database is locked")

    with pytest.raises(StoreUnavailable) as info:
        RetryPolicy(3, 0.25, sleep=waits.append).call(down)
    assert waits == [0.25, 0.5, 1.0] and len(calls) == 4
    assert str(info.value) == (
        "sqlite:///x is unavailable (log): database is locked (gave up after 4 attempts); "
        "nothing was lost, run ff-sync again later"
    )


def test_mlflow_errors_are_classified(project: Project) -> None:
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        INVALID_PARAMETER_VALUE,
        RESOURCE_DOES_NOT_EXIST,
        TEMPORARILY_UNAVAILABLE,
    )

    sink = MlflowSink("sqlite:///" + str(project.root / "c.db"), project.root / "art")
    locked = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("database is locked"))
    cases = [
        (MlflowException("x", TEMPORARILY_UNAVAILABLE), StoreUnavailable),
        (MlflowException("API request to http://h failed with exception boom"), StoreUnavailable),
        (locked, StoreUnavailable),
        (ConnectionRefusedError(111, "Connection refused"), StoreUnavailable),
        (
            MlflowException(
                "Changing param values is not allowed. Params were already logged",
                INVALID_PARAMETER_VALUE,
            ),
            StoredParamConflict,
        ),
        (MlflowException("Run 'abc' not found", RESOURCE_DOES_NOT_EXIST), DestinationRejected),
        (
            MlflowException("must be in the 'active' state", INVALID_PARAMETER_VALUE),
            DestinationRejected,
        ),
    ]
    for exc, kind in cases:
        err = sink.classify(exc, "test")
        assert type(err) is kind or isinstance(err, kind), (exc, err)
    assert sink.classify(TypeError("a bug"), "test") is None
    pg = MlflowSink.__new__(MlflowSink)
    pg.uri, pg.description = "postgresql://u:s3cret@h/db", "postgresql://u:***@h/db"
    err = pg.classify(MlflowException("could not connect to postgresql://u:s3cret@h/db"), "x")
    assert err is not None and "s3cret" not in str(err) and "u:***@h" in str(err)


def test_a_deleted_run_is_refused_the_others_go_on_and_restoring_it_heals(
    project: Project,
) -> None:
    from mlflow import MlflowClient

    live = project.root / "go"
    code = f"""
    import pathlib, time
    go = pathlib.Path({str(live)!r})
    run = tracker.start_run(run_name="victim")
    run.log_metric("m", 1.0, step=0)
    print(run.run_id, flush=True)
    while not go.exists():
        time.sleep(0.05)
    run.log_metric("m", 2.0, step=1)
    run.end()
    """
    import subprocess
    import sys
    import textwrap

    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from formula_foundry.tracking import get_tracker\ntracker = get_tracker()\n"
            + textwrap.dedent(code),
        ],
        cwd=project.root,
        env=project.env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    victim = proc.stdout.readline().strip()
    assert project.sync().exit_code == 0
    client = MlflowClient(project.uri)
    exp = client.get_experiment_by_name("formula-foundry").experiment_id
    (found,) = client.search_runs([exp], f"tags.`ff.run_uuid` = '{victim}'")
    run_id = found.info.run_id
    client.delete_run(run_id)
    live.touch()
    assert proc.wait(timeout=60) == 0
    project.spool('with tracker.start_run(run_name="other") as r:\n    r.log_metric("o", 1.0)\n')

    report = project.sync()
    assert report.exit_code == 1 and len(report.blocked) == 1
    assert report.blocked[0].startswith(f"run {victim}: {project.uri} refused log a batch to run")
    assert "must be in the 'active' state" in report.blocked[0]
    snap = project.snapshot()
    assert [r["name"] for r in snap["runs"].values()].count("other") == 1
    assert snap["runs"][victim]["status"] == "RUNNING"

    client.restore_run(run_id)
    report = project.sync()
    assert report.exit_code == 0 and not report.blocked
    victim_run = project.snapshot()["runs"][victim]
    assert [v for _, _, v in victim_run["metrics"]["m"]] == ["1.0", "2.0"]
    assert victim_run["status"] == "FINISHED"


def test_a_deleted_experiment_refuses_its_new_runs_with_a_hint(project: Project) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(project.uri)
    project.db.parent.mkdir(parents=True, exist_ok=True)
    exp = client.create_experiment("gone", artifact_location=str(project.root / "gone"))
    client.delete_experiment(exp)
    project.spool(
        'with tracker.start_run(run_name="a", experiment_name="gone") as r:\n'
        '    r.log_metric("m", 1.0)\n'
        'with tracker.start_run(run_name="b") as r:\n    r.log_metric("m", 1.0)\n'
    )
    result = project.ff_sync()
    assert result.returncode == 1
    refused = [x for x in result.stderr.splitlines() if x.startswith("ff-sync: refused: run ")]
    assert len(refused) == 1
    assert f"experiment 'gone' (id {exp}) is deleted in {project.uri}; restore it" in refused[0]
    assert "1 refused" in result.stdout
    assert [r["name"] for r in project.snapshot()["runs"].values()] == ["b"]
