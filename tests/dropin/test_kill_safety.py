"""Kill safety of the drop-in: every MLflow call that returned survives ``kill -9``.

An unmodified fluent-API training loop logs through ``spool:`` (``synchronous=True`` and
``False`` mixed, ``log_metrics`` batches, ``MlflowClient.log_batch``) and acknowledges each
call *after* it returned, in an ack file of its own (one ``os.write`` per call). The test
SIGKILLs it at random moments; requeued jobs continue the same run through ``MLFLOW_RUN_ID``,
as Slurm's requeue would, from their last acknowledged step (their "checkpoint"). After each
sync every acknowledged point, param and tag must be in the MLflow store; at the end there is
one FINISHED run holding every step.

The random kill delays come from a seed printed in every failure message; set
``FF_TEST_KILL_SEED`` to replay one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from tests.dropin._compare import dump
from tests.dropin.conftest import child_env, ff_sync, run_script

# The training loop. Values depend on the step only, so a requeued job logs the same ones.
# START: first step to log; END: one past the last (huge for the jobs that get killed).
# DONE: end the run normally after the loop.
SCRIPT = """
import json, os, time

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

ack_fd = os.open(os.environ["ACK"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def ack(**what):
    os.write(ack_fd, json.dumps(what).encode() + b"\\n")


ack(begin=os.getpid())
mlflow.set_experiment("kill-safety")
run = mlflow.start_run()  # MLFLOW_RUN_ID set: continues that run
run_id = run.info.run_id
ack(run=run_id)
client = MlflowClient()
for i in range(int(os.environ["START"]), int(os.environ["END"])):
    sync = i % 2 == 0
    loss = 1.0 / (i + 1)
    mlflow.log_metric("loss", loss, step=i, synchronous=sync)
    ack(m=[["loss", i, loss]])
    if i % 3 == 0:
        mlflow.log_metrics({"acc": i / 7, "lr": 0.1 * i}, step=i, synchronous=not sync)
        ack(m=[["acc", i, i / 7], ["lr", i, 0.1 * i]])
    if i % 5 == 0:
        mlflow.log_param(f"p{i}", i, synchronous=sync)
        ack(p={f"p{i}": str(i)})
    if i % 7 == 0:
        mlflow.set_tag(f"seen{i}", f"step {i}", synchronous=not sync)
        ack(t={f"seen{i}": f"step {i}"})
    if i % 11 == 0:
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric("grad", i * 0.5, now, i), Metric("grad2", -i * 0.25, now, i)],
            params=[Param(f"b{i}", str(i))],
            tags=[RunTag("progress", str(i))],
            synchronous=sync,
        )
        ack(m=[["grad", i, i * 0.5], ["grad2", i, -i * 0.25]], p={f"b{i}": str(i)},
            t={"progress": str(i)})
    if i % 13 == 0:
        mlflow.log_params({f"q{i}": f"v{i}", f"r{i}": i * 2}, synchronous=not sync)
        ack(p={f"q{i}": f"v{i}", f"r{i}": str(i * 2)})
    ack(step=i)
if os.environ.get("DONE"):
    mlflow.end_run()
    ack(ended=run_id)
