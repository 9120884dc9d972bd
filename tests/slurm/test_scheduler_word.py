"""The scheduler's word on dead runs: ff-sync asks Slurm before it waits for silence."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import Slurm

# One cluster per session: every Slurm test runs on the same pytest-xdist worker.
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

# A run that is killed outright: no end event ever reaches the spool.
DIES = """
import os, signal, sys
from formula_foundry.tracking import get_tracker
run = get_tracker().start_run(run_name=sys.argv[1])
for i in range(3):
    run.log_metric("x", i, step=i)
print(run.run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _env(slurm: Slurm, spool: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in slurm.env.items() if not k.startswith(("FF_", "MLFLOW_"))}
    return {**env, "FF_SPOOL_ROOT": str(spool), **extra}


def _sync(slurm: Slurm, spool: Path, db: Path, config: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "formula_foundry.sync"],
        cwd=config.parent,
        env=_env(slurm, spool, FF_CONFIG=str(config), MLFLOW_TRACKING_URI=f"sqlite:///{db}"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _runs(db: Path) -> dict[str, tuple[str, str | None]]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "select r.name, r.status, t.value from runs r left join tags t "
            "on t.run_uuid = r.run_uuid and t.key = 'ff.sync.end_reason'"
        ).fetchall()
    finally:
        con.close()
    return {name: (status, reason) for name, status, reason in rows}


def _config(tmp_path: Path, stale_after_s: float) -> Path:
    config = tmp_path / "mlflow.yaml"
    config.write_text(f"sync:\n  stale_after_s: {stale_after_s}\n", encoding="utf-8")
    return config


def test_a_run_whose_job_died_is_ended_in_the_first_pass(slurm: Slurm, tmp_path: Path) -> None:
    spool, db = tmp_path / "spool", tmp_path / "out.db"
    (tmp_path / "dies.py").write_text(DIES, encoding="utf-8")
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\nexec {sys.executable} {tmp_path / 'dies.py'} killed\n")
    job = slurm.sbatch(
        "-o", str(tmp_path / "out.txt"), str(script), cwd=tmp_path, env=_env(slurm, spool)
    )
    slurm.wait_state(job, ("FAILED", "COMPLETED"), timeout=180)
    # Silence alone would wait an hour; the scheduler says the job is over.
    done = _sync(slurm, spool, db, _config(tmp_path, 3600))
    assert _runs(db) == {"killed": ("KILLED", f"slurm job {job} {slurm.state(job)}")}
    assert "1 dead run ended" in done.stdout


def test_a_pending_job_keeps_its_run_open_and_its_end_ends_it(slurm: Slurm, tmp_path: Path) -> None:
    spool, db = tmp_path / "spool", tmp_path / "out.db"
    config = _config(tmp_path, 0)  # silence alone would end every open run at once
    held = slurm.sbatch("--hold", "--wrap", "sleep 1", cwd=tmp_path)
    try:
        assert slurm.state(held) == "PENDING"
        # The run's process belonged to that job (as a requeued job's did before it waits).
        (tmp_path / "dies.py").write_text(DIES, encoding="utf-8")
        subprocess.run(
            [sys.executable, str(tmp_path / "dies.py"), "waiting"],
            env=_env(slurm, spool, SLURM_JOB_ID=held),
            check=False,
            timeout=120,
        )
        _sync(slurm, spool, db, config)
        time.sleep(1.5)
        _sync(slurm, spool, db, config)  # an idle pass: the scheduler is asked again
        assert _runs(db) == {"waiting": ("RUNNING", None)}
    finally:
        slurm.run("scancel", held, check=False)
    slurm.wait_state(held, "CANCELLED", timeout=60)
    _sync(slurm, spool, db, config)
    assert _runs(db) == {"waiting": ("KILLED", f"slurm job {held} CANCELLED")}


def test_a_scheduler_that_does_not_answer_leaves_the_silence_rule(
    slurm: Slurm, tmp_path: Path
) -> None:
    spool, db = tmp_path / "spool", tmp_path / "out.db"
    held = slurm.sbatch("--hold", "--wrap", "sleep 1", cwd=tmp_path)
    try:
        (tmp_path / "dies.py").write_text(DIES, encoding="utf-8")
        subprocess.run(
            [sys.executable, str(tmp_path / "dies.py"), "silent"],
            env=_env(slurm, spool, SLURM_JOB_ID=held),
            check=False,
            timeout=120,
        )
        # A squeue that hangs (a controller that does not answer) comes first on PATH.
        fake = tmp_path / "bin"
        fake.mkdir()
        (fake / "squeue").write_text("#!/bin/sh\nexec sleep 60\n")
        os.chmod(fake / "squeue", 0o755)
        config = _config(tmp_path, 3600)
        env_path = f"{fake}:{os.environ['PATH']}"

        def sync_with_fake_squeue() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "formula_foundry.sync"],
                cwd=tmp_path,
                env=_env(
                    slurm,
                    spool,
                    FF_CONFIG=str(config),
                    MLFLOW_TRACKING_URI=f"sqlite:///{db}",
                    PATH=env_path,
                ),
                capture_output=True,
                text=True,
                timeout=300,
            )

        done = sync_with_fake_squeue()
        assert done.returncode == 0, done.stderr
        assert _runs(db) == {"silent": ("RUNNING", None)}
        # The second (idle) pass asks again, gets no answer, says so, and keeps the run open.
        again = sync_with_fake_squeue()
        assert "squeue did not answer" in again.stderr
        assert _runs(db) == {"silent": ("RUNNING", None)}
    finally:
        slurm.run("scancel", held, check=False)
