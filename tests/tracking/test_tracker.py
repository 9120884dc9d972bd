"""The tracker API: the workflow document's examples, the run lifecycle, validation at log time."""

from __future__ import annotations

import getpass
import hashlib
import math
import os
import socket
import subprocess
import sys
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from formula_foundry.errors import (
    ParamConflictError,
    RunStateError,
    ValidationError,
)
from formula_foundry.tracking import Run, Tracker, get_tracker
from formula_foundry.tracking.events import decode_metric_value

from ._helpers import child_env, only_segment, payloads, read_clean, segments


def events_of(tracker: Tracker, run: Run) -> list[Any]:
    return read_clean(only_segment(tracker.settings.spool_root, run.run_id))


def kinds(events: list[Any]) -> list[str]:
    return [e.kind for e in events]


# --- the workflow document ("Experiment Tracking Workflow"), snippets copied verbatim --------
# The document uses Path without importing it; the namespace provides it, as a reader would.

BASIC = """
from formula_foundry.tracking import get_tracker

tracker = get_tracker()

with tracker.start_run(run_name="my-coupon-build") as run:
    # Log parameters
    run.log_param("coupon_family", "F1_SINGLE_ENDED_VIA")
    run.log_param("fab_profile", "oshpark_4layer")

    # Log metrics
    run.log_metric("build_time_seconds", 12.5)
    run.log_metric("constraint_violations", 0)

    # Set tags
    run.set_tag("status", "success")
"""

MANIFEST = """
from formula_foundry.substrate import Manifest, DeterminismConfig
from formula_foundry.tracking import get_tracker

# Create manifest from environment
manifest = Manifest.from_environment(
    determinism=DeterminismConfig(mode="strict", seed=42, cublas_workspace_config=":4096:8")
)

tracker = get_tracker()

with tracker.start_run(run_name="tracked-build", manifest=manifest) as run:
    # Manifest data is automatically logged as tags:
    # - git_sha
    # - design_doc_sha256
    # - environment_fingerprint
    # - determinism_mode
    # - seed_* (for each PRNG)

    run.log_metric("some_metric", 42.0)
"""

RUN_ARTIFACTS = """
from formula_foundry.substrate import init_run_dir, create_run, Manifest
from formula_foundry.tracking import get_tracker

# Create substrate run directory
run_artifacts = init_run_dir(run_root=Path("data/runs"), run_id="run-001")

tracker = get_tracker()

with tracker.start_run(
    run_name="linked-run",
    run_artifacts=run_artifacts,
) as run:
    # MLflow run is linked to substrate run via tags:
    # - substrate_run_id
    # - substrate_run_dir

    run.log_metric("pipeline_stage", 1)
"""

ARTIFACT_REFERENCE = """
from formula_foundry.substrate import ArtifactStore
from formula_foundry.tracking import get_tracker

store = ArtifactStore(root=Path("data/artifacts"))

# Add file to substrate store
entry = store.add_file(Path("output/coupon.kicad_pcb"), logical_path="coupon.kicad_pcb")

tracker = get_tracker()

with tracker.start_run(run_name="artifact-run") as run:
    # Log reference (creates a small JSON file, not the full artifact)
    run.log_artifact_reference(
        logical_path=entry.path,
        digest=entry.digest,
        size_bytes=entry.size_bytes,
    )
"""

EXPERIMENT = """
tracker = get_tracker()

with tracker.start_run(
    run_name="sim-001",
    experiment_name="ff-m2-simulation",
) as run:
    run.log_metric("insertion_loss_db", -0.5)
"""

NESTED = """
tracker = get_tracker()

with tracker.start_run(run_name="pipeline-run") as parent:
    parent.log_param("pipeline_version", "1.0")

    with tracker.start_run(run_name="coupongen", nested=True) as child1:
        child1.log_metric("build_time", 5.0)

    with tracker.start_run(run_name="simulation", nested=True) as child2:
        child2.log_metric("sim_time", 120.0)
"""


