"""docs/tracker.md runs as written.

Every ```python block of the page runs, in document order, as ``example.py`` in a fresh
interpreter and a fresh project folder (``ff_project``): one subprocess per block, so each block
is shown to stand alone, as the page promises. The line before a block names what the test
checks afterwards (``<!-- check: NAME -->``, a function of ``CHECKS``, mostly reading the spool
back with ``SegmentReader``) or why it cannot run here (``<!-- not run: REASON -->``: only
compiled). A block with neither fails, and so does a check no block names.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from formula_foundry.tracking.spool_reader import Event, SegmentReader
from formula_foundry.tracking.spool_writer import is_segment_name, segment_started_ms
from tests.conftest import REPO_ROOT

DOC = REPO_ROOT / "docs" / "tracker.md"
FF_SYNC = str(Path(sys.executable).with_name("ff-sync"))
_FENCE = re.compile(r"^```python\n(.*?)^```[ \t]*$", re.S | re.M)
_MARK = re.compile(r"<!-- (check|not run): *(\S.*?) *-->")

Result = subprocess.CompletedProcess[str]


@dataclass(frozen=True)
class Block:
    line: int
    code: str
    mark: str | None  # "check", "not run", or None when the block has no marker
    value: str = ""  # the check's name, or the reason it is not run

    @property
    def id(self) -> str:
        kind = {"check": self.value, "not run": "not-run"}.get(self.mark or "", "unmarked")
        return f"line{self.line}-{kind}"


def parse_blocks(text: str) -> list[Block]:
    """The page's python blocks with the marker on the line before each (if any)."""
    blocks = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rpartition("\n")[2].strip()
        line = text.count("\n", 0, m.start()) + 1
        mark = _MARK.fullmatch(before)
        if mark is None:
            blocks.append(Block(line, m.group(1), None))
        else:
            blocks.append(Block(line, m.group(1), mark.group(1), mark.group(2)))
    return blocks


BLOCKS = parse_blocks(DOC.read_text(encoding="utf-8"))


# -- reading the spool back ----------------------------------------------------------------


@dataclass
class Spooled:
    """One run of the spool: its first start and its segments' events in the sync's order."""

    run_id: str
    start: dict[str, Any]
    segments: list[list[Event]] = field(default_factory=list)

    @property
    def events(self) -> list[Event]:
        return [ev for seg in self.segments for ev in seg]

    def kinds(self) -> list[str]:
        return [ev.kind for ev in self.events]

    def data(self, kind: str) -> list[dict[str, Any]]:
        return [ev.data for ev in self.events if ev.kind == kind]

    def metrics(self) -> dict[str, list[tuple[int, Any]]]:
        out: dict[str, list[tuple[int, Any]]] = {}
        for rec in self.data("metrics"):
            for key, value in rec["d"].items():
                out.setdefault(key, []).append((rec["step"], value))
        return out


def spool(project: Path) -> dict[str, Spooled]:
    """Every run spooled under the project's data/runs, by run name; no problem allowed."""
    runs: dict[str, Spooled] = {}
    root = project / "data" / "runs"
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        names = sorted(
            (p.name for p in folder.iterdir() if is_segment_name(p.name)),
            key=lambda n: (segment_started_ms(n), n),
        )
        if not names:
            continue  # a substrate run directory, not a spool
        segments = []
        for name in names:
            items = list(SegmentReader(folder / name))
            problems = [i for i in items if not isinstance(i, Event)]
            assert not problems, problems
            segments.append([i for i in items if isinstance(i, Event)])
        starts = [ev.data for seg in segments for ev in seg if ev.kind == "run_start"]
        first = next(s for s in starts if not s["resume"])
        assert first["name"] not in runs, f"two runs named {first['name']!r}"
        runs[first["name"]] = Spooled(folder.name, first, segments)
    return runs


def ended(run: Spooled) -> list[tuple[str, str | None]]:
    return [(e["status"], e.get("reason")) for e in run.data("run_end")]


def tags(run: Spooled) -> dict[str, str]:
    out: dict[str, str] = {}
    for rec in run.data("tags"):
        out.update(rec["d"])
    return out


def params(run: Spooled) -> dict[str, str]:
    out: dict[str, str] = {}
    for rec in run.data("params"):
        out.update(rec["d"])
    return out


def lines(out: Result) -> list[str]:
    return out.stdout.splitlines()


# -- the checks, one per block -------------------------------------------------------------


def check_get_tracker(project: Path, out: Result) -> None:
    assert lines(out) == [str(project / "data" / "runs"), "False"]
    assert not (project / "data").exists()  # reading the configuration creates nothing


