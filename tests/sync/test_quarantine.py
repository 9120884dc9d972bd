"""Bad records are quarantined with file, line, offset and reason; everything else is synced.

On every destination (SQLite, PostgreSQL, the mlflow server).
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson

from formula_foundry.tracking.events import frame

from .conftest import Destination, Project

SPOOL = """
with tracker.start_run(run_name="damaged") as r:
    r.log_params({"lr": 0.1})
    for i in range(20):
        r.log_metric("loss", float(i), step=i)
with tracker.start_run(run_name="healthy") as h:
    h.log_metric("fine", 1.0)
print(r.run_id, h.run_id)
"""


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _damage(project: Project) -> tuple[str, str, Path]:
    run, healthy = project.spool(SPOOL).split()
    (seg,) = (project.spool_root / run).glob("seg-*.jsonl")
    lines = _lines(seg)
    # line numbers: 1 header, 2 run_start, 3 params, 4..23 loss steps 0..19, 24 run_end
    step = {i: 3 + i for i in range(20)}  # index in `lines` of step i
    lines[step[5]] = b"this is not json at all\n"
    lines[step[8]] = lines[step[8]].replace(b'"d":{"loss":8.0}', b'"d":{"loss":9.0}')
    lines[step[11]] = b"\x00" * len(lines[step[11]])  # a zero-filled block, newline included
    v2 = frame({"v": 2, "s": 99, "t": 1, "k": "metrics", "step": 99, "d": {"loss": 1.0}})
    lines.insert(step[15] + 1, v2)
    seg.write_bytes(b"".join(lines))
    return run, healthy, seg


def _segment(
    project: Project, run: str, t: int, records: list[dict[str, object]], fmt: int = 1
) -> Path:
    seg = project.spool_root / run / f"seg-{t}-otherhost-7-a1b2c3.jsonl"
    header = {
        "v": 1,
        "s": 0,
        "t": t,
        "k": "segment",
        "format": fmt,
        "run": run,
        "host": "o",
        "pid": 7,
        "segment": seg.name,
    }
    body = [{"v": 1, "s": i + 1, "t": t + i, **rec} for i, rec in enumerate(records)]
    seg.write_bytes(b"".join(frame(rec) for rec in [header, *body]))
    return seg


def test_damaged_records_are_quarantined_and_the_rest_is_synced(
    project: Project, destination: Destination
) -> None:
    run, healthy, seg = _damage(project)
    t = 4_000_000_000_000
    second = _segment(
        project,
        run,
        t,
        [
            {"k": "params", "d": {"lr": "0.2", "extra": "kept"}},
            {"k": "metrics", "step": 100, "d": {"loss": 100.0}},
        ],
    )
    future = _segment(project, run, t + 10, [{"k": "metrics", "step": 7, "d": {"x": 1.0}}], 2)

    result = project.ff_sync()
    assert result.returncode == 1, result.stderr
    assert ", 6 quarantined in " in result.stdout
    quarantine = project.state_folder() / "quarantine.jsonl"
    assert f"ff-sync: quarantine report: {quarantine}" in result.stderr.splitlines()

    snap = project.snapshot()["runs"]
    steps = [s for s, _, _ in snap[run]["metrics"]["loss"]]
    assert steps == [i for i in range(20) if i not in (5, 8, 11)] + [100]
    assert snap[run]["params"] == {"lr": "0.1", "extra": "kept"}
    assert snap[run]["status"] == "FINISHED"
    assert "x" not in snap[run]["metrics"]
    assert [p[::2] for p in snap[healthy]["metrics"]["fine"]] == [[0, "1.0"]]

    reports = [json.loads(line) for line in quarantine.read_text().splitlines()]
    by_kind = {r["kind"]: r for r in reports}
    kinds = sorted(r["kind"] for r in reports)
    assert kinds == ["checksum", "corrupt", "nul_hole", "param_conflict", "version", "version"]
    lines = _lines(seg)
    offsets = [sum(len(x) for x in lines[:i]) for i in range(len(lines))]
    assert by_kind["corrupt"]["line"] == 9 and by_kind["corrupt"]["offset"] == offsets[8]
    assert by_kind["corrupt"]["raw"] == "this is not json at all"
    assert by_kind["checksum"]["line"] == 12 and by_kind["checksum"]["file"] == str(seg)
    assert by_kind["nul_hole"]["line"] == 15
    assert {r["run"] for r in reports} == {run}
    conflict = by_kind["param_conflict"]
    assert conflict["file"] == str(second) and conflict["line"] == 2
    assert "param 'lr' is already '0.1'; this record sets '0.2'" in conflict["reason"]
    versions = sorted((r["file"], r["line"]) for r in reports if r["kind"] == "version")
    # Line 19, not 20: the NUL block swallowed a newline, so the lines after it moved up one.
    assert versions == sorted([(str(seg), 19), (str(future), 1)])
    for r in reports:
        assert set(r) >= {"run", "file", "line", "offset", "kind", "reason", "raw"}

    # Nothing new: exit 0, no report repeated. A replay meets the records again (exit 1) but
    # the report keeps one line per record.
    again = project.ff_sync()
    assert again.returncode == 0 and "0 quarantined" in again.stdout
    replay = project.ff_sync("--replay")
    assert replay.returncode == 1 and ", 6 quarantined in " in replay.stdout
    assert len(quarantine.read_text().splitlines()) == 6
    assert project.snapshot()["runs"] == snap


def test_an_invalid_payload_is_quarantined_not_sent(
    project: Project, destination: Destination
) -> None:
    run = project.spool(
        'with tracker.start_run(run_name="r") as r:\n    r.log_metric("ok", 1.0)\nprint(r.run_id)'
    ).strip()
    _segment(
        project,
        run,
        4_000_000_000_000,
        [
            {"k": "metrics", "step": 1, "d": {"ok": "not-a-number"}},
            {"k": "tags", "d": {"bad key!": "v"}},
            {
                "k": "artifact_ref",
                "path": "../escape",
                "digest": "sha256:" + "0" * 64,
                "size": 1,
                "store": "/s",
            },
            {"k": "run_end", "status": "EXPLODED"},
            {"k": "metrics", "step": 2, "d": {"ok": 2.0}},
        ],
    )
    report = project.sync()
    assert report.exit_code == 1 and report.quarantined == 4
    text = "\n".join(report.problems)
    assert "metric 'ok' value 'not-a-number' is not a number" in text
    assert "key 'bad key!' has a character MLflow rejects" in text
    assert "invalid logical path '../escape'" in text
    assert "run_end status 'EXPLODED'" in text
    run_snap = project.snapshot()["runs"][run]
    assert [s for s, _, _ in run_snap["metrics"]["ok"]] == [0, 2]
    assert run_snap["artifact_refs"] == {}


def test_a_torn_last_line_waits_for_the_next_pass(
    project: Project, destination: Destination
) -> None:
    run = project.spool(
        'with tracker.start_run(run_name="r") as r:\n    r.log_metric("m", 1.0)\nprint(r.run_id)'
    ).strip()
    (seg,) = (project.spool_root / run).glob("seg-*.jsonl")
    whole = seg.read_bytes()
    last = whole.splitlines(keepends=True)[-1]
    seg.write_bytes(whole[: -len(last)] + last[:10])  # the writer is in the middle of run_end
    report = project.sync()
    assert report.exit_code == 0 and report.quarantined == 0
    assert project.snapshot()["runs"][run]["status"] == "RUNNING"
    assert project.sync().idle  # an unchanged torn tail is not read again
    seg.write_bytes(whole)
    assert project.sync().exit_code == 0
    assert project.snapshot()["runs"][run]["status"] == "FINISHED"
    assert not (project.state_folder() / "quarantine.jsonl").exists()


def test_quarantine_report_survives_a_torn_line(tmp_path: Path) -> None:
    from formula_foundry.sync.engine.quarantine_log import QuarantineLog

    path = tmp_path / "quarantine.jsonl"
    log = QuarantineLog(path)
    assert log.add({"file": "/a", "offset": 1, "kind": "corrupt"})
    assert not log.add({"file": "/a", "offset": 1, "kind": "corrupt"})
    with open(path, "ab") as fh:
        fh.write(b'{"file": "/a", "offs')  # a crash in the middle of a report
    log = QuarantineLog(path)
    assert not log.add({"file": "/a", "offset": 1, "kind": "corrupt"})
    assert log.add({"file": "/a", "offset": 2, "kind": "corrupt"})
    log.sync()
    lines = path.read_bytes().splitlines()
    assert [orjson.loads(x)["offset"] for x in (lines[0], lines[2])] == [1, 2]
