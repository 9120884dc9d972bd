"""Logged models through the spool and ``ff-sync``: the same runs, files and models as logging
straight into MLflow, exactly one model per spooled model whatever crashed.

The differential runs one script — every artifact call plus ``mlflow.sklearn.autolog()`` with
its defaults (params, metrics, plots, model) — straight into MLflow and into a spool synced by
``ff-sync``, then reads both stores back with a helper script (``READ``) and compares.

Normalised explicitly, because MLflow writes ids and times into them: the ``MLmodel`` file of a
model (``model_id``, ``model_uuid``, ``run_id``, ``artifact_path``, ``utc_time_created``: the
spool's ids and times stay in the synced copy, whose bytes are the logged ones). Left out:
``ff.*`` tags. Everything else is compared as is: run params, tags, metric points; the run's
inputs (autolog's training dataset, one logged with ``mlflow.log_input`` and its tags, the
model it lists as an input, by name); every run file and every other model file byte for byte;
the model's name, status, params, tags, linked metrics with the dataset (name and digest)
each was computed on; and the predictions of
``mlflow.sklearn.load_model("models:/<id>")``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests._services import mlflow_server
from tests.dropin.conftest import child_env, ff_sync
from tests.sync.conftest import FF_SYNC, Project

SCRIPT = """
import json, os
import numpy as np
import mlflow
from mlflow.entities import LoggedModelInput
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from PIL import Image
from sklearn.linear_model import LogisticRegression

mlflow.set_experiment(os.environ.get("EXP", "models"))
rng = np.random.default_rng(0)
X = rng.normal(size=(60, 3))
y = (X[:, 0] + X[:, 1] > 0).astype(int)
mlflow.sklearn.autolog()
with mlflow.start_run(run_name="diff") as run:
    os.makedirs("files/sub", exist_ok=True)
    open("files/a.txt", "w").write("a")
    open("files/sub/b.bin", "wb").write(bytes(range(256)))
    mlflow.log_artifact("files/a.txt")
    mlflow.log_artifacts("files", "tree")
    mlflow.log_text("hello", "notes/hello.txt")
    mlflow.log_dict({"k": [1, 2]}, "cfg.json")
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    mlflow.log_figure(fig, "plots/line.png")
    mlflow.log_image(Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)), "img/zero.png")
    mlflow.log_table({"x": [1, 2], "y": ["a", "b"]}, "tables/t.json")
    mlflow.log_table({"x": [3], "y": ["c"]}, "tables/t.json")
    LogisticRegression(max_iter=200).fit(X, y)
    evaluation = mlflow.data.from_numpy(X[:10], source="eval.csv", name="eval")
    mlflow.log_input(evaluation, context="eval", tags={"split": "first-10"})
    mlflow.log_input(evaluation, context="again")  # MLflow keeps the first input's tags
    mlflow.log_input(model=LoggedModelInput(mlflow.last_logged_model().model_id))
print(json.dumps({"run": run.info.run_id, "model": mlflow.last_logged_model().model_id}))
"""

# Reads a store back (MLFLOW_TRACKING_URI), for one experiment, as comparable JSON.
READ = """
import hashlib, json, os, sys, tempfile
from pathlib import Path
import numpy as np
import mlflow, yaml
VOLATILE_MLMODEL = {"model_id", "model_uuid", "run_id", "artifact_path", "utc_time_created"}
client = mlflow.MlflowClient()
exp = client.get_experiment_by_name(sys.argv[1])

def files(root):
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel == "MLmodel":
                doc = yaml.safe_load(p.read_text())
                out[rel] = {k: v for k, v in doc.items() if k not in VOLATILE_MLMODEL}
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out

out = {"runs": {}, "models": {}}
for run in client.search_runs([exp.experiment_id]):
    run = client.get_run(run.info.run_id)  # search_runs leaves model inputs out
    tmp = tempfile.mkdtemp()
    out["runs"][run.info.run_name] = {
        "params": run.data.params,
        "metrics": run.data.metrics,
        "tags": {k: v for k, v in run.data.tags.items()
                 if not k.startswith("ff.") and k != "mlflow.source.git.commit"},
        "status": run.info.status,
        "files": files(client.download_artifacts(run.info.run_id, "", tmp)),
        "outputs": len(run.outputs.model_outputs) if run.outputs else 0,
        "datasets": sorted(
            [i.dataset.name, i.dataset.digest, i.dataset.source_type, i.dataset.source,
             i.dataset.schema, i.dataset.profile, sorted((t.key, t.value) for t in i.tags)]
            for i in run.inputs.dataset_inputs
        ),
        "model_inputs": sorted(
            client.get_logged_model(m.model_id).name for m in run.inputs.model_inputs
        ),
    }
