"""A run whose console was captured syncs like any other: its ``console`` events reach no
destination, are never quarantined, and ``verify`` expects nothing of them."""

from __future__ import annotations

from click.testing import CliRunner

from formula_foundry.sync.commands.cli import main
from formula_foundry.tracking.spool_reader import Event, SegmentReader

from .conftest import Project

CAPTURED = """
import os, sys
os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # what the capture gets, not the test's pipe
with tracker.start_run(run_id="with-console", capture_output=True) as run:
    for step in range(50):
        print(f"step {step}", flush=True)
        run.log_metric("loss", 1.0 / (step + 1), step=step)
        os.write(2, b"\\xff not text\\n")  # base64 in the spool
    run.set_tag("phase", "done")
"""


def test_console_events_pass_the_replay_and_verify(project: Project) -> None:
    project.python(
        "from formula_foundry.tracking import get_tracker\ntracker = get_tracker()\n" + CAPTURED
    )
    (seg,) = (project.spool_root / "with-console").glob("seg-*.jsonl")
    kinds = [e.kind for e in SegmentReader(seg) if isinstance(e, Event)]
    assert kinds.count("console") >= 1 and kinds.count("metrics") == 50
    report = project.sync()
    assert (report.exit_code, report.quarantined, report.problems) == (0, 0, [])
    assert not (project.state_folder() / "quarantine.jsonl").exists()
    run = project.snapshot()["runs"]["with-console"]
    assert len(run["metrics"]["loss"]) == 50 and run["tags"]["phase"] == "done"
    result = CliRunner().invoke(main, ["--config", str(project.config), "verify"])
    assert (result.exit_code, result.stdout) == (
        0,
        f"ff-sync: verify: OK: 1 runs match -> {project.uri}\n",
    )
    # A second pass finds nothing new: the console events were passed over, not left behind.
    assert project.sync().events == 0
