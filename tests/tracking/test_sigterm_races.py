"""SIGTERM against everything else that ends a run: the program's exit, its own end, a second
owner of runs in the process, and the threads the tracker starts."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from formula_foundry.tracking.spool_reader import Event, SegmentReader
from tests.tracking._helpers import run_child, segments, start_child


def _ends(spool: Path, run_id: str) -> list[str]:
    return [
        item.data["status"]
        for seg in segments(spool, run_id)
        for item in SegmentReader(seg)
        if isinstance(item, Event) and item.kind == "run_end"
    ]


@pytest.mark.parametrize("capture", [True, False], ids=["capture", "no-capture"])
def test_a_sigterm_as_the_program_finishes_ends_the_run_killed_once(
    ff_project: Path, capture: bool
) -> None:
    # The handler hands the end to a thread and returns; the program, with nothing left to
    # do, reaches the interpreter's exit at once. The at-exit end (FINISHED) raced that
    # thread: two run_end events, or FINISHED alone with the console's last bytes lost when
    # the exit cut the thread off (seen in 22 of 30 runs with the capture on).
    spool = ff_project / "data" / "runs"
    for i in range(8):
        code = f"""
            import os, signal, sys
            from formula_foundry.tracking import get_tracker
            get_tracker().start_run(run_id="last-{i}", capture_output={capture})
            sys.stdout.write("the last words")
            os.kill(os.getpid(), signal.SIGTERM)
        """
        done = run_child(code, ff_project)
        assert (done.returncode, _ends(spool, f"last-{i}")) == (-signal.SIGTERM, ["KILLED"])
        assert done.stdout == b"the last words"


def test_a_sigterm_ends_the_runs_of_the_tracker_and_of_the_mlflow_drop_in(
    ff_project: Path,
) -> None:
    # One process, two owners of runs (the tracker, and MLflow code on a spool: URI): the
    # handler is installed once, and ends the runs of both.
    spool = ff_project / "data" / "runs"
    code = """
        import time
        import mlflow
        from formula_foundry.tracking import get_tracker
        get_tracker().start_run(run_id="tracked")
        run = mlflow.start_run()
        print(run.info.run_id, flush=True)
        time.sleep(60)
    """
    proc = start_child(code, ff_project, MLFLOW_TRACKING_URI=f"spool://{spool}")
    assert proc.stdout is not None
    mlflow_run = proc.stdout.readline().decode().strip()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err
    assert _ends(spool, "tracked") == ["KILLED"]
    assert _ends(spool, mlflow_run) == ["KILLED"]


def test_the_trackers_threads_leave_the_process_signals_to_the_programs_threads(
    ff_project: Path,
) -> None:
    # Linux hands a signal sent to the process to any thread not blocking it, and Python runs
    # the handler only when the main thread next runs Python code: landed on the heartbeat
    # or the console reader, a SIGTERM would wait for the main thread's sleep or read to end.
    code = """
        import os, threading
        from formula_foundry.tracking import get_tracker
        from formula_foundry.quiet_threads import BLOCKED
        run = get_tracker().start_run(run_id="threads", capture_output=True)
        started = threading.Event()
        def program_thread():
            started.set()
            threading.Event().wait(30)
        threading.Thread(target=program_thread, daemon=True).start()
        started.wait()
        masks = {}
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/status") as f:
                line = next(l for l in f if l.startswith("SigBlk:"))
            masks[int(tid)] = int(line.split()[1], 16)
        ours = {t.native_id for t in threading.enumerate() if t.name.startswith("ff-")}
        program = {t.native_id for t in threading.enumerate() if t.name.startswith("Thread-")}
        want = sum(1 << (s - 1) for s in BLOCKED)
        helpers = [t for t in masks if t != os.getpid() and t not in program]
        print(len(helpers), sorted(n for n in ours))
        print(all(masks[t] & want == want for t in helpers))
        print(masks[os.getpid()] & want, sum(masks[t] & want for t in program))
        run.end()
    """
    done = run_child(code, ff_project, FF_SYSTEM_METRICS="true", FF_SYSTEM_METRICS_INTERVAL_S="1")
    assert done.returncode == 0, done.stderr
    count, _, rest = done.stdout.decode().partition(" ")
    lines = rest.splitlines()
    # heartbeat, console reader, system metrics (when psutil is there: it warns otherwise)
    assert int(count) >= 2, done.stdout
    assert lines[1] == "True", done.stdout  # each of them blocks the process's signals
    assert lines[2] == "0 0", done.stdout  # the main thread and the program's block none


def test_two_ends_at_once_record_the_first_and_the_second_waits_for_it(
    ff_project: Path,
) -> None:
    # A SIGTERM's thread ends the run (KILLED) while the program's with block ends it too:
    # the end that began first is the one recorded, whole (its sampler's last window, its
    # console's last chunk, then run_end); the other waits for it and finds the run ended.
    import threading
    import time

    from formula_foundry.errors import RunStateError
    from formula_foundry.tracking import get_tracker

    class SlowSampler:  # stands in for the sampler's last window, which takes a moment
        def stop(self) -> None:
            time.sleep(0.5)

    spool = ff_project / "data" / "runs"
    run = get_tracker().start_run(run_id="both")
    run._sampler = SlowSampler()  # type: ignore[assignment]
    outcome: list[str] = []

    def sigterm_end() -> None:
        run.end("KILLED", reason="SIGTERM")
        outcome.append("killed")

    first = threading.Thread(target=sigterm_end)
    first.start()
    time.sleep(0.1)  # the first end is inside the sampler's stop now
    with pytest.raises(RunStateError, match="has already ended \\(KILLED\\)"):
        run.end("FINISHED")
    first.join()
    assert outcome == ["killed"] and run.status == "KILLED"
    assert _ends(spool, "both") == ["KILLED"]
    run.__exit__(None, None, None)  # the with block's end after it: no error, no second end
    assert _ends(spool, "both") == ["KILLED"]


def test_an_application_handler_installed_later_is_called_once(ff_project: Path) -> None:
    # The program installs its own SIGTERM handler after the first run (Lightning, submitit),
    # chaining to ours: the runs end KILLED and its handler runs once, not once per re-signal.
    spool = ff_project / "data" / "runs"
    code = """
        import os, signal, time
        from formula_foundry.tracking import get_tracker
        get_tracker().start_run(run_id="app-handler")
        calls = 0
        previous = signal.getsignal(signal.SIGTERM)
        def on_term(signum, frame):
            global calls
            calls += 1
            time.sleep(0.5)  # a checkpoint
            previous(signum, frame)
        signal.signal(signal.SIGTERM, on_term)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)
        print("calls", calls)
    """
    done = run_child(code, ff_project)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [b"calls", b"1"]
    assert _ends(spool, "app-handler") == ["KILLED"]


def test_a_sigterm_with_no_thread_to_spare_kills_instead_of_hanging(ff_project: Path) -> None:
    # No new thread can start (an address-space limit, `ulimit -v`) and the main thread is in
    # the middle of log calls: ending the runs on top of it would wait forever for the lock
    # its interrupted write holds. The process dies of SIGTERM as the default would.
    code = """
        import os, resource, threading
        from formula_foundry.tracking import get_tracker
        run = get_tracker().start_run(run_id="no-thread")
        run.log_metric("warm", 1.0)
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (vm + 4 * 1024 * 1024, resource.RLIM_INFINITY))
        try:
            threading.Thread(target=lambda: None).start()
            print("a thread still starts", flush=True)
        except RuntimeError:
            print("ready", flush=True)
        i = 0
        while True:
            run.log_metric("loss", float(i), step=i)
            i += 1
    """
    proc = start_child(code, ff_project)
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()
    if first != b"ready":
        proc.kill()
        proc.communicate()
        pytest.skip(f"the address-space limit does not stop threads here ({first!r})")
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the process hung after SIGTERM")
    assert proc.returncode == -signal.SIGTERM


def test_a_run_started_as_the_sigterm_lands_is_ended_too(ff_project: Path) -> None:
    # The SIGTERM's ender looks at the active runs once; a run whose start it did not see yet
    # ends KILLED as it registers (the process dies next).
    spool = ff_project / "data" / "runs"
    code = """
        from formula_foundry.tracking import get_tracker, liveness
        tracker = get_tracker()
        tracker.start_run(run_id="before").end()  # installs the handler
        liveness._term_stage = 1  # the handler has run; its ender took its snapshot already
        run = tracker.start_run(run_id="late")
        print(run.status)
    """
    done = run_child(code, ff_project)
    assert done.stdout.strip() == b"KILLED", done.stderr
    assert _ends(spool, "late") == ["KILLED"]


@pytest.mark.parametrize("how", ["sigterm", "end_then_os_exit"])
def test_the_drop_in_in_buffered_durability_keeps_its_events(ff_project: Path, how: str) -> None:
    # Buffered events reach the file at the run's end: also when the end is the SIGTERM's
    # (the process then dies without the interpreter's exit) or the program leaves by
    # os._exit right after mlflow.end_run().
    spool = ff_project / "data" / "runs"
    end = {
        "sigterm": "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)",
        "end_then_os_exit": "mlflow.end_run(); os._exit(0)",
    }[how]
    code = f"""
        import os, signal, time
        import mlflow
        run = mlflow.start_run()
        print(run.info.run_id, flush=True)
        for step in range(100):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        {end}
    """
    done = run_child(
        code, ff_project, MLFLOW_TRACKING_URI=f"spool://{spool}", FF_DURABILITY="buffered"
    )
    run_id = done.stdout.split()[0].decode()
    events = [
        item
        for seg in segments(spool, run_id)
        for item in SegmentReader(seg)
        if isinstance(item, Event)
    ]
    steps = {e.data["step"] for e in events if e.kind == "metrics"}
    assert steps == set(range(100))
    want = "KILLED" if how == "sigterm" else "FINISHED"
    assert [e.data["status"] for e in events if e.kind == "run_end"] == [want]
