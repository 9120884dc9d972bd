"""The scheduler's word, state by state: how each Slurm state ``squeue`` can print decides a run.

tests/slurm/ checks the states a single-node Slurm produces here for real (FAILED, CANCELLED,
COMPLETED, TIMEOUT, PENDING, RUNNING); the states it cannot produce on demand (NODE_FAIL,
BOOT_FAIL, OUT_OF_MEMORY, DEADLINE, PREEMPTED with PreemptMode=CANCEL, the requeue holds) are
printed here by a stand-in ``squeue`` on PATH that answers like Slurm 22.05's
``squeue --noheader --states=all --format=%A|%T``, and logs each call it gets.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from formula_foundry.sync.engine.scheduler import ALIVE, ENDED, ask, slurm_states
from formula_foundry.sync.engine.sync_state import RunRecord

SQUEUE = """#!/bin/sh
echo "$@" >> "{calls}"
{body}
"""


def _squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    """A stand-in squeue first on PATH running ``body``; returns the file of its calls."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    script = folder / "squeue"
    script.write_text(SQUEUE.format(calls=calls, body=body))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
    return calls


def _run(uuid: str) -> RunRecord:
    return RunRecord(
        spool_run_id=uuid, mlflow_run_id="m-" + uuid, experiment_id="1", status="RUNNING"
    )


@pytest.mark.parametrize("state", sorted(ENDED))
def test_an_ended_state_ends_the_run_with_it_as_reason(
    state: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # squeue marks a state still being processed with "+" (CANCELLED+); the state is the same.
    _squeue(tmp_path, monkeypatch, f'echo "  41|{state}"\necho "42|{state}+"')
    verdict = ask([_run("a"), _run("b")], {"a": "slurm:41", "b": "slurm:42"})
    assert verdict.ended == {"a": f"slurm job 41 {state}", "b": f"slurm job 42 {state}"}
    assert (verdict.alive, verdict.warning) == (set(), None)


@pytest.mark.parametrize("state", sorted(ALIVE))
def test_an_alive_state_keeps_the_run_open(
    state: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _squeue(tmp_path, monkeypatch, f'echo "41|{state}"')
    verdict = ask([_run("a")], {"a": "slurm:41"})
    assert (verdict.ended, verdict.alive, verdict.warning) == ({}, {"a"}, None)


def test_an_unknown_state_or_job_leaves_the_run_to_the_silence_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A state a newer Slurm may add must not hold a run open forever; a purged job says nothing.
    _squeue(tmp_path, monkeypatch, 'echo "41|SOME_NEW_STATE"')
    verdict = ask([_run("a"), _run("b")], {"a": "slurm:41", "b": "slurm:43"})
    assert (verdict.ended, verdict.alive, verdict.warning) == ({}, set(), None)


def test_one_query_per_pass_for_every_open_run_and_only_slurm_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _squeue(tmp_path, monkeypatch, 'echo "7|RUNNING"\necho "100|FAILED"')
    runs = [_run(u) for u in "abcde"]
    jobs = {"a": "slurm:100", "b": "slurm:7", "c": "slurm:7", "d": "pbs:9", "e": "slurm:x"}
    verdict = ask(runs, jobs)
    assert verdict.ended == {"a": "slurm job 100 FAILED"}
    assert verdict.alive == {"b", "c"}
    assert calls.read_text().splitlines() == ["--noheader --states=all --format=%A|%T --jobs=7,100"]


def test_no_open_run_with_a_job_asks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _squeue(tmp_path, monkeypatch, 'echo "7|FAILED"')
    assert ask([_run("a")], {}).ended == {}
    assert not calls.exists()


def test_all_jobs_purged_is_an_answer_and_a_failure_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _squeue(
        tmp_path, monkeypatch, 'echo "slurm_load_jobs error: Invalid job id specified" >&2\nexit 1'
    )
    assert slurm_states(["5"]) == {}
    _squeue(tmp_path, monkeypatch, 'echo "Unable to contact slurm controller" >&2\nexit 1')
    assert slurm_states(["5"]) is None
    verdict = ask([_run("a")], {"a": "slurm:5"})
    assert (verdict.ended, verdict.alive) == ({}, set())
    assert verdict.warning and "squeue did not answer" in verdict.warning


def test_a_squeue_that_hangs_is_no_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _squeue(tmp_path, monkeypatch, "exec sleep 30")
    assert slurm_states(["5"], timeout_s=0.5) is None
