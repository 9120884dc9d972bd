from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formula_foundry.errors import ValidationError
from formula_foundry.substrate import (
    DeterminismConfig,
    InvalidRunId,
    Manifest,
    RunArtifacts,
    RunDirExists,
    create_run,
    init_run_dir,
)
from formula_foundry.substrate.run_dir import new_run_id


def test_init_run_dir_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = init_run_dir(run_root=Path("data/runs"), run_id="run-001")
    assert isinstance(run, RunArtifacts)
    assert run.run_id == "run-001"
    assert run.run_dir == (tmp_path / "data" / "runs" / "run-001").resolve()
    assert run.run_dir.is_absolute()
    assert run.outputs_dir.is_dir() and run.logs_dir.is_dir()
    assert run.manifest_path == run.run_dir / "manifest.json"
    assert sorted(p.name for p in run.run_dir.iterdir()) == ["logs", "outputs"]


@pytest.mark.parametrize(
    "run_id",
    [
        "",
        ".",
        "..",
        "../escape",
        "a/b",
        "a\\b",
        ".hidden",
        "nul\x00",
        "a b",
        "é",
        "-x",
        "x" * 129,
        "/abs",
    ],
)
def test_bad_run_ids_are_rejected_and_named(tmp_path: Path, run_id: str) -> None:
    with pytest.raises(InvalidRunId) as info:
        init_run_dir(tmp_path / "runs", run_id)
    assert repr(run_id) in str(info.value)
    assert isinstance(info.value, ValidationError)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_non_string_run_id(tmp_path: Path) -> None:
    with pytest.raises(InvalidRunId, match="expected a str"):
        init_run_dir(tmp_path, 7)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", fullmatch=True))
def test_valid_run_ids_stay_one_level_below_root(
    tmp_path_factory: pytest.TempPathFactory, run_id: str
) -> None:
    root = tmp_path_factory.mktemp("r")
    run = init_run_dir(root, run_id)
    assert run.run_dir.parent == root.resolve()
    assert run.run_dir.name == run_id


def test_non_empty_run_dir_needs_resume(tmp_path: Path) -> None:
    run = init_run_dir(tmp_path, "run-1")
    (run.outputs_dir / "result.txt").write_text("42")
    with pytest.raises(RunDirExists, match="resume=True") as info:
        init_run_dir(tmp_path, "run-1")
    assert str(run.run_dir) in str(info.value)
    resumed = init_run_dir(tmp_path, "run-1", resume=True)
    assert resumed == run
    assert (resumed.outputs_dir / "result.txt").read_text() == "42"


def test_empty_existing_dir_is_adopted_and_resume_creates(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert init_run_dir(tmp_path, "empty").outputs_dir.is_dir()
    assert init_run_dir(tmp_path, "fresh", resume=True).logs_dir.is_dir()


def test_run_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x")
    with pytest.raises(RunDirExists, match="not a directory"):
        init_run_dir(tmp_path, "taken", resume=True)


def test_create_run_writes_manifest_with_sortable_id(
    project: Path, distributions: list[tuple[str, str]]
) -> None:
    manifest = Manifest.from_environment(
        determinism=DeterminismConfig(mode="relaxed", seed=1), distributions=distributions
    )
    first = create_run(project / "runs", manifest)
    second = create_run(project / "runs", manifest)
    assert first.run_id != second.run_id
    assert sorted([second.run_id, first.run_id]) == [first.run_id, second.run_id]
    assert first.load_manifest() == manifest
    assert first.manifest_path.read_bytes() == manifest.canonical_bytes()
    default = create_run(project / "runs", determinism=DeterminismConfig(mode="off"))
    assert default.load_manifest().determinism_mode == "off"
    with pytest.raises(ValidationError, match="not both"):
        create_run(project / "runs", manifest, determinism=DeterminismConfig(mode="off"))


def test_new_run_id_format() -> None:
    from datetime import datetime, timezone

    run_id = new_run_id(datetime(2025, 1, 2, 3, 4, 5, 678_000, tzinfo=timezone.utc))
    assert run_id.startswith("20250102T030405.678Z-")
    assert len(run_id) == len("20250102T030405.678Z-") + 8


def test_link_tracking_run_round_trip(tmp_path: Path) -> None:
    run = init_run_dir(tmp_path, "r")
    run.link_tracking_run("uuid-1", "ff-m3-pipeline", "linked-run")
    run.link_tracking_run("uuid-2", "ff-m3-pipeline", None)
    records = run.tracking_runs()
    assert [(r["run_uuid"], r["experiment"], r["run_name"]) for r in records] == [
        ("uuid-1", "ff-m3-pipeline", "linked-run"),
        ("uuid-2", "ff-m3-pipeline", None),
    ]
    assert all(isinstance(r["time_ms"], int) and r["time_ms"] > 1_600_000_000_000 for r in records)
    lines = run.tracking_runs_path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", "exp", None), "tracking run id"),
        (("u", "", None), "experiment"),
        (("u", "e", 3), "run name"),
    ],
)
def test_link_tracking_run_validates(
    tmp_path: Path, args: tuple[object, ...], message: str
) -> None:
    run = init_run_dir(tmp_path, "r")
    with pytest.raises(ValidationError, match=message):
        run.link_tracking_run(*args)  # type: ignore[arg-type]
    assert run.tracking_runs() == []


def test_tracking_runs_reader_contract(tmp_path: Path) -> None:
    run = init_run_dir(tmp_path, "r")
    run.link_tracking_run("a", "e", None)
    with open(run.tracking_runs_path, "ab") as f:
        f.write(b"garbage line\n")
        f.write(b"\x00\x00\x00" + json.dumps({"run_uuid": "b"}).encode() + b"\n")
        f.write(b'{"run_uuid": "unfinished"')  # torn tail: a writer is mid-line
    assert [r["run_uuid"] for r in run.tracking_runs()] == ["a", "b"]


_APPENDER = """
import sys
from pathlib import Path
from formula_foundry.substrate import init_run_dir
run = init_run_dir(Path(sys.argv[1]), "shared", resume=True)
for i in range(40):
    run.link_tracking_run(f"{sys.argv[2]}-{i}", "exp", "x" * 3000)
"""


def test_concurrent_link_tracking_run_never_interleaves(tmp_path: Path) -> None:
    import subprocess
    import sys

    procs = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, str(tmp_path), f"p{n}"])
        for n in range(4)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    run = init_run_dir(tmp_path, "shared", resume=True)
    uuids = [r["run_uuid"] for r in run.tracking_runs()]
    assert sorted(uuids) == sorted(f"p{n}-{i}" for n in range(4) for i in range(40))
    assert len(run.tracking_runs_path.read_bytes().splitlines()) == 160
    assert os.stat(run.tracking_runs_path).st_size > 160 * 3000