def run_doc(snippet: str, **names: Any) -> dict[str, Any]:
    namespace: dict[str, Any] = {"Path": Path, **names}
    exec(compile(snippet, "<workflow doc>", "exec"), namespace)
    return namespace


def test_doc_basic_usage(ff_project: Path) -> None:
    ns = run_doc(BASIC)
    run, tracker = ns["run"], ns["tracker"]
    events = events_of(tracker, run)
    assert kinds(events) == [
        "segment",
        "run_start",
        "params",
        "params",
        "metrics",
        "metrics",
        "tags",
        "run_end",
    ]
    start = events[1].data
    assert (start["name"], start["experiment"], start["parent"]) == (
        "my-coupon-build",
        "formula-foundry",
        None,
    )
    assert start["run"] == run.run_id
    assert payloads(events[2:7]) == [
        {"k": "params", "d": {"coupon_family": "F1_SINGLE_ENDED_VIA"}},
        {"k": "params", "d": {"fab_profile": "oshpark_4layer"}},
        {"k": "metrics", "step": 0, "d": {"build_time_seconds": 12.5}},
        {"k": "metrics", "step": 0, "d": {"constraint_violations": 0.0}},
        {"k": "tags", "d": {"status": "success"}},
    ]
    assert events[-1].data["status"] == "FINISHED" and run.status == "FINISHED"
    assert only_segment(ff_project / "data" / "runs", run.run_id)  # where the config says


def test_doc_manifest_integration(ff_project: Path) -> None:
    ns = run_doc(MANIFEST)
    run, tracker, manifest = ns["run"], ns["tracker"], ns["manifest"]
    events = events_of(tracker, run)
    assert kinds(events) == ["segment", "run_start", "tags", "metrics", "run_end"]
    tags = events[2].data["d"]
    assert tags == manifest.to_tags()
    assert {"git_sha", "design_doc_sha256", "environment_fingerprint", "determinism_mode"} <= set(
        tags
    )
    assert tags["determinism_mode"] == "strict"
    assert {k for k in tags if k.startswith("seed_")}  # one per PRNG
    assert events[3].data["d"] == {"some_metric": 42.0}


def test_doc_linking_substrate_run_artifacts(ff_project: Path) -> None:
    ns = run_doc(RUN_ARTIFACTS)
    run, tracker, run_artifacts = ns["run"], ns["tracker"], ns["run_artifacts"]
    events = events_of(tracker, run)
    assert kinds(events) == ["segment", "run_start", "tags", "metrics", "run_end"]
    assert events[2].data["d"] == {
        "substrate_run_id": "run-001",
        "substrate_run_dir": str(ff_project / "data" / "runs" / "run-001"),
    }
    assert events[3].data["d"] == {"pipeline_stage": 1.0}
    # The run directory records the tracking run that used it.
    linked = run_artifacts.tracking_runs()
    assert [(r["run_uuid"], r["experiment"], r["run_name"]) for r in linked] == [
        (run.run_id, "formula-foundry", "linked-run")
    ]


def test_doc_logging_artifact_references(ff_project: Path) -> None:
    board = b"(kicad_pcb (version 20240108))\n"
    (ff_project / "output").mkdir()
    (ff_project / "output" / "coupon.kicad_pcb").write_bytes(board)
    ns = run_doc(ARTIFACT_REFERENCE)
    run, tracker = ns["run"], ns["tracker"]
    events = events_of(tracker, run)
    assert kinds(events) == ["segment", "run_start", "artifact_ref", "run_end"]
    assert payloads(events[2:3]) == [
        {
            "k": "artifact_ref",
            "path": "coupon.kicad_pcb",
            "digest": "sha256:" + hashlib.sha256(board).hexdigest(),
            "size": len(board),
            "store": str(ff_project / "data" / "artifacts"),
        }
    ]


