"""``ff-sync status``: pending, synced and quarantined counts that match what a pass does."""

from __future__ import annotations

import json
import re
import socket
from typing import Any

from click.testing import CliRunner

from formula_foundry.sync.commands.cli import main

from .conftest import Project

TWO_RUNS = """
with tracker.start_run(run_name="a") as a:
    a.log_params({"lr": 0.1})
    for i in range(10):
        a.log_metric("loss", 1.0 / (i + 1), step=i)
with tracker.start_run(run_name="b") as b:
    b.set_tag("phase", "one")
print(a.run_id, b.run_id)
"""
LATER = """
with tracker.start_run(run_name="c") as c:
    c.log_metrics({"x": 1.0, "y": 2.0})
    c.log_metric("x", 3.0, step=1)
print(c.run_id)
"""


def _status(project: Project, *args: str, uri: str | None = None) -> tuple[int, str, str]:
    head = ["--config", str(project.config)]
    if uri is not None:
        head += ["--tracking-uri", uri]
    result = CliRunner().invoke(main, [*head, *args], prog_name="ff-sync")
    return result.exit_code, result.stdout, result.stderr


def _json(project: Project, *args: str, uri: str | None = None) -> dict[str, Any]:
    code, out, err = _status(project, *args, "status", "--json", uri=uri)
    assert (code, err) == (0, ""), err
    data: dict[str, Any] = json.loads(out)
    return data


def _runs(dest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["run"]: r for r in dest["runs"]}


def _events(summary: str) -> int:
    match = re.search(r"(\d+) events", summary)
    assert match, summary
    return int(match.group(1))


def test_counts_match_what_the_passes_sync(project: Project) -> None:
    a, b = project.spool(TWO_RUNS).split()
    (dest,) = _json(project)["destinations"]
    assert dest["configured"] and dest["destination"] == project.uri
    assert dest["last_sync_ms"] is None
    assert {r["run"]: (r["status"], r["events_synced"]) for r in dest["runs"]} == {
        a: (None, 0),
        b: (None, 0),
    }
    pending_before = dest["totals"]["events_pending"]
    first = project.sync()
    assert first.exit_code == 0 and pending_before == first.events

    (c,) = project.spool(LATER).split()  # logged after the pass: pending for this destination
    (dest,) = _json(project)["destinations"]
    runs = _runs(dest)
    assert (runs[a]["status"], runs[a]["events_pending"]) == ("FINISHED", 0)
    assert runs[a]["events_synced"] == 1 + 1 + 10 + 1  # run_start, params, 10 metrics, run_end
    assert runs[b]["events_synced"] == 3 and runs[b]["events_pending"] == 0
    assert (runs[c]["status"], runs[c]["events_synced"], runs[c]["events_pending"]) == (
        None,
        0,
        4,
    )
    assert dest["totals"] == {
        "runs": 3,
        "events_synced": first.events,
        "events_pending": 4,
        "events_quarantined": 0,
        "bytes_pending_upload": 0,
        "runs_pending": 1,
        "runs_dead": 0,
    }
    assert dest["last_sync_ms"] is not None and runs[a]["last_sync_ms"] is not None
    second = project.sync()
    assert second.events == 4
    totals = _json(project)["destinations"][0]["totals"]
    assert (totals["events_synced"], totals["events_pending"]) == (first.events + 4, 0)


def test_quarantined_records_are_counted_apart(project: Project) -> None:
    a, _ = project.spool(TWO_RUNS).split()
    (seg,) = (project.spool_root / a).glob("seg-*.jsonl")
    lines = seg.read_bytes().splitlines(keepends=True)
    lines[4] = b"this is not json\n"  # a loss point
    seg.write_bytes(b"".join(lines))
    before = _runs(_json(project)["destinations"][0])[a]
    assert before["events_pending"] == 12  # the damaged line is no event
    assert project.sync().exit_code == 1
    after = _runs(_json(project)["destinations"][0])[a]
    assert (after["events_synced"], after["events_pending"], after["events_quarantined"]) == (
        12,
        0,
        1,
    )
    code, out, _ = _status(project, "status")
    assert code == 0
    assert re.search(rf"^{a}\s+FINISHED\s+12\s+0\s+1\s", out, re.M), out


def test_a_pass_stopped_by_an_unavailable_destination_leaves_everything_pending(
    project: Project,
) -> None:
    project.spool(TWO_RUNS)
    assert project.sync().exit_code == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = f"postgresql://ff:hunter2secret@127.0.0.1:{port}/mlflow"
    result = project.ff_sync("--tracking-uri", down)
    assert result.returncode == 75, result.stderr

    (dest,) = _json(project, uri=down)["destinations"]
    assert dest["destination"] == f"postgresql://ff:***@127.0.0.1:{port}/mlflow"
    assert dest["totals"]["events_synced"] == 0 and dest["totals"]["events_pending"] == 16

    code, out, err = _status(project, "status", "--all", uri=down)
    assert code == 0 and err == ""
    assert "hunter2secret" not in out
    assert f"destination: postgresql://ff:***@127.0.0.1:{port}/mlflow\n" in out
    assert f"destination: {project.uri} (not configured)\n" in out
    code, out, _ = _status(project, "status", "--all", "--json", uri=down)
    assert "hunter2secret" not in out
    both = json.loads(out)["destinations"]
    assert [d["configured"] for d in both] == [True, False]
    assert both[1]["totals"]["events_pending"] == 0 and both[1]["totals"]["events_synced"] == 16


def test_a_silent_run_without_end_event_looks_dead(project: Project) -> None:
    (run,) = project.spool(
        """
        import os
        r = tracker.start_run(run_name="killed")
        r.log_metric("m", 1.0)
        print(r.run_id, flush=True)
        os._exit(0)  # no end event, like SIGKILL
        """
    ).split()
    fresh = _runs(_json(project)["destinations"][0])[run]
    assert fresh["dead"] is False and fresh["last_event_ms"] is not None
    dead = _runs(_json(project, "--stale-after", "0.001")["destinations"][0])[run]
    assert dead["dead"] is True and dead["ended_by_sync"] is False
    code, out, _ = _status(project, "--stale-after", "0.001", "status")
    assert code == 0
    assert re.search(rf"^{run}\s+not synced\s+0\s+2\s+0\s+-\s+dead\?$", out, re.M), out

    assert project.sync().exit_code == 0  # a run that grows in a pass is never judged in it
    result = project.ff_sync("--stale-after", "0.001")
    assert result.returncode == 0
    ended = _runs(_json(project)["destinations"][0])[run]
    assert (ended["status"], ended["dead"], ended["ended_by_sync"]) == ("KILLED", True, True)


def test_status_reads_no_destination_and_imports_no_mlflow(project: Project) -> None:
    project.spool(TWO_RUNS)
    out = project.python(
        """
        import json, sys
        from click.testing import CliRunner
        from formula_foundry.sync.commands.cli import main
        result = CliRunner().invoke(main, ["status", "--json"])
        mlflow = sorted(m for m in sys.modules if m.split(".")[0] == "mlflow")
        print(json.dumps([result.exit_code, mlflow]))
        """
    ).stdout
    assert json.loads(out) == [0, []]
    assert not project.db.exists()  # never opened, never created
