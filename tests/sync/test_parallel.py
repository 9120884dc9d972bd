"""Parallel passes (``sync.workers``): servers get several runs at once, SQLite one writer.

Real destinations only: an ``mlflow server`` and a throw-away PostgreSQL cluster
(``tests/_services.py``), compared with what a one-writer pass puts in a SQLite store.
No timing is asserted here; tools/bench/bench_sync_http.py measures the gain.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from formula_foundry.config import Settings
from formula_foundry.errors import StoreUnavailable
from formula_foundry.sync import Progress, SyncReport, load_sync_settings, sync_once
from formula_foundry.sync.engine.parallel import workers_for
from formula_foundry.sync.engine.sink import Sink
from formula_foundry.sync.engine.sync_pass import mlflow_sink
from tests._services import MlflowServer, create_database, mlflow_server, postgres_cluster

from .conftest import Project

# Runs of very different sizes, nested three deep across two experiments: parents, children
# and grandchildren end up in different workers, and a big run keeps one worker busy while
# the others go through the small ones.
TREES = """
import sys
trees, points = int(sys.argv[1]), int(sys.argv[2])
for t in range(trees):
    with tracker.start_run(run_name=f"tree-{t}", tags={"tree": str(t)}) as top:
        top.log_params({"lr": 0.1 * (t + 1), "tree": t})
        for i in range(points * (t % 3 + 1)):
            top.log_metric("loss", 1.0 / (i + 1), step=i)
        for c in range(2):
            with tracker.start_run(run_name=f"child-{t}-{c}", nested=True,
                                   experiment_name="ff-parallel-children") as child:
                child.log_param("c", c)
                for i in range(points // 4):
                    child.log_metrics({"a": i * 0.5, "b": -i}, step=i)
                with tracker.start_run(run_name=f"grandchild-{t}-{c}", nested=True) as g:
                    g.set_tag("depth", "2")
                    g.log_metric("x", float(t), step=0)
                    if c == 1:
                        g.log_artifact_reference("out/model.bin", "sha256:" + "cd" * 32, 77)
"""
TREE_COUNT, POINTS = 4, 600
RUN_COUNT = TREE_COUNT * 5


def _comparable(snap: dict[str, Any]) -> dict[str, Any]:
    """What must match across store kinds (artifact locations differ by design)."""
    return {"duplicates": snap["duplicates"], "runs": snap["runs"]}


class CountingFactory:
    """The real MLflow sink factory, noting which threads opened a sink, and the order in
    which runs were created and batches sent (``calls``: (what, thread) pairs)."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.calls: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def __call__(self, settings: Settings) -> Sink:
        with self._lock:
            self.threads.append(threading.get_ident())
        return _Recording(mlflow_sink(settings), self)

    def note(self, what: str) -> None:
        with self._lock:
            self.calls.append((what, threading.get_ident()))


class _Recording:
    """A real sink that tells its factory about run creations and batches."""

    def __init__(self, inner: Sink, factory: CountingFactory) -> None:
        self.inner, self.factory = inner, factory

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def create_run(self, spec: Any) -> Any:
        self.factory.note("create_run")
        return self.inner.create_run(spec)

    def log_batch(self, mlflow_run_id: str, metrics: Any, params: Any, tags: Any) -> None:
        self.inner.log_batch(mlflow_run_id, metrics, params, tags)
        self.factory.note("log_batch")


def _settings(project: Project, uri: str | None, workers: int) -> Settings:
    settings = load_sync_settings(project.config, tracking_uri=uri)
    return dataclasses.replace(settings, sync_workers=workers)


def _parallel_pass(project: Project, uri: str, workers: int = 4) -> SyncReport:
    factory = CountingFactory()
    seen: list[Progress] = []
    report = sync_once(_settings(project, uri, workers), sink_factory=factory, progress=seen.append)
    assert report.exit_code == 0, report.details()
    assert report.runs == RUN_COUNT and report.workers == workers
    # The pass's own sink (resolving runs) plus one per worker, each opened in its thread.
    assert len(factory.threads) == workers + 1
    assert len(set(factory.threads)) == workers + 1
    # Only the calling thread creates runs; workers replay runs already resolved, while the
    # calling thread goes on resolving the others (lookups overlap the replay).
    caller = factory.threads[0]
    creates = [i for i, (what, _) in enumerate(factory.calls) if what == "create_run"]
    assert len(creates) == RUN_COUNT
    assert {factory.calls[i][1] for i in creates} == {caller}
    first_batch = next(i for i, (w, t) in enumerate(factory.calls) if w == "log_batch")
    assert factory.calls[first_batch][1] != caller and first_batch < creates[-1]
    # One coherent display: whole-pass figures that never go backwards.
    assert seen and seen[-1].runs_total == RUN_COUNT
    for before, after in itertools.pairwise(seen):
        assert after.events >= before.events and after.metrics >= before.metrics
        assert after.runs_done >= before.runs_done
    assert max(p.metrics for p in seen) == report.metrics
    return report


def _reference(project: Project) -> dict[str, Any]:
    project.spool(TREES, str(TREE_COUNT), str(POINTS))
    report = project.sync()
    assert report.exit_code == 0 and report.workers == 1 and report.runs == RUN_COUNT
    return _comparable(project.snapshot())


def test_only_servers_get_several_workers(project: Project) -> None:
    for uri, expected in [
        ("sqlite:////tmp/x.db", 1),
        ("http://127.0.0.1:5000", 8),
        ("https://mlflow.example", 8),
        ("postgresql://u@h/db", 8),
        ("postgresql+psycopg2://u@h/db", 8),
        ("mysql://u@h/db", 1),
    ]:
        assert workers_for(_settings(project, uri, 8)) == expected, uri


def test_sqlite_keeps_one_writer_with_eight_workers(project: Project) -> None:
    project.spool(TREES, "3", "200")
    factory = CountingFactory()
    report = sync_once(_settings(project, None, 8), sink_factory=factory)
    assert report.exit_code == 0 and report.runs == 15
    assert report.workers == 1
    assert factory.threads == [threading.get_ident()]  # one sink, in the calling thread


@pytest.mark.server
def test_parallel_http_matches_one_writer(project: Project, tmp_path: Path) -> None:
    reference = _reference(project)
    with mlflow_server(tmp_path / "server") as (uri, _pid):
        report = _parallel_pass(project, uri)
        assert report.metrics > 0
        assert _comparable(project.snapshot(uri)) == reference
        again = sync_once(_settings(project, uri, 4))
        assert again.idle and again.events == 0


@pytest.mark.postgres
def test_parallel_postgresql_matches_one_writer(project: Project) -> None:
    reference = _reference(project)
    with postgres_cluster() as admin:
        uri = create_database(admin)
        _parallel_pass(project, uri)
        assert _comparable(project.snapshot(uri)) == reference
        assert sync_once(_settings(project, uri, 4)).idle


@pytest.mark.server
def test_outage_mid_pass_stops_cleanly_then_exactly_once(project: Project, tmp_path: Path) -> None:
    reference = _reference(project)
    if os.environ.get("FF_TEST_MLFLOW_SERVER_URI"):
        pytest.skip("needs a server this test can stop and restart")
    # Restarted on the same port and store: a pass interrupted by its death resumes
    # against the same destination.
    server = MlflowServer(tmp_path / "server")
    settings = _settings(project, server.uri, 4)
    batches: list[Progress] = []
    server.start()
    try:

        def kill_after_some(p: Progress) -> None:
            batches.append(p)
            if len(batches) == 5:
                server.stop(signal.SIGKILL)  # the server dies mid-pass

        with pytest.raises(StoreUnavailable) as info:
            sync_once(settings, progress=kill_after_some)
        assert info.value.exit_code == 75
    finally:
        server.stop()
    assert len(batches) >= 5
    server.start()
    try:
        # Nothing recorded beyond what the server committed: the rest comes exactly once.
        partial = project.snapshot(server.uri)
        assert partial["duplicates"] == {}
        report = sync_once(settings)
        assert report.exit_code == 0, report.details()
        assert _comparable(project.snapshot(server.uri)) == reference
        assert sync_once(settings).idle
    finally:
        server.stop()
