"""MLflow 3 logged models on a ``spool:`` run: recorded as ``model_*`` events of the run, files
in the artifact store, read back on the node (``get_logged_model``, ``search_logged_models``,
``models:/<id>``) as MLflow's own stores answer."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException

from formula_foundry.tracking.spool_reader import Event, SegmentReader
from tests.dropin.conftest import child_env


def spool_uri(spool: Path) -> str:
    return f"spool://{spool.as_posix()}"


def model_events(spool: Path, run_id: str) -> list[Event]:
    out: list[Event] = []
    for seg in sorted((spool / run_id).glob("seg-*.jsonl")):
        out += [
            e for e in SegmentReader(seg) if isinstance(e, Event) and e.kind.startswith("model")
        ]
    return out


@pytest.fixture
def in_process(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> Iterator[None]:
    clean_env.chdir(tmp_path)
    yield
    import mlflow.tracking._model_registry.utils as registry

    registry._registry_uri = None  # a spool store sets it (see test_store.py)


@pytest.mark.usefixtures("in_process")
def test_a_model_is_created_changed_and_finalized_as_events_of_its_run(tmp_path: Path) -> None:
    spool = tmp_path / "data" / "runs"
    client = MlflowClient(tracking_uri=spool_uri(spool))
    run_id = client.create_run("0").info.run_id
    model = client.create_logged_model(
        "0", name="net", source_run_id=run_id, tags={"team": "a"}, params={"lr": "0.1"}
    )
    assert model.model_id.startswith("m-") and len(model.model_id) == 34
    assert model.status == LoggedModelStatus.PENDING
    assert model.artifact_location == (
        f"spool://{spool.as_posix()}/{run_id}/models/{model.model_id}/artifacts"
    )
    client.log_model_params(model.model_id, {"depth": 3})
    client.set_logged_model_tags(model.model_id, {"stage": "x", "gone": "y"})
    client.delete_logged_model_tag(model.model_id, "gone")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 2)])
    client.log_batch(
        run_id,
        [
            Metric("acc", 0.9, 1000, 2, model_id=model.model_id),
            Metric("f1", 0.7, 1000, 2, model_id=model.model_id, dataset_name="train",
                   dataset_digest="d1"),
        ],
    )  # fmt: skip
    done = client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    assert done.status == LoggedModelStatus.READY

    got = client.get_logged_model(model.model_id)
    assert (got.name, got.source_run_id, got.experiment_id) == ("net", run_id, "0")
    assert got.params == {"lr": "0.1", "depth": "3"}
    assert got.tags == {"team": "a", "stage": "x"}
    assert [
        (m.key, m.value, m.step, m.model_id, m.dataset_name, m.dataset_digest) for m in got.metrics
    ] == [
        ("acc", 0.9, 2, model.model_id, None, None),
        ("f1", 0.7, 2, model.model_id, "train", "d1"),
    ]
    # The run got the linked points too, as MLflow's stores give them.
    assert client.get_run(run_id).data.metrics == {"acc": 0.9, "f1": 0.7}
    events = model_events(spool, run_id)
    assert [e.kind for e in events] == [
        "model_start",
        "model_params",
        "model_tags",
        "model_tag_delete",
        "model_output",
        "model_metrics",
        "model_metrics",
        "model_end",
    ]
    # One event per step, time and dataset: the dataset is the event's.
    assert [(e.data["d"], e.data.get("dataset_name"), e.data.get("dataset_digest"))
            for e in events if e.kind == "model_metrics"] == [
        ({"acc": 0.9}, None, None), ({"f1": 0.7}, "train", "d1")
    ]  # fmt: skip
    assert {e.data["model"] for e in model_events(spool, run_id)} == {model.model_id}
    # Another process finds it through the spool alone (its record in .models, its run's spool).
    code = (
        "import json, sys, mlflow; c = mlflow.MlflowClient(sys.argv[1]); m = c.get_logged_model("
        "sys.argv[2]); print(json.dumps([m.status.name, m.params, m.tags, len(c.search_logged_"
        "models(['0'], filter_string=\"name = 'net'\")), [[x.key, x.dataset_name, x.dataset_"
        "digest] for x in m.metrics], len(c.search_logged_models(['0'], datasets=[{'dataset_"
        "name': 'train', 'dataset_digest': 'd1'}]))]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, spool_uri(spool), model.model_id],
        env=child_env({"MLFLOW_DISABLE_TELEMETRY": "true"}),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().splitlines()[-1] == (
        '["READY", {"lr": "0.1", "depth": "3"}, {"team": "a", "stage": "x"}, 1, '
        '[["acc", null, null], ["f1", "train", "d1"]], 1]'
    )


@pytest.mark.usefixtures("in_process")
def test_what_mlflow_refuses_or_a_spool_cannot_do_is_refused_by_name(tmp_path: Path) -> None:
    spool = tmp_path / "data" / "runs"
    client = MlflowClient(tracking_uri=spool_uri(spool))
    run_id = client.create_run("0").info.run_id
    with pytest.raises(MlflowException, match="start a run first") as info:
        client.create_logged_model("0", name="orphan")
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException, match=r"'ff\.model' is reserved"):
        client.create_logged_model("0", source_run_id=run_id, tags={"ff.model": "x"})
    model = client.create_logged_model("0", source_run_id=run_id, params={"p": "1"})
    with pytest.raises(MlflowException, match="write-once"):
        client.log_model_params(model.model_id, {"p": "2"})
    with pytest.raises(MlflowException, match="No tag with key 'nope'") as info:
        client.delete_logged_model_tag(model.model_id, "nope")
    assert info.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    with pytest.raises(MlflowException, match="not found") as info:
        client.get_logged_model("m-" + "0" * 32)
    assert info.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    other = client.create_run("0").info.run_id
    with pytest.raises(MlflowException, match=f"belongs to run {run_id}, not {other}"):
        client.log_outputs(other, [LoggedModelOutput(model.model_id, 0)])
    too_long = Metric("acc", 1.0, 1, 0, model_id=model.model_id, dataset_name="n" * 501,
                      dataset_digest="d")  # fmt: skip
    with pytest.raises(MlflowException, match="dataset_name"):
        client.log_batch(run_id, [too_long])  # the column MLflow keeps it in has 500
    assert client.get_run(run_id).data.metrics == {}  # not even the run's point
    # A refused call wrote nothing: one model_start.
    assert [e.kind for e in model_events(spool, run_id)] == ["model_start"]
    assert model_events(spool, other) == []


@pytest.mark.usefixtures("in_process")
def test_a_models_files_are_its_own_stored_once_and_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = tmp_path / "data" / "runs"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", spool_uri(spool))  # what models:/ URIs resolve
    client = MlflowClient(tracking_uri=spool_uri(spool))
    run_id = client.create_run("0").info.run_id
    model = client.create_logged_model("0", source_run_id=run_id)
    src = tmp_path / "m"
    (src / "sub").mkdir(parents=True)
    (src / "MLmodel").write_text("flavors: {}\n")
    (src / "sub" / "w.bin").write_bytes(b"\x00" * 10)
    client.log_model_artifacts(model.model_id, str(src))
    listing = [
        (f.path, f.is_dir, f.file_size) for f in client.list_logged_model_artifacts(model.model_id)
    ]
    assert listing == [("MLmodel", False, 12), ("sub", True, None)]
    assert client.list_artifacts(run_id) == []  # the run's own files: none
    got = Path(client.download_artifacts(run_id, "", str(tmp_path / "run-dl")))
    assert list(got.iterdir()) == []
    import mlflow.artifacts

    dl = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{model.model_id}",
            dst_path=str(tmp_path / "dl"),
            tracking_uri=spool_uri(spool),
        )
    )
    assert (dl / "sub" / "w.bin").read_bytes() == b"\x00" * 10
    files = [e.data for e in model_events(spool, run_id) if e.kind == "model_artifact"]
    assert sorted((f["path"], f["size"], f["model"]) for f in files) == [
        ("MLmodel", 12, model.model_id),
        ("sub/w.bin", 10, model.model_id),
    ]
    store = tmp_path / "data" / "artifacts"
    assert {f["store"] for f in files} == {str(store)}


SKLEARN = """
import json, mlflow, numpy as np
from sklearn.linear_model import LinearRegression
X = np.arange(20, dtype=float).reshape(10, 2)
mlflow.set_experiment("m")
with mlflow.start_run() as run:
    mlflow.log_metric("mse", 0.5)
    info = mlflow.sklearn.log_model(LinearRegression().fit(X, X @ [1.0, 2.0] + 3), name="model")