def check_get_tracker_config(project: Path, out: Result) -> None:
    assert lines(out) == ["fsync"]
    run = spool(project)["durable"]
    assert run.metrics() == {"loss": [(0, 0.25)]}
    assert ended(run) == [("FINISHED", None)]


def check_start_run(project: Path, out: Result) -> None:
    assert lines(out) == ["formula-foundry", "FINISHED"]
    run = spool(project)["my-coupon-build"]
    assert run.kinds() == ["segment", "run_start", "params", "metrics", "tags", "run_end"]
    assert run.start["experiment"] == "formula-foundry" and run.start["parent"] is None
    assert params(run) == {"coupon_family": "F1_SINGLE_ENDED_VIA"}
    assert run.metrics() == {"build_time_seconds": [(0, 12.5)]}
    assert tags(run) == {"status": "success"}
    assert ended(run) == [("FINISHED", None)]


def check_experiment_name(project: Path, out: Result) -> None:
    assert lines(out) == ["True"]
    (run,) = spool(project).values()
    assert run.start["name"] == f"run-{run.run_id[:8]}"
    assert run.start["experiment"] == "ff-m2-simulation"


def check_nested(project: Path, out: Result) -> None:
    assert lines(out)[-1] == "True"
    assert "refused: run " in out.stdout and "pass nested=True" in out.stdout
    runs = spool(project)
    assert set(runs) == {"pipeline-run", "coupongen", "simulation"}
    parent = runs["pipeline-run"]
    assert runs["coupongen"].start["parent"] == parent.run_id
    assert runs["coupongen"].start["experiment"] == "formula-foundry"
    assert runs["simulation"].start["parent"] == parent.run_id
    assert runs["simulation"].start["experiment"] == "ff-m2-simulation"
    assert all(ended(r) == [("FINISHED", None)] for r in runs.values())


def check_tags_description(project: Path, out: Result) -> None:
    run = spool(project)["tagged"]
    assert run.kinds()[:3] == ["segment", "run_start", "tags"]  # one event, before any log
    assert tags(run) == {
        "mlflow.note.content": "First 4-layer coupon of the F1 family",
        "fab_profile": "oshpark_4layer",
        "layers": "4",
    }


def check_manifest(project: Path, out: Result) -> None:
    keys = [
        "design_doc_sha256",
        "determinism_mode",
        "environment_fingerprint",
        "git_sha",
        "seed_numpy",
        "seed_python",
        "seed_torch",
    ]
    assert lines(out) == [str(keys)]
    t = tags(spool(project)["tracked-build"])
    assert sorted(t) == keys and t["determinism_mode"] == "strict"


def check_run_artifacts(project: Path, out: Result) -> None:
    assert lines(out) == ["True"]
    run = spool(project)["linked-run"]
    t = tags(run)
    run_dir = Path(t["substrate_run_dir"])
    assert run_dir.parent == project / "data" / "runs" and run_dir.name == t["substrate_run_id"]
    assert (run_dir / "manifest.json").is_file()
    assert (run_dir / "outputs" / "result.txt").read_text() == "ok\n"
    assert (run_dir / "tracking_runs.jsonl").read_text().count(run.run_id) == 1


def check_resume(project: Path, out: Result) -> None:
    assert lines(out) == ["long-train"]
    run = spool(project)["long-train"]
    assert run.run_id == "train-001" and len(run.segments) == 2
    starts = run.data("run_start")
    assert [s["resume"] for s in starts] == [False, True]
    assert len(run.data("params")) == 1  # the same value again wrote nothing
    assert params(run) == {"lr": "0.1"}
    assert run.metrics() == {"loss": [(0, 0.9), (1, 0.5)]}
    assert ended(run) == [("FINISHED", None), ("FINISHED", None)]


def check_ff_run_id(project: Path, out: Result) -> None:
    assert lines(out) == ["coupon-sweep-4711", "refused: FF_RUN_ID names one run"]
    runs = spool(project)
    assert {name: r.run_id for name, r in runs.items()} == {
        "coupon-sweep": "coupon-sweep-4711",
        "lr=0.1": "coupon-sweep-4711-lr0.1",
        "lr=0.01": "coupon-sweep-4711-lr0.01",
    }
    assert runs["lr=0.1"].metrics() == {"loss": [(0, 0.1)]}