X = np.random.default_rng(0).normal(size=(60, 3))
for m in client.search_logged_models([exp.experiment_id]):
    assert m.name not in out["models"], f"two models named {m.name}"
    tmp = tempfile.mkdtemp()
    local = mlflow.artifacts.download_artifacts(f"models:/{m.model_id}", dst_path=tmp)
    out["models"][m.name] = {
        "status": m.status.name,
        "run": client.get_run(m.source_run_id).info.run_name,
        "params": m.params,
        "tags": {k: v for k, v in m.tags.items() if not k.startswith("ff.")},
        "metrics": sorted(
            ([x.key, x.value, x.step, x.dataset_name, x.dataset_digest] for x in m.metrics),
            key=repr,
        ),
        "files": files(local),
        "predict": mlflow.sklearn.load_model(f"models:/{m.model_id}").predict_proba(X).tolist(),
        "ff.model_id": m.tags.get("ff.model_id"),
    }
print(json.dumps(out))
"""


def _run(code: str, cwd: Path, uri: str, *args: str, **env: str) -> str:
    (cwd / "code.py").write_text(code)
    proc = subprocess.run(
        [sys.executable, "code.py", *args],
        cwd=cwd,
        env=child_env({"MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true", **env}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def _read(cwd: Path, uri: str, experiment: str) -> dict[str, Any]:
    cwd.mkdir(exist_ok=True)
    out: dict[str, Any] = json.loads(_run(READ, cwd, uri, experiment))
    return out


def _same(direct: dict[str, Any], synced: dict[str, Any], spooled_model: str) -> None:
    (model,) = synced["models"].values()
    assert model.pop("ff.model_id") == spooled_model  # the spool's id, on the synced model
    assert direct["models"]["model"].pop("ff.model_id") is None
    assert synced == direct
    # What the comparison rests on is there, not vacuously equal.
    run = direct["runs"]["diff"]
    assert {"training_confusion_matrix.png", "tree/sub/b.bin", "tables/t.json"} <= set(run["files"])
    assert run["params"]["max_iter"] == "200" and "training_score" in run["metrics"]
    assert run["outputs"] == 1 and run["model_inputs"] == ["model"]
    contexts = {name: dict(tags) for name, *_, tags in run["datasets"]}
    assert contexts["eval"] == {"mlflow.data.context": "eval", "split": "first-10"}
    assert len(contexts) == 2 and contexts["dataset"]["mlflow.data.context"] == "train"
    assert {"MLmodel", "model.pkl"} <= set(direct["models"]["model"]["files"])
    assert direct["models"]["model"]["metrics"] and direct["models"]["model"]["status"] == "READY"
    # autolog links its training metrics to the training dataset: the link is compared too.
    linked = {(name, digest) for *_, name, digest in direct["models"]["model"]["metrics"]}
    train = next(d for d in run["datasets"] if d[0] == "dataset")
    assert (train[0], train[1]) in linked


def test_autolog_and_every_artifact_call_sync_as_straight_into_sqlite(tmp_path: Path) -> None:
    direct, spooled = tmp_path / "direct", tmp_path / "spooled"
    direct.mkdir()
    spooled.mkdir()
    _run(SCRIPT, direct, f"sqlite:///{direct / 'direct.db'}")
    out = json.loads(_run(SCRIPT, spooled, f"spool://{(spooled / 'spool').as_posix()}"))
    db = spooled / "synced.db"
    ff_sync(spooled / "spool", db)
    ff_sync(spooled / "spool", db)  # a second pass: nothing twice (READ counts the models)
    ff_sync(spooled / "spool", db, "verify")  # models, their files and the inputs included
    a = _read(tmp_path / "r1", f"sqlite:///{direct / 'direct.db'}", "models")
    b = _read(tmp_path / "r2", f"sqlite:///{db}", "models")
    _same(a, b, out["model"])


@pytest.mark.server
def test_autolog_and_every_artifact_call_sync_as_straight_into_a_server(tmp_path: Path) -> None:
    direct, spooled = tmp_path / "direct", tmp_path / "spooled"
    direct.mkdir()
    spooled.mkdir()
    with mlflow_server(tmp_path / "server") as (uri, _pid):
        _run(SCRIPT, direct, uri, EXP=f"direct-{tmp_path.name}")
        exp = f"synced-{tmp_path.name}"
        out = json.loads(
            _run(SCRIPT, spooled, f"spool://{(spooled / 'spool').as_posix()}", EXP=exp)
        )
        proc = subprocess.run(
            [sys.executable, "-m", "formula_foundry.sync"],
            cwd=spooled,
            env=child_env({"FF_SPOOL_ROOT": str(spooled / "spool"), "MLFLOW_TRACKING_URI": uri}),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        a = _read(tmp_path / "r1", uri, f"direct-{tmp_path.name}")
        b = _read(tmp_path / "r2", uri, exp)
    _same(a, b, out["model"])


# -- a crash in the middle of a model's upload ------------------------------------------------

BIG_MODEL = """
import json, os, sys
import numpy as np
import mlflow
mlflow.set_experiment("big")
with mlflow.start_run() as run:
    model = mlflow.initialize_logged_model(name="big", params={"n": "3"}, tags={"kind": "weights"})
    rng = np.random.default_rng(1)
    os.makedirs("weights", exist_ok=True)
    for i in range(3):
        with open(f"weights/w{i}.bin", "wb") as f:
            f.write(rng.bytes(24 << 20))
    for i in range(40):
        with open(f"weights/s{i:02d}.txt", "w") as f:
            f.write(str(i) * (i + 1))
    mlflow.MlflowClient().log_model_artifacts(model.model_id, "weights")
    mlflow.finalize_logged_model(model.model_id, "READY")
