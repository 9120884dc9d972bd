"""No database, no network on the node: an MLflow script logging through ``spool:`` runs in a
network namespace without usable interfaces (``unshare --net``: a loopback that is down) and
creates no database file anywhere; ``ff-sync``, outside, brings its runs into MLflow.

Where ``strace`` is installed the script also runs under it. With MLflow's telemetry off
(``MLFLOW_DISABLE_TELEMETRY=true``, as a node should set it) no IPv4/IPv6 ``connect`` is even
attempted and every file or folder the script creates lies in the spool. With the telemetry at
MLflow's default (on, outside CI and pytest, which MLflow detects by their variables) MLflow's
background thread tries to reach its telemetry server and keeps an installation id under
``~/.config/mlflow``: the script must still succeed, without a database, in the namespace.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.dropin._compare import dump
from tests.dropin.conftest import child_env, ff_sync

SCRIPT = """
import json, sys

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.telemetry.utils import is_telemetry_disabled

mlflow.set_experiment("offline")
client = MlflowClient()
with mlflow.start_run(run_name="parent") as parent:
    pid = parent.info.run_id
    mlflow.log_param("lr", 0.01)
    mlflow.log_params({"layers": 4, "opt": "adam"})
    mlflow.set_tag("stage", "train")
    for i in range(25):
        mlflow.log_metric("loss", 1.0 / (i + 1), step=i, synchronous=i % 2 == 0)
    mlflow.log_metrics({"acc": 0.5, "nan": float("nan"), "inf": float("inf")}, step=3)
    with mlflow.start_run(run_name="child", nested=True) as child:
        cid = child.info.run_id
        mlflow.log_metric("child_loss", 0.25, step=1)
        mlflow.set_tag("kind", "fold")
    client.log_batch(
        pid,
        metrics=[Metric("grad", 2.0, 1700000000123, 7)],
        params=[Param("seed", "42")],
        tags=[RunTag("via", "client")],
    )

    # The reads integrations make, answered from the spool.
    run = client.get_run(pid)
    assert run.info.status == "RUNNING", run.info
    assert run.data.params == {"lr": "0.01", "layers": "4", "opt": "adam", "seed": "42"}
    assert run.data.metrics["loss"] == 1.0 / 25 and run.data.metrics["grad"] == 2.0
    assert run.data.tags["stage"] == "train" and run.data.tags["via"] == "client"
    hist = client.get_metric_history(pid, "loss")
    assert [(m.step, m.value) for m in hist] == [(i, 1.0 / (i + 1)) for i in range(25)]
    exp = client.get_experiment_by_name("offline")
    assert exp is not None and client.get_experiment(exp.experiment_id).name == "offline"
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["child", "parent"], runs
    tagged = client.search_runs([exp.experiment_id], "tags.stage = 'train'")
    assert [r.info.run_id for r in tagged] == [pid], tagged
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{pid}'")
    assert [r.info.run_id for r in kids] == [cid], kids
    assert client.get_run(cid).info.status == "FINISHED"

# A second experiment through the client API, ended FAILED.
exp2 = client.create_experiment("offline-client")
r2 = client.create_run(exp2, run_name="client-run", tags={"team": "hpc"})
client.log_metric(r2.info.run_id, "m", 1.5, step=2)
client.log_param(r2.info.run_id, "k", "v")
client.set_terminated(r2.info.run_id, "FAILED")
assert client.get_run(r2.info.run_id).info.status == "FAILED"
names = {e.name for e in client.search_experiments()}
assert {"offline", "offline-client"} <= names, names
assert client.get_run(pid).info.status == "FINISHED"

print(json.dumps({
    "parent": pid,
    "child": cid,
    "tracking_uri": mlflow.get_tracking_uri(),
    "sqlalchemy": "sqlalchemy" in sys.modules,
    "telemetry": not is_telemetry_disabled(),
}))
"""

# Run inside the namespace before the script: what network it has.
PROBE = """
import errno, json, socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(5)
code = s.connect_ex(("192.0.2.1", 80))
s.close()
try:
    lo = socket.create_connection(("127.0.0.1", 9), timeout=5)
