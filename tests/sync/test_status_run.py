"""``ff-sync status RUN_ID``: the run id printed on the node leads to the run in the destination.

Runs are logged for real (the tracker, and unmodified MLflow code through ``spool:``), synced
by the real ``ff-sync``, and the ids ``status`` prints are checked against the store itself:
the printed MLflow run id is the run tagged ``ff.run_uuid = <id>``, and the printed search
filter finds exactly that run through ``MlflowClient.search_runs``.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from formula_foundry.redact import redact_uri
from formula_foundry.sync.commands.cli import main
from formula_foundry.sync.commands.status_table import search_filter, ui_of
from tests.dropin.conftest import ff_sync, run_script

from .conftest import Destination, Project

SYNCED = """
with tracker.start_run(run_name="a", experiment_name="ff-status-run") as a:
    a.log_params({"lr": 0.1})
    for i in range(5):
        a.log_metric("loss", 1.0 / (i + 1), step=i)
print(a.run_id)
"""
LATER = """
with tracker.start_run(run_name="b") as b:
    b.log_metrics({"x": 1.0, "y": 2.0})
    b.log_metric("x", 3.0, step=1)
print(b.run_id)
"""


def _status(project: Project, *args: str, uri: str | None = None) -> tuple[int, str, str]:
    head = ["--config", str(project.config)]
    if uri is not None:
        head += ["--tracking-uri", uri]
    result = CliRunner().invoke(main, [*head, "status", *args], prog_name="ff-sync")
    return result.exit_code, result.stdout, result.stderr


def _runs(data: dict[str, Any], index: int = 0) -> dict[str, dict[str, Any]]:
    return {r["run"]: r for r in data["destinations"][index]["runs"]}


def _search(uri: str, filter_string: str) -> list[Any]:
    """Every run of the store ``uri`` (deleted ones too, every experiment) the filter finds."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    found: list[Any] = []
    for i in range(0, len(ids), 100):
        found += client.search_runs(
            ids[i : i + 100], filter_string, run_view_type=ViewType.ALL, max_results=1000
        )
    return found


def _ui(uri: str) -> tuple[str, str | None]:
    """The UI address and command ``status`` must print for ``uri`` (written out here)."""
    if uri.startswith("http"):
        return uri.rstrip("/"), None
    return "http://127.0.0.1:5000", f"mlflow ui --backend-store-uri {shlex.quote(redact_uri(uri))}"


def test_a_run_id_maps_to_the_destination_run_and_its_ui_address(
    project: Project, destination: Destination
) -> None:
    (a,) = project.spool(SYNCED).split()
    assert project.sync().exit_code == 0
    (b,) = project.spool(LATER).split()  # logged after the pass: not synced yet

    code, out, err = _status(project, "--json", a, b)
    assert (code, err) == (0, ""), err
    data = json.loads(out)
    assert data["unknown_runs"] == []
    runs = _runs(data)
    assert list(runs) == [a, b]  # only the runs asked for, in that order
    base, command = _ui(project.uri)
    assert data["destinations"][0]["ui_command"] == command

    # The printed MLflow run id is the run the sync tagged with the spool run id.
    filt = runs[a]["search_filter"]
    assert filt == f"tags.`ff.run_uuid` = '{a}'"
    (found,) = _search(project.uri, filt)  # exactly one run
    assert found.data.tags["ff.run_uuid"] == a and found.data.tags["mlflow.runName"] == "a"
    assert runs[a]["mlflow_run_id"] == found.info.run_id != a  # the destination's own id
    assert runs[a]["experiment_id"] == found.info.experiment_id
    assert runs[a]["status"] == "FINISHED" and runs[a]["events_pending"] == 0
    assert runs[a]["ui_url"] == (
        f"{base}/#/experiments/{found.info.experiment_id}/runs/{found.info.run_id}"
    )
    # The filter without backticks finds it too (MLflow 3 parses a dotted tag key either way).
    assert [r.info.run_id for r in _search(project.uri, f"tags.ff.run_uuid = '{a}'")] == [
        found.info.run_id
    ]

    assert runs[b]["status"] is None and runs[b]["events_pending"] == 4
    assert (runs[b]["mlflow_run_id"], runs[b]["experiment_id"], runs[b]["ui_url"]) == (
        None,
        None,
        None,
    )
    assert _search(project.uri, runs[b]["search_filter"]) == []

    code, out, err = _status(project, a, b)
    assert (code, err) == (0, ""), err
    block_a, block_b = out.split("\n\nrun ")[1:]
    assert f"  mlflow run id: {found.info.run_id}\n" in block_a
    assert f"  experiment id: {found.info.experiment_id}\n" in block_a
    assert f"  address:       {runs[a]['ui_url']}\n" in block_a
    printed = re.search(r"^  search filter: (.*)$", block_a, re.M)
    assert printed is not None and printed.group(1) == filt
    assert (f"mlflow ui:   {command}  " in out) == (command is not None)
    assert block_b.startswith(f"{b}\n  status:        not synced yet; 4 events pending\n")
    assert "mlflow run id" not in block_b

    assert project.sync().exit_code == 0  # once synced, b maps too
    runs = _runs(json.loads(_status(project, "--json", b)[1]))
    (found_b,) = _search(project.uri, runs[b]["search_filter"])
    assert runs[b]["mlflow_run_id"] == found_b.info.run_id