print(json.dumps({"run": run.info.run_id, "model": model.model_id}))
"""


def _model_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_sigkill_mid_model_upload_then_a_rerun_gives_one_complete_model(project: Project) -> None:
    spool = project.spool_root
    env = {"MLFLOW_TRACKING_URI": f"spool://{spool.as_posix()}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    (project.root / "big.py").write_text(BIG_MODEL)
    proc = subprocess.run(
        [sys.executable, "big.py"], cwd=project.root, env=child_env(env),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    logged = _model_files(project.root / "weights")
    artifacts = project.root / "data" / "mlflow" / "artifacts"
    kills = 0
    for delay in (0.0, 0.01, 0.03, 0.06):
        sync = subprocess.Popen(
            [FF_SYNC, "--config", str(project.config)], cwd=project.root, env=project.env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while sync.poll() is None and time.monotonic() < deadline:
            if any(artifacts.glob("*/models/*/artifacts/*")):
                break  # the model exists and its upload has begun
            time.sleep(0.002)
        time.sleep(delay)
        if sync.poll() is not None:
            break
        os.kill(sync.pid, signal.SIGKILL)
        sync.wait(timeout=60)
        kills += 1
    assert kills >= 1, "every pass ended before it could be killed mid-upload"
    final = project.ff_sync()
    assert final.returncode == 0, final.stderr
    again = project.ff_sync()
    assert again.returncode == 0, again.stderr
    (folder,) = artifacts.glob("*/models/*/artifacts")  # exactly one model's files
    found = _model_files(folder)
    assert [p for p in found if Path(p).name.startswith(".artifact.uploading.")] == []
    assert found == logged
    from mlflow import MlflowClient

    client = MlflowClient(project.uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    (model,) = client.search_logged_models(exps)
    assert (model.name, model.status.name, model.params) == ("big", "READY", {"n": "3"})
    assert model.tags["kind"] == "weights"


# -- the engine's rules, against an in-memory destination (fast) --------------------------------

MODELS = """
import mlflow
import numpy as np
from mlflow.entities import LoggedModelInput, LoggedModelOutput, Metric
from pathlib import Path
mlflow.set_experiment("mem")
client = mlflow.MlflowClient()
Path("w/sub").mkdir(parents=True)
Path("w/MLmodel").write_text("flavors: {}")
Path("w/sub/x.bin").write_bytes(b"x" * 100)
with mlflow.start_run() as run:
    rid = run.info.run_id
    mlflow.log_metric("loss", 0.5, step=1)
    for name in ("one", "two"):
        m = mlflow.initialize_logged_model(name=name, params={"p": name}, tags={"t": "1", "u": "2"})
        client.log_model_params(m.model_id, {"q": "3"})
        client.set_logged_model_tags(m.model_id, {"v": "4"})
        client.delete_logged_model_tag(m.model_id, "u")
        client.log_model_artifacts(m.model_id, "w")
        client.log_outputs(rid, [LoggedModelOutput(m.model_id, 1)])
        client.log_batch(rid, [
            Metric("acc", 0.9, 1000, 1, model_id=m.model_id),
            Metric("f1", 0.8, 1000, 1, model_id=m.model_id, dataset_name="a",
                   dataset_digest="d" + name),
        ])
        client.finalize_logged_model(m.model_id, "READY" if name == "one" else "FAILED")
    data = mlflow.data.from_numpy(np.arange(6.0).reshape(3, 2), source="a.csv", name="a")
    mlflow.log_input(data, context="train", tags={"k": "v"})
    mlflow.log_input(data, context="again")
    mlflow.log_input(model=LoggedModelInput(m.model_id))
