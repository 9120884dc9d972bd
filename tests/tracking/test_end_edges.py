"""Ending a run at awkward moments: Ctrl-C in the middle of the end, a thread logging while the
run ends, a tracker whose settings changed under an active run, a fatal error while the
console is captured."""

from __future__ import annotations

from pathlib import Path

import pytest

from formula_foundry.errors import RunStateError
from formula_foundry.tracking import get_tracker
from formula_foundry.tracking.spool_reader import Event, Problem, SegmentReader
from tests.tracking._helpers import run_child, segments


def test_ctrl_c_in_the_middle_of_the_end_leaves_one_run_end(ff_project: Path) -> None:
    # A KeyboardInterrupt at a random moment of Run.end, then the excepthook's end (KILLED):
    # an interrupt between the run_end's write and the run's switch to ended made it write a
    # second run_end, or take one sequence number twice.
    spool = ff_project / "data" / "runs"
    code = """
        import random, signal, time
        from formula_foundry.tracking import get_tracker
        signal.signal(signal.SIGALRM, signal.default_int_handler)  # Ctrl-C's KeyboardInterrupt
        random.seed(7)
        tracker = get_tracker()
        for i in range(400):
            run = tracker.start_run(run_id=f"ctrl-c-{i}")
            run.log_metric("x", 1.0)
            try:
                signal.setitimer(signal.ITIMER_REAL, random.uniform(1e-6, 150e-6))
                run.end()
                time.sleep(0.001)
            except KeyboardInterrupt:
                signal.setitimer(signal.ITIMER_REAL, 0)
                tracker.end_all("KILLED", reason="uncaught KeyboardInterrupt")
        print("done", flush=True)
    """
    done = run_child(code, ff_project)
    assert done.stdout.strip() == b"done", done.stderr
    for i in range(400):
        items = [item for seg in segments(spool, f"ctrl-c-{i}") for item in SegmentReader(seg)]
        assert not [p for p in items if isinstance(p, Problem)], (i, items)
        ends = [e.data["status"] for e in items if isinstance(e, Event) and e.kind == "run_end"]
        assert len(ends) == 1, (i, ends)


def test_a_thread_logging_as_the_run_ends_gets_an_error_not_a_segment_after_the_end(
    ff_project: Path,
) -> None:
    spool = ff_project / "data" / "runs"
    run = get_tracker().start_run(run_id="threaded")
    writer = run._writer  # what a worker thread fetched just before the end
    run.log_metric("m", 1.0)
    run.end()
    with pytest.raises(RunStateError, match="run threaded has ended"):
        writer.append_metric(0, 0, b'"m"', b"2.0")
    with pytest.raises(RunStateError, match="has ended"):
        writer.append({"v": 1, "s": 0, "t": 0, "k": "tags", "d": {"a": "b"}})
    (seg,) = segments(spool, "threaded")
    kinds = [e.kind for e in SegmentReader(seg) if isinstance(e, Event)]
    assert kinds[-1] == "run_end" and kinds.count("metrics") == 1


def test_changed_settings_keep_the_tracker_of_an_active_run(ff_project: Path) -> None:
    # mlflow.set_tracking_uri() sets MLFLOW_TRACKING_URI, which is part of the settings: a
    # new tracker then lost the active run (no nesting, no end at exit).
    spool = ff_project / "data" / "runs"
    code = """
        import os
        from formula_foundry.tracking import get_tracker
        run = get_tracker().start_run(run_id="kept")
        os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///elsewhere.db"
        assert get_tracker().active_run() is run
        with get_tracker().start_run(run_name="child", nested=True) as child:
            print(child.parent_run_id, flush=True)
    """
    done = run_child(code, ff_project)
    assert done.stdout.strip() == b"kept", done.stderr
    ends = [
        e.data["status"]
        for seg in segments(spool, "kept")
        for e in SegmentReader(seg)
        if isinstance(e, Event) and e.kind == "run_end"
    ]
    assert ends == ["FINISHED"]  # ended by the interpreter's exit


def test_a_fatal_errors_traceback_reaches_the_terminal_while_captured(ff_project: Path) -> None:
    # A segfault kills the process before the capture's thread passes on what the pipe holds:
    # faulthandler writes straight to the original stderr while the capture runs.
    code = """
        import faulthandler
        faulthandler.enable()
        from formula_foundry.tracking import get_tracker
        get_tracker().start_run(run_id="crashing", capture_output=True)
        faulthandler._sigsegv()
    """
    done = run_child(code, ff_project)
    assert done.returncode < 0
    assert b"Fatal Python error: Segmentation fault" in done.stderr, done.stderr
