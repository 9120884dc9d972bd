"""``ff-sync verify``: a clean sync verifies; each kind of damage to the store is reported."""

from __future__ import annotations

import json
import socket
import sqlite3
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from formula_foundry.sync.commands.cli import main
from formula_foundry.tracking.events import frame

from .conftest import RICH_SPOOL, Project


def _verify(project: Project, *args: str, uri: str | None = None) -> tuple[int, str, str]:
    """``ff-sync verify`` in process (MLflow imported once for the whole test session)."""
    head = ["--config", str(project.config)]
    if uri is not None:
        head += ["--tracking-uri", uri]
    result = CliRunner().invoke(main, [*head, "verify", *args], prog_name="ff-sync")
    return result.exit_code, result.stdout, result.stderr


def _json(project: Project, uri: str | None = None) -> tuple[int, dict[str, Any]]:
    code, out, _ = _verify(project, "--json", uri=uri)
    return code, json.loads(out)


def _synced(project: Project) -> tuple[str, str, str]:
    """The rich spool, synced; its three run ids (parent, child, failed child)."""
    parent, child, broken = project.spool(RICH_SPOOL, "5").split()
    assert project.sync().exit_code == 0
    return parent, child, broken


def _sql(project: Project, statement: str, *args: object) -> int:
    db = sqlite3.connect(project.db)
    try:
        with db:
            return db.execute(statement, args).rowcount
    finally:
        db.close()


def _mlflow_id(project: Project, uuid: str) -> str:
    db = sqlite3.connect(project.db)
    try:
        row = db.execute(
            "SELECT run_uuid FROM tags WHERE key = 'ff.run_uuid' AND value = ?", (uuid,)
        ).fetchone()
    finally:
        db.close()
    return str(row[0])


