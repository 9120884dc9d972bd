"""A wrong tracking URI is said out loud, and one bad record never looks like an outage.

* a SQLite path that has no file yet: the pass says it creates a new store, where, and why;
* attempts that fail (driver missing, MLflow refusing the store) leave no state folder that
  would hold back ``ff-sync gc``; ``file://`` exits 2 with MLflow's whole message;
* ``ff-sync verify`` against a SQLite path with no file: exit 2, "no store at <path>";
* a refusal quoting a very long name keeps the destination's reason;
* an artifact reference whose document cannot be written for a local reason (ENOTDIR,
  ENAMETOOLONG) is refused alone (``RecordRejected``), not taken for an outage.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from formula_foundry.sync.engine.report import one_line
from formula_foundry.sync.engine.sink import (
    ArtifactRef,
    DestinationRejected,
    RecordRejected,
    RunSpec,
)
from formula_foundry.sync.mlflow.client_sink import MlflowSink

from .conftest import Project

RUN = """
import sys
with tracker.start_run(run_id=sys.argv[1], run_name=sys.argv[1]) as run:
    run.log_metric("x", 1.0, step=0)
"""


def test_a_typo_in_the_sqlite_path_says_a_new_store_is_created(project: Project) -> None:
    project.spool(RUN, "typo-run")
    assert project.ff_sync().returncode == 0
    typo = project.root / "data" / "mlflow" / "mlrun.db"
    first = project.ff_sync("--tracking-uri", "sqlite:///data/mlflow/mlrun.db")
    assert first.returncode == 0, first.stderr
    lines = [line for line in first.stderr.splitlines() if "creating a new MLflow store" in line]
    assert lines == [
        f"ff-sync: warning: creating a new MLflow store at {typo} (no file there yet; if the "
        "path is a typo, delete that file and its state folder and fix the tracking URI)"
    ]
    again = project.ff_sync("--tracking-uri", "sqlite:///data/mlflow/mlrun.db")
    assert again.returncode == 0 and "creating a new MLflow store" not in again.stderr


def test_failed_attempts_leave_no_state_folder_and_gc_is_not_held_back(
    project: Project,
) -> None:
    project.spool(RUN, "kept-run")
    assert project.ff_sync().returncode == 0
    before = sorted(p.name for p in project.state_dir.iterdir())

    driver = project.ff_sync("--tracking-uri", "mysql://u:pw@127.0.0.1/db")
    assert driver.returncode == 2 and "is not installed" in driver.stderr
    file_store = project.ff_sync("--tracking-uri", f"file://{project.root / 'mlruns'}")
    assert file_store.returncode == 2, file_store.stderr
    # MLflow's whole message: its end (how to opt out) is there too.
    assert "filesystem tracking backend" in file_store.stderr
    assert "MLFLOW_ALLOW_FILE_STORE=true" in file_store.stderr
    assert len(file_store.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in project.state_dir.iterdir()) == before

    time.sleep(0.05)
    gc = project.ff_sync("gc", "--older-than", "0")
    assert gc.returncode == 0, gc.stderr
    assert "archived 1 run folder, kept 0" in gc.stdout and "has not synced" not in gc.stderr


def test_verify_against_a_missing_sqlite_store_exits_2(project: Project, tmp_path: Path) -> None:
    project.spool(RUN, "verified-run")
    assert project.ff_sync().returncode == 0
    missing = tmp_path / "elsewhere" / "mlflow.db"
    result = project.ff_sync("--tracking-uri", f"sqlite:///{missing}", "verify")
    assert result.returncode == 2, result.stderr
    assert f"no store at {missing}" in result.stderr
    assert not missing.parent.exists()


@pytest.fixture
def sink(tmp_path: Path) -> MlflowSink:
    return MlflowSink(f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "artifacts")


def _spec(experiment: str, spool_run_id: str = "0" * 31 + "1") -> RunSpec:
    return RunSpec(spool_run_id, experiment, "run", 1_700_000_000_000, "me", "host", "job.py")


def test_a_refusal_quoting_a_long_name_keeps_the_reason(sink: MlflowSink) -> None:
    name = "exp-" + "n" * 600
    with pytest.raises(DestinationRejected) as caught:
        sink.create_run(_spec(name))
    shown = one_line(str(caught.value))  # as the pass prints it (400 characters at most)
    assert "exceeds the maximum length of 500 characters" in shown, shown
    assert "(604 chars)" in shown and "exp-nnn" in shown


def _ref(path: str) -> ArtifactRef:
    return ArtifactRef(path, "sha256:" + "0" * 64, 3, "/srv/artifacts", 1_700_000_000_000)


def test_a_reference_document_a_local_store_cannot_write_is_rejected_alone(
    sink: MlflowSink,
) -> None:
    run = sink.create_run(_spec("refs"))
    sink.log_artifact_ref(run.mlflow_run_id, _ref("a"))  # ff_artifact_refs/a.json, a file
    with pytest.raises(RecordRejected) as caught:
        sink.log_artifact_ref(run.mlflow_run_id, _ref("a.json/x"))  # needs a.json to be a folder
    message = str(caught.value)
    assert "Not a directory" in message and "'a.json/x'" in message, message
    with pytest.raises(RecordRejected, match="File name too long"):
        sink.log_artifact_ref(run.mlflow_run_id, _ref("b" * 252))
    sink.log_artifact_ref(run.mlflow_run_id, _ref("c"))  # the run goes on
