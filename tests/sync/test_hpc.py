"""HPC life of a run: requeued and SIGKILLed writers, concurrent ranks, dead runs, the
watcher, spool garbage collection, and the recipes' unit files.

Real child processes write the spools, a real SQLite MLflow store receives them.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from formula_foundry.sync.commands.gc import collect_garbage, default_archive
from tests.sync.conftest import FF_SYNC, Destination, Project

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "docs" / "recipes"

# One writer process of a run: FF_RUN_ID names the run; it logs points [base, base + n),
# then either ends the run or says "ready" and waits to be killed (or for a "go" file).
WRITER = """
import os, sys, time
from pathlib import Path
from formula_foundry.tracking import get_tracker
tracker = get_tracker()
run = tracker.start_run(run_name="job")
base, n, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for i in range(base, base + n):
    run.log_metric("loss", float(i), step=i)
if mode == "end":
    run.end()
    print("done", flush=True)
    sys.exit(0)
print("ready", flush=True)
while not Path("go").exists():
    time.sleep(0.05)
run.end()
print("done", flush=True)
"""


def _writer(project: Project, run_id: str, base: int, n: int, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER), str(base), str(n), mode],
        cwd=project.root,
        env=project.env(FF_RUN_ID=run_id),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc


def _expect(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == line


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _last_t(run_dir: Path) -> int:
    """The largest event time in a run's segments (heartbeats included)."""
    best = 0
    for seg in run_dir.glob("seg-*.jsonl"):
        for raw in seg.read_bytes().splitlines():
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("t"), int) and "k" in rec:
                best = max(best, rec["t"])
    return best


def _store(db: Path) -> dict[str, tuple[str, int, int | None]]:
    """ff.run_uuid -> (status, metric rows, end_time), read straight from the SQLite store."""
    if not db.exists():
        return {}
    con = sqlite3.connect(db, timeout=30)
    try:
        rows = con.execute(
            "SELECT t.value, r.status, r.end_time, "
            "(SELECT COUNT(*) FROM metrics m WHERE m.run_uuid = r.run_uuid) "
            "FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'ff.run_uuid'"
        ).fetchall()
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()
    return {uuid: (status, n, end) for uuid, status, end, n in rows}


def test_requeued_run_written_by_three_processes(project: Project) -> None:
    run_id = "slurm-job-7"
    for k, mode in enumerate(("wait", "wait", "end")):
        proc = _writer(project, run_id, 100 * k, 100, mode)
        try:
            _expect(proc, "ready" if mode == "wait" else "done")
            if mode == "wait":
                _kill(proc)  # SIGKILL mid-stream: no end event
            else:
                assert proc.wait(timeout=60) == 0
        finally:
            proc.kill()
            proc.wait()
        assert project.sync().exit_code == 0
        run = project.snapshot()["runs"][run_id]
        assert run["status"] == ("FINISHED" if mode == "end" else "RUNNING")
    snap = project.snapshot()
    assert list(snap["runs"]) == [run_id] and snap["duplicates"] == {}
    steps = [p[0] for p in snap["runs"][run_id]["metrics"]["loss"]]
    assert steps == list(range(300))  # every event once
    assert len(list((project.spool_root / run_id).glob("seg-*.jsonl"))) == 3


ATTACHED = """
import sys
from formula_foundry.tracking import get_tracker
tracker = get_tracker()
run = tracker.attach_run(sys.argv[1])
rank = int(sys.argv[2])
for i in range(250):
    run.log_metric(f"rank{rank}", float(i), step=i)
run.end()
"""


def test_four_ranks_log_into_one_run(project: Project) -> None:
    owner = _writer(project, "ddp-run", 0, 10, "wait")
    try:
        _expect(owner, "ready")
        ranks = [
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(ATTACHED), "ddp-run", str(r)],
                cwd=project.root,
                env=project.env(),
            )
            for r in range(4)
        ]
        assert project.sync().exit_code == 0  # a pass while the ranks write
        assert [p.wait(timeout=60) for p in ranks] == [0, 0, 0, 0]
        (project.root / "go").touch()
        _expect(owner, "done")
        assert owner.wait(timeout=30) == 0
    finally:
        owner.kill()
        owner.wait()
    assert project.sync().exit_code == 0
    snap = project.snapshot()
    assert list(snap["runs"]) == ["ddp-run"] and snap["duplicates"] == {}
    run = snap["runs"]["ddp-run"]
    assert run["status"] == "FINISHED"
    for r in range(4):
        assert [p[0] for p in run["metrics"][f"rank{r}"]] == list(range(250))
    assert len(run["metrics"]["loss"]) == 10


