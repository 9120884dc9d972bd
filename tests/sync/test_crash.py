"""Exactly once under crashes: ff-sync SIGKILLed at random moments, again and again, then let
finish, leaves MLflow in the state one uninterrupted pass gives — no duplicate run, point,
param, tag or artifact reference.

Kill points are drawn from a seeded RNG (``FF_CRASH_SEED``; the seed and every delay are in
the failure message) uniformly over the duration of an uninterrupted pass, so kills land in
store creation, run creation, batches, status updates and progress records. Each chain starts
from its own empty destination: kill → kill → … → a pass that completes → compare. One chain
also deletes the sync state after every kill; another kills real ``ff-sync`` processes.

Both run on every destination (SQLite, PostgreSQL, the mlflow server; see ``Targets``).
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import FF_SYNC, Destination, Project, comparable

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


@dataclass
class Target:
    """One empty destination to crash a chain of passes into, and what it must end up holding.

    SQLite and PostgreSQL: the project's spool, a fresh store of the kind. The mlflow server
    (one per session, cannot be emptied): a spool of its own with the same code (new run ids),
    compared (runs and duplicates) with a SQLite sync of that same spool."""

    config: Path
    state: Project
    uri: str
    args: list[str]
    reference: Callable[[], dict[str, Any]]
    actual: Callable[[], dict[str, Any]]


class Targets:
    def __init__(
        self, project: Project, destination: Destination, zygote: Zygote | None, tmp_path: Path
    ) -> None:
        self.project, self.destination, self.zygote = project, destination, zygote
        self.tmp_path = tmp_path
        self.count = 0
        self._reference: dict[str, Any] | None = None

    def _sync(self, config: Path, uri: str, log: Path) -> float:
        args = ["--config", str(config), "-q", "--tracking-uri", uri]
        if self.zygote is not None:
            out = self.zygote.run(args, None, log)
            assert out["rc"] == 0, log.read_text()
            return float(out["elapsed"])
        started = time.monotonic()
        result = subprocess.run(
            [FF_SYNC, *args],
            cwd=self.project.root,
            env=self.project.env(),
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        return time.monotonic() - started

    def reference_pass(self, log: Path) -> tuple[float, dict[str, Any]]:
        """One uninterrupted pass into the destination kind: (seconds, what it gives)."""
        target = self.new()
        took = self._sync(target.config, target.uri, log)
        snap = target.actual()
        if self.destination.shared:
            assert snap == target.reference()  # the server gives what SQLite gives
        else:
            self._reference = snap  # the reference of every later chain
        return took, snap

    def new(self) -> Target:
        self.count += 1
        project, dest = self.project, self.destination
        if not dest.shared:
            uri = dest.fresh()
            assert uri is not None

            def reference() -> dict[str, Any]:
                assert self._reference is not None, "reference_pass first"
                return self._reference

            return Target(
                project.config,
                project,
                uri,
                ["--config", str(project.config), "-q", "--tracking-uri", uri],
                reference,
                lambda: project.snapshot(uri),
            )
        own = Project(self.tmp_path / f"spool-{self.count}", dest.uri, shared=True)
        own.configure()
        own.spool(CRASH_SPOOL)
        ref_uri = f"sqlite:///{own.root / 'reference.db'}"
        self._sync(own.config, ref_uri, own.root / "reference.log")
        expected = comparable(own.snapshot(ref_uri))
        return Target(
            own.config,
            own,
            dest.uri,
            ["--config", str(own.config), "-q", "--tracking-uri", dest.uri],
            lambda: expected,
            lambda: comparable(own.snapshot()),
        )


# How many kills must land, per destination: a pass into PostgreSQL or the server is slower
# and each chain there costs more (a spool of its own on the server), so fewer kills; every
# chain still ends with the full exactly-once comparison.
MIN_KILLS_BY_KIND = {"sqlite": MIN_KILLS, "postgresql": 30, "http": 12}
MAX_CHAINS_BY_KIND = {"sqlite": MAX_CHAINS, "postgresql": 14, "http": 6}


@pytest.mark.timeout(1500)  # the slow destinations on a loaded machine
def test_sigkill_at_random_moments_converges_to_one_uninterrupted_sync(
    project: Project, destination: Destination, zygote: Zygote, tmp_path: Path
) -> None:
    seed = int(os.environ.get("FF_CRASH_SEED", "4041"))
    rng = random.Random(seed)
    min_kills = MIN_KILLS_BY_KIND[destination.kind]
    max_chains = MAX_CHAINS_BY_KIND[destination.kind]
    if not destination.shared:
        project.spool(CRASH_SPOOL)
    logs = tmp_path / "logs"
    logs.mkdir()
    targets = Targets(project, destination, zygote, tmp_path)

    full, reference = targets.reference_pass(logs / "reference.log")
    assert reference["duplicates"] == {} and len(reference["runs"]) == 7
    assert sum(len(h) for r in reference["runs"].values() for h in r["metrics"].values()) > 9000

    kills: list[tuple[int, int, float]] = []
    chain = 0
    while len(kills) < min_kills and chain < max_chains:
        chain += 1
        target = targets.new()
        uri, args = target.uri, target.args
        forget_state = chain == 2  # this chain loses the sync state after every kill
        # Draw each kill over what is probably left of the work, so most attempts die.
        left = full
        for attempt in range(ATTEMPTS_PER_CHAIN):
            delay = rng.uniform(0.01, 0.85 * left)
            left = max(left - max(delay - REOPEN_S, 0.0), 2 * REOPEN_S)
            log = logs / f"chain-{chain}-{attempt}.log"
            out = zygote.run(args, delay, log)
            if not out["killed"]:
                assert out["rc"] == 0, log.read_text()
                if attempt == 0:  # a whole pass: recalibrate (the machine's load changes)
                    full = float(out["elapsed"])
                break
            kills.append((chain, attempt, round(delay, 3)))
            if forget_state:
                shutil.rmtree(target.state.state_folder(uri), ignore_errors=True)
        final = zygote.run(args, None, logs / f"chain-{chain}-final.log")
        where = f"{destination.kind}, seed {seed}, chain {chain}, "
        where += f"kills {[k for k in kills if k[0] == chain]}"
        assert final["rc"] == 0, f"{where}: {(logs / f'chain-{chain}-final.log').read_text()}"
        assert target.actual() == target.reference(), where
        idle = zygote.run(args, None, logs / f"chain-{chain}-idle.log")
        assert idle["rc"] == 0
        assert "nothing new: 0 runs, 0 events" in (logs / f"chain-{chain}-idle.log").read_text()
        assert not (target.state.state_folder(uri) / "quarantine.jsonl").exists(), where
    assert len(kills) >= min_kills, f"seed {seed}: only {len(kills)} kills landed"
    print(
        f"crash test ({destination.kind}): seed {seed}, {len(kills)} kills in {chain} chains, "
        f"pass {full:.2f} s"
    )


@pytest.mark.timeout(1500)  # the slow destinations on a loaded machine
def test_sigkilled_ff_sync_processes_converge_too(
    project: Project, destination: Destination, tmp_path: Path
) -> None:
    """The same with real ``ff-sync`` processes (the import of MLflow included)."""
    seed = int(os.environ.get("FF_CRASH_SEED", "4041"))
    rng = random.Random(seed + 1)
    if not destination.shared:
        project.spool(CRASH_SPOOL)
    targets = Targets(project, destination, None, tmp_path)
    full, _ = targets.reference_pass(tmp_path / "reference.log")
    kills: list[float] = []
    # A fresh target until a kill lands (at most three): a pass that outruns its kill point
    # leaves later processes nothing to do. The first kill point of a target comes in the
    # first 60 % of a whole process (the pass runs faster than the reference on a quieter
    # machine), the later ones anywhere.
    for _ in range(3):
        target = targets.new()
        for _ in range(4):
            proc = subprocess.Popen(
                [FF_SYNC, *target.args],
                cwd=project.root,
                env=project.env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            delay = rng.uniform(0.1, 0.95 if kills else 0.6) * full
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                kills.append(round(delay, 3))
            proc.wait()
        if kills:
            break
    result = subprocess.run(
        [FF_SYNC, *target.args], cwd=project.root, env=project.env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert kills, "no kill landed"
    where = f"{destination.kind}, seed {seed}, kills {kills}"
    assert target.actual() == target.reference(), where
