"""Files of ``spool:`` runs: MLflow's artifact calls store the bytes and spool one event per file.

Unmodified MLflow scripts run as separate processes (children of the session's zygote) with
``MLFLOW_TRACKING_URI=spool:...``. Every artifact call must leave, for each file, an
``artifact`` event in the run's spool (path, digest, size, store) and the bytes in the
content-addressed store; ``list_artifacts`` / ``download_artifacts`` on the node must answer
what MLflow's own store answers for the same script (the differential test runs it both ways);
bad input must be refused by name with nothing written; a call that returned survives SIGKILL.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from formula_foundry.dropin.run_files import Location, parse_artifact_uri
from formula_foundry.errors import ValidationError
from formula_foundry.substrate.artifact_store import stored_object_path
from formula_foundry.tracking.spool_reader import Event, SegmentReader
from tests.conftest import REPO_ROOT
from tests.dropin.conftest import SCRIPT, Zygote, child_env

# -- helpers ---------------------------------------------------------------------------------


def run(
    zygote: Zygote,
    code: str,
    cwd: Path,
    uri: str,
    env: Mapping[str, str] | None = None,
    *,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as ``python script.py`` in ``cwd`` (a zygote child) logging into ``uri``."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / SCRIPT).write_text(textwrap.dedent(code), encoding="utf-8")
    child = zygote.start([SCRIPT], cwd, child_env({"MLFLOW_TRACKING_URI": uri, **(env or {})}))
    proc = zygote.wait(child, 240)
    if check and proc.returncode != 0:
        raise AssertionError(f"script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def last_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def events(spool: Path, run_id: str, kind: str | None = None) -> list[tuple[str, Event]]:
    """(segment name, event) of the run, segment by segment, in file order."""
    out = []
    for seg in sorted((spool / run_id).glob("seg-*.jsonl")):
        out.extend(
            (seg.name, e)
            for e in SegmentReader(seg)
            if isinstance(e, Event) and (kind is None or e.kind == kind)
        )
    return out


def artifact_events(spool: Path, run_id: str) -> list[dict[str, Any]]:
    return [e.data for _, e in events(spool, run_id, "artifact")]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def objects(store: Path) -> list[Path]:
    return sorted(p for p in (store / "objects").rglob("*") if p.is_file())


def tree_digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha(p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def spool_uri(spool: Path) -> str:
    return f"spool://{spool.as_posix()}"


# -- every call, both ways -------------------------------------------------------------------

# Logs a file with every call MLflow has for it, then reads the run's files back: the listing
# at every level, the digests of a full download, one file downloaded alone, the table.
EVERY_CALL = """
import hashlib, json, os
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import mlflow
from mlflow import MlflowClient

FILES = {
    "inputs/a.txt": b"alpha\\n",
    "inputs/empty.txt": b"",
    "inputs/nested/b.bin": bytes(range(256)) * 4099,
    "inputs/nested/deeper/c.csv": b"x,y\\n1,2\\n",
}
for path, data in FILES.items():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)

mlflow.set_experiment("artifacts")
with mlflow.start_run() as run:
    run_id = run.info.run_id
    mlflow.log_artifact("inputs/a.txt")
    mlflow.log_artifact("inputs/a.txt", "copies/of/a")
    mlflow.log_artifact("inputs/nested")            # a folder: kept under its own name
    mlflow.log_artifacts("inputs", "all")
    mlflow.log_artifacts("inputs/nested")           # its files at the root
    mlflow.log_text("some text\\n", "notes/readme.md")
    mlflow.log_dict({"lr": 0.1, "layers": [64, 32]}, "config/params.json")
    mlflow.log_dict({"lr": 0.1}, "config/params.yaml")
    fig, ax = plt.subplots()
    ax.plot([0, 1, 4, 9])
    mlflow.log_figure(fig, "plots/curve.png")
    mlflow.log_image(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), "images/grid.png")
    mlflow.log_table({"q": ["a", "b"], "score": [0.5, 0.25]}, "eval/table.json")
    mlflow.log_table({"q": ["c"], "score": [1.0]}, "eval/table.json")   # appends
    client = MlflowClient()
    client.log_artifact(run_id, "inputs/a.txt", "client")
    client.log_artifacts(run_id, "inputs/nested", "client/tree")
    client.log_text(run_id, "replaced\\n", "notes/readme.md")          # the same path again

