"""One pass, again and again: what arrives in MLflow, idempotence, idle passes, state, replay."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat

import orjson

from formula_foundry.sync.engine.sink import artifact_ref_file
from tests.tracking._helpers import segments

from .conftest import RICH_SPOOL, Project, tree


def _rich(project: Project, points: int = 50) -> tuple[str, str, str]:
    parent, child, broken = project.spool(RICH_SPOOL, str(points)).split()
    return parent, child, broken


def _events(project: Project, run: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for seg in segments(project.spool_root, run):
        out += [orjson.loads(line) for line in seg.read_bytes().splitlines()]
    return out


def test_a_pass_gives_mlflow_what_the_runs_logged(project: Project) -> None:
    parent, child, broken = _rich(project, points=1500)
    result = project.ff_sync()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ff-sync: synced: 3 runs, ")
    assert ", 0 quarantined in " in result.stdout

    snap = project.snapshot()
    assert snap["duplicates"] == {} and snap["untracked_runs"] == 0
    assert set(snap["experiments"]) >= {"formula-foundry", "ff-m2-simulation"}
    runs = snap["runs"]
    assert set(runs) == {parent, child, broken}
    p = runs[parent]
    ev = _events(project, parent)
    start = next(e for e in ev if e["k"] == "run_start")
    end = next(e for e in ev if e["k"] == "run_end")
    assert (p["name"], p["experiment"], p["status"]) == ("parent", "formula-foundry", "FINISHED")
    assert (p["start_time"], p["end_time"]) == (start["t"], end["t"])
    assert p["params"] == {"lr": "0.1", "layers": "4"}
    assert p["tags"]["phase"] == "two" and p["tags"]["team"] == "si"
    assert p["tags"]["ff.run_uuid"] == parent and p["tags"]["mlflow.source.type"] == "LOCAL"
    assert p["tags"]["mlflow.user"] == start["user"] and p["tags"]["ff.host"] == start["host"]
    assert p["tags"]["mlflow.runName"] == "parent"
    assert p["tags"]["mlflow.source.name"] == start["source"]
    # Every point with its own step and original timestamp; NaN kept, ±inf clamped by MLflow.
    loss = p["metrics"]["loss"]
    assert [s for s, _, _ in loss] == list(range(1500))
    metric_ts = [e["t"] for e in ev if e["k"] == "metrics" and "loss" in e["d"]]
    assert [t for _, t, _ in loss] == metric_ts
    assert [v for _, _, v in loss] == [repr(1.0 / (i + 1)) for i in range(1500)]
    assert [v for _, _, v in p["metrics"]["odd"]] == [
        "nan",
        repr(1.7976931348623157e308),
        repr(-1.7976931348623157e308),
    ]
    assert p["metrics"]["b"][0][::2] == [7, "-2.0"]
    assert p["latest_metrics"]["loss"] == repr(1.0 / 1500)
    ref = p["artifact_refs"][artifact_ref_file("out/coupon.kicad_pcb")]
    assert ref["digest"] == "sha256:" + "ab" * 32 and ref["size_bytes"] == 1234
    assert ref["logical_path"] == "out/coupon.kicad_pcb"
    assert ref["store_root"] == str(project.root / "data" / "artifacts")
    # Nesting, across experiments; the failed child keeps its status.
    assert runs[child]["parent"] == parent and runs[child]["experiment"] == "ff-m2-simulation"
    assert runs[child]["params"] == {"solver": "fdtd"}
    assert runs[broken]["parent"] == parent and runs[broken]["status"] == "FAILED"


def test_a_second_pass_sends_nothing_and_changes_nothing(project: Project) -> None:
    _rich(project)
    first = project.sync()
    assert first.exit_code == 0 and first.events > 0
    before = project.snapshot()
    again = project.sync()
    assert (again.idle, again.events, again.runs, again.metrics) == (True, 0, 0, 0)
    assert again.summary().startswith("ff-sync: nothing new: 0 runs, 0 events, 0 quarantined")
    assert project.snapshot() == before


def test_an_idle_pass_does_not_import_mlflow(project: Project) -> None:
    _rich(project)
    assert project.ff_sync().returncode == 0
    probe = """
    import sys
    from formula_foundry.sync.commands.cli import main
    try:
        main(["--config", sys.argv[1]], prog_name="ff-sync")
    except SystemExit as exc:
        code = exc.code
    print(code, "mlflow" in sys.modules, sorted(m for m in sys.modules if m.startswith("mlflow")))
    """
    out = project.python(probe, str(project.config)).stdout.split("\n")
    assert (
        out[0]
        == "ff-sync: nothing new: 0 runs, 0 events, 0 quarantined in " + out[0].split(" in ")[1]
    )
    assert out[1] == "0 False []"
    # A logged file into the local artifact root goes without MLflow too (its protocol, by
    # local_upload), as new metrics do (test_lean_imports.py).
    project.spool(
        'open("late.txt", "w").write("x")\n'
        'with tracker.start_run(run_name="late") as r:\n    r.log_artifact("late.txt")\n'
    )
    out = project.python(probe, str(project.config)).stdout.split("\n")
    assert out[1] == "0 False []"
    (late,) = (project.root / "data" / "mlflow" / "artifacts").rglob("late.txt")
    assert late.read_text() == "x"
    # The probe can fail: an artifact reference pending, the same pass imports MLflow (its
    # artifact client writes the reference document).
    project.spool(
        'with tracker.start_run(run_name="ref") as r:\n'
        '    r.log_artifact_reference("out/x.bin", "sha256:" + "cd" * 32, 3)\n'
    )
    out = project.python(probe, str(project.config)).stdout.split("\n")
    assert out[1].startswith("0 True ")


def test_the_sync_never_writes_under_the_spool_root(project: Project) -> None:
    _rich(project)
    before = tree(project.spool_root)
    modes = {}
    for path in [project.spool_root, *project.spool_root.rglob("*")]:
        modes[path] = path.stat().st_mode
        path.chmod(stat.S_IMODE(path.stat().st_mode) & ~0o222)  # read-only copy of the spool
    try:
        assert project.ff_sync().returncode == 0
        assert project.ff_sync().returncode == 0
        assert project.ff_sync("--replay").returncode == 0
    finally:
        for path, mode in modes.items():
            path.chmod(stat.S_IMODE(mode))
    after = tree(project.spool_root)
    assert after.keys() == before.keys()
    assert {k: v[:2] for k, v in after.items()} == {k: v[:2] for k, v in before.items()}
    assert len(project.snapshot()["runs"]) == 3


def test_progress_is_recorded_per_destination_and_destinations_are_independent(
    project: Project,
) -> None:
    _rich(project)
    other = f"sqlite:///{project.root / 'other.db'}"
    assert project.sync().exit_code == 0
    second = project.sync(tracking_uri=other)
    assert second.runs == 3 and second.events > 0
    assert project.snapshot(other)["runs"] == project.snapshot()["runs"]
    folders = sorted(p.name for p in project.state_dir.iterdir())
    assert len(folders) == 2 and all(f.startswith("sqlite-") for f in folders)
    text = (project.state_folder(other) / "destination.txt").read_text()
    assert text == other + "\n"


def test_losing_the_sync_state_resends_without_duplicating(project: Project) -> None:
    _rich(project)
    assert project.sync().exit_code == 0
    reference = project.snapshot()
    shutil.rmtree(project.state_dir)
    report = project.sync()
    assert report.exit_code == 0 and report.runs == 3
    assert project.snapshot() == reference


def test_replay_sends_everything_again_into_a_restored_store(project: Project) -> None:
    _rich(project)
    assert project.sync().exit_code == 0
    reference = project.snapshot()
    project.db.unlink()  # "restored" from a backup taken before the first sync
    # The store is not the one the state describes: noticed without --replay (issue 11.3).
    assert not project.sync().idle
    result = project.ff_sync("--replay")
    assert result.returncode == 0, result.stderr
    assert project.snapshot() == reference
    # Replaying into a store that has it all converges to the same state, too.
    assert project.ff_sync("--replay").returncode == 0
    assert project.snapshot() == reference


def test_big_events_are_split_within_mlflow_limits_and_tags_keep_the_last_value(
    project: Project,
) -> None:
    project.spool(
        """
        with tracker.start_run(run_name="wide") as r:
            r.log_params({f"p{i}": i for i in range(250)})
            r.log_metrics({f"m{i}": float(i) for i in range(2500)}, step=3)
            r.set_tags({f"t{i}": "a" for i in range(150)})
            r.set_tags({f"t{i}": "b" for i in range(0, 150, 2)})
        print(r.run_id)
        """
    )
    report = project.sync()
    assert report.exit_code == 0 and report.metrics == 2500
    (run,) = project.snapshot()["runs"].values()
    assert run["params"] == {f"p{i}": str(i) for i in range(250)}
    assert len(run["metrics"]) == 2500
    assert run["metrics"]["m2499"] == [[3, run["metrics"]["m0"][0][1], "2499.0"]]
    assert {k: v for k, v in run["tags"].items() if k.startswith("t")} == {
        f"t{i}": "b" if i % 2 == 0 else "a" for i in range(150)
    }


def test_a_run_resumed_in_a_second_segment_is_merged_into_one_mlflow_run(
    project: Project,
) -> None:
    out = project.spool(
        """
        with tracker.start_run(run_name="job") as r:
            r.log_param("seed", 1)
            for i in range(10):
                r.log_metric("loss", float(i), step=i)
            r.end("KILLED")
        print(r.run_id)
        """
    )
    spool_run_id = out.strip()
    assert project.sync().exit_code == 0
    assert project.snapshot()["runs"][spool_run_id]["status"] == "KILLED"
    # A requeued job appends a segment of its own to the same run (what issue 5 automates).
    from formula_foundry.tracking.events import frame

    seg = project.spool_root / spool_run_id / f"seg-{10**13}-host-1-abcdef.jsonl"
    lines = [
        {
            "v": 1,
            "s": 0,
            "t": 10**13,
            "k": "segment",
            "format": 1,
            "run": spool_run_id,
            "host": "h",
            "pid": 1,
            "segment": seg.name,
        },
        {
            "v": 1,
            "s": 1,
            "t": 10**13,
            "k": "run_start",
            "run": spool_run_id,
            "experiment": "formula-foundry",
            "name": "job",
            "parent": None,
            "user": "u",
            "host": "h",
            "pid": 1,
            "source": "x",
            "command": [],
        },
        {"v": 1, "s": 2, "t": 10**13 + 1, "k": "params", "d": {"seed": "1"}},
        *(
            {
                "v": 1,
                "s": 3 + i,
                "t": 10**13 + 2,
                "k": "metrics",
                "step": 10 + i,
                "d": {"loss": float(10 + i)},
            }
            for i in range(5)
        ),
    ]
    seg.write_bytes(b"".join(frame(rec) for rec in lines))
    assert project.sync().exit_code == 0
    run = project.snapshot()["runs"][spool_run_id]
    assert run["status"] == "RUNNING"  # reopened until the resumed job ends
    assert [s for s, _, _ in run["metrics"]["loss"]] == list(range(15))
    with open(seg, "ab") as fh:
        fh.write(frame({"v": 1, "s": 8, "t": 10**13 + 9, "k": "run_end", "status": "FINISHED"}))
    assert project.sync().exit_code == 0
    run = project.snapshot()["runs"][spool_run_id]
    assert (run["status"], run["end_time"]) == ("FINISHED", 10**13 + 9)
    assert len(project.snapshot()["runs"]) == 1


def test_report_state_rows_follow_the_segments(project: Project) -> None:
    parent, _, _ = _rich(project)
    assert project.sync().exit_code == 0
    import sqlite3

    db = sqlite3.connect(project.state_folder() / "state.sqlite3")
    rows = db.execute("SELECT rel, byte_offset, size_seen, done FROM segments").fetchall()
    assert len(rows) == 3
    for rel, offset, size_seen, done in rows:
        size = os.path.getsize(project.spool_root / rel)
        assert offset == size_seen == size and done == 1
    runs = dict(db.execute("SELECT run_uuid, status FROM runs").fetchall())
    assert runs[parent] == "FINISHED"


def test_a_run_the_store_lost_is_sent_again_whole(project: Project) -> None:
    """The store was replaced (restored from an old backup) under a run the state had mapped."""
    run = project.spool(
        'with tracker.start_run(run_name="r") as r:\n'
        "    for i in range(20):\n"
        '        r.log_metric("m", float(i), step=i)\n'
        "print(r.run_id)"
    ).strip()
    assert project.sync().exit_code == 0
    reference = project.snapshot()
    # The run alone is lost (a losing restore, a hard delete): the store itself is still the one
    # the state describes (a replaced store is noticed earlier, by its identity).
    db = sqlite3.connect(project.db, isolation_level=None)
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    for table in tables:
        if "run_uuid" in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"DELETE FROM {table}")
    db.close()
    # A new segment of the same run (a resumed job) makes the run pending again.
    from formula_foundry.tracking.events import frame

    t = 5_000_000_000_000
    seg = project.spool_root / run / f"seg-{t}-h-2-aaaaaa.jsonl"
    seg.write_bytes(
        frame({"v": 1, "s": 0, "t": t, "k": "segment", "format": 1, "run": run, "host": "h",
               "pid": 2, "segment": seg.name})
        + frame({"v": 1, "s": 1, "t": t, "k": "tags", "d": {"resumed": "yes"}})
    )  # fmt: skip
    # A fresh process, as ff-sync always is (MLflow caches each store for a process's life).
    result = project.ff_sync()
    assert result.returncode == 0, result.stderr
    assert "ff-sync: warning: run " in result.stderr and "resending the whole run" in result.stderr
    got = project.snapshot()["runs"][run]
    assert got["tags"].pop("resumed") == "yes"
    assert got == reference["runs"][run]


def test_a_segment_that_shrank_is_reported_not_reread(project: Project) -> None:
    run = project.spool(
        'with tracker.start_run(run_name="r") as r:\n    r.log_metric("m", 1.0)\nprint(r.run_id)'
    ).strip()
    assert project.sync().exit_code == 0
    (seg,) = (project.spool_root / run).glob("seg-*.jsonl")
    seg.write_bytes(seg.read_bytes()[:50])
    report = project.sync()
    assert report.exit_code == 0 and report.events == 0
    assert any("shorter than the" in w for w in report.warnings)
    assert project.sync().idle


def test_a_job_resumed_with_the_tracker_stays_one_mlflow_run(project: Project) -> None:
    job = """
    import sys
    run = tracker.start_run(run_name="sweep", run_id="coupon-sweep-42")
    first = int(sys.argv[1])
    for i in range(first, first + 50):
        run.log_metric("loss", 1.0 / (i + 1), step=i)
    run.end(sys.argv[2])
    """
    project.spool(job, "0", "KILLED")  # the job hit its time limit
    assert project.sync().exit_code == 0
    assert project.snapshot()["runs"]["coupon-sweep-42"]["status"] == "KILLED"
    project.spool(job, "50", "FINISHED")  # requeued: same run id, a new segment
    report = project.sync()
    assert report.exit_code == 0 and report.runs == 1
    snap = project.snapshot()
    assert list(snap["runs"]) == ["coupon-sweep-42"]
    run = snap["runs"]["coupon-sweep-42"]
    assert run["status"] == "FINISHED" and run["name"] == "sweep"
    assert [s for s, _, _ in run["metrics"]["loss"]] == list(range(100))
    # The same from scratch (state lost) gives the same run.
    shutil.rmtree(project.state_dir)
    assert project.sync().exit_code == 0
    assert project.snapshot() == snap


def test_a_run_resumed_under_a_new_name_takes_that_name(project: Project) -> None:
    # The handle says the new name; MLflow must too (it renames a run on its mlflow.runName
    # tag), not silently keep the first start's name.
    job = """
    import sys
    run = tracker.start_run(run_name=sys.argv[1], run_id="renamed-7")
    print(run.run_name)
    run.end()
    """
    assert project.spool(job, "first").strip() == "first"
    assert project.sync().exit_code == 0
    assert project.snapshot()["runs"]["renamed-7"]["name"] == "first"
    assert project.spool(job, "second").strip() == "second"
    assert project.sync().exit_code == 0
    run = project.snapshot()["runs"]["renamed-7"]
    assert (run["name"], run["tags"]["mlflow.runName"]) == ("second", "second")
    assert project.ff_sync("verify").returncode == 0