def test_an_mlflow_run_id_printed_on_the_node_leads_to_the_synced_run(tmp_path: Path) -> None:
    spool, db = tmp_path / "spool", tmp_path / "mlruns.db"
    proc = run_script(
        """
        import mlflow
        mlflow.set_experiment("dropin-status")
        with mlflow.start_run(run_name="train") as run:
            mlflow.log_param("lr", 0.1)
            mlflow.log_metric("loss", 0.5, step=1)
        print(run.info.run_id)
        """,
        tmp_path,
        f"spool://{spool}",
    )
    node_id = proc.stdout.split()[-1]
    ff_sync(spool, db)
    result = ff_sync(spool, db, "status", "--json", node_id)
    (run,) = json.loads(result.stdout)["destinations"][0]["runs"]
    uri = f"sqlite:///{db}"
    (found,) = _search(uri, run["search_filter"])
    assert found.data.tags["mlflow.runName"] == "train" and found.data.params == {"lr": "0.1"}
    assert (run["run"], run["mlflow_run_id"], run["experiment_id"]) == (
        node_id,
        found.info.run_id,
        found.info.experiment_id,
    )
    assert run["ui_url"] == (
        f"http://127.0.0.1:5000/#/experiments/{found.info.experiment_id}/runs/{found.info.run_id}"
    )


def test_an_unknown_run_id_exits_2_naming_it(project: Project) -> None:
    (a,) = project.spool(SYNCED).split()
    assert project.sync().exit_code == 0
    missing = "0123456789abcdef0123456789abcdef"
    code, out, err = _status(project, a, missing)
    assert code == 2
    assert err == (
        f"ff-sync: error: run {missing} is neither in the spool {project.spool_root} "
        "nor in the sync state of this destination\n"
    )
    assert f"\nrun {a}\n" in out and missing not in out  # the runs found are still shown
    code, out, err = _status(project, missing)
    assert (code, out) == (2, "") and err.count("\n") == 1
    code, out, _ = _status(project, "--json", missing, a)
    data = json.loads(out)
    assert code == 2 and data["unknown_runs"] == [missing] and list(_runs(data)) == [a]


def test_a_run_collected_by_gc_is_still_mapped(project: Project) -> None:
    (a,) = project.spool(SYNCED).split()
    assert project.sync().exit_code == 0
    before = _runs(json.loads(_status(project, "--json", a)[1]))[a]
    gc = project.ff_sync("gc", "--older-than", "0", "--delete")
    assert gc.returncode == 0, gc.stderr
    assert not (project.spool_root / a).exists()
    code, out, err = _status(project, "--json", a)
    assert (code, err) == (0, "")
    after = _runs(json.loads(out))[a]
    assert (after["status"], after["mlflow_run_id"], after["ui_url"]) == (
        "FINISHED",
        before["mlflow_run_id"],
        before["ui_url"],
    )
    code, out, _ = _status(project, a)
    assert code == 0 and "FINISHED; no longer in the spool" in out
    assert f"  mlflow run id: {before['mlflow_run_id']}\n" in out
    assert _status(project)[1].count(a) == 0  # the overview lists the spool's runs only


def test_no_password_in_the_ui_address_or_command(project: Project) -> None:
    (a,) = project.spool(SYNCED).split()
    assert project.sync().exit_code == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = f"postgresql://ff:hunter2secret@127.0.0.1:{port}/mlflow?sslpassword=k3y5ecret"
    for args in ((a,), ("--all", a), ("--all", "--json", a)):
        code, out, err = _status(project, *args, uri=down)
        assert code == 0 and err == ""
        assert "hunter2" not in out and "k3y5ecret" not in out
    data = json.loads(out)
    assert data["destinations"][0]["ui_command"] == (
        f"mlflow ui --backend-store-uri 'postgresql://ff:***@127.0.0.1:{port}/mlflow"
        "?sslpassword=***'"
    )
    assert _runs(data, 0)[a]["status"] is None and _runs(data, 1)[a]["status"] == "FINISHED"

    assert ui_of("https://bob:pa:ss@mlflow.example.org/team/?token=t0ken#x") == (
        "https://mlflow.example.org/team",
        None,
    )
    assert ui_of("http://127.0.0.1:5000/") == ("http://127.0.0.1:5000", None)
    assert ui_of("mysql+pymysql://u:pw@db/m") == (
        "http://127.0.0.1:5000",
        "mlflow ui --backend-store-uri 'mysql+pymysql://u:***@db/m'",
    )
    assert ui_of("databricks://profile") == (None, None)
    assert search_filter("it's") == "tags.`ff.run_uuid` = 'it\\'s'"
