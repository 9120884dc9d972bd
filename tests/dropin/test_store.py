"""The spool store in one process: URIs, ids, reads, errors — MLflow's own client against it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from formula_foundry.dropin.experiments import experiment_id
from formula_foundry.tracking.spool_reader import Event, SegmentReader
from tests.dropin.conftest import child_env, ff_sync, run_script


@pytest.fixture
def spool(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "spool"
    yield root
    while mlflow.active_run() is not None:
        mlflow.end_run()
    # A spool store resolves the process's registry URI (see test below): not for other tests.
    import mlflow.tracking._model_registry.utils as registry

    registry._registry_uri = None


def client(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"spool://{root}")


def events(root: Path, run_id: str) -> list[Event]:
    out: list[Event] = []
    for seg in sorted((root / run_id).glob("seg-*.jsonl")):
        out.extend(e for e in SegmentReader(seg) if isinstance(e, Event))
    return out


# -- URIs ------------------------------------------------------------------------------------


def test_every_spool_uri_form_names_a_folder(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.chdir(tmp_path)
    clean_env.setenv("FF_SPOOL_ROOT", str(tmp_path / "configured"))
    for uri, folder in (
        (f"spool://{tmp_path}/abs", tmp_path / "abs"),
        ("spool:rel/spool", tmp_path / "rel" / "spool"),
        ("spool:", tmp_path / "configured"),
    ):
        c = MlflowClient(tracking_uri=uri)
        exp = c.create_experiment(f"e-{folder.name}")
        run = c.create_run(exp, run_name="r")
        assert (folder / run.info.run_id).is_dir(), uri
        assert c.get_run(run.info.run_id).info.run_name == "r"


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("spool://otherhost/x", "names host 'otherhost'"),
        ("spool:///x?mode=fast", "query or fragment"),
        ("spool://", "names no folder"),
    ],
)
def test_a_spool_uri_that_names_no_local_folder_is_refused(
    uri: str, words: str, clean_env: pytest.MonkeyPatch
) -> None:
    with pytest.raises(MlflowException, match=words) as info:
        MlflowClient(tracking_uri=uri).search_experiments()
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


def test_ff_sync_takes_the_spool_from_a_spool_tracking_uri(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    run_script(
        """
        import mlflow
        with mlflow.start_run(run_name="r"):
            mlflow.log_metric("m", 1.0)
        """,
        tmp_path,
        f"spool://{spool}",
    )
    db = tmp_path / "out.db"
    env = child_env(
        {"MLFLOW_TRACKING_URI": f"spool://{spool}", "FF_CONFIG": str(tmp_path / "c.yaml")}
    )
    (tmp_path / "c.yaml").write_text(
        f"tracking:\n  backend_store_uri: sqlite:///{db}\n", encoding="utf-8"
    )
    done = subprocess.run(
        [sys.executable, "-m", "formula_foundry.sync"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "synced: 1 run" in done.stdout
    runs = MlflowClient(tracking_uri=f"sqlite:///{db}").search_runs(["0"])
    assert [r.info.run_name for r in runs] == ["r"]


def test_a_spool_is_never_a_sync_destination(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "tracking:\n  backend_store_uri: spool:///somewhere\n", encoding="utf-8"
    )
    done = subprocess.run(
        [sys.executable, "-m", "formula_foundry.sync"],
        cwd=tmp_path,
        env=child_env({"FF_CONFIG": str(tmp_path / "c.yaml")}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "is a spool" in done.stderr
    assert "Traceback" not in done.stderr


# -- experiments ---------------------------------------------------------------------------


def test_experiment_ids_are_the_same_in_every_process(spool: Path, tmp_path: Path) -> None:
    code = """
        import mlflow
        print(mlflow.set_experiment("shared-exp").experiment_id)
        """
    ids = {run_script(code, tmp_path, f"spool://{spool}").stdout.split()[-1] for _ in range(2)}
    assert ids == {experiment_id("shared-exp")}
    c = client(spool)
    assert c.get_experiment(ids.pop()).name == "shared-exp"
    assert c.get_experiment("0").name == "Default"
    names = {e.name for e in c.search_experiments()}
    assert names == {"Default", "shared-exp"}


def test_experiments_behave_as_mlflow_s(spool: Path) -> None:
    c = client(spool)
    exp = c.create_experiment("a")
    with pytest.raises(MlflowException) as dup:
        c.create_experiment("a")
    assert dup.value.error_code == "RESOURCE_ALREADY_EXISTS"
    assert c.get_experiment_by_name("a").experiment_id == exp
    assert c.get_experiment_by_name("nope") is None
    with pytest.raises(MlflowException) as missing:
        c.get_experiment("12345")
    assert missing.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    with pytest.raises(MlflowException, match="not in the spool") as nowhere:
        c.create_run("12345")
    assert nowhere.value.error_code == "RESOURCE_DOES_NOT_EXIST"


# -- reads -----------------------------------------------------------------------------------


def test_get_run_of_a_run_this_process_logs_never_reads_the_spool(spool: Path) -> None:
    c = client(spool)
    run = c.create_run("0", run_name="live")
    c.log_batch(run.info.run_id, metrics=[Metric("m", float(i), i, i) for i in range(100)])
    c.log_param(run.info.run_id, "p", "1")
    # Take the spool away: the active run is answered from memory, an unknown one is not.
    shutil.move(spool, spool.with_name("moved"))
    got = c.get_run(run.info.run_id)
    assert got.data.metrics == {"m": 99.0}
    assert got.data.params == {"p": "1"}
    assert got.info.status == "RUNNING"
    assert got.info.artifact_uri == f"spool://{spool}/{run.info.run_id}/artifacts"


def test_a_run_of_another_process_is_read_from_the_spool(spool: Path, tmp_path: Path) -> None:
    out = run_script(
        """
        import math, mlflow
        mlflow.set_experiment("other")
        with mlflow.start_run(run_name="theirs", tags={"team": "a"}) as run:
            mlflow.log_param("lr", 0.1)
            for i in range(3):
                mlflow.log_metric("loss", 1.0 / (i + 1), step=i)
            mlflow.log_metric("loss", math.nan, step=1)
            mlflow.log_metric("loss", 7.0, step=1)  # the same step again: two points
            mlflow.log_metric("big", math.inf)
        print(run.info.run_id)
        """,
        tmp_path,
        f"spool://{spool}",
    )
    run_id = out.stdout.split()[-1]
    c = client(spool)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "theirs"
    assert run.info.experiment_id == experiment_id("other")
    assert run.data.params == {"lr": "0.1"}
    assert run.data.tags["team"] == "a" and run.data.tags["mlflow.runName"] == "theirs"
    assert not any(k.startswith("ff.") for k in run.data.tags)
    # MLflow's store keeps +inf as the largest float and the latest point by step, time, value.
    assert run.data.metrics == {"loss": pytest.approx(1 / 3), "big": sys.float_info.max}
    history = c.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history if m.value == m.value) == [
        (0, 1.0),
        (1, 0.5),
        (1, 7.0),
        (2, pytest.approx(1 / 3)),
    ]
    assert sum(1 for m in history if m.value != m.value) == 1
    found = c.search_runs([experiment_id("other")], "tags.team = 'a'")
    assert [r.info.run_id for r in found] == [run_id]
    assert c.search_runs([experiment_id("other")], "tags.team = 'b'") == []
    assert c.search_runs([experiment_id("other")], "params.lr = '0.1'")[0].info.run_id == run_id


def test_what_a_spool_cannot_answer_says_so_and_names_ff_sync(spool: Path) -> None:
    c = client(spool)
    run = c.create_run("0")
    for call in (
        lambda: c.delete_run(run.info.run_id),
        lambda: c.rename_experiment("0", "x"),
        lambda: c.set_experiment_tag("0", "k", "v"),
        lambda: c.search_traces(locations=["0"]),
    ):
        with pytest.raises(MlflowException) as info:
            call()
        assert "not available on a spool" in info.value.message
        assert "ff-sync" in info.value.message
    # Plain logging code resolves the model registry of the tracking URI: that works.
    with pytest.raises(MlflowException, match="not available on a spool"):
        c.search_registered_models()


# -- writes ----------------------------------------------------------------------------------


def test_a_batch_mixing_steps_and_times_is_one_write_of_several_events(spool: Path) -> None:
    c = client(spool)
    run_id = c.create_run("0").info.run_id
    seg = next((spool / run_id).glob("seg-*.jsonl"))
    before = seg.stat().st_size
    c.log_batch(
        run_id,
        metrics=[Metric("a", 1.0, 5, 0), Metric("b", 2.0, 5, 0), Metric("a", 3.0, 6, 1)],
        params=[Param("p", "x")],
        tags=[RunTag("t", "y")],
    )
    kinds = [(e.kind, e.data.get("d")) for e in events(spool, run_id)][-4:]
    assert kinds == [
        ("params", {"p": "x"}),
        ("metrics", {"a": 1.0, "b": 2.0}),
        ("metrics", {"a": 3.0}),
        ("tags", {"t": "y"}),
    ]
    assert seg.stat().st_size > before
    # A bad batch writes nothing at all, and is MLflow's INVALID_PARAMETER_VALUE.
    size = seg.stat().st_size
    with pytest.raises(MlflowException) as bad:
        c.log_batch(run_id, metrics=[Metric("ok", 1.0, 1, 0), Metric("bad key!", 1.0, 1, 0)])
    assert bad.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException) as conflict:
        c.log_param(run_id, "p", "changed")
    assert conflict.value.error_code == "INVALID_PARAMETER_VALUE"
    assert seg.stat().st_size == size


def test_asynchronous_calls_are_in_the_spool_when_they_return(spool: Path) -> None:
    mlflow.set_tracking_uri(f"spool://{spool}")
    try:
        with mlflow.start_run() as run:
            op = mlflow.log_metric("m", 1.5, step=3, synchronous=False)
            assert [e.data["d"] for e in events(spool, run.info.run_id) if e.kind == "metrics"] == [
                {"m": 1.5}
            ]
            op.wait()
            bad = mlflow.log_param("bad key!", 1, synchronous=False)
            with pytest.raises(MlflowException, match="bad key!"):
                bad.wait()
    finally:
        mlflow.set_tracking_uri(None)


def test_ff_run_id_continues_one_run_across_processes(spool: Path, tmp_path: Path) -> None:
    code = """
        import sys, mlflow
        with mlflow.start_run(run_name="job") as run:
            mlflow.log_metric("step_seen", float(sys.argv[-1] if len(sys.argv) > 1 else 0))
            print(run.info.run_id)
        with mlflow.start_run(run_name="second"):
            pass
        """
    done = run_script(code, tmp_path, f"spool://{spool}", env={"FF_RUN_ID": "job-7"}, check=False)
    assert done.stdout.split()[0] == "job-7"
    assert "FF_RUN_ID=job-7 names one run" in done.stderr
    # The requeued job: same id, the same run, resumed.
    done = run_script(code, tmp_path, f"spool://{spool}", env={"FF_RUN_ID": "job-7"}, check=False)
    assert done.stdout.split()[0] == "job-7"
    starts = [e.data["resume"] for e in events(spool, "job-7") if e.kind == "run_start"]
    assert sorted(starts) == [False, True]


def test_delete_tag_follows_mlflow_and_replays_in_order(spool: Path, tmp_path: Path) -> None:
    c = client(spool)
    run_id = c.create_run("0", run_name="tags", tags={"mlflow.user": "me"}).info.run_id
    c.set_tag(run_id, "a", "1")
    c.delete_tag(run_id, "a")
    c.set_tag(run_id, "b", "1")
    c.delete_tag(run_id, "b")
    c.set_tag(run_id, "b", "2")
    with pytest.raises(MlflowException) as missing:
        c.delete_tag(run_id, "never")
    assert missing.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    # The tags the sync writes from the run's start cannot be deleted in a spool.
    with pytest.raises(MlflowException, match="reserved"):
        c.delete_tag(run_id, "mlflow.user")
    with pytest.raises(MlflowException) as absent:  # never set on this run: as MLflow says
        c.delete_tag(run_id, "mlflow.source.name")
    assert absent.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    c.set_terminated(run_id)
    assert "a" not in c.get_run(run_id).data.tags
    db = tmp_path / "out.db"
    ff_sync(spool, db)
    synced = MlflowClient(tracking_uri=f"sqlite:///{db}").search_runs(["0"])[0]
    assert synced.data.tags["b"] == "2" and "a" not in synced.data.tags
    assert synced.info.status == "FINISHED"
    assert json.loads(ff_sync(spool, db, "verify", "--json", check=False).stdout)["ok"] is True


def test_the_writer_process_ends_its_runs_at_sigterm(spool: Path, tmp_path: Path) -> None:
    script = tmp_path / "term.py"
    script.write_text(
        "import mlflow, os, signal\n"
        "run = mlflow.start_run()\n"
        "mlflow.log_metric('m', 1)\n"
        "print(run.info.run_id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        env=child_env({"MLFLOW_TRACKING_URI": f"spool://{spool}"}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -15
    run_id = done.stdout.split()[0]
    assert [e.data["status"] for e in events(spool, run_id) if e.kind == "run_end"] == ["KILLED"]
    assert os.path.isdir(spool / run_id)


def test_every_method_of_mlflow_s_store_is_implemented_inherited_or_refused() -> None:
    from mlflow.store.tracking.abstract_store import AbstractStore

    from formula_foundry.dropin.store import INHERITED, SpoolStore

    for name in dir(AbstractStore):
        if name.startswith("_") and name != "_search_runs":
            continue
        attr = getattr(SpoolStore, name)
        if not callable(attr) or name in INHERITED:
            continue
        assert name in SpoolStore.__dict__, f"{name} falls through to MLflow's base class"


def test_the_scheme_registers_whichever_module_is_imported_first(tmp_path: Path) -> None:
    # MLflow loads entry points while it imports itself; our store module imports MLflow.
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::UserWarning",
            "-c",
            "import formula_foundry.dropin.store\n"
            "import mlflow\n"
            f"print(mlflow.MlflowClient(tracking_uri='spool://{tmp_path}/s')"
            ".get_experiment('0').name)",
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "Default"


REGISTRY = """
import os, mlflow
print(mlflow.get_registry_uri())
with mlflow.start_run():
    mlflow.log_metric("m", 1.0)
