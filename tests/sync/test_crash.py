"""Exactly once under crashes: ff-sync SIGKILLed at random moments, again and again, then let
finish, leaves MLflow in the state one uninterrupted pass gives — no duplicate run, point,
param, tag or artifact reference.

Kill points are drawn from a seeded RNG (``FF_CRASH_SEED``; the seed and every delay are in
the failure message) uniformly over the duration of an uninterrupted pass, so kills land in
store creation, run creation, batches, status updates and progress records. Each chain starts
from its own empty destination: kill → kill → … → a pass that completes → compare. One chain
also deletes the sync state after every kill; another kills real ``ff-sync`` processes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import FF_SYNC, Project

MIN_KILLS = 50
MAX_CHAINS = 24
ATTEMPTS_PER_CHAIN = 7
REOPEN_S = 0.4  # about what a pass spends opening an existing store

CRASH_SPOOL = """
import math
experiments = ["formula-foundry", "ff-m2-simulation", "formula-foundry"]
with tracker.start_run(run_name="pipeline", tags={"stage": "all"}) as parent:
    parent.log_params({f"p{i}": i for i in range(30)})
    for i in range(2500):
        parent.log_metric("loss", 1.0 / (i + 1), step=i)
        parent.log_metric("lr", 0.1 * 0.999 ** i, step=i)
        if i % 250 == 0:
            parent.set_tag("progress", str(i))
            parent.log_artifact_reference(f"ckpt/step-{i}.pt", "sha256:" + format(i, "064x"), i)
    for c in range(3):
        name = f"child-{c}"
        with tracker.start_run(run_name=name, nested=True, experiment_name=experiments[c]) as ch:
            ch.log_params({"solver": "fdtd", "index": c})
            for i in range(1200):
                ch.log_metrics({"sim": math.sin(i), "err": 1e-3 * i}, step=i)
            ch.set_tags({"done": "yes", "mlflow.note.content": "child run"})
            with tracker.start_run(run_name=f"grand-{c}", nested=True) as g:
                g.log_metric("g", float(c), step=c)
                g.log_metric("nan", math.nan)
    parent.log_metric("final", -math.inf)
"""


class Zygote:
    """Drives ``crash_zygote.py``: forked ``ff-sync`` passes, killed on request."""

    def __init__(self, project: Project) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("crash_zygote.py"))],
            cwd=project.root,
            env=project.env(PYTHONPATH=str(Path(__file__).parent)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, args: list[str], delay: float | None, log: Path) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"args": args, "delay": delay, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def zygote(project: Project) -> Iterator[Zygote]:
    z = Zygote(project)
    try:
        yield z
    finally:
        z.close()


def test_sigkill_at_random_moments_converges_to_one_uninterrupted_sync(
    project: Project, zygote: Zygote, tmp_path: Path
) -> None:
    seed = int(os.environ.get("FF_CRASH_SEED", "4041"))
    rng = random.Random(seed)
    project.spool(CRASH_SPOOL)
    logs = tmp_path / "logs"
    logs.mkdir()
    base = ["--config", str(project.config), "-q"]

    ref_uri = f"sqlite:///{tmp_path / 'reference.db'}"
    ref = zygote.run([*base, "--tracking-uri", ref_uri], None, logs / "reference.log")
    assert ref["rc"] == 0, (logs / "reference.log").read_text()
    full = float(ref["elapsed"])
    reference = project.snapshot(ref_uri)
    assert reference["duplicates"] == {} and len(reference["runs"]) == 7
    assert sum(len(h) for r in reference["runs"].values() for h in r["metrics"].values()) > 9000

    kills: list[tuple[int, int, float]] = []
    chain = 0
    while len(kills) < MIN_KILLS and chain < MAX_CHAINS:
        chain += 1
        uri = f"sqlite:///{tmp_path / f'chain-{chain}.db'}"
        forget_state = chain == 2  # this chain loses the sync state after every kill
        args = [*base, "--tracking-uri", uri]
        # Draw each kill over what is probably left of the work, so most attempts die.
        left = full
        for attempt in range(ATTEMPTS_PER_CHAIN):
            delay = rng.uniform(0.01, 0.85 * left)
            left = max(left - max(delay - REOPEN_S, 0.0), 2 * REOPEN_S)
            log = logs / f"chain-{chain}-{attempt}.log"
            out = zygote.run(args, delay, log)
            if not out["killed"]:
                assert out["rc"] == 0, log.read_text()
                break
            kills.append((chain, attempt, round(delay, 3)))
            if forget_state:
                shutil.rmtree(project.state_folder(uri), ignore_errors=True)
        final = zygote.run(args, None, logs / f"chain-{chain}-final.log")
        where = f"seed {seed}, chain {chain}, kills {[k for k in kills if k[0] == chain]}"
        assert final["rc"] == 0, f"{where}: {(logs / f'chain-{chain}-final.log').read_text()}"
        assert project.snapshot(uri) == reference, where
        idle = zygote.run([*args[:-1], uri], None, logs / f"chain-{chain}-idle.log")
        assert idle["rc"] == 0
        assert "nothing new: 0 runs, 0 events" in (logs / f"chain-{chain}-idle.log").read_text()
        assert not (project.state_folder(uri) / "quarantine.jsonl").exists(), where
    assert len(kills) >= MIN_KILLS, f"seed {seed}: only {len(kills)} kills landed"
    print(f"crash test: seed {seed}, {len(kills)} kills in {chain} chains, pass {full:.2f} s")


def test_sigkilled_ff_sync_processes_converge_too(project: Project, tmp_path: Path) -> None:
    """The same with real ``ff-sync`` processes (the import of MLflow included)."""
    seed = int(os.environ.get("FF_CRASH_SEED", "4041"))
    rng = random.Random(seed + 1)
    project.spool(CRASH_SPOOL)
    ref_uri = f"sqlite:///{tmp_path / 'reference.db'}"
    started = time.monotonic()
    assert project.ff_sync("--tracking-uri", ref_uri).returncode == 0
    full = time.monotonic() - started
    uri = f"sqlite:///{tmp_path / 'killed.db'}"
    kills = []
    for _ in range(4):
        proc = subprocess.Popen(
            [FF_SYNC, "--config", str(project.config), "--tracking-uri", uri],
            cwd=project.root,
            env=project.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        delay = rng.uniform(0.5, full)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            kills.append(round(delay, 3))
        proc.wait()
    result = project.ff_sync("--tracking-uri", uri)
    assert result.returncode == 0, result.stderr
    assert kills, "no kill landed"
    assert project.snapshot(uri) == project.snapshot(ref_uri), f"seed {seed}, kills {kills}"
