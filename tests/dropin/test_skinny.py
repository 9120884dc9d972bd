"""Compute-node installs: formula-foundry alone (no MLflow at all), and with ``mlflow-skinny``.

Each test gets a real throw-away virtual environment (built once per session by pip from the
package index, with a wheel of this repository), runs a job there, and syncs the spool
with *this* venv's ``ff-sync`` (full MLflow), as the sync host would.

* ``bare``: ``pip install <repo>`` resolves formula-foundry's own dependencies and no MLflow;
  the tracker logs, and ``ff-sync`` there refuses clearly (it needs MLflow).
* ``skinny``: ``mlflow-skinny`` of this venv's MLflow minor version, no SQLAlchemy, no server:
  unmodified MLflow code logs through ``spool:``.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.dropin._compare import dump
from tests.dropin.conftest import child_env, ff_sync

LIST_DISTS = """
import importlib.metadata, importlib.util, json
print(json.dumps({
    "dists": sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions()),
    "importable": {m: importlib.util.find_spec(m) is not None
                   for m in ("mlflow", "sqlalchemy", "alembic", "flask", "formula_foundry")},
}))
"""


class Venv:
    def __init__(self, path: Path, seconds: float) -> None:
        self.path = path
        self.python = path / "bin" / "python"
        self.seconds = seconds

    def run(
        self, args: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.python), *args],
            cwd=cwd,
            env=child_env(env),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def dists(self, cwd: Path) -> dict[str, object]:
        return json.loads(self.run(["-c", LIST_DISTS], cwd).stdout)


def start_venv(path: Path, *requirements: str) -> subprocess.Popen[str]:
    """Create a venv at ``path`` and start this venv's pip installing ``requirements`` there."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"), "install"]
    return subprocess.Popen(
        [*pip, "--quiet", "--disable-pip-version-check", *requirements],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def skinny_requirement() -> str:
    """mlflow-skinny of the same major.minor as this venv's MLflow (what ff-sync talks to)."""
    major, minor = importlib.metadata.version("mlflow").split(".")[:2]
    return f"mlflow-skinny=={major}.{minor}.*"


def repo_wheel(work: Path) -> Path:
    """A wheel of this repository, built from a copy (the build writes nothing in the repo)."""
    src = work / "repo"
    shutil.copytree(
        REPO_ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, src / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(work), str(src)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, f"building the wheel failed:\n{build.stdout}\n{build.stderr}"
    (wheel,) = work.glob("formula_foundry-*.whl")
    return wheel


@pytest.fixture(scope="session")
def node_venvs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Venv]:
    """Two compute-node installs of formula-foundry's wheel, built side by side:

    ``bare``: what ``pip install formula-foundry`` resolves, nothing else;
    ``skinny``: the same plus ``mlflow-skinny``."""
    work = tmp_path_factory.mktemp("venvs")
    start = time.monotonic()
    wheel = repo_wheel(work)
    jobs = {
        "bare": start_venv(work / "bare", str(wheel)),
        "skinny": start_venv(work / "skinny", str(wheel), skinny_requirement()),
    }
    venvs = {}
    try:
        for name, job in jobs.items():
            out, _ = job.communicate(timeout=900)
            assert job.returncode == 0, f"pip install into the {name} venv failed:\n{out}"
            venvs[name] = Venv(work / name, time.monotonic() - start)
    finally:
        for job in jobs.values():
            if job.poll() is None:
                job.kill()
                job.wait()
    return venvs


TRACKER_JOB = """
import json
from formula_foundry.tracking import get_tracker

tracker = get_tracker()
with tracker.start_run(run_name="node-job", experiment_name="bare-node") as run:
    run.log_param("alpha", 0.5)
    run.set_tag("node", "no-mlflow")
    for i in range(10):
        run.log_metric("loss", 1.0 / (i + 1), step=i)
print(json.dumps({"run": run.run_id}))
"""


def test_a_node_install_without_mlflow_logs_with_the_tracker(
    node_venvs: dict[str, Venv], tmp_path: Path
) -> None:
    bare_venv = node_venvs["bare"]
    print(f"bare venv ready after {bare_venv.seconds:.1f} s")
    found = bare_venv.dists(tmp_path)
    assert not [d for d in found["dists"] if "mlflow" in d], found
    assert found["importable"] == {
        "mlflow": False,
        "sqlalchemy": False,
        "alembic": False,
        "flask": False,
        "formula_foundry": True,
    }

    spool = tmp_path / "spool"
    out = bare_venv.run(
        ["-c", textwrap.dedent(TRACKER_JOB)], tmp_path, {"FF_SPOOL_ROOT": str(spool)}
    )
    run_id = json.loads(out.stdout)["run"]
    assert (spool / run_id).is_dir()

    # ff-sync on such a host says what is missing instead of failing obscurely.
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    env = {"FF_SPOOL_ROOT": str(spool), "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    refused = bare_venv.run(["-m", "formula_foundry.sync"], db.parent, env, check=False)
    assert refused.returncode == 2, refused.stderr
    assert "MLflow is not installed" in refused.stderr
    assert not db.exists()

    # The sync host (this venv) replays it.
    ff_sync(spool, db)
    data = dump(db)
    run = data["bare-node/node-job"]
    assert run["status"] == "FINISHED"
    assert run["params"] == {"alpha": "0.5"} and run["tags"]["node"] == "no-mlflow"
    assert sorted(run["metrics"]["loss"]) == [(i, 1.0 / (i + 1)) for i in range(10)]


SKINNY_JOB = """
import json, sys

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

mlflow.set_experiment("skinny-node")
client = MlflowClient()
with mlflow.start_run(run_name="train") as run:
    rid = run.info.run_id
    mlflow.log_params({"lr": 0.001, "batch": 64})
    mlflow.set_tag("node", "skinny")
    for i in range(30):
        mlflow.log_metric("loss", 1.0 / (i + 1), step=i, synchronous=i % 2 == 0)
    mlflow.log_metrics({"acc": 0.9, "f1": float("nan")}, step=29)
    with mlflow.start_run(run_name="eval", nested=True):
        mlflow.log_metric("eval_loss", 0.125, step=0)
    client.log_batch(rid, metrics=[Metric("grad", 0.5, 1700000000000, 3)],
                     params=[Param("seed", "7")], tags=[RunTag("via", "client")])
    got = client.get_run(rid)
    assert got.data.params == {"lr": "0.001", "batch": "64", "seed": "7"}, got.data.params
    assert got.data.metrics["loss"] == 1.0 / 30
    assert len(client.get_metric_history(rid, "loss")) == 30
    exp = client.get_experiment_by_name("skinny-node")
    assert len(client.search_runs([exp.experiment_id], "tags.node = 'skinny'")) == 1
heavy = sorted(m for m in ("sqlalchemy", "alembic", "flask") if m in sys.modules)
print(json.dumps({"run": rid, "heavy": heavy, "mlflow": mlflow.__version__}))
"""


def test_a_node_with_mlflow_skinny_logs_unmodified_mlflow_code_through_spool(
    node_venvs: dict[str, Venv], tmp_path: Path
) -> None:
    skinny_venv = node_venvs["skinny"]
    print(f"skinny venv ready after {skinny_venv.seconds:.1f} s")
    found = skinny_venv.dists(tmp_path)
    dists = found["dists"]
    assert "mlflow-skinny" in dists and "mlflow" not in dists, dists
    assert found["importable"] == {
        "mlflow": True,
        "sqlalchemy": False,  # no database layer at all
        "alembic": False,
        "flask": False,  # no server
        "formula_foundry": True,
    }

    spool = tmp_path / "spool"
    out = skinny_venv.run(
        ["-c", textwrap.dedent(SKINNY_JOB)], tmp_path, {"MLFLOW_TRACKING_URI": f"spool://{spool}"}
    )
    job = json.loads(out.stdout.strip().splitlines()[-1])
    assert job["heavy"] == []
    assert job["mlflow"].split(".")[:2] == importlib.metadata.version("mlflow").split(".")[:2]
    assert not list(tmp_path.rglob("*.db"))

    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    ff_sync(spool, db)
    data = dump(db)
    assert data["experiments"] == ["Default", "skinny-node"]
    train, evaluation = data["skinny-node/train"], data["skinny-node/eval"]
    assert (train["status"], evaluation["status"]) == ("FINISHED", "FINISHED")
    assert evaluation["tags"]["mlflow.parentRunId"] == "train"
    assert train["params"] == {"lr": "0.001", "batch": "64", "seed": "7"}
    user_tags = {k: v for k, v in train["tags"].items() if not k.startswith("mlflow.")}
    assert user_tags == {"node": "skinny", "via": "client"}
    assert sorted(train["metrics"]["loss"]) == [(i, 1.0 / (i + 1)) for i in range(30)]
    assert train["metrics"]["f1"] == [(29, "NaN")]
    assert train["metrics"]["grad"] == [(3, 0.5)]
    assert evaluation["metrics"] == {"eval_loss": [(0, 0.125)]}