"""

KEYS = ("loss", "acc", "lr", "grad", "grad2")


def expected(n: int) -> tuple[dict[str, set[tuple[int, float]]], dict[str, str], dict[str, str]]:
    """What the script logs for steps 0..n-1: metric points, params, (non-system) tags."""
    points: dict[str, set[tuple[int, float]]] = {k: set() for k in KEYS}
    params: dict[str, str] = {}
    tags: dict[str, str] = {}
    for i in range(n):
        points["loss"].add((i, 1.0 / (i + 1)))
        if i % 3 == 0:
            points["acc"].add((i, i / 7))
            points["lr"].add((i, 0.1 * i))
        if i % 5 == 0:
            params[f"p{i}"] = str(i)
        if i % 7 == 0:
            tags[f"seen{i}"] = f"step {i}"
        if i % 11 == 0:
            points["grad"].add((i, i * 0.5))
            points["grad2"].add((i, -i * 0.25))
            params[f"b{i}"] = str(i)
            tags["progress"] = str(i)
        if i % 13 == 0:
            params[f"q{i}"] = f"v{i}"
            params[f"r{i}"] = str(i * 2)
    return points, params, tags


class Acks:
    """What the jobs acknowledged so far (read from the ack file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reset()

    def reset(self) -> None:
        self.points: dict[str, set[tuple[int, float]]] = {k: set() for k in KEYS}
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.progress = -1  # the last acknowledged value of the tag "progress"
        self.run_ids: list[str] = []
        self.last_step = -1
        self.calls = 0
        self.begins = 0
        self.ended: list[str] = []

    def read(self) -> Acks:
        """Parse the whole ack file again."""
        self.reset()
        lines = self.path.read_bytes().split(b"\n") if self.path.exists() else []
        # One os.write per line: a kill cannot leave half a line, but never trust it.
        for line in lines:
            if not line:
                continue
            rec: dict[str, Any] = json.loads(line)
            if "begin" in rec:
                self.begins += 1
            if "run" in rec:
                self.run_ids.append(rec["run"])
            if "ended" in rec:
                self.ended.append(rec["ended"])
            if "step" in rec:
                self.last_step = max(self.last_step, rec["step"])
            for key, step, value in rec.get("m", ()):
                self.points[key].add((step, value))
            self.params.update(rec.get("p", {}))
            for key, value in rec.get("t", {}).items():
                self.tags[key] = value
                if key == "progress":
                    self.progress = max(self.progress, int(value))
            self.calls += sum(k in rec for k in ("m", "p", "t"))
        return self

    def seen_lines(self) -> int:
        return self.path.read_bytes().count(b"\n") if self.path.exists() else 0


def store_run(db: Path) -> tuple[str, dict[str, Any]]:
    """The only run of ``db`` (name, dumped entry); fails if there is not exactly one."""
    data = dump(db)
    runs = {k: v for k, v in data.items() if k != "experiments"}
    assert len(runs) == 1, f"expected exactly one run, found {sorted(runs)}"
    ((name, entry),) = runs.items()
    return name, entry


def store_points(entry: dict[str, Any]) -> dict[str, set[tuple[int, float]]]:
    return {k: {(s, v) for s, v in pts} for k, pts in entry["metrics"].items()}


def assert_acks_stored(db: Path, acks: Acks, why: str) -> dict[str, Any]:
    """Every acknowledged point, param and tag is in the store, and nothing foreign is."""
    _, entry = store_run(db)
    got = store_points(entry)
    for key, want in acks.points.items():
        lost = sorted(want - got.get(key, set()))
        assert not lost, f"{why}: {len(lost)} acknowledged {key!r} points lost, e.g. {lost[:5]}"
    lost_params = {k: v for k, v in acks.params.items() if entry["params"].get(k) != v}
    assert not lost_params, f"{why}: acknowledged params lost or wrong: {lost_params}"
    lost_tags = {
        k: v for k, v in acks.tags.items() if k != "progress" and entry["tags"].get(k) != v
    }
    assert not lost_tags, f"{why}: acknowledged tags lost or wrong: {lost_tags}"
    if acks.progress >= 0:
        # Last write wins: a job may have written a later value it had no time to acknowledge.
        assert int(entry["tags"].get("progress", "-1")) >= acks.progress, (why, entry["tags"])
    # Whatever is stored is something the script logs (a step at most one past the acks).
    limit = acks.last_step + 2
    points, params, tags = expected(limit)
    for key, pts in got.items():
        assert pts <= points.get(key, set()), f"{why}: foreign {key!r} points {pts - points[key]}"
    assert set(entry["params"]) <= set(params), why
    assert {k: params[k] for k in entry["params"]} == entry["params"], why
    user_tags = {k: v for k, v in entry["tags"].items() if not k.startswith("mlflow.")}
    assert set(user_tags) <= set(tags) | {"progress"}, f"{why}: {user_tags}"
    return entry


def run_count(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute("select count(*) from runs").fetchone()[0])
    finally:
        con.close()


class Job:
    """One run of the training loop in a real child process, killed with SIGKILL on demand."""

    def __init__(self, work: Path, spool: Path, env: dict[str, str], n: int) -> None:
        self.out = (work / f"job{n}.out").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(work / "train.py")],
            cwd=work,
            env=child_env({"MLFLOW_TRACKING_URI": f"spool://{spool}", **env}),
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )

    def wait_for(self, acks: Acks, lines: int, timeout: float = 120.0) -> None:
        """Wait until the ack file has more than ``lines`` lines."""
        deadline = time.monotonic() + timeout
        while acks.seen_lines() <= lines:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"job exited {self.proc.returncode} before acknowledging:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"job acknowledged nothing in time:\n{self.output()}")
            time.sleep(0.002)

    def kill(self) -> None:
        assert self.proc.poll() is None, (
            f"job ended by itself ({self.proc.returncode}):\n{self.output()}"
        )
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def output(self) -> str:
        self.out.flush()
        return Path(self.out.name).read_text(encoding="utf-8", errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.out.close()


def seed() -> int:
    return int(os.environ.get("FF_TEST_KILL_SEED") or time.time_ns() % 1_000_000)


def kill_rounds(
    work: Path, spool: Path, acks: Acks, rng: random.Random, rounds: int, **env: str
) -> list[str]:
    """Start (then requeue) the job ``rounds`` times, each SIGKILLed at a random moment.

    The first job is killed after it printed its run id; later ones resume it (MLFLOW_RUN_ID),
    some killed while still starting (set_experiment, start_run), most while logging.
    """
    where = []
    for _ in range(rounds):
        acks.read()
        start = acks.last_step + 1
        extra = {"ACK": str(acks.path), "START": str(start), "END": "100000000", **env}
        if acks.run_ids:
            extra["MLFLOW_RUN_ID"] = acks.run_ids[0]
        lines = acks.seen_lines()
        job = Job(work, spool, extra, len(list(work.glob("job*.out"))))
        try:
            job.wait_for(acks, lines)  # 'begin': imports done, about to start the run
            if not acks.run_ids or rng.random() < 0.7:
                job.wait_for(acks, lines + 1)  # 'run': the run is started, logging begins
                delay = rng.uniform(0.0, 1.2)
                where.append(f"logging+{delay:.3f}s")
            else:
                delay = rng.uniform(0.0, 0.15)
                where.append(f"starting+{delay:.3f}s")
            time.sleep(delay)
            job.kill()
        finally:
            job.close()
    return where


def test_sigkilled_fluent_loop_loses_no_returned_call_and_requeue_finishes_one_run(
    tmp_path: Path,
) -> None:
    spool, store = tmp_path / "spool", tmp_path / "store"
    store.mkdir()
    db = store / "mlflow.db"
    (tmp_path / "train.py").write_text(textwrap.dedent(SCRIPT), encoding="utf-8")
    acks = Acks(tmp_path / "acks.jsonl")
    s = seed()
    rng = random.Random(s)

    # Three kills, then a sync that must hold every acknowledged call; three more kills of
    # jobs continuing that (already synced) run; the final sync checks them all.
    where = kill_rounds(tmp_path, spool, acks, rng, 3)
    acks.read()
    why = f"seed {s}, kills at {where}"
    assert len(set(acks.run_ids)) == 1, f"{why}: MLFLOW_RUN_ID did not continue the run"
    ff_sync(spool, db)
    entry = assert_acks_stored(db, acks, why)
    assert entry["status"] == "RUNNING", why  # killed, not stale yet: still running

    where += kill_rounds(tmp_path, spool, acks, rng, 3)
    acks.read()
    why = f"seed {s}, kills at {where}"
    assert len(set(acks.run_ids)) == 1, why
    assert acks.calls > 100, f"{why}: the jobs logged too little to test anything"

    # The requeued job that completes: from the last checkpoint to the end, then end_run.
    n_steps = acks.last_step + 1 + 300
    proc = run_script(
        SCRIPT,
        tmp_path,
        f"spool://{spool}",
        env={
            "ACK": str(acks.path),
            "START": str(acks.last_step + 1),
            "END": str(n_steps),
            "DONE": "1",
            "MLFLOW_RUN_ID": acks.run_ids[0],
        },
    )
    acks.read()
    assert acks.ended == acks.run_ids[:1], (why, proc.stdout, proc.stderr)
    assert len(set(acks.run_ids)) == 1, why
    ff_sync(spool, db)

    assert run_count(db) == 1, why
    name, entry = store_run(db)
    assert name.startswith("kill-safety/"), name
    assert entry["status"] == "FINISHED", why
    assert_acks_stored(db, acks, why)
    points, params, tags = expected(n_steps)
    got = store_points(entry)
    assert got == {k: v for k, v in points.items() if v}, why
    assert {s for s, _ in got["loss"]} == set(range(n_steps)), why
    # A step logged by a killed job and again by its requeue may hold two points (two wall
    # clock times); never more than one per job.
    jobs = acks.begins
    for key, pts in entry["metrics"].items():
        per_step: dict[int, int] = {}
        for step, _ in pts:
            per_step[step] = per_step.get(step, 0) + 1
        assert max(per_step.values()) <= jobs, (why, key)
    assert entry["params"] == params, why
    user_tags = {k: v for k, v in entry["tags"].items() if not k.startswith("mlflow.")}
    assert user_tags == tags, why
    assert entry["latest"]["loss"] == (n_steps - 1, 1.0 / n_steps), why

    check = ff_sync(spool, db, "verify", check=False)
    assert check.returncode == 0, f"{why}: ff-sync verify\n{check.stdout}\n{check.stderr}"


def test_the_check_catches_a_loss_buffered_durability_is_allowed(tmp_path: Path) -> None:
    """The same kill and check with ``FF_DURABILITY=buffered`` (documented to lose the last
    window on a kill): the check must see acknowledged calls missing, or it proves nothing."""
    spool, store = tmp_path / "spool", tmp_path / "store"
    store.mkdir()
    db = store / "mlflow.db"
    (tmp_path / "train.py").write_text(textwrap.dedent(SCRIPT), encoding="utf-8")
    acks = Acks(tmp_path / "acks.jsonl")
    # Kill once the run is logging for a while (the first block of 64 KiB is written).
    job = Job(
        tmp_path,
        spool,
        {"ACK": str(acks.path), "START": "0", "END": "100000000", "FF_DURABILITY": "buffered"},
        0,
    )
    try:
        job.wait_for(acks, 1)
        time.sleep(0.8)
        job.kill()
    finally:
        job.close()
    acks.read()
    assert acks.calls > 100
    ff_sync(spool, db)
    try:
        assert_acks_stored(db, acks, "buffered")
    except AssertionError as exc:
        assert "lost" in str(exc) or "found []" in str(exc), exc
    else:
        raise AssertionError("buffered writes lost nothing on SIGKILL: the check is blind")