def test_doc_experiment_names(ff_project: Path) -> None:
    ns = run_doc(EXPERIMENT, get_tracker=get_tracker)
    run, tracker = ns["run"], ns["tracker"]
    events = events_of(tracker, run)
    assert events[1].data["experiment"] == "ff-m2-simulation"
    assert events[1].data["name"] == "sim-001"
    assert events[2].data["d"] == {"insertion_loss_db": -0.5}


def test_doc_nested_runs(ff_project: Path) -> None:
    ns = run_doc(NESTED, get_tracker=get_tracker)
    tracker, parent, child1, child2 = ns["tracker"], ns["parent"], ns["child1"], ns["child2"]
    p, c1, c2 = (events_of(tracker, r) for r in (parent, child1, child2))
    assert p[1].data["parent"] is None
    assert c1[1].data["parent"] == parent.run_id and c2[1].data["parent"] == parent.run_id
    assert (c1[1].data["name"], c2[1].data["name"]) == ("coupongen", "simulation")
    assert c1[2].data["d"] == {"build_time": 5.0} and c2[2].data["d"] == {"sim_time": 120.0}
    assert p[2].data["d"] == {"pipeline_version": "1.0"}
    assert all(e[-1].data["status"] == "FINISHED" for e in (p, c1, c2))
    # The children end before their parent.
    assert c1[-1].t <= c2[-1].t <= p[-1].t


# --- stand-ins for the substrate protocols ----------------------------------------------------


class StandInManifest:
    def to_tags(self) -> dict[str, str]:
        return {"git_sha": "0" * 40, "seed_python": "7"}


class StandInRunDir:
    def __init__(self, run_dir: Path, with_link: bool = True) -> None:
        self.run_id = "r-1"
        self.run_dir = run_dir
        self.links: list[tuple[str, str, str | None]] = []
        if with_link:
            self.link_tracking_run = self._link

    def _link(self, run_uuid: str, experiment: str, run_name: str | None) -> None:
        self.links.append((run_uuid, experiment, run_name))


def test_start_run_takes_any_object_offering_the_protocols(
    tracker: Tracker, ff_project: Path
) -> None:
    run_dir = StandInRunDir(Path("rel/run-dir"))
    with tracker.start_run(
        run_name="n",
        manifest=StandInManifest(),
        run_artifacts=run_dir,
        tags={"user_tag": 3, "git_sha": "overridden"},
        description="a note",
    ) as run:
        pass
    events = events_of(tracker, run)
    assert events[2].data["d"] == {
        "git_sha": "overridden",  # explicit tags win over the manifest's
        "seed_python": "7",
        "substrate_run_id": "r-1",
        "substrate_run_dir": str(ff_project / "rel" / "run-dir"),
        "mlflow.note.content": "a note",
        "user_tag": "3",
    }
    assert run_dir.links == [(run.run_id, "formula-foundry", "n")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"manifest": object()}, "manifest must offer to_tags() -> dict[str, str], got object"),
        ({"run_artifacts": object()}, "run_artifacts must offer run_id (str) and run_dir (path)"),
        ({"tags": ["a"]}, "tags must be a mapping, got list"),
        ({"tags": {"bad key!": "x"}}, "tag key 'bad key!' has a character MLflow rejects"),
        ({"tags": {"k": "x" * 8001}}, "tag 'k' value is 8001 characters"),
    ],
)
def test_start_run_rejects_bad_inputs_before_writing(
    tracker: Tracker, spool_root: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as e:
        tracker.start_run(run_name="bad", **kwargs)
    assert message in str(e.value) and str(e.value).startswith("run ")
    assert not spool_root.exists() or list(spool_root.glob("*/seg-*")) == []
    assert tracker.active_run() is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"run_name": ""}, "run_name must be a non-empty str, got ''"),
        ({"run_name": 5}, "run_name must be a non-empty str, got 5"),
        ({"experiment_name": "  "}, "experiment_name must be a non-empty str, got '  '"),
    ],
)
def test_start_run_rejects_bad_names(
    tracker: Tracker, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=f"^{message}$"):
        tracker.start_run(**kwargs)