def test_dead_run_is_killed_then_revived_by_resume(
    project: Project, destination: Destination
) -> None:
    dead = f"dead-run-{destination.unique}"  # run ids are unique on the shared server
    proc = _writer(project, dead, 0, 20, "wait")
    try:
        _expect(proc, "ready")
        _kill(proc)
    finally:
        proc.kill()
        proc.wait()
    last = _last_t(project.spool_root / dead)
    first = project.ff_sync("--stale-after", "1")  # synced, but still within the second
    assert first.returncode == 0, first.stderr
    assert project.snapshot()["runs"][dead]["status"] == "RUNNING"
    time.sleep(max(0.0, last / 1000 + 1.3 - time.time()))

    killed = project.ff_sync("--stale-after", "1")
    assert killed.returncode == 0, killed.stderr
    assert "1 dead run ended" in killed.stdout
    run = project.snapshot()["runs"][dead]
    assert (run["status"], run["end_time"]) == ("KILLED", last)
    again = project.ff_sync("--stale-after", "1")
    assert "nothing new" in again.stdout and "dead run" not in again.stdout  # not redone

    resumed = _writer(project, dead, 20, 5, "wait")
    try:
        _expect(resumed, "ready")
        assert project.ff_sync("--stale-after", "1").returncode == 0
        run = project.snapshot()["runs"][dead]
        assert run["status"] == "RUNNING"
        (project.root / "go").touch()
        _expect(resumed, "done")
        assert resumed.wait(timeout=30) == 0
    finally:
        resumed.kill()
        resumed.wait()
    assert project.ff_sync("--stale-after", "1").returncode == 0
    run = project.snapshot()["runs"][dead]
    assert run["status"] == "FINISHED" and run["end_time"] > last
    assert [p[0] for p in run["metrics"]["loss"]] == list(range(25))


SHORT_RUN = """
import sys
with tracker.start_run(run_id=sys.argv[1], run_name=sys.argv[1]) as run:
    for i in range(30):
        run.log_metric("x", float(i), step=i)
"""


def _wait_for(db: Path, run_id: str, deadline: float) -> float:
    while time.monotonic() < deadline:
        got = _store(db).get(run_id)
        if got is not None and got[:2] == ("FINISHED", 30):
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"{run_id} not synced in time")


def test_watch_syncs_within_two_intervals_and_stops_on_sigterm(
    project: Project, tmp_path: Path
) -> None:
    log = (tmp_path / "watch.log").open("w")
    watcher = subprocess.Popen(
        [FF_SYNC, "--config", str(project.config), "watch", "--interval", "1"],
        cwd=project.root,
        env=project.env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        project.spool(SHORT_RUN, "warm-up")  # the first busy pass imports MLflow
        _wait_for(project.db, "warm-up", time.monotonic() + 60)
        project.spool(SHORT_RUN, "measured")
        written = time.monotonic()
        seen = _wait_for(project.db, "measured", written + 10)
        assert seen - written <= 2 * 1.0 + 1.0  # two intervals (+ the pass itself)
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=15) == 0
    finally:
        watcher.kill()
        watcher.wait()
        log.close()
    text = (tmp_path / "watch.log").read_text()
    assert "stopped after" in text
    again = project.ff_sync("watch", "--interval", "0.2", "--max-passes", "2")
    assert again.returncode == 0, again.stderr
    snap = project.snapshot()
    assert snap["duplicates"] == {} and sorted(snap["runs"]) == ["measured", "warm-up"]
    assert all(len(r["metrics"]["x"]) == 30 for r in snap["runs"].values())


def test_watch_survives_an_unavailable_destination(project: Project, tmp_path: Path) -> None:
    project.spool(SHORT_RUN, "r1")
    bad = "postgresql://ff:s3cret@127.0.0.1:9/mlflow"  # nothing listens on port 9
    done = project.ff_sync(
        "--tracking-uri", bad, "watch", "--interval", "0.2", "--max-passes", "2", timeout=120
    )
    assert done.returncode == 0, done.stderr
    retries = [line for line in done.stderr.splitlines() if "retrying in the next" in line]
    assert len(retries) == 2 and "s3cret" not in done.stderr


# -- gc -------------------------------------------------------------------------------------

DRIVER = """
import sys
from formula_foundry.tracking import get_tracker
tracker = get_tracker()
run = None
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "start":
        run = tracker.start_run(run_id=arg[0], run_name=arg[0])
        step = 0
    elif cmd == "log":
        for _ in range(int(arg[0])):
            run.log_metric("m", float(step), step=step)
            step += 1
    elif cmd == "end":
        run.end()
        run = None
    print("ok", flush=True)
"""


class _Driver:
    """A long-lived writer taking commands on stdin (one active run at a time)."""

    def __init__(self, project: Project) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(DRIVER)],
            cwd=project.root,
            env=project.env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def __call__(self, *cmd: Any) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(map(str, cmd)) + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.mark.parametrize("seed", [1, 2])