print(mlflow.get_registry_uri())
mlflow.set_tracking_uri("sqlite:///other.db")
print(os.environ.get("MLFLOW_REGISTRY_URI"))
"""


def test_the_spool_resolves_its_registry_once_unless_one_was_chosen(tmp_path: Path) -> None:
    uri = f"spool://{tmp_path}/spool"
    out = run_script(REGISTRY, tmp_path, uri).stdout.split()
    # Resolved up front (no Spark probe per client), never exported to child processes.
    assert out == [uri, uri, "None"]
    chosen = run_script(REGISTRY, tmp_path, uri, env={"MLFLOW_REGISTRY_URI": "sqlite:///r.db"})
    assert chosen.stdout.split() == ["sqlite:///r.db", "sqlite:///r.db", "sqlite:///r.db"]


def test_a_run_other_processes_wrote_into_is_read_again(spool: Path, tmp_path: Path) -> None:
    # A launcher creates the trials; worker processes resume them, log and end them; the
    # launcher then picks the best by search_runs. Answered from the launcher's memory, the
    # trials still looked RUNNING without metrics, and the "best" tag went to the wrong run.
    c = client(spool)
    exp = c.create_experiment("sweep")
    trials = [c.create_run(exp, run_name=f"trial-{i}").info.run_id for i in range(2)]
    assert c.get_run(trials[0]).data.metrics == {}
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys, mlflow\n"
        "with mlflow.start_run(run_id=sys.argv[1]):\n"
        "    mlflow.log_metric('loss', float(sys.argv[2]))\n"
        "    mlflow.set_tag('worker', 'done')\n",
        encoding="utf-8",
    )
    for run_id, loss in zip(trials, ("0.1", "0.9"), strict=True):
        subprocess.run(
            [sys.executable, str(worker), run_id, loss],
            env=child_env({"MLFLOW_TRACKING_URI": f"spool://{spool}"}),
            check=True,
            timeout=120,
        )
    best = c.search_runs([exp], order_by=["metrics.loss ASC"])[0]
    assert best.info.run_id == trials[0]
    got = c.get_run(trials[1])
    assert (got.info.status, got.data.metrics, got.data.tags["worker"]) == (
        "FINISHED",
        {"loss": 0.9},
        "done",
    )
    c.set_tag(best.info.run_id, "best", "yes")  # the launcher still writes into it
    assert c.get_run(trials[0]).data.tags["best"] == "yes"
    tagged = [e.data["d"] for e in events(spool, trials[0]) if e.kind == "tags"]
    assert {"best": "yes"} in tagged


def test_whole_floats_as_step_and_time_are_taken_as_mlflows_store_takes_them(
    spool: Path,
) -> None:
    c = client(spool)
    run_id = c.create_run(c.create_experiment("floats")).info.run_id
    c.log_metric(run_id, "m", 1.0, timestamp=1500.0, step=2.0)  # type: ignore[arg-type]
    c.log_batch(run_id, metrics=[Metric("m", 2.0, 1600.0, 3.0)])  # type: ignore[arg-type]
    history = c.get_metric_history(run_id, "m")
    assert [(p.timestamp, p.step, p.value) for p in history] == [(1500, 2, 1.0), (1600, 3, 2.0)]
    with pytest.raises(MlflowException, match="step"):
        c.log_metric(run_id, "m", 1.0, timestamp=1700, step=2.5)  # type: ignore[arg-type]


def test_a_run_name_and_a_different_run_name_tag_are_refused_as_mlflow_refuses_them(
    spool: Path,
) -> None:
    c = client(spool)
    exp = c.create_experiment("names")
    with pytest.raises(MlflowException, match=r"Both 'run_name' argument and 'mlflow\.runName'"):
        c.create_run(exp, run_name="a", tags={"mlflow.runName": "b"})
    same = c.create_run(exp, run_name="a", tags={"mlflow.runName": "a"})
    assert same.info.run_name == "a"
