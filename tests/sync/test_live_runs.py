"""A run synced while it is being written: each pass sends only what is new; RUNNING until the
end event is synced, then FINISHED with the end time the run recorded. On every destination."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import orjson

from .conftest import Destination, Project

WRITER = """
import pathlib, sys, time
from formula_foundry.tracking import get_tracker

root = pathlib.Path(sys.argv[1])

def step(name):
    print(name, flush=True)
    while not (root / f"go-{name}").exists():
        time.sleep(0.02)

tracker = get_tracker()
run = tracker.start_run(run_name="live")
run.log_param("phase_count", 3)
for i in range(100):
    run.log_metric("loss", 1.0 / (i + 1), step=i)
print(run.run_id, flush=True)
step("one")
for i in range(100, 250):
    run.log_metric("loss", 1.0 / (i + 1), step=i)
run.set_tag("phase", "two")
step("two")
run.log_artifact_reference("model.bin", "sha256:" + "cd" * 32, 99)
run.set_tag("phase", "three")
step("three")
run.end("FINISHED")
print("ended", flush=True)
"""


def test_a_growing_run_is_synced_incrementally_and_finished_last(
    project: Project, destination: Destination
) -> None:
    assert project.uri == destination.uri
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER), str(project.root)],
        cwd=project.root,
        env=project.env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        spool_run_id = proc.stdout.readline().strip()

        def advance(name: str) -> None:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == name
            (project.root / f"go-{name}").touch()

        assert proc.stdout.readline().strip() == "one"
        first = project.sync()
        assert first.exit_code == 0 and first.metrics == 100
        assert first.events == 102  # run_start, params, 100 points
        run = project.snapshot()["runs"][spool_run_id]
        assert run["status"] == "RUNNING" and run["end_time"] is None
        assert len(run["metrics"]["loss"]) == 100

        assert project.sync().idle  # nothing new yet: nothing read, nothing sent

        (project.root / "go-one").touch()
        advance("two")
        second = project.sync()
        assert (second.metrics, second.events) == (150, 151)
        run = project.snapshot()["runs"][spool_run_id]
        assert run["status"] == "RUNNING" and run["tags"]["phase"] == "two"
        assert [s for s, _, _ in run["metrics"]["loss"]] == list(range(250))

        advance("three")
        assert proc.stdout.readline().strip() == "ended"
        assert proc.wait(timeout=30) == 0
        # Written but not yet synced: MLflow still says RUNNING.
        assert project.snapshot()["runs"][spool_run_id]["status"] == "RUNNING"
        third = project.sync()
        assert (third.metrics, third.events) == (0, 3)  # artifact_ref, tags, run_end
    finally:
        proc.kill()
        proc.wait()

    (seg,) = (project.spool_root / spool_run_id).glob("seg-*.jsonl")
    end = orjson.loads(seg.read_bytes().splitlines()[-1])
    assert end["k"] == "run_end"
    run = project.snapshot()["runs"][spool_run_id]
    assert (run["status"], run["end_time"]) == ("FINISHED", end["t"])
    assert run["tags"]["phase"] == "three"
    assert list(run["artifact_refs"]) == ["ff_artifact_refs/model.bin.json"]
    assert project.sync().idle