def test_gc_never_removes_an_unsynced_event(project: Project, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    other_db = tmp_path / "other.db"
    other = f"sqlite:///{other_db}"
    archive = tmp_path / "archive"
    driver = _Driver(project)
    expected: dict[str, int] = {}
    ended: set[str] = set()
    current: str | None = None
    collected: set[str] = set()
    destinations = [project.db]  # gc consults destinations that have a state folder
    try:
        for op in range(24):
            choice = rng.choice(["log", "log", "end", "sync", "sync", "sync_other", "gc", "gc"])
            if choice == "log":
                if current is None:
                    current = f"run-{seed}-{op}"
                    driver("start", current)
                    expected[current] = 0
                n = rng.randint(1, 40)
                driver("log", n)
                expected[current] += n
            elif choice == "end" and current is not None:
                driver("end")
                ended.add(current)
                current = None
            elif choice == "sync":
                project.sync()
            elif choice == "sync_other":
                project.sync(tracking_uri=other)
                destinations.append(other_db)
            elif choice == "gc":
                delete = rng.random() < 0.3
                report = collect_garbage(
                    load_settings_for(project),
                    0,
                    archive=None if delete else archive,
                    delete=delete,
                )
                collected |= set(report.collected)
                # Whatever gc took is complete and ended in *every* destination.
                for db in set(destinations):
                    store = _store(db)
                    for run_id in report.collected:
                        assert run_id in ended
                        assert store[run_id][:2] == ("FINISHED", expected[run_id]), (db, run_id)
                # ... and whatever it left is still in the spool.
                for run_id in set(expected) - collected:
                    assert (project.spool_root / run_id).is_dir()
        if current is not None:
            driver("end")
            ended.add(current)
    finally:
        driver.close()

    # Everything in MLflow (A), then archive all, then a fresh store from the archive: equal.
    assert project.sync().exit_code == 0
    assert project.sync(tracking_uri=other).exit_code == 0
    settings = load_settings_for(project)
    report = collect_garbage(settings, 0, archive=archive)
    deleted = collected - {p.name for p in archive.iterdir()} if archive.exists() else collected
    assert not list(project.spool_root.iterdir()) or all(
        not any(p.glob("seg-*")) for p in project.spool_root.iterdir()
    )
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert project.sync(tracking_uri=fresh, spool_root=archive).exit_code == 0
    original = project.snapshot()
    for run_id in deleted:
        original["runs"].pop(run_id)
    assert project.snapshot(fresh)["runs"] == original["runs"]
    assert set(original["runs"]) == set(expected) - deleted
    assert report.collected or not expected


def load_settings_for(project: Project) -> Any:
    from formula_foundry.sync import load_sync_settings

    return load_sync_settings(project.config)


def test_gc_cli_dry_run_default_archive_and_replay(project: Project) -> None:
    out = project.spool(SHORT_RUN, "done-run")
    assert out == ""
    busy = _writer(project, "busy-run", 0, 5, "wait")
    try:
        _expect(busy, "ready")
        assert project.ff_sync().returncode == 0
        dry = project.ff_sync("gc", "--older-than", "0", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would archive" in dry.stderr and "done-run" in dry.stderr
        assert "busy-run" not in dry.stderr and (project.spool_root / "done-run").is_dir()
        assert "archived 0" not in dry.stdout and "would archive 1" in dry.stdout
        young = project.ff_sync("gc", "--older-than", "3600")
        assert "archived 0 run folders" in young.stdout
        real = project.ff_sync("gc", "--older-than", "0")
        assert real.returncode == 0, real.stderr
    finally:
        busy.kill()
        busy.wait()
    archive = default_archive(load_settings_for(project))
    assert archive == project.root / "data" / "runs-archive"
    assert not (project.spool_root / "done-run").exists() and (archive / "done-run").is_dir()
    assert (project.spool_root / "busy-run").is_dir()  # never ended: kept
    # The same destination again with the archive as spool: nothing new, nothing doubled.
    same = project.ff_sync("--spool-root", str(archive))
    assert "nothing new" in same.stdout
    both = project.ff_sync("gc", "--older-than", "0", "--archive", "x", "--delete")
    assert both.returncode == 2


# -- recipes --------------------------------------------------------------------------------


def test_recipes_unit_files_and_job_script_parse(tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(RECIPES / "slurm-job.sbatch")]).returncode == 0
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    units = sorted([*RECIPES.glob("*.service"), *RECIPES.glob("*.timer")])
    assert {u.name for u in units} >= {"ff-sync.service", "ff-sync.timer", "ff-sync-watch.service"}
    for unit in units:
        text = unit.read_text().replace("/opt/formula-foundry/.venv/bin/ff-sync", FF_SYNC)
        (tmp_path / unit.name).write_text(text.replace("/opt/formula-foundry", str(tmp_path)))
    result = subprocess.run(
        [analyze, "verify", *(f"./{u.name}" for u in units)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    assert result.returncode == 0, result.stderr
    assert "Unknown" not in result.stderr and "not executable" not in result.stderr