except OSError as exc:
    lo_code = exc.errno
else:
    lo.close()
    lo_code = 0
print(json.dumps({"interfaces": [n for _, n in socket.if_nameindex()], "connect": code,
                  "loopback": lo_code, "unreachable": [errno.ENETUNREACH, errno.EHOSTUNREACH]}))
"""

DB_NAME = re.compile(r"(\.db|\.sqlite3?|\.db-journal|\.db-wal|\.db-shm)$|(^|/)mlruns(/|$)")

# Variables by which MLflow (mlflow/telemetry/utils.py) decides it runs in CI or under pytest
# and turns its telemetry off; a user's job on a node has none of them.
CI_MARKERS = (
    "PYTEST_CURRENT_TEST",
    "GITHUB_ACTIONS",
    "CI",
    "CIRCLECI",
    "GITLAB_CI",
    "JENKINS_URL",
    "TRAVIS",
    "TF_BUILD",
    "BITBUCKET_BUILD_NUMBER",
    "CODEBUILD_BUILD_ARN",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "CLOUD_RUN_EXECUTION",
    "RUNBOT_HOST_URL",
    "RUNBOT_BUILD_NAME",
    "RUNBOT_WORKER_ID",
    "DO_NOT_TRACK",
    "MLFLOW_DISABLE_TELEMETRY",
)

_CALL = re.compile(r"^\d+ +(\w+)\((.*)$")
_PATH = re.compile(r'(?:(?:AT_FDCWD|-?\d+)<([^>]*)>, )?"((?:[^"\\]|\\.)*)"')


def unshare_net() -> list[str]:
    """The command prefix that runs a process without network, or skip saying why not."""
    exe = shutil.which("unshare")
    if exe is None:
        pytest.skip("unshare (util-linux) is not installed: no namespace without network")
    probe = subprocess.run([exe, "--net", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(
            f"unshare --net is not permitted here (needs root or CAP_SYS_ADMIN): {probe.stderr}"
        )
    return [exe, "--net"]


def created_paths(trace: str) -> list[str]:
    """Paths an ``strace -f -y`` log shows created: open with O_CREAT, creat, mkdir, and the
    targets of rename and link. A call split by another thread (``<unfinished ...>``) counts
    as successful: the list errs on the side of too many."""
    out = []
    for line in trace.splitlines():
        m = _CALL.match(line)
        if m is None or re.search(r"= -1 E", line):
            continue
        call, rest = m.groups()
        paths = [
            name if name.startswith("/") or not base else f"{base}/{name}"
            for base, name in _PATH.findall(rest)
        ]
        if not paths:
            continue
        opens = call in ("open", "openat", "openat2") and "O_CREAT" in rest
        if opens or call in ("creat", "mkdir", "mkdirat", "mknod", "mknodat"):
            out.append(paths[0])
        elif call.startswith(("rename", "link", "symlink")):
            out.append(paths[-1])
    return out


def inet_connects(trace: str) -> list[str]:
    return [ln for ln in trace.splitlines() if " connect(" in ln and "AF_INET" in ln]


def run_offline(tmp_path: Path, *, telemetry: bool) -> tuple[dict[str, object], Path, str | None]:
    """Run SCRIPT in a namespace without network (under strace where installed), as a job on a
    node: HOME and TMPDIR fresh folders, the spool ``spool:runs`` in the working folder.
    Returns the script's JSON line, the spool, and the strace log (None without strace)."""
    prefix = unshare_net()
    work, home, tmp = (tmp_path / n for n in ("work", "home", "tmp"))
    for d in (work, home, tmp):
        d.mkdir()
    env = child_env({"MLFLOW_TRACKING_URI": "spool:runs", "HOME": str(home), "TMPDIR": str(tmp)})
    for name in CI_MARKERS:
        env.pop(name, None)
    if not telemetry:
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"

    probe = subprocess.run(
        [*prefix, sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, env=env
    )
    assert probe.returncode == 0, probe.stderr
    net = json.loads(probe.stdout)
    assert net["interfaces"] == ["lo"], net
    assert net["connect"] in net["unreachable"], net  # no route anywhere
    assert net["loopback"] in net["unreachable"], net  # not even to the loopback

    (work / "train.py").write_text(textwrap.dedent(SCRIPT), encoding="utf-8")
    strace = shutil.which("strace")
    trace = tmp_path / "trace.txt"
    traced = (
        [strace, "-f", "--seccomp-bpf", "-y", "-qq", "-o", str(trace), "-e", "trace=%file,connect"]
        if strace
        else []
    )
    proc = subprocess.run(
        [*prefix, *traced, sys.executable, "train.py"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tracking_uri"] == "spool:runs"
    assert out["sqlalchemy"] is False  # MLflow's SQL store was never even imported
    assert out["telemetry"] is telemetry

    # No database file, no mlruns folder: in the working folder, HOME, TMPDIR (the test
    # folder holds them all).
    found = [str(p) for p in tmp_path.rglob("*") if DB_NAME.search(str(p.relative_to(tmp_path)))]
    assert found == []
    spool = work / "runs"
    runs = sorted(p.name for p in spool.iterdir() if p.name != ".experiments")
    assert len(runs) == 3 and {out["parent"], out["child"]} <= set(runs), runs
    text = trace.read_text(encoding="utf-8", errors="replace") if strace else None
    if text is not None:
        created = created_paths(text)
        assert any(Path(p).is_relative_to(spool) for p in created), "strace log not understood"
        assert [p for p in created if DB_NAME.search(p)] == []  # anywhere on the machine
    return out, spool, text


def test_spool_logging_needs_no_network_and_creates_no_database(tmp_path: Path) -> None:
    _, spool, trace = run_offline(tmp_path, telemetry=False)
    if trace is not None:
        assert inet_connects(trace) == []
        outside = [p for p in created_paths(trace) if not Path(p).is_relative_to(spool)]
        assert outside == []  # everything the script created is in the spool

    # ff-sync, outside the namespace, replays the spool into MLflow.
    store = tmp_path / "store"
    store.mkdir()
    db = store / "mlflow.db"
    ff_sync(spool, db)
    data = dump(db)
    assert data["experiments"] == ["Default", "offline", "offline-client"]
    parent, child, client_run = (
        data["offline/parent"],
        data["offline/child"],
        data["offline-client/client-run"],
    )
    statuses = (parent["status"], child["status"], client_run["status"])
    assert statuses == ("FINISHED", "FINISHED", "FAILED")
    assert child["tags"]["mlflow.parentRunId"] == "parent"
    assert parent["params"] == {"lr": "0.01", "layers": "4", "opt": "adam", "seed": "42"}
    user_tags = {k: v for k, v in parent["tags"].items() if not k.startswith("mlflow.")}
    assert user_tags == {"stage": "train", "via": "client"}
    assert sorted(parent["metrics"]["loss"]) == [(i, 1.0 / (i + 1)) for i in range(25)]
    assert parent["metrics"]["nan"] == [(3, "NaN")]
    assert parent["metrics"]["inf"] == [(3, sys.float_info.max)]  # as MLflow stores +inf
    assert parent["metrics"]["grad"] == [(7, 2.0)]
    assert child["metrics"] == {"child_loss": [(1, 0.25)]}
    assert child["tags"]["kind"] == "fold"
    assert client_run["params"] == {"k": "v"} and client_run["tags"]["team"] == "hpc"
    assert client_run["metrics"] == {"m": [(2, 1.5)]}


def test_with_mlflow_telemetry_at_its_default_the_job_still_succeeds_offline(
    tmp_path: Path,
) -> None:
    """MLflow's telemetry thread finds no network; logging and reads do not depend on it."""
    _, spool, trace = run_offline(tmp_path, telemetry=True)
    if trace is not None:
        # Outside the spool only MLflow's own telemetry state (an installation id, no database).
        config = tmp_path / "home" / ".config"
        outside = [p for p in created_paths(trace) if not Path(p).is_relative_to(spool)]
        assert all(Path(p).is_relative_to(config) for p in outside), outside