print(rid)
"""


def _memory_models(sink: Any) -> dict[str, Any]:
    """The sink's models by spool model id, destination ids replaced by spool ids."""
    runs = {r.mlflow_run_id: r.tags["ff.run_uuid"] for r in sink.runs.values()}
    out: dict[str, Any] = {}
    for m in sink.models.values():
        key = m.tags["ff.model_id"]
        assert key not in out, f"two destination models for {key}"
        out[key] = (
            m.name, runs[m.source_run], m.status, m.params, m.tags, m.metrics,
            {runs[r]: step for r, step in m.outputs.items()}, m.files,
        )  # fmt: skip
    for r in sink.runs.values():  # the runs' inputs, models by their spool ids
        spool_ids = sorted(sink.models[d].tags["ff.model_id"] for d in r.model_inputs)
        out[r.tags["ff.run_uuid"]] = (sorted(r.datasets.values(), key=repr), spool_ids)
    return out


def test_a_destination_down_at_any_call_then_a_second_pass_gives_the_same_models(
    tmp_path: Path,
) -> None:
    import dataclasses

    from tests.memory_sink import MemorySink
    from tests.sync.test_engine_memory import _pass, _settings

    s = _settings(tmp_path)
    _run(MODELS, tmp_path, f"spool://{s.spool_root.as_posix()}")
    clean = MemorySink()
    assert _pass(dataclasses.replace(s, sync_state_dir=tmp_path / "clean-state"), clean) == 0
    expected = _memory_models(clean)
    assert len(expected) == 3
    (datasets, model_inputs) = next(v for v in expected.values() if len(v) == 2)
    (dataset,) = datasets  # one input per dataset and run, with its first tags
    assert dict(dataset.tags) == {"mlflow.data.context": "train", "k": "v"}
    assert dataset.name == "a" and dataset.profile and len(model_inputs) == 1
    one = next(v for v in expected.values() if v[0] == "one")
    assert one[2:5] == (
        "READY",
        {"p": "one", "q": "3"},
        {**one[4], "t": "1", "v": "4"},
    )
    assert "u" not in one[4] and one[4]["mlflow.source.name"] == "code.py"
    assert one[5] == {("acc", 1, 1000, 0.9, None), ("f1", 1, 1000, 0.8, ("a", "done"))}
    assert one[6] and one[7] == {"MLmodel": b"flavors: {}", "sub/x.bin": b"x" * 100}
    model_calls = [i for i, c in enumerate(clean.calls, 1) if "model" in c]
    assert model_calls, clean.calls
    for at in range(model_calls[0] - 1, len(clean.calls) + 1):
        for after in (False, True):
            state = tmp_path / f"state-{at}-{after}"
            t = dataclasses.replace(s, sync_state_dir=state)
            broken = MemorySink(fail_at={at}, after=after)
            assert _pass(t, broken) == 75
            broken._fail_at = set()
            assert _pass(t, broken) == 0
            assert _memory_models(broken) == expected, (at, after, broken.calls)
            assert _pass(t, broken, replay=True) == 0  # everything sent again: nothing twice
            assert _memory_models(broken) == expected, (at, after)