def check_attach_run(project: Path, out: Result) -> None:
    run = spool(project)["ddp-train"]
    assert len(run.segments) == 3
    assert [ev.kind for ev in run.segments[0]][-1] == "run_end"
    assert run.kinds().count("run_start") == 1 and ended(run) == [("FINISHED", None)]
    assert sorted(run.metrics()["rank_loss"]) == [(0, 1.0), (1, 0.5)]
    pids = {seg[0].data["pid"] for seg in run.segments}
    assert len(pids) == 3  # a segment per process


def check_active_run(project: Path, out: Result) -> None:
    assert lines(out) == ["None"]
    assert spool(project)["staged"].metrics() == {"pipeline_stage": [(0, 1.0), (0, 2.0)]}


def check_end_all(project: Path, out: Result) -> None:
    assert out.returncode == 143
    runs = spool(project)
    why = ("KILLED", "checkpointed on SIGTERM")
    assert ended(runs["train"]) == [why] and ended(runs["epoch-1"]) == [why]
    assert runs["epoch-1"].data("run_end")[0]["t"] <= runs["train"].data("run_end")[0]["t"]


def check_log_params(project: Path, out: Result) -> None:
    assert lines(out)[0].startswith("refused: run ")
    assert "param 'layers' is already '4'" in out.stdout
    run = spool(project)["params"]
    assert [p["d"] for p in run.data("params")] == [
        {"coupon_family": "F1_SINGLE_ENDED_VIA"},
        {"layers": "4", "fab_profile": "oshpark_4layer"},
    ]


def check_log_metrics(project: Path, out: Result) -> None:
    run = spool(project)["metrics"]
    assert len(run.data("metrics")) == 6
    assert run.metrics() == {
        "train_loss": [(0, 1.0), (1, 0.5), (2, 1 / 3)],
        "val_loss": [(2, 0.4)],
        "val_acc": [(2, 0.9)],
        "grad_norm": [(0, "Infinity")],
        "wall_clock_s": [(0, 3.5)],
    }
    (batch,) = [m for m in run.data("metrics") if "val_loss" in m["d"]]
    assert batch["d"] == {"val_loss": 0.4, "val_acc": 0.9}


def check_set_tags(project: Path, out: Result) -> None:
    assert lines(out) == ["refused: ff-sync sets mlflow.parentRunId"]
    run = spool(project)["tags"]
    assert [t["d"] for t in run.data("tags")] == [
        {"status": "running"},
        {"status": "success", "node": "node017"},
    ]


def check_log_artifact_reference(project: Path, out: Result) -> None:
    board = (project / "output" / "coupon.kicad_pcb").read_bytes()
    digest = "sha256:" + hashlib.sha256(board).hexdigest()
    store = str(project / "data" / "artifacts")
    refs = spool(project)["artifact-run"].data("artifact_ref")
    assert [(r["path"], r["digest"], r["size"], r["store"]) for r in refs] == [
        ("coupon.kicad_pcb", digest, len(board), store),
        ("boards/coupon.kicad_pcb", digest, len(board), store),
    ]
    hexdigest = digest.removeprefix("sha256:")
    assert (project / "data" / "artifacts" / "objects" / hexdigest[:2] / hexdigest[2:]).is_file()