model = mlflow.get_logged_model(info.model_id)
found = mlflow.search_logged_models(filter_string="name = 'model'", output_format="list")
pred = mlflow.sklearn.load_model(f"models:/{info.model_id}").predict(X[:2]).tolist()
print(json.dumps({"run": run.info.run_id, "model": info.model_id, "status": model.status.name,
    "metrics": [(m.key, m.value) for m in model.metrics], "found": [m.model_id for m in found],
    "outputs": [o.model_id for o in mlflow.get_run(run.info.run_id).outputs.model_outputs]
    if mlflow.get_run(run.info.run_id).outputs else [], "pred": pred}))
"""


def test_sklearn_log_model_on_a_spool_loads_back_on_the_node(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (tmp_path / "script.py").write_text(SKLEARN)
    proc = subprocess.run(
        [sys.executable, "script.py"],
        cwd=tmp_path,
        env=child_env(
            {"MLFLOW_TRACKING_URI": spool_uri(spool), "MLFLOW_DISABLE_TELEMETRY": "true"}
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == "READY"
    assert out["metrics"] == [["mse", 0.5]]
    assert out["found"] == [out["model"]]
    assert out["pred"] == pytest.approx([5.0, 11.0])
    kinds = [e.kind for e in model_events(spool, out["run"])]
    assert kinds[0] == "model_start" and kinds[-1] == "model_end"
    assert "model_artifact" in kinds and "model_output" in kinds and "model_metrics" in kinds


def test_the_documented_example_logs_loads_and_syncs(tmp_path: Path) -> None:
    import re

    from mlflow import MlflowClient

    from tests.conftest import REPO_ROOT
    from tests.dropin.conftest import ff_sync, run_script

    text = (REPO_ROOT / "docs" / "mlflow-dropin.md").read_text(encoding="utf-8")
    section = text.split("## Logged models", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    spool, db = tmp_path / "spool", tmp_path / "out.db"
    proc = run_script(code, tmp_path, spool_uri(spool), {"MLFLOW_DISABLE_TELEMETRY": "true"})
    assert proc.stdout.strip().splitlines()[-1] == "[0 1]"
    ff_sync(spool, db)
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (model,) = client.search_logged_models(["0"])
    (run,) = client.search_runs(["0"])
    assert (model.name, model.status.name, model.source_run_id) == (
        "model",
        "READY",
        run.info.run_id,
    )
    assert {f.path for f in client.list_logged_model_artifacts(model.model_id)} >= {"MLmodel"}


def input_events(spool: Path, run_id: str) -> list[Event]:
    return [
        e
        for seg in sorted((spool / run_id).glob("seg-*.jsonl"))
        for e in SegmentReader(seg)
        if isinstance(e, Event) and e.kind == "inputs"
    ]


@pytest.mark.usefixtures("in_process")
def test_log_inputs_is_one_event_of_the_run_read_back_as_mlflow_keeps_it(tmp_path: Path) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput

    spool = tmp_path / "data" / "runs"
    client = MlflowClient(tracking_uri=spool_uri(spool))
    run_id = client.create_run("0").info.run_id
    model = client.create_logged_model("0", source_run_id=run_id)
    ds = Dataset("train", "d1", "local", '{"uri": "a.csv"}', '{"cols": 2}', '{"rows": 3}')
    first = DatasetInput(ds, [InputTag("mlflow.data.context", "train")])
    client.log_inputs(run_id, [first], [LoggedModelInput(model.model_id)])
    client.log_inputs(run_id, [DatasetInput(ds, [InputTag("mlflow.data.context", "eval")])])
    (one, two) = input_events(spool, run_id)
    assert one.data["models"] == [model.model_id]
    assert one.data["datasets"] == [
        {"name": "train", "digest": "d1", "source_type": "local", "source": '{"uri": "a.csv"}',
         "schema": '{"cols": 2}', "profile": '{"rows": 3}',
         "tags": {"mlflow.data.context": "train"}},
    ]  # fmt: skip
    assert "models" not in two.data
    # Read back in this process and from the spool alone: one input per dataset, first tags.
    from formula_foundry.dropin.spool_runs import read_run
    from formula_foundry.dropin.store import SpoolStore

    from_spool = read_run(spool, run_id)
    assert from_spool is not None
    for inputs in (
        client.get_run(run_id).inputs,
        SpoolStore(spool_uri(spool))._run(from_spool).inputs,
    ):
        (got,) = inputs.dataset_inputs
        assert (got.dataset.name, got.dataset.digest, got.dataset.profile) == (
            "train",
            "d1",
            ds.profile,
        )
        assert [(t.key, t.value) for t in got.tags] == [("mlflow.data.context", "train")]
        assert [m.model_id for m in inputs.model_inputs] == [model.model_id]


@pytest.mark.usefixtures("in_process")
def test_inputs_mlflow_or_the_sync_would_refuse_are_refused_and_write_nothing(
    tmp_path: Path,
) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput

    spool = tmp_path / "data" / "runs"
    client = MlflowClient(tracking_uri=spool_uri(spool))
    run_id = client.create_run("0").info.run_id
    ok = Dataset("train", "d1", "local", "a.csv")
    with pytest.raises(MlflowException, match="digest"):
        client.log_inputs(run_id, [DatasetInput(Dataset("x", "d" * 37, "local", "a.csv"))])
    with pytest.raises(MlflowException, match="value"):
        client.log_inputs(run_id, [DatasetInput(ok, [InputTag("k", "v" * 501)])])
    with pytest.raises(MlflowException, match="source_type"):
        client.log_inputs(run_id, [DatasetInput(Dataset("x", "d", "s" * 37, "a.csv"))])
    with pytest.raises(MlflowException, match="not found") as info:
        client.log_inputs(run_id, [DatasetInput(ok)], [LoggedModelInput("m-" + "0" * 32)])
    assert info.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    with pytest.raises(MlflowException, match="not found"):
        client.log_inputs("f" * 32, [DatasetInput(ok)])
    assert input_events(spool, run_id) == []
    client.log_inputs(run_id, [DatasetInput(ok)])
    assert len(input_events(spool, run_id)) == 1