# -- verify and status: a model's files, the model itself, the run's inputs ---------------------

CHECKED = """
import json, os
import numpy as np
import mlflow
from mlflow.entities import LoggedModelInput, Metric
mlflow.set_experiment("checked")
os.makedirs("w/sub", exist_ok=True)
open("w/MLmodel", "w").write("flavors: {}")
open("w/sub/x.bin", "wb").write(b"x" * 100)
with mlflow.start_run() as run:
    m = mlflow.initialize_logged_model(name="net", params={"p": "1"}, tags={"t": "1"})
    mlflow.MlflowClient().log_model_artifacts(m.model_id, "w")
    mlflow.finalize_logged_model(m.model_id, "READY")
    zeros = mlflow.data.from_numpy(np.zeros((3, 2)), source="z.csv", name="zeros")
    mlflow.log_input(zeros, context="train", tags={"k": "v"})
    mlflow.log_input(model=LoggedModelInput(m.model_id))
    mlflow.MlflowClient().log_batch(run.info.run_id, [
        Metric("acc", 0.9, 1000, 1, model_id=m.model_id, dataset_name="zeros",
               dataset_digest=zeros.digest),
        Metric("nan", float("nan"), 1000, 1, model_id=m.model_id),
    ])
print(json.dumps({"run": run.info.run_id, "model": m.model_id, "digest": zeros.digest}))
"""
SPOOL_ENV = {"MLFLOW_TRACKING_URI": "spool:", "MLFLOW_DISABLE_TELEMETRY": "true"}


def _differences(project: Project) -> list[tuple[str, str | None]]:
    from tests.sync.test_verify import _json

    code, report = _json(project)
    found = [(d["kind"], d["key"]) for d in report["differences"]]
    assert code == (1 if found else 0), report
    return sorted(found)