# --- lifecycle --------------------------------------------------------------------------------


def test_run_start_records_time_user_host_and_command_line(tracker: Tracker) -> None:
    before = time.time_ns() // 1_000_000
    with tracker.start_run() as run:
        pass
    after = time.time_ns() // 1_000_000
    start = events_of(tracker, run)[1]
    assert before <= start.t <= after
    assert start.data["user"] == getpass.getuser()
    assert start.data["host"] == socket.gethostname()
    assert start.data["pid"] == os.getpid()
    assert start.data["command"] == sys.argv and start.data["source"] == sys.argv[0]
    assert start.data["name"] == run.run_name == f"run-{run.run_id[:8]}"
    assert len(run.run_id) == 32 and int(run.run_id, 16) >= 0


def test_run_start_records_the_scripts_command_line(ff_project: Path) -> None:
    script = ff_project / "train.py"
    script.write_text(
        "from formula_foundry.tracking import get_tracker\n"
        "with get_tracker().start_run() as run:\n"
        "    print(run.run_id)\n"
    )
    out = subprocess.run(
        [sys.executable, str(script), "--lr", "0.1", "a b"],
        cwd=ff_project,
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    start = read_clean(only_segment(ff_project / "data" / "runs", out))[1].data
    assert start["command"] == [str(script), "--lr", "0.1", "a b"]
    assert start["source"] == str(script)


def test_with_block_ends_finished(tracker: Tracker) -> None:
    with tracker.start_run() as run:
        assert tracker.active_run() is run and run.status == "RUNNING"
    assert tracker.active_run() is None and run.status == "FINISHED"
    assert events_of(tracker, run)[-1].data["status"] == "FINISHED"


def test_an_exception_ends_the_run_failed_and_propagates(tracker: Tracker) -> None:
    boom = RuntimeError("boom")
    with pytest.raises(RuntimeError) as e, tracker.start_run() as run:
        run.log_metric("m", 1.0)
        raise boom
    assert e.value is boom
    assert run.status == "FAILED" and events_of(tracker, run)[-1].data["status"] == "FAILED"
    assert tracker.active_run() is None


def test_keyboard_interrupt_ends_the_run_killed(tracker: Tracker) -> None:
    with pytest.raises(KeyboardInterrupt), tracker.start_run() as run:
        raise KeyboardInterrupt
    assert events_of(tracker, run)[-1].data["status"] == "KILLED"


@pytest.mark.parametrize(("code", "status"), [(0, "FINISHED"), (None, "FINISHED"), (3, "FAILED")])
def test_system_exit(tracker: Tracker, code: int | None, status: str) -> None:
    with pytest.raises(SystemExit), tracker.start_run() as run:
        sys.exit(code)
    assert events_of(tracker, run)[-1].data["status"] == status


def test_end_explicitly_and_twice(tracker: Tracker) -> None:
    run = tracker.start_run(run_name="manual")
    with pytest.raises(ValidationError) as e:
        run.end("DONE")
    assert str(e.value) == (
        f"run {run.run_id}: end status must be FINISHED, FAILED or KILLED, got 'DONE'"
    )
    run.end("KILLED")
    with pytest.raises(RunStateError, match=f"^run {run.run_id} has already ended \\(KILLED\\)$"):
        run.end()
    with run:  # entering an ended run and leaving it changes nothing
        pass
    assert kinds(events_of(tracker, run)).count("run_end") == 1


def test_logging_on_an_ended_run_is_an_error_naming_the_run(tracker: Tracker) -> None:
    with tracker.start_run() as run:
        run.log_param("p", 1)
    path = only_segment(tracker.settings.spool_root, run.run_id)
    size = path.stat().st_size
    prefix = f"run {run.run_id} has ended (FINISHED); cannot log "
    calls = [
        (lambda: run.log_metric("loss", 1.0), "metrics 'loss' to it"),
        (lambda: run.log_metrics({"a": 1.0, "b": 2}), "metrics 'a', 'b' to it"),
        (lambda: run.log_param("q", 1), "params 'q' to it"),
        (lambda: run.set_tag("t", 1), "tags 't' to it"),
        (
            lambda: run.log_artifact_reference("a.txt", "sha256:" + "0" * 64, 1),
            "artifact reference 'a.txt' to it",
        ),
    ]
    for call, what in calls:
        with pytest.raises(RunStateError) as e:
            call()
        assert str(e.value) == prefix + what
    assert path.stat().st_size == size


def test_a_second_top_level_run_in_the_same_thread_is_an_error(
    tracker: Tracker, spool_root: Path
) -> None:
    with tracker.start_run(run_name="first") as first:
        with pytest.raises(RunStateError) as e:
            tracker.start_run(run_name="second")
        assert str(e.value) == (
            f"run {first.run_id} ('first') is still active in this thread; end it first, "
            "or pass nested=True to start a child run"
        )
        assert [p.name for p in spool_root.iterdir()] == [first.run_id]
        assert tracker.active_run() is first


def test_nested_runs_are_children_of_the_innermost_active_run(tracker: Tracker) -> None:
    with tracker.start_run(nested=True) as top:  # nothing active: a top-level run
        with tracker.start_run(nested=True) as child:
            with tracker.start_run(nested=True) as grandchild:
                assert tracker.active_run() is grandchild
            assert tracker.active_run() is child
        assert tracker.active_run() is top
    parents = [events_of(tracker, r)[1].data["parent"] for r in (top, child, grandchild)]
    assert parents == [None, top.run_id, child.run_id]
    assert (child.parent_run_id, grandchild.parent_run_id) == (top.run_id, child.run_id)


def test_threads_have_independent_active_runs(tracker: Tracker) -> None:
    seen: dict[str, Any] = {}

    def other_thread() -> None:
        try:
            seen["active_at_start"] = tracker.active_run()
            # No error although the main thread has an active run: each thread has its own.
            with (
                tracker.start_run(run_name="thread-top") as top,
                tracker.start_run(run_name="thread-child", nested=True) as child,
            ):
                seen["ids"] = (top.run_id, child.run_id, child.parent_run_id)
        except BaseException as exc:  # pragma: no cover - reported below
            seen["error"] = exc

    with tracker.start_run(run_name="main") as main:
        th = threading.Thread(target=other_thread)
        th.start()
        th.join()
        assert tracker.active_run() is main
        with tracker.start_run(nested=True) as main_child:
            pass
    assert "error" not in seen, seen.get("error")
    assert seen["active_at_start"] is None
    top_id, _, child_parent = seen["ids"]
    assert child_parent == top_id
    assert main_child.parent_run_id == main.run_id


def test_get_tracker_returns_the_same_tracker(ff_project: Path, clean_env: Any) -> None:
    first = get_tracker()
    assert get_tracker() is first
    clean_env.setenv("FF_SPOOL_ROOT", "elsewhere")
    other = get_tracker()
    assert other is not first and other.settings.spool_root == ff_project / "elsewhere"


# --- validation through the API ---------------------------------------------------------------


class Key(str, Enum):
    LOSS = "loss"


def test_rejected_calls_write_nothing_and_name_run_key_and_rule(tracker: Tracker) -> None:
    run = tracker.start_run(run_name="strict")
    run.log_param("lr", 0.1)
    path = only_segment(tracker.settings.spool_root, run.run_id)
    size = path.stat().st_size
    r = run.run_id
    bad: list[tuple[Any, type[Exception], str]] = [
        (
            lambda: run.log_metric("bad key!", 1.0),
            ValidationError,
            f"run {r}: metric key 'bad key!'",
        ),
        (lambda: run.log_metric("x" * 251, 1.0), ValidationError, "is 251 characters"),
        (lambda: run.log_metric(["unhashable"], 1.0), ValidationError, "must be a str"),
        (lambda: run.log_metric(None, 1.0), ValidationError, f"run {r}: metric key None must"),
        (lambda: run.log_metric("m", True), ValidationError, "value True is not a real number"),
        (lambda: run.log_metric("m", "1.0"), ValidationError, "value '1.0' is not a real number"),
        (lambda: run.log_metric("m", None), ValidationError, "value None is not a real number"),
        (lambda: run.log_metric("m", 1.0, step=1.5), ValidationError, "step must be an integer"),
        (lambda: run.log_metric("m", 1.0, step=2**63), ValidationError, "is outside"),
        (lambda: run.log_metric("m", 1.0, step=True), ValidationError, "got a bool"),
        (lambda: run.log_metric("m", 1.0, timestamp=-1), ValidationError, "timestamp -1"),
        (lambda: run.log_metric("m", 1.0, timestamp=1.5), ValidationError, "milliseconds"),
        (
            lambda: run.log_metrics({"ok": 1.0, "bad": "x"}),
            ValidationError,
            f"run {r}: metric 'bad' value 'x'",
        ),
        (lambda: run.log_metrics({"ok": 1.0}, step=-(2**63) - 1), ValidationError, "step"),
        (lambda: run.log_metrics([("a", 1.0)]), ValidationError, "must be a mapping"),
        (lambda: run.log_param("lr", 0.2), ParamConflictError, f"run {r}: param 'lr' is already"),
        (
            lambda: run.log_params({"new": 1, "lr": 0.3}),
            ParamConflictError,
            "cannot change it to '0.3'",
        ),
        (lambda: run.log_param("p", "x" * 6001), ValidationError, "6001 characters"),
        (lambda: run.log_param("a/../b", 1), ValidationError, "not a unique path"),
        (lambda: run.log_param({}, 1), ValidationError, f"run {r}: param key {{}} must be a str"),
        (lambda: run.set_tag("t", "x" * 8001), ValidationError, f"run {r}: tag 't' value is 8001"),
        (lambda: run.set_tag("t", "a\x00b"), ValidationError, "NUL"),
        (lambda: run.set_tags({"ok": 1, "": 2}), ValidationError, "tag key ''"),
        (
            lambda: run.log_artifact_reference("a.txt", "md5:abc", 1),
            ValidationError,
            f"run {r}: artifact reference 'a.txt': invalid digest",
        ),
        (
            lambda: run.log_artifact_reference("../a", "sha256:" + "0" * 64, 1),
            ValidationError,
            "invalid logical path",
        ),
        (
            lambda: run.log_artifact_reference("a", "sha256:" + "0" * 64, -1),
            ValidationError,
            "size_bytes must be an integer >= 0, got -1",
        ),
        (
            lambda: run.log_artifact_reference(3, "sha256:" + "0" * 64, 1),
            ValidationError,
            "logical_path must be a str",
        ),
    ]
    for call, kind, text in bad:
        with pytest.raises(kind) as e:
            call()
        assert text in str(e.value), (text, str(e.value))
        assert str(e.value).startswith(f"run {r}"), str(e.value)
        assert "\n" not in str(e.value)
        assert path.stat().st_size == size, f"{text}: the rejected call wrote something"
    run.end()


def test_param_conflict_message(tracker: Tracker) -> None:
    with tracker.start_run() as run:
        run.log_param("lr", 0.1)
        with pytest.raises(ParamConflictError) as e:
            run.log_param("lr", 0.2)
    assert str(e.value) == (
        f"run {run.run_id}: param 'lr' is already '0.1'; cannot change it to '0.2' "
        "(params are write-once; log values that change as metrics or tags)"
    )
    assert isinstance(e.value, ValidationError)


def test_relogging_a_param_with_the_same_value_is_fine_and_writes_nothing(tracker: Tracker) -> None:
    with tracker.start_run() as run:
        run.log_param("lr", 0.1)
        run.log_param("lr", "0.1")  # MLflow compares str(value)
        run.log_params({"lr": 0.1, "batch": 32})
        run.log_params({"batch": "32"})
    events = events_of(tracker, run)
    assert payloads(events, "params") == [
        {"k": "params", "d": {"lr": "0.1"}},
        {"k": "params", "d": {"batch": "32"}},
    ]


def test_limits_are_inclusive(tracker: Tracker) -> None:
    key = "k" * 250
    with tracker.start_run() as run:
        run.log_param(key, "p" * 6000)
        run.set_tag(key, "t" * 8000)
        run.log_metric(key, 1.0, step=2**63 - 1, timestamp=2**63 - 1)
        run.log_metric(key, 1.0, step=-(2**63), timestamp=0)
    events = events_of(tracker, run)
    assert events[2].data["d"] == {key: "p" * 6000}
    assert events[3].data["d"] == {key: "t" * 8000}
    assert (events[4].data["step"], events[4].t) == (2**63 - 1, 2**63 - 1)
    assert (events[5].data["step"], events[5].t) == (-(2**63), 0)


def test_metric_values_keep_their_exact_value(tracker: Tracker) -> None:
    values = [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308, 0.1 + 0.2]
    with tracker.start_run() as run:
        for i, v in enumerate(values):
            run.log_metric("m", v, step=i)
        run.log_metrics({"a": math.nan, "b": -math.inf, "c": np.float32(0.1), "d": np.int64(7)})
        run.log_metric("np", np.float64(-0.0), step=np.int64(3))
        run.log_metric("int", 2**53 + 1)
    events = [e for e in events_of(tracker, run) if e.kind == "metrics"]
    got = [decode_metric_value(e.data["d"]["m"]) for e in events[: len(values)]]
    assert math.isnan(got[0]) and got[1:3] == [math.inf, -math.inf]
    assert [v.hex() for v in got[3:]] == [v.hex() for v in values[3:]]
    batch = events[len(values)].data["d"]
    assert batch["a"] == "NaN" and batch["b"] == "-Infinity"
    assert batch["c"] == float(np.float32(0.1)) and batch["d"] == 7.0
    assert events[-2].data["d"]["np"] == 0.0 and math.copysign(1, events[-2].data["d"]["np"]) == -1
    assert events[-2].data["step"] == 3
    assert events[-1].data["d"]["int"] == float(2**53 + 1)


def test_default_step_and_time(tracker: Tracker) -> None:
    with tracker.start_run() as run:
        before = time.time_ns() // 1_000_000
        run.log_metric("m", 1.0)
        run.log_metrics({"a": 1.0})
        after = time.time_ns() // 1_000_000
        run.log_metric("m", 1.0, step=5, timestamp=1234)
    events = [e for e in events_of(tracker, run) if e.kind == "metrics"]
    assert [e.data["step"] for e in events] == [0, 0, 5]
    assert all(before <= e.t <= after for e in events[:2]) and events[2].t == 1234


def test_str_subclass_keys_work_everywhere(tracker: Tracker) -> None:
    with tracker.start_run(tags={Key.LOSS: 1}) as run:
        run.log_metric(Key.LOSS, 1.0)
        run.log_metrics({Key.LOSS: 2.0, np.str_("acc"): 0.5})
        run.log_metrics({Key.LOSS: 3.0, np.str_("acc"): 0.25})  # keys known by now
        run.log_param(Key.LOSS, 1)
        run.log_params({np.str_("p"): 2})
        run.set_tag(Key.LOSS, "x")
        run.set_tags({np.str_("t"): "y"})
    assert payloads(events_of(tracker, run)[2:]) == [
        {"k": "tags", "d": {"loss": "1"}},
        {"k": "metrics", "step": 0, "d": {"loss": 1.0}},
        {"k": "metrics", "step": 0, "d": {"loss": 2.0, "acc": 0.5}},
        {"k": "metrics", "step": 0, "d": {"loss": 3.0, "acc": 0.25}},
        {"k": "params", "d": {"loss": "1"}},
        {"k": "params", "d": {"p": "2"}},
        {"k": "tags", "d": {"loss": "x"}},
        {"k": "tags", "d": {"t": "y"}},
        {"k": "run_end", "status": "FINISHED"},
    ]


def test_empty_batches_write_nothing(tracker: Tracker) -> None:
    with tracker.start_run() as run:
        run.log_metrics({})
        run.log_params({})
        run.set_tags({})
    assert kinds(events_of(tracker, run)) == ["segment", "run_start", "run_end"]


def test_artifact_reference_from_an_entry_and_another_store(
    tracker: Tracker, ff_project: Path
) -> None:
    class Entry:
        path = "out/board.kicad_pcb"
        digest = "sha256:" + "ab" * 32
        size_bytes = 12

    with tracker.start_run() as run:
        run.log_artifact_reference(Entry())
        run.log_artifact_reference("x.bin", "sha256:" + "cd" * 32, 0, store_root="other/store")
    refs = payloads(events_of(tracker, run), "artifact_ref")
    assert refs == [
        {
            "k": "artifact_ref",
            "path": "out/board.kicad_pcb",
            "digest": "sha256:" + "ab" * 32,
            "size": 12,
            "store": str(ff_project / "data" / "artifacts"),
        },
        {
            "k": "artifact_ref",
            "path": "x.bin",
            "digest": "sha256:" + "cd" * 32,
            "size": 0,
            "store": str(ff_project / "other" / "store"),
        },
    ]


# --- no-op mode -------------------------------------------------------------------------------


def test_disabled_tracking_writes_nothing_but_still_validates(
    ff_project: Path, clean_env: Any
) -> None:
    clean_env.setenv("FF_TRACKING_DISABLED", "1")
    tracker = get_tracker()
    assert tracker.disabled
    with tracker.start_run(run_name="quiet", tags={"a": "b"}) as run:
        run.log_metric("m", 1.0)
        run.log_metrics({"a": 1.0})
        run.log_param("p", 1)
        run.set_tag("t", "v")
        run.log_artifact_reference("a.txt", "sha256:" + "0" * 64, 1)
        assert run.spool_path is None
        with pytest.raises(ValidationError):
            run.log_metric("bad key!", 1.0)
        with pytest.raises(ValidationError):
            run.log_metric("m", "not a number")
        with pytest.raises(ParamConflictError):
            run.log_param("p", 2)
        with pytest.raises(RunStateError):
            tracker.start_run()
    assert run.status == "FINISHED"
    with pytest.raises(RunStateError):
        run.log_metric("m", 1.0)
    assert not (ff_project / "data").exists()
    assert list(ff_project.rglob("seg-*")) == []


def test_disabled_tracking_attaches_workers_too(ff_project: Path, clean_env: Any) -> None:
    # A pipeline with workers (attach_run) runs unchanged with tracking off, writing nothing.
    clean_env.setenv("FF_TRACKING_DISABLED", "1")
    tracker = get_tracker()
    owner = tracker.start_run(run_name="owner")
    with tracker.attach_run(owner.run_id) as worker:
        worker.log_metric("rank0.loss", 0.5)
        with pytest.raises(ValidationError):
            worker.log_metric("bad key!", 1.0)
    owner.end()
    with pytest.raises(ValidationError):
        tracker.attach_run("../x")
    assert not (ff_project / "data").exists()


def test_the_spool_folder_is_created_on_first_use(ff_project: Path) -> None:
    tracker = get_tracker()
    assert not (ff_project / "data").exists()  # reading the settings creates nothing
    with tracker.start_run() as run:
        assert segments(ff_project / "data" / "runs", run.run_id)
    for folder in ("artifacts", "sync", "mlflow"):
        assert not (ff_project / "data" / folder).exists()  # the tracker needs none of them