def tree(path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out.append([f.path, f.is_dir, f.file_size])
        if f.is_dir:
            out.extend(tree(f.path))
    return out

def digests(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            p = os.path.join(root, name)
            rel = os.path.relpath(p, folder).replace(os.sep, "/")
            out[rel] = "sha256:" + hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out

full = mlflow.artifacts.download_artifacts(run_id=run_id, dst_path="downloaded")
one = mlflow.artifacts.download_artifacts(
    run_id=run_id, artifact_path="all/nested/b.bin", dst_path="one"
)
print(json.dumps({
    "run": run_id,
    "tree": tree(),
    "sub": tree("all/nested"),
    "file": client.list_artifacts(run_id, "notes/readme.md") == [],
    "digests": digests(full),
    "one": [os.path.relpath(one, "one"), digests("one")],
    "table": mlflow.artifacts.load_dict(f"runs:/{run_id}/eval/table.json"),
    "text": mlflow.artifacts.load_text(f"runs:/{run_id}/notes/readme.md"),
}))
"""
# Files the script logs, call by call (a folder counts each file).
EVERY_CALL_FILES = 1 + 1 + 2 + 4 + 2 + 1 + 1 + 1 + 1 + 1 + 2 + 1 + 2 + 1


def test_every_artifact_call_stores_its_files_reads_back_and_syncs_as_mlflow_does(
    zygote: Zygote, tmp_path: Path
) -> None:
    direct, spooled = tmp_path / "direct", tmp_path / "spooled"
    spool = spooled / "data" / "runs"
    want = last_json(run(zygote, EVERY_CALL, direct, f"sqlite:///{direct / 'direct.db'}"))
    got = last_json(run(zygote, EVERY_CALL, spooled, spool_uri(spool)))
    assert not (spooled / "mlruns").exists() and not list(spooled.glob("*.db"))

    # What MLflow code sees on the node is what MLflow's own store answers.
    for key in ("tree", "sub", "file", "digests", "one", "table", "text"):
        assert got[key] == want[key], key
    assert got["table"]["data"] == [["a", 0.5], ["b", 0.25], ["c", 1.0]]
    assert got["text"] == "replaced\n"

    # One event per file and call, all through the run's one writer (the run_start's segment);
    # no spool config file: the store is ``artifacts`` beside the spool root.
    run_id = got["run"]
    store = spooled / "data" / "artifacts"
    found = events(spool, run_id, "artifact")
    assert len(found) == EVERY_CALL_FILES
    (segment,) = {seg for seg, _ in events(spool, run_id)}
    assert {seg for seg, _ in found} == {segment}
    last = {e.data["path"]: e.data for _, e in found}
    assert set(last) == set(got["digests"])
    for path, data in last.items():
        assert data["store"] == str(store)
        assert data["digest"] == got["digests"][path], path
        obj = stored_object_path(store, data["digest"])
        assert obj.stat().st_size == data["size"]
        assert sha(obj.read_bytes()) == data["digest"], path
    # Content-addressed: a.txt logged five times, b.bin four, is stored once each (the
    # overwritten readme and first table stay as objects, unreferenced by the last events).
    assert len(objects(store)) == len({e.data["digest"] for _, e in found}) == 12

    # ff-sync uploads the files the node logged: the synced run holds MLflow's tree.
    db = tmp_path / "synced.db"
    env = child_env({"FF_SPOOL_ROOT": str(spool), "MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    child = zygote.start(["ff-sync"], tmp_path, env, module="formula_foundry.sync")
    proc = zygote.wait(child, 240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    synced = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (exp,) = [e for e in synced.search_experiments() if e.name == "artifacts"]
    (mlflow_run,) = synced.search_runs([exp.experiment_id])
    dst = tmp_path / "synced-files"
    dst.mkdir()
    synced.download_artifacts(mlflow_run.info.run_id, "", str(dst))
    assert tree_digests(dst) == want["digests"]


def test_a_folder_is_logged_file_by_file_in_one_write(zygote: Zygote, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    code = """
        import os, mlflow
        for i in range(30):
            os.makedirs(f"out/part{i % 3}/sub", exist_ok=True)
            with open(f"out/part{i % 3}/sub/f{i}.txt", "w") as f:
                f.write("x" * i)
        os.symlink(os.path.abspath("out/part0/sub/f3.txt"), "out/link.txt")
        with mlflow.start_run() as run:
            mlflow.log_artifacts("out", "model/files")
        print(run.info.run_id)
    """
    run_id = run(zygote, code, tmp_path, spool_uri(spool)).stdout.split()[-1]
    found = [e for _, e in events(spool, run_id, "artifact")]
    paths = sorted(e.data["path"] for e in found)
    assert paths == sorted(
        [f"model/files/part{i % 3}/sub/f{i}.txt" for i in range(30)] + ["model/files/link.txt"]
    )
    assert {e.data["path"]: e.data["size"] for e in found}["model/files/part2/sub/f29.txt"] == 29
    # One append of consecutive events: no other event between them, timestamps together.
    seqs = [e.seq for e in found]
    assert seqs == list(range(seqs[0], seqs[0] + len(found)))


def test_log_table_appends_across_processes_and_reads_finished_runs_back(
    zygote: Zygote, tmp_path: Path
) -> None:
    """A second process logs into the first one's finished run: its own segment, no resume;
    its log_table reads the table the first process logged back from the spool and the store."""
    spool = tmp_path / "spool"
    first = """
        import mlflow
        with mlflow.start_run() as run:
            mlflow.log_table({"step": [0, 1], "loss": [1.0, 0.5]}, "eval/t.json")
        print(run.info.run_id)
    """
    run_id = run(zygote, first, tmp_path / "a", spool_uri(spool)).stdout.split()[-1]
    second = f"""
        import json, mlflow
        from mlflow import MlflowClient
        c = MlflowClient()
        c.log_table({run_id!r}, {{"step": [2], "loss": [0.25]}}, "eval/t.json")
        print(json.dumps([
            mlflow.artifacts.load_dict("runs:/{run_id}/eval/t.json"),
            c.get_run({run_id!r}).info.status,
            [[f.path, f.is_dir, f.file_size] for f in c.list_artifacts({run_id!r}, "eval")],
        ]))
    """
    table, status, listing = last_json(run(zygote, second, tmp_path / "b", spool_uri(spool)))
    assert table["data"] == [[0, 1.0], [1, 0.5], [2, 0.25]]
    assert status == "FINISHED"
    assert len(events(spool, run_id, "run_start")) == 1
    found = artifact_events(spool, run_id)
    assert [e["path"] for e in found] == ["eval/t.json", "eval/t.json"]
    assert listing == [["eval/t.json", False, found[-1]["size"]]]


def test_downloads_check_the_bytes_against_their_digest(zygote: Zygote, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    code = """
        import mlflow
        with mlflow.start_run() as run:
            mlflow.log_text("the right bytes", "a/b.txt")
        print(run.info.run_id)
    """
    run_id = run(zygote, code, tmp_path, spool_uri(spool)).stdout.split()[-1]
    (event,) = artifact_events(spool, run_id)
    obj = stored_object_path(event["store"], event["digest"])
    obj.chmod(0o644)
    obj.write_bytes(b"the wrong bytes")
    download = f"""
        import os, mlflow
        uri = "{spool_uri(spool)}/{run_id}/artifacts/a/b.txt"
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path="got")
        except Exception as exc:
            print(type(exc).__name__, exc)
        print(sorted(os.listdir("got")))
    """
    out = run(zygote, download, tmp_path / "reader", spool_uri(spool)).stdout
    assert f"run {run_id}: artifact 'a/b.txt': object {event['digest']} is corrupt" in out, out
    assert out.strip().splitlines()[-1] == "[]"  # no wrong file left behind
    assert not obj.exists()  # quarantined by the store


def test_with_a_config_file_the_configured_store_holds_the_bytes(
    zygote: Zygote, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    (project / "config").mkdir(parents=True)
    (project / "config" / "mlflow.yaml").write_text(
        "spool:\n  root: spool\nartifacts:\n  store_root: shared/objects\n", encoding="utf-8"
    )
    code = """
        import mlflow
        with mlflow.start_run() as run:
            mlflow.log_text("configured", "x.txt")
        print(run.info.run_id)
    """
    run_id = run(zygote, code, project / "jobs", "spool:").stdout.split()[-1]
    (event,) = artifact_events(project / "spool", run_id)
    assert event["store"] == str(project / "shared" / "objects")
    assert stored_object_path(event["store"], event["digest"]).read_bytes() == b"configured"


# -- what is refused, by name, with nothing written ------------------------------------------

BAD = """
import json, os, mlflow
from mlflow import MlflowClient
os.makedirs("folder", exist_ok=True)
with open("folder/x.txt", "w") as f:
    f.write("x")
with open("file.txt", "w") as f:
    f.write("y")
calls = {
    "missing file": lambda: mlflow.log_artifact("no/such.txt"),
    "missing folder": lambda: mlflow.log_artifacts("no/such/folder"),
    "file as folder": lambda: mlflow.log_artifacts("file.txt"),
    "dotdot": lambda: mlflow.log_artifact("file.txt", "../outside"),
    "dotdot inside": lambda: mlflow.log_artifacts("folder", "a/../../b"),
    "dotdot text": lambda: mlflow.log_text("t", "../up.txt"),
    "absolute": lambda: mlflow.log_artifact("file.txt", "/etc"),
    "delete": lambda: client._tracking_client._get_artifact_repo(run_id).delete_artifacts("x"),
}
out = {}
with mlflow.start_run() as run:
    run_id = run.info.run_id
    client = MlflowClient()
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except Exception as exc:
            out[name] = [type(exc).__name__, getattr(exc, "error_code", ""), str(exc)]
print(json.dumps([run_id, out]))
"""


def test_bad_input_is_refused_by_name_and_writes_nothing(zygote: Zygote, tmp_path: Path) -> None:
    spool = tmp_path / "data" / "runs"
    run_id, out = last_json(run(zygote, BAD, tmp_path, spool_uri(spool)))
    culprits = {
        "missing file": "no/such.txt: no such file",
        "missing folder": "no/such/folder: no such folder",
        "file as folder": "file.txt: not a folder",
        "dotdot": "'../outside'",
        "dotdot inside": "'a/../../b'",
        "dotdot text": "'..'",
        "absolute": "'/etc'",
    }
    for name, words in culprits.items():
        kind, code, message = out[name]
        assert kind == "MlflowException" and code == "INVALID_PARAMETER_VALUE", out[name]
        assert words in message and run_id in message, (name, message)
    kind, code, message = out["delete"]
    assert "delete_artifacts() is not available on a spool" in message and "ff-sync" in message
    assert artifact_events(spool, run_id) == []
    assert objects(tmp_path / "data" / "artifacts") == []


def test_a_path_cannot_be_both_a_file_and_a_folder(zygote: Zygote, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    code = """
        import json, mlflow
        out = []
        with mlflow.start_run() as run:
            mlflow.log_text("a file", "model")
            for call in (lambda: mlflow.log_text("x", "model/inner.txt"),
                         lambda: mlflow.log_text("y", "plots/a.png"),
                         lambda: mlflow.log_text("z", "plots")):
                try:
                    call()
                    out.append(None)
                except Exception as exc:
                    out.append(str(exc))
        print(json.dumps([run.info.run_id, out]))
    """
    run_id, out = last_json(run(zygote, code, tmp_path, spool_uri(spool)))
    assert "'model' is already a file of the run" in out[0]
    assert out[1] is None
    assert "already has a folder of artifacts by that name" in out[2]
    assert [e["path"] for e in artifact_events(spool, run_id)] == ["model", "plots/a.png"]


NOBODY = 65534


@functools.cache
def _as_nobody() -> list[str] | None:
    """The prefix that runs a command as ``nobody`` (root reads mode-000 folders), or None."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import mlflow"], check=False)
    return prefix if probe.returncode == 0 else None


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every user can write (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="ff-artifacts-"))
    base.chmod(0o777)
    try:
        yield base
    finally:
        for dirpath, dirnames, _ in os.walk(base):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_an_unreadable_folder_or_file_is_named_and_nothing_is_logged(open_folder: Path) -> None:
    prefix = _as_nobody()
    if prefix is None:
        pytest.skip("cannot run a script as an unprivileged user here")
    code = """
        import json, os, mlflow
        out = {}
        with mlflow.start_run() as run:
            for name, call in (
                ("folder", lambda: mlflow.log_artifacts("tree", "t")),
                ("file", lambda: mlflow.log_artifacts("flat", "f")),
            ):
                try:
                    call()
                    out[name] = None
                except Exception as exc:
                    out[name] = [getattr(exc, "error_code", ""), str(exc)]
        print(json.dumps([run.info.run_id, out]))
    """
    for folder in ("tree/ok", "tree/locked", "flat"):
        (open_folder / folder).mkdir(parents=True)
    (open_folder / "tree" / "ok" / "a.txt").write_text("a")
    (open_folder / "tree" / "locked" / "b.txt").write_text("b")
    (open_folder / "flat" / "a.txt").write_text("a")
    (open_folder / "flat" / "secret.txt").write_text("s")
    (open_folder / "flat" / "secret.txt").chmod(0o000)
    (open_folder / "tree" / "locked").chmod(0o000)
    (open_folder / SCRIPT).write_text(textwrap.dedent(code), encoding="utf-8")
    spool = open_folder / "data" / "runs"
    env = child_env(
        {"MLFLOW_TRACKING_URI": spool_uri(spool), "HOME": str(open_folder), "TMPDIR": "/tmp"}
    )
    proc = subprocess.run(
        [*prefix, sys.executable, SCRIPT],
        cwd=open_folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    run_id, out = last_json(proc)
    assert "tree/locked" in out["folder"][1] and "Permission denied" in out["folder"][1]
    assert out["folder"][0] == "INVALID_PARAMETER_VALUE"
    assert "secret.txt" in out["file"][1] and "Permission denied" in out["file"][1]
    assert artifact_events(spool, run_id) == []
    # The unreadable folder is found before anything is stored.
    store = open_folder / "data" / "artifacts"
    assert {sha(p.read_bytes()) for p in objects(store)} <= {sha(b"a")}


# -- kill safety ----------------------------------------------------------------------------

KILLED = """
import hashlib, os, signal, mlflow
with mlflow.start_run() as run:
    print(run.info.run_id, flush=True)
    for i in range(3):
        with open(f"f{i}.bin", "wb") as f:
            f.write(os.urandom(1000 + i))
        mlflow.log_artifact(f"f{i}.bin", "files")
    with open("ack", "w") as f:
        f.write(hashlib.sha256(open("f2.bin", "rb").read()).hexdigest())
    mlflow.log_artifact("f2.bin", "last")
    os.kill(os.getpid(), signal.SIGKILL)   # right after the call returned
"""


@pytest.mark.parametrize("durability", ["write", "buffered"])
def test_sigkill_right_after_a_returned_log_artifact_loses_nothing(
    zygote: Zygote, tmp_path: Path, durability: str
) -> None:
    spool = tmp_path / "data" / "runs"
    proc = run(
        zygote, KILLED, tmp_path, spool_uri(spool), {"FF_DURABILITY": durability}, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_id = proc.stdout.split()[0]
    found = {e["path"]: e for e in artifact_events(spool, run_id)}
    assert sorted(found) == ["files/f0.bin", "files/f1.bin", "files/f2.bin", "last/f2.bin"]
    for i in range(3):
        data = (tmp_path / f"f{i}.bin").read_bytes()
        event = found[f"files/f{i}.bin"]
        assert event["digest"] == sha(data) and event["size"] == len(data)
        assert stored_object_path(event["store"], event["digest"]).read_bytes() == data
    assert found["last/f2.bin"]["digest"] == "sha256:" + (tmp_path / "ack").read_text()


KILL_LOOP = """
import os, mlflow
ack = os.open("acks", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
with mlflow.start_run() as run:
    os.write(ack, (run.info.run_id + "\\n").encode())
    i = 0
    while True:
        with open("f.bin", "wb") as f:
            f.write(i.to_bytes(8, "big") * (1 + i % 5000))
        mlflow.log_artifact("f.bin", f"step{i}")
        os.write(ack, f"{i}\\n".encode())
        i += 1
"""


def test_sigkill_at_any_moment_keeps_every_acknowledged_file(
    zygote: Zygote, tmp_path: Path
) -> None:
    spool = tmp_path / "data" / "runs"
    (tmp_path / SCRIPT).write_text(textwrap.dedent(KILL_LOOP), encoding="utf-8")
    child = zygote.start([SCRIPT], tmp_path, child_env({"MLFLOW_TRACKING_URI": spool_uri(spool)}))
    acks = tmp_path / "acks"
    deadline = time.monotonic() + 120
    while (acks.read_bytes().count(b"\n") if acks.exists() else 0) < 20:
        assert time.monotonic() < deadline, "the script acknowledged too few files"
        time.sleep(0.01)
    os.killpg(child.pid, signal.SIGKILL)
    assert zygote.wait(child, 60).returncode == -signal.SIGKILL
    run_id, *steps = acks.read_text().split()
    found = {e["path"]: e for e in artifact_events(spool, run_id)}
    for i in map(int, steps):
        data = i.to_bytes(8, "big") * (1 + i % 5000)
        event = found[f"step{i}/f.bin"]
        assert event["digest"] == sha(data), i
        assert stored_object_path(event["store"], event["digest"]).read_bytes() == data
    # Nothing logged that was not the script's: at most the call in flight beyond the acks.
    assert len(found) <= len(steps) + 1


# -- in one process (quick) ------------------------------------------------------------------


@pytest.fixture
def in_process(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> Iterator[None]:
    """MLflow's client in this process, in ``tmp_path`` with no configuration."""
    clean_env.chdir(tmp_path)
    yield
    import mlflow.tracking._model_registry.utils as registry

    registry._registry_uri = None  # a spool store sets it (see test_store.py)


@pytest.mark.usefixtures("in_process")
def test_client_calls_in_process_log_list_and_download(tmp_path: Path) -> None:
    spool = tmp_path / "data" / "runs"
    client = MlflowClient(tracking_uri=spool_uri(spool))
    run_id = client.create_run("0").info.run_id
    (tmp_path / "src" / "d").mkdir(parents=True)
    (tmp_path / "src" / "d" / "x.txt").write_bytes(b"xx")
    (tmp_path / "src" / "y.txt").write_bytes(b"yyy")
    client.log_artifact(run_id, str(tmp_path / "src"))  # a folder: under its name
    client.log_artifacts(run_id, str(tmp_path / "src"), "flat")
    client.log_dict(run_id, {"k": 1}, "cfg.json")
    listing = [(f.path, f.is_dir, f.file_size) for f in client.list_artifacts(run_id)]
    assert listing == [("cfg.json", False, 12), ("flat", True, None), ("src", True, None)]
    assert [(f.path, f.file_size) for f in client.list_artifacts(run_id, "src/d")] == [
        ("src/d/x.txt", 2)
    ]
    assert client.list_artifacts(run_id, "src/y.txt") == []
    assert client.list_artifacts(run_id, "nowhere") == []
    got = Path(client.download_artifacts(run_id, "", str(tmp_path / "dl")))
    assert tree_digests(got) == {
        "cfg.json": sha(b'{\n  "k": 1\n}'),
        "flat/d/x.txt": sha(b"xx"),
        "flat/y.txt": sha(b"yyy"),
        "src/d/x.txt": sha(b"xx"),
        "src/y.txt": sha(b"yyy"),
    }
    client.set_terminated(run_id)
    with pytest.raises(MlflowException, match="no such file") as info:
        client.log_artifact(run_id, str(tmp_path / "missing.txt"))
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException) as info:
        client.download_artifacts(run_id, "src/nothing.txt", str(tmp_path))
    assert len(artifact_events(spool, run_id)) == 5
    assert client.get_run(run_id).info.status == "FINISHED"


def test_the_documented_example_logs_its_files(zygote: Zygote, tmp_path: Path) -> None:
    text = (REPO_ROOT / "docs" / "mlflow-dropin.md").read_text(encoding="utf-8")
    section = text.split("## Artifacts: files of a run", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"weights")
    (tmp_path / "plots" / "epoch").mkdir(parents=True)
    (tmp_path / "plots" / "loss.png").write_bytes(b"png")
    (tmp_path / "plots" / "epoch" / "1.png").write_bytes(b"png1")
    spool = tmp_path / "data" / "runs"
    run(zygote, code, tmp_path, spool_uri(spool))
    (run_id,) = [p.name for p in spool.iterdir() if not p.name.startswith(".")]
    found = {e["path"]: e for e in artifact_events(spool, run_id)}
    assert sorted(found) == ["checkpoints/last.pt", "config/train.json", "epoch/1.png", "loss.png"]
    store = tmp_path / "data" / "artifacts"
    assert stored_object_path(store, found["checkpoints/last.pt"]["digest"]).read_bytes() == (
        b"weights"
    )


@pytest.mark.usefixtures("in_process")
def test_artifact_uris_split_at_the_run_folder_whatever_the_paths_hold(tmp_path: Path) -> None:
    root = tmp_path / "artifacts" / "runs"  # a spool root with an "artifacts" folder above it
    client = MlflowClient(tracking_uri=spool_uri(root))
    run_id = client.create_run("0").info.run_id
    uri = client.get_run(run_id).info.artifact_uri
    assert uri == f"{spool_uri(root)}/{run_id}/artifacts"
    for tracking in (None, spool_uri(root)):
        assert parse_artifact_uri(uri, tracking) == Location(root, run_id, "")
        deep = parse_artifact_uri(f"{uri}/a/artifacts/b", tracking)
        assert deep == Location(root, run_id, "a/artifacts/b")
    with pytest.raises(ValidationError, match="names no run's artifacts"):
        parse_artifact_uri(spool_uri(tmp_path / "elsewhere"))
    client.log_text(run_id, "deep", "a/artifacts/b/c.txt")
    assert [f.path for f in client.list_artifacts(run_id, "a/artifacts")] == ["a/artifacts/b"]
    assert [e["path"] for e in artifact_events(root, run_id)] == ["a/artifacts/b/c.txt"]