def check_log_artifact(project: Path, out: Result) -> None:
    events = spool(project)["files-run"].data("artifact")
    assert [(e["path"], e["size"]) for e in events] == [
        ("config.yaml", 8),
        ("figures/plots/loss.svg", 7),
    ]
    sync = subprocess.run(
        [FF_SYNC], cwd=project, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert sync.returncode == 0, sync.stderr
    db = sqlite3.connect(project / "data" / "mlflow" / "mlruns.db")
    try:
        (uri,) = db.execute("select artifact_uri from runs").fetchone()
    finally:
        db.close()
    root = Path(uri.removeprefix("file://"))
    assert (root / "config.yaml").read_text() == "lr: 0.1\n"
    assert (root / "figures" / "plots" / "loss.svg").read_text() == "<svg/>\n"


def check_end(project: Path, out: Result) -> None:
    assert "refused: run " in out.stdout and "has ended (FAILED)" in out.stdout
    run = spool(project)["diverged"]
    assert ended(run) == [("FAILED", "loss became NaN at step 7")]
    assert run.metrics() == {"loss": [(7, "NaN")]}
    # What the page says ff-sync does with the reason.
    sync = subprocess.run(
        [FF_SYNC], cwd=project, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert sync.returncode == 0, sync.stderr
    db = sqlite3.connect(project / "data" / "mlflow" / "mlruns.db")
    try:
        rows = db.execute(
            "SELECT r.status, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE r.name = 'diverged' AND t.key = 'ff.sync.end_reason'"
        ).fetchall()
    finally:
        db.close()
    assert rows == [("FAILED", "loss became NaN at step 7")]


def check_statuses(project: Path, out: Result) -> None:
    assert lines(out) == ["FAILED", "KILLED"]
    runs = spool(project)
    assert ended(runs["crashed"]) == [("FAILED", None)]
    assert ended(runs["interrupted"]) == [("KILLED", None)]


def check_at_exit(project: Path, out: Result) -> None:
    run = spool(project)["no-with"]
    assert run.kinds()[-2:] == ["metrics", "run_end"] and ended(run) == [("FINISHED", None)]


def check_sigterm(project: Path, out: Result) -> None:
    assert out.returncode == -15  # died of SIGTERM, as without the tracker
    run = spool(project)["preempted"]
    assert ended(run) == [("KILLED", "SIGTERM")]  # no SLURM_JOB_ID in the example's env
    assert run.metrics() == {"loss": [(0, 0.5)]}


def check_heartbeat(project: Path, out: Result) -> None:
    run = spool(project)["quiet"]
    kinds = run.kinds()
    assert "heartbeat" in kinds and kinds[-1] == "run_end"


def check_durability(project: Path, out: Result) -> None:
    run = spool(project)["hot-loop"]
    steps = [step for step, _ in run.metrics()["loss"]]
    assert steps == list(range(10_000)) and ended(run) == [("FINISHED", None)]


def check_disabled(project: Path, out: Result) -> None:
    assert lines(out) == ["None", "refused: not a number"]
    assert not (project / "data").exists()


def check_substrate(project: Path, out: Result) -> None:
    assert lines(out) == ["python True"]
    run_dir = project / "data" / "runs" / "coupon-local"
    assert (run_dir / "manifest.json").is_file()
    run = spool(project)["coupon-pipeline"]
    t = tags(run)
    assert t["substrate_run_id"] == "coupon-local" and t["determinism_mode"] == "strict"
    assert t["substrate_run_dir"] == str(run_dir)
    refs = run.data("artifact_ref")
    assert [r["path"] for r in refs] == ["coupon.kicad_pcb", "coupon.s2p"]
    assert refs[1]["digest"] == "sha256:" + hashlib.sha256(b"s-params").hexdigest()


Check = Callable[[Path, Result], None]
CHECKS: dict[str, Check] = {
    name.removeprefix("check_"): fn
    for name, fn in list(globals().items())
    if name.startswith("check_") and callable(fn)
}
# What a block exits with when it does not end normally (the checks look at it too).
EXIT: dict[str, int] = {"end_all": 143, "sigterm": -15}


def _env() -> dict[str, str]:
    # The examples must not depend on the job around the test: a Slurm job id would change
    # the SIGTERM reason, a design-doc override the manifest.
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_") and k not in ("FF_DESIGN_DOC", "FF_RUN_ID")
    }


def _run(project: Path, code: str) -> Result:
    script = project / "example.py"
    script.write_text(code, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=project,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs_as_written(block: Block, ff_project: Path) -> None:
    where = f"docs/tracker.md:{block.line}"
    if block.mark is None:
        pytest.fail(f"{where}: mark the block <!-- check: NAME --> or <!-- not run: REASON -->")
    compile(block.code, where, "exec")
    if block.mark == "not run":
        return
    check = CHECKS.get(block.value)
    assert check is not None, f"{where}: no function check_{block.value} in this test"
    out = _run(ff_project, block.code)
    assert out.returncode == EXIT.get(block.value, 0), f"{where}:\n{out.stderr}"
    check(ff_project, out)


def test_every_check_belongs_to_one_block() -> None:
    names = [b.value for b in BLOCKS if b.mark == "check"]
    assert sorted(names) == sorted(set(names)), "two blocks name the same check"
    assert set(names) == set(CHECKS), f"checks without a block: {set(CHECKS) - set(names)}"


def test_the_markers_are_read_from_the_line_before_each_block() -> None:
    text = (
        "<!-- check: a -->\n```python\nx = 1\n```\n\n"
        "<!-- not run: needs Slurm -->\n\n```python\ny = 2\n```\n"
        "text\n```python\nz = 3\n```\n```bash\nls\n```\n"
    )
    assert parse_blocks(text) == [
        Block(2, "x = 1\n", "check", "a"),
        Block(8, "y = 2\n", "not run", "needs Slurm"),
        Block(12, "z = 3\n", None),
    ]
