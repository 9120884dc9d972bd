"""Resuming a run from a new process, workers attaching to it, heartbeats and SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from formula_foundry.errors import RunStateError, ValidationError
from formula_foundry.tracking import get_tracker
from formula_foundry.tracking.spool_reader import Event, SegmentReader
from formula_foundry.tracking.spool_writer import now_ms, segment_started_ms
from tests.tracking._helpers import segments as _merge_order


def _events(root: Path, run_id: str) -> list[tuple[str, list[Event]]]:
    out = []
    for seg in _merge_order(root, run_id):
        out.append((seg.name, [e for e in SegmentReader(seg) if isinstance(e, Event)]))
    return out


def _child(code: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _env(spool: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FF_", "MLFLOW_", "SLURM_"))}
    env.update(FF_SPOOL_ROOT=str(spool), **extra)
    return env


def test_resume_by_run_id_writes_a_new_segment_of_the_same_run(ff_project: Path) -> None:
    tracker = get_tracker()
    with tracker.start_run(
        run_name="sweep", experiment_name="ff-m2-simulation", run_id="sweep-42"
    ) as run:
        run.log_param("solver", "fdtd")
        run.log_metric("loss", 1.0, step=0)
    with tracker.start_run(run_id="sweep-42") as again:
        assert again.experiment_name == "ff-m2-simulation"
        assert again.run_name == "sweep"
        again.log_param("solver", "fdtd")  # same value: fine
        again.log_metric("loss", 0.5, step=1)
    segs = _events(ff_project / "data" / "runs", "sweep-42")
    assert len(segs) == 2
    starts = [e.data for _, evs in segs for e in evs if e.kind == "run_start"]
    assert [s["resume"] for s in starts] == [False, True]
    ends = [e.data["status"] for _, evs in segs for e in evs if e.kind == "run_end"]
    assert ends == ["FINISHED", "FINISHED"]


def test_resumes_in_the_same_millisecond_keep_their_order(ff_project: Path) -> None:
    # Start and resume back to back, often within one millisecond: the sync must still see the
    # segments in the order they were written, or the run would end with an older status.
    tracker = get_tracker()
    for i in range(20):
        with tracker.start_run(run_id="quick") as run:
            run.log_metric("i", float(i), step=i)
    segs = _events(ff_project / "data" / "runs", "quick")
    starts = [e.data["resume"] for _, evs in segs for e in evs if e.kind == "run_start"]
    assert starts == [False] + [True] * 19
    steps = [e.data["step"] for _, evs in segs for e in evs if e.kind == "metrics"]
    assert steps == list(range(20))


def test_a_resumed_segment_sorts_last_even_if_this_clock_is_behind(ff_project: Path) -> None:
    spool = ff_project / "data" / "runs"
    tracker = get_tracker()
    with tracker.start_run(run_id="skew"):
        pass
    # The first job ran on a node whose clock was an hour ahead of this one.
    (first,) = (spool / "skew").glob("seg-*.jsonl")
    ahead = now_ms() + 3_600_000
    renamed = first.with_name(f"seg-{ahead}-{first.name.split('-', 2)[2]}")
    first.rename(renamed)
    with tracker.start_run(run_id="skew") as again:
        again.set_tag("second", "yes")
    order = _merge_order(spool, "skew")
    assert order[0] == renamed
    assert segment_started_ms(order[1].name) > ahead


def test_resume_in_another_experiment_is_refused(ff_project: Path) -> None:
    tracker = get_tracker()
    with tracker.start_run(run_id="r1", experiment_name="a"):
        pass
    with pytest.raises(ValidationError, match="belongs to experiment 'a'"):
        tracker.start_run(run_id="r1", experiment_name="b")


def test_bad_run_id_is_refused(ff_project: Path) -> None:
    with pytest.raises(ValidationError, match=r"run id '\.\./x' is not valid"):
        get_tracker().start_run(run_id="../x")


def test_ff_run_id_resumes_across_processes_killed_midway(ff_project: Path) -> None:
    spool = ff_project / "data" / "runs"
    code = """
        import os, signal
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_name="job") as run:
            for i in range(5):
                run.log_metric("x", float(i), step=int(os.environ["BASE"]) + i)
            if os.environ.get("DIE"):
                os.kill(os.getpid(), signal.SIGKILL)
    """
    for base, die in (("0", "1"), ("5", "1"), ("10", "")):
        env = _env(spool, FF_RUN_ID="job-7", BASE=base, **({"DIE": die} if die else {}))
        proc = _child(code, env, ff_project)
        proc.communicate(timeout=60)
    segs = _events(spool, "job-7")
    assert len(segs) == 3
    steps = sorted(e.data["step"] for _, evs in segs for e in evs if e.kind == "metrics")
    assert steps == list(range(15))
    ends = [e.data["status"] for _, evs in segs for e in evs if e.kind == "run_end"]
    assert ends == ["FINISHED"]  # the killed processes left no end event


def test_attached_workers_write_their_own_segments_and_never_end_the_run(
    ff_project: Path,
) -> None:
    spool = ff_project / "data" / "runs"
    tracker = get_tracker()
    owner = tracker.start_run(run_name="ranks", run_id="ranks-1")
    code = """
        import os
        from formula_foundry.tracking import get_tracker
        with get_tracker().attach_run("ranks-1") as run:
            for i in range(200):
                run.log_metric("rank" + os.environ["RANK"], float(i), step=i)
    """
    procs = [_child(code, _env(spool, RANK=str(r)), ff_project) for r in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    owner.end()
    segs = _events(spool, "ranks-1")
    assert len(segs) == 5
    pids = set()
    for _, evs in segs:
        header = evs[0]
        assert header.kind == "segment"
        pids.add(header.data["pid"])
    assert len(pids) == 5  # one writer process per segment
    per_rank = {f"rank{r}": 0 for r in range(4)}
    for _, evs in segs:
        for e in evs:
            if e.kind == "metrics":
                for key in e.data["d"]:
                    per_rank[key] += 1
    assert per_rank == {f"rank{r}": 200 for r in range(4)}
    ends = [e for _, evs in segs for e in evs if e.kind == "run_end"]
    assert len(ends) == 1


def test_attach_to_unknown_run_is_refused(ff_project: Path) -> None:
    with pytest.raises(RunStateError, match="run nope has no spool under"):
        get_tracker().attach_run("nope")


def test_heartbeat_marks_a_quiet_run_alive(ff_project: Path, write_config) -> None:  # type: ignore[no-untyped-def]
    text = (ff_project / "config" / "mlflow.yaml").read_text()
    write_config(ff_project, text.replace("heartbeat_s: 60", "heartbeat_s: 0.2"))
    spool = ff_project / "data" / "runs"
    code = """
        import time
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="quiet") as run:
            run.log_metric("x", 1.0)
            time.sleep(1.5)
    """
    proc = _child(
        code, _env(spool, FF_CONFIG=str(ff_project / "config" / "mlflow.yaml")), ff_project
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    ((_, evs),) = _events(spool, "quiet")
    beats = [e for e in evs if e.kind == "heartbeat"]
    assert 3 <= len(beats) <= 10


def test_a_quiet_buffered_run_reaches_the_file_at_each_heartbeat(
    ff_project: Path, write_config
) -> None:  # type: ignore[no-untyped-def]
    # Buffered mode keeps events in memory; the heartbeat writes them (and itself), so a quiet
    # run never looks dead to ff-sync and a kill loses at most one heartbeat interval.
    text = (ff_project / "config" / "mlflow.yaml").read_text()
    write_config(ff_project, text.replace("heartbeat_s: 60", "heartbeat_s: 0.2"))
    spool = ff_project / "data" / "runs"
    code = """
        import time
        from formula_foundry.tracking import get_tracker
        run = get_tracker().start_run(run_id="quiet-buffered")
        run.log_metric("x", 1.0)
        print("logged", flush=True)
        time.sleep(60)
    """
    env = _env(
        spool, FF_CONFIG=str(ff_project / "config" / "mlflow.yaml"), FF_DURABILITY="buffered"
    )
    proc = _child(code, env, ff_project)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"logged"
    deadline = time.monotonic() + 20
    kinds: list[str] = []
    while time.monotonic() < deadline and "heartbeat" not in kinds:
        time.sleep(0.1)
        found = _events(spool, "quiet-buffered") if spool.exists() else []
        kinds = [e.kind for _, evs in found for e in evs]
    proc.kill()
    proc.communicate(timeout=30)
    assert kinds[:3] == ["segment", "run_start", "metrics"] and "heartbeat" in kinds, kinds


def test_sigterm_records_a_killed_end_event(ff_project: Path) -> None:
    spool = ff_project / "data" / "runs"
    code = """
        import sys, time
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="term") as run:
            run.log_metric("x", 1.0)
            print("ready", flush=True)
            time.sleep(60)
    """
    proc = _child(code, _env(spool), ff_project)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM
    ((_, evs),) = _events(spool, "term")
    assert evs[-1].kind == "run_end"
    assert evs[-1].data["status"] == "KILLED"
    assert evs[-1].data["reason"] == "SIGTERM"  # outside a Slurm job: the signal alone
    assert time.time() * 1000 - evs[-1].t < 60_000


def test_sigterm_in_a_slurm_job_names_the_job_when_squeue_cannot_answer(
    ff_project: Path, tmp_path: Path
) -> None:
    # SLURM_JOB_ID set but no squeue on PATH (a node without Slurm's client commands): the
    # reason names the job and leaves the time left out instead of delaying the end event.
    # tests/slurm/test_recipes.py checks the reason with a real squeue.
    spool = ff_project / "data" / "runs"
    code = """
        import time
        from formula_foundry.tracking import get_tracker
        with get_tracker().start_run(run_id="in-job"):
            print("ready", flush=True)
            time.sleep(60)
    """
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = _child(code, _env(spool, SLURM_JOB_ID="4242", PATH=str(empty)), ff_project)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    ((_, evs),) = _events(spool, "in-job")
    assert (evs[-1].kind, evs[-1].data["status"]) == ("run_end", "KILLED")
    assert evs[-1].data["reason"] == "SIGTERM in Slurm job 4242"


def test_end_with_a_reason_records_it_and_a_bad_reason_is_refused(ff_project: Path) -> None:
    spool = ff_project / "data" / "runs"
    run = get_tracker().start_run(run_id="why")
    for bad in ("", 3, "x" * 8001, "a\x00b"):
        with pytest.raises(ValidationError, match="run why: end reason"):
            run.end("FAILED", reason=bad)  # type: ignore[arg-type]
    run.end("FAILED", reason="loss diverged at step 812")
    ((_, evs),) = _events(spool, "why")
    ends = [(e.data["status"], e.data.get("reason")) for e in evs if e.kind == "run_end"]
    assert ends == [("FAILED", "loss diverged at step 812")]


def test_sigterm_inside_a_spool_write_and_a_second_sigterm_still_end_the_run(
    ff_project: Path,
) -> None:
    # The signal lands while the main thread holds the writer's lock (in the middle of a log
    # call), then again (Slurm signals every process, the recipe's shell forwards one more):
    # the run still gets its end event and the process dies of SIGTERM, instead of hanging.
    spool = ff_project / "data" / "runs"
    code = """
        import os, signal
        from formula_foundry.tracking import get_tracker
        run = get_tracker().start_run(run_id="locked")
        run.log_metric("x", 1.0)
        with run._writer._lock:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        import time
        time.sleep(60)
    """
    proc = _child(code, _env(spool), ff_project)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM
    ((_, evs),) = _events(spool, "locked")
    assert [(e.kind, e.data.get("status")) for e in evs if e.kind == "run_end"] == [
        ("run_end", "KILLED")
    ]


@pytest.mark.parametrize(
    ("raise_", "status", "reason"),
    [
        (
            "raise ValueError('diverged at step 3')",
            "FAILED",
            "uncaught ValueError: diverged at step 3",
        ),
        ("raise KeyboardInterrupt", "KILLED", "uncaught KeyboardInterrupt"),
    ],
)
def test_an_uncaught_exception_outside_a_with_block_ends_the_run_failed(
    ff_project: Path, raise_: str, status: str, reason: str
) -> None:
    # Without the hook the interpreter's exit would end the run FINISHED: a crash read as a
    # success. The previous hook (here the default one) still prints the traceback.
    spool = ff_project / "data" / "runs"
    code = f"""
        from formula_foundry.tracking import get_tracker
        run = get_tracker().start_run(run_id="crash")
        run.log_metric("x", 1.0)
        {raise_}
    """
    proc = _child(code, _env(spool), ff_project)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert b"Traceback" in err
    ((_, evs),) = _events(spool, "crash")
    ends = [(e.data["status"], e.data.get("reason")) for e in evs if e.kind == "run_end"]
    assert ends == [(status, reason)]


def test_an_exception_hook_of_the_application_still_runs(ff_project: Path) -> None:
    spool = ff_project / "data" / "runs"
    code = """
        import sys
        sys.excepthook = lambda *a: print("app hook", a[0].__name__, flush=True)
        from formula_foundry.tracking import get_tracker
        get_tracker().start_run(run_id="hooked")
        raise RuntimeError("x")
    """
    proc = _child(code, _env(spool), ff_project)
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == b"app hook RuntimeError"
    ((_, evs),) = _events(spool, "hooked")
    assert [e.data["status"] for e in evs if e.kind == "run_end"] == ["FAILED"]


def test_a_run_ended_by_another_thread_is_not_active_in_its_own(ff_project: Path) -> None:
    import threading

    tracker = get_tracker()
    run = tracker.start_run(run_name="ended-elsewhere")
    worker = threading.Thread(target=run.end)
    worker.start()
    worker.join()
    assert tracker.active_run() is None
    nxt = tracker.start_run(run_name="next")  # not refused as "still active"
    assert nxt.parent_run_id is None  # and not nested under the ended run
    nxt.end()


def test_an_exception_at_the_interactive_prompt_ends_no_run(ff_project: Path) -> None:
    # `python -i`: the interpreter reports the exception and goes on, and so does the run.
    spool = ff_project / "data" / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-i", "-q"],
        env=_env(spool),
        cwd=ff_project,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    script = (
        "from formula_foundry.tracking import get_tracker\n"
        "run = get_tracker().start_run(run_id='repl')\n"
        "1 / 0\n"
        "run.log_metric('after', 1.0)\n"
        "run.end()\n"
    )
    _, err = proc.communicate(script.encode(), timeout=60)
    assert b"ZeroDivisionError" in err
    ((_, evs),) = _events(spool, "repl")
    assert [e.kind for e in evs][-2:] == ["metrics", "run_end"]
    assert [e.data["status"] for e in evs if e.kind == "run_end"] == ["FINISHED"]


def test_a_run_started_in_a_batch_job_is_tagged_with_the_jobs_facts(ff_project: Path) -> None:
    # Read from the scheduler's variables at start_run; what the caller passes wins.
    spool = ff_project / "data" / "runs"
    code = """
        from formula_foundry.tracking import get_tracker
        get_tracker().start_run(run_id="in-job", tags={"slurm.partition": "mine"}).end()
    """
    env = _env(
        spool,
        SLURM_JOB_ID="77",
        SLURM_ARRAY_JOB_ID="70",
        SLURM_ARRAY_TASK_ID="7",
        SLURM_JOB_PARTITION="gpu",
        SLURM_JOB_NODELIST="n[01-04]",
        SLURM_GPUS_ON_NODE="2",
        SLURM_JOB_ACCOUNT="x" * 1001,  # too long to be a fact worth a tag: left out, not cut
        PBS_QUEUE="",  # empty: no tag
    )
    proc = _child(code, env, ff_project)
    proc.communicate(timeout=30)
    ((_, evs),) = _events(spool, "in-job")
    tags = {k: v for e in evs if e.kind == "tags" for k, v in e.data["d"].items()}
    assert tags == {
        "slurm.job_id": "77",
        "slurm.array_job_id": "70",
        "slurm.array_task_id": "7",
        "slurm.partition": "mine",
        "slurm.nodelist": "n[01-04]",
        "slurm.gpus_on_node": "2",
    }