def test_verify_checks_each_synced_model_its_files_and_the_runs_inputs(project: Project) -> None:
    out = json.loads(project.python(CHECKED, env=SPOOL_ENV).stdout)
    mid, digest = out["model"], out["digest"]
    assert project.ff_sync().returncode == 0
    assert _differences(project) == []
    from mlflow import MlflowClient

    client = MlflowClient(project.uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    (model,) = client.search_logged_models(exps)
    folder = Path(model.artifact_location)
    assert (folder / "sub" / "x.bin").read_bytes() == b"x" * 100  # what the damage below changes
    import sqlite3

    def linked_metrics(sql: str) -> None:
        db = sqlite3.connect(project.db)
        with db:
            assert db.execute(sql).rowcount == 1
        db.close()

    # The link of a model's metric to its dataset (logged_model_metrics only) is compared.
    linked_metrics(
        "UPDATE logged_model_metrics SET dataset_digest = 'other' WHERE metric_name = 'acc'"
    )
    assert _differences(project) == [("model_metric_mismatch", f"{mid} acc")]
    linked_metrics(
        f"UPDATE logged_model_metrics SET dataset_digest = '{digest}' WHERE metric_name = 'acc'"
    )
    linked_metrics("DELETE FROM logged_model_metrics WHERE metric_name = 'nan'")
    assert _differences(project) == [("missing_model_metric", f"{mid} nan")]
    cols = "model_id, metric_name, metric_timestamp_ms, metric_step, metric_value, experiment_id"
    linked_metrics(
        f"INSERT INTO logged_model_metrics ({cols}, run_id) SELECT model_id, 'nan', "
        "metric_timestamp_ms, metric_step, 0.0, experiment_id, run_id FROM logged_model_metrics"
    )
    assert _differences(project) == []  # NaN is stored as 0 by MLflow: its place is compared

    (folder / "sub" / "x.bin").write_bytes(b"y" * 100)  # same size, other bytes
    assert _differences(project) == [("model_artifact_mismatch", f"{mid}/sub/x.bin")]
    (folder / "MLmodel").unlink()
    assert _differences(project) == [
        ("missing_model_artifact", f"{mid}/MLmodel"),
        ("model_artifact_mismatch", f"{mid}/sub/x.bin"),
    ]
    client.set_logged_model_tags(model.model_id, {"t": "2"})
    client.log_model_params(model.model_id, {"extra": "1"})
    assert _differences(project) == [
        ("extra_model_param", f"{mid} extra"),
        ("missing_model_artifact", f"{mid}/MLmodel"),
        ("model_artifact_mismatch", f"{mid}/sub/x.bin"),
        ("model_tag_mismatch", f"{mid} t"),
    ]
    client.delete_logged_model_tag(model.model_id, "ff.model_id")  # the sync's own lookup tag
    db = sqlite3.connect(project.db)
    with db:
        db.execute("DELETE FROM inputs WHERE source_type = 'DATASET'")
    db.close()
    assert _differences(project) == [
        ("missing_dataset_input", f"zeros@{digest}"),
        ("missing_model", mid),
        ("missing_model_input", mid),
    ]


def test_verify_reports_a_second_model_carrying_the_same_id(project: Project) -> None:
    out = json.loads(project.python(CHECKED, env=SPOOL_ENV).stdout)
    assert project.ff_sync().returncode == 0
    from mlflow import MlflowClient

    client = MlflowClient(project.uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    (model,) = client.search_logged_models(exps)
    tags = {"ff.model_id": out["model"]}
    client.create_logged_model(model.experiment_id, name="other", tags=tags)
    # Which of the two the rest is compared with follows the replay's choice (the lower id).
    assert ("duplicate_model", out["model"]) in _differences(project)


def test_status_counts_a_models_files_as_bytes_pending_upload(project: Project) -> None:
    from tests.sync.test_status import _json

    project.python(CHECKED, env=SPOOL_ENV)
    (dest,) = _json(project)["destinations"]
    assert dest["totals"]["bytes_pending_upload"] == len("flavors: {}") + 100
    assert project.ff_sync().returncode == 0
    (dest,) = _json(project)["destinations"]
    assert dest["totals"]["bytes_pending_upload"] == 0


READ_BACK = """
import json, sys, mlflow
m = mlflow.MlflowClient().get_logged_model(sys.argv[1])
print(json.dumps([m.status.name, m.tags, sorted([x.key, x.dataset_name] for x in m.metrics)]))
"""


def test_model_events_the_replay_refuses_are_left_out_by_the_dropin_and_verify(
    project: Project,
) -> None:
    from formula_foundry.tracking.events import frame

    out = json.loads(project.python(CHECKED, env=SPOOL_ENV).stdout)
    run, mid = out["run"], out["model"]
    # Another writer's segment, later in the run: two invalid model events around a valid one.
    t = 4_000_000_000_000
    seg = project.spool_root / run / f"seg-{t}-otherhost-7-a1b2c3.jsonl"
    header = {"k": "segment", "format": 1, "run": run, "host": "o", "pid": 7, "segment": seg.name}
    body = [
        header,
        {"k": "model_metrics", "model": mid, "step": 2, "d": {"x": 1.0}, "dataset_name": "zeros"},
        {"k": "model_tags", "model": mid, "d": {"late": "1"}},
        {"k": "model_end", "model": mid, "status": "DONE"},
    ]
    seg.write_bytes(b"".join(frame({"v": 1, "s": i, "t": t + i, **r}) for i, r in enumerate(body)))
    on_node = json.loads(project.python(READ_BACK, mid, env=SPOOL_ENV).stdout)
    synced = project.ff_sync()
    assert synced.returncode == 1 and ", 2 quarantined in " in synced.stdout, synced.stdout
    assert _differences(project) == []  # verify expects what the replay made of it
    from mlflow import MlflowClient

    client = MlflowClient(project.uri)
    (model,) = client.search_logged_models([e.experiment_id for e in client.search_experiments()])

    def users(tags: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in tags.items() if not k.startswith(("ff.", "mlflow."))}

    dest = [
        model.status.name,
        users(model.tags),
        sorted([x.key, x.dataset_name] for x in model.metrics),
    ]
    assert dest == [on_node[0], users(on_node[1]), on_node[2]]
    assert dest == ["READY", {"t": "1", "late": "1"}, [["acc", "zeros"], ["nan", None]]]