def _kinds(report: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    return [(d["run"], d["kind"], d["key"]) for d in report["differences"]]


def test_a_clean_sync_verifies(project: Project) -> None:
    _synced(project)
    result = project.ff_sync("verify")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout == f"ff-sync: verify: OK: 3 runs match -> {project.uri}\n"
    code, report = _json(project)
    assert code == 0
    assert report == {
        "version": 1,
        "destination": project.uri,
        "ok": True,
        "runs_checked": 3,
        "runs_differing": 0,
        "differences": [],
    }


def test_a_deleted_metric_point_is_reported(project: Project) -> None:
    parent, _, _ = _synced(project)
    run_id = _mlflow_id(project, parent)
    assert (
        _sql(
            project, "DELETE FROM metrics WHERE run_uuid = ? AND key = 'loss' AND step = 2", run_id
        )
        == 1
    )
    code, out, _ = _verify(project)
    assert code == 1
    assert f"run {parent}: metric 'loss': 1 points missing from the destination: (step 2, " in out
    code, report = _json(project)
    assert code == 1 and _kinds(report) == [(parent, "missing_metric_points", "loss")]
    (diff,) = report["differences"]
    assert diff["count"] == 1 and diff["expected"][0][0] == 2 and diff["expected"][0][2] == 1 / 3


def test_an_extra_metric_point_and_nan_are_compared_exactly(project: Project) -> None:
    parent, _, _ = _synced(project)
    run_id = _mlflow_id(project, parent)
    # NaN (stored as is_nan), +inf and -inf (stored as ±max float) all verified above; now
    # an extra point next to the NaN one.
    _sql(
        project,
        "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
        "SELECT key, 0.0, timestamp, run_uuid, 99, 1 FROM metrics "
        "WHERE run_uuid = ? AND key = 'odd' AND step = 1",
        run_id,
    )
    code, report = _json(project)
    assert code == 1 and _kinds(report) == [(parent, "extra_metric_points", "odd")]
    assert report["differences"][0]["actual"][0][0] == 99
    assert report["differences"][0]["actual"][0][2] == "NaN"


def test_a_changed_param_is_reported(project: Project) -> None:
    parent, _, _ = _synced(project)
    _sql(project, "UPDATE params SET value = '0.2' WHERE key = 'lr'")
    code, out, _ = _verify(project)
    assert code == 1
    assert f"run {parent}: param 'lr' is '0.2', the spool says '0.1'" in out
    assert out.endswith(f"ff-sync: verify: 1 differences in 1 of 3 runs -> {project.uri}\n")
    code, report = _json(project)
    (diff,) = report["differences"]
    assert (diff["kind"], diff["key"], diff["expected"], diff["actual"]) == (
        "param_mismatch",
        "lr",
        "0.1",
        "0.2",
    )


def test_a_missing_run_is_reported(project: Project) -> None:
    _, child, _ = _synced(project)
    run_id = _mlflow_id(project, child)
    for table in ("metrics", "latest_metrics", "params", "tags", "runs"):
        _sql(project, f"DELETE FROM {table} WHERE run_uuid = ?", run_id)
    code, out, _ = _verify(project)
    assert code == 1
    assert out.startswith(f"run {child} is not in the destination\n")
    code, report = _json(project)
    assert _kinds(report) == [(child, "missing_run", None)]


def test_a_wrong_status_is_reported(project: Project) -> None:
    _, _, broken = _synced(project)
    _sql(
        project,
        "UPDATE runs SET status = 'FINISHED' WHERE run_uuid = ?",
        _mlflow_id(project, broken),
    )
    code, out, _ = _verify(project)
    assert code == 1
    assert f"run {broken}: status is FINISHED, the spool says FAILED" in out
    code, report = _json(project)
    assert _kinds(report) == [(broken, "status_mismatch", None)]


def test_a_changed_tag_a_lost_parent_link_and_a_changed_end_time_are_reported(
    project: Project,
) -> None:
    parent, child, _ = _synced(project)
    _sql(project, "UPDATE tags SET value = 'three' WHERE key = 'phase'")
    _sql(
        project,
        "DELETE FROM tags WHERE key = 'mlflow.parentRunId' AND run_uuid = ?",
        _mlflow_id(project, child),
    )
    _sql(
        project,
        "UPDATE runs SET end_time = end_time + 1 WHERE run_uuid = ?",
        _mlflow_id(project, parent),
    )
    code, report = _json(project)
    assert code == 1
    assert sorted(_kinds(report)) == sorted(
        [
            (parent, "end_time_mismatch", None),
            (parent, "tag_mismatch", "phase"),
            (child, "missing_tag", "mlflow.parentRunId"),
        ]
    )


def test_tags_mlflow_adds_itself_are_ignored(project: Project) -> None:
    parent, _, _ = _synced(project)
    _sql(
        project,
        "INSERT INTO tags (key, value, run_uuid) VALUES ('mlflow.log-model.history', '[]', ?)",
        _mlflow_id(project, parent),
    )
    assert _verify(project)[0] == 0
    _sql(
        project,
        "INSERT INTO tags (key, value, run_uuid) VALUES ('extra', 'x', ?)",
        _mlflow_id(project, parent),
    )
    code, report = _json(project)
    assert code == 1 and _kinds(report) == [(parent, "extra_tag", "extra")]


def test_a_missing_artifact_reference_is_reported(project: Project) -> None:
    parent, _, _ = _synced(project)
    (doc,) = (project.root / "data" / "mlflow" / "artifacts").rglob("coupon.kicad_pcb.json")
    doc.unlink()
    code, report = _json(project)
    assert code == 1 and _kinds(report) == [
        (parent, "missing_artifact_ref", "out/coupon.kicad_pcb")
    ]


def test_events_not_synced_yet_are_differences(project: Project) -> None:
    _synced(project)
    (late,) = project.spool(
        'with tracker.start_run(run_name="late") as r:\n    print(r.run_id)\n'
    ).split()
    code, report = _json(project)
    assert code == 1 and _kinds(report) == [(late, "missing_run", None)]
    assert project.sync().exit_code == 0
    assert _verify(project)[0] == 0


def test_quarantined_records_are_expected_absent(project: Project) -> None:
    parent, _, _ = _synced(project)
    t = 4_000_000_000_000
    seg = project.spool_root / parent / f"seg-{t}-otherhost-7-a1b2c3.jsonl"
    header = {"v": 1, "s": 0, "t": t, "k": "segment", "format": 1, "run": parent}
    records: list[dict[str, Any]] = [
        {"k": "metrics", "step": 50, "d": {"loss": "not a number"}},  # invalid
        {"k": "params", "d": {"lr": "0.5", "new": "kept"}},  # lr conflicts, new is synced
        {"k": "metrics", "step": 51, "d": {"loss": 0.5}},
        {"k": "run_end", "status": "EXPLODED"},  # invalid
    ]
    body = [{"v": 1, "s": i + 1, "t": t + i, **r} for i, r in enumerate(records)]
    lines = [frame(header), *(frame(r) for r in body)]
    lines.insert(3, b"this is not json\n")  # corrupt (and a sequence gap after it)
    seg.write_bytes(b"".join(lines))
    assert project.sync().exit_code == 1
    code, out, _ = _verify(project)
    assert code == 0, out


def test_a_run_ended_by_the_sync_as_dead_verifies(project: Project) -> None:
    (run,) = project.spool(
        """
        import os
        r = tracker.start_run(run_name="killed")
        r.log_metric("m", 1.0)
        print(r.run_id, flush=True)
        os._exit(0)  # no end event, like SIGKILL
        """
    ).split()
    assert project.sync().exit_code == 0
    code, report = _json(project)
    assert code == 0, report  # RUNNING, as the spool says
    result = project.ff_sync("--stale-after", "0.001")
    assert result.returncode == 0 and "1 dead run" in result.stdout + result.stderr
    code, report = _json(project)
    assert code == 0, report  # KILLED by stale detection: legitimate
    state = sqlite3.connect(project.state_folder() / "state.sqlite3")
    with state:
        state.execute("DELETE FROM stale_ended")
    state.close()
    code, report = _json(project)
    assert code == 1 and _kinds(report) == [(run, "status_mismatch", None)]


def test_a_sync_and_a_replay_into_a_second_store_both_verify(
    project: Project, tmp_path: Path
) -> None:
    _synced(project)
    second = f"sqlite:///{tmp_path / 'second.db'}"
    result = project.ff_sync("--tracking-uri", second, "--replay")
    assert result.returncode == 0, result.stderr
    for uri in (project.uri, second):
        result = project.ff_sync("--tracking-uri", uri, "verify")
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout == f"ff-sync: verify: OK: 3 runs match -> {uri}\n"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unavailable_destination_exits_75_without_its_password(project: Project) -> None:
    _synced(project)
    uri = f"postgresql://ff:hunter2secret@127.0.0.1:{_closed_port()}/mlflow"
    code, out, err = _verify(project, uri=uri)
    assert code == 75 and out == ""
    assert err.startswith("ff-sync: error: postgresql://ff:***@127.0.0.1:") and "unavailable" in err
    assert "hunter2secret" not in err


def test_a_missing_sqlite_store_exits_2_and_is_not_created(
    project: Project, tmp_path: Path
) -> None:
    _synced(project)
    missing = tmp_path / "nowhere" / "gone.db"
    code, _, err = _verify(project, uri=f"sqlite:///{missing}")
    assert code == 2 and f"no store at {missing}" in err  # a typo, not an outage (issue 11.7)
    assert not missing.exists() and not missing.parent.exists()


def test_usage_errors_exit_2(project: Project) -> None:
    assert _verify(project, "--bogus")[0] == 2
    code, _, err = _verify(project, uri="ftp://host/x")
    assert code == 2 and "unsupported scheme" in err
