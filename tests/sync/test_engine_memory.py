"""The replay engine against an in-memory destination (the fast tier; no MLflow).

Programs of tracker calls are drawn by hypothesis and run in this process with the real
tracker, so the spool is the real thing; ``sync_once`` then replays it into a
:class:`tests.memory_sink.MemorySink`. Two properties:

* the engine's result (its fast metric path included) equals ``verify``'s reading of the same
  spool (:func:`formula_foundry.sync.commands.expected.expected_run`, the slow path), run by run;
* a destination going down at any call of the pass, before the write or after it (the
  acknowledgement lost), then a second pass, gives exactly the state of an undisturbed pass:
  nothing missing, nothing twice, statuses final. ``--replay`` afterwards changes nothing.

The same properties against real stores are tests/sync/test_crash.py and test_faults.py,
which take minutes; these take seconds and cover the engine's own logic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formula_foundry.config import Settings, load_settings
from formula_foundry.errors import EXIT_OK, StoreUnavailable
from formula_foundry.sync import RetryPolicy, sync_once
from formula_foundry.sync.commands.expected import expected_run, metric_value
from formula_foundry.sync.engine.scan import scan_spool
from formula_foundry.sync.engine.sink import BatchLimits
from formula_foundry.tracking.tracker import Tracker
from tests.memory_sink import MemorySink

NO_RETRY = RetryPolicy(0, 0.0)
# Small batches, so that a program of a few dozen calls spans several batches and barriers.
SMALL = BatchLimits(metrics=5, params=3, tags=3, total=7)

KEYS = st.sampled_from(["loss", "acc", "lr", "a/b", "x.y"])
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.integers(min_value=-(2**53), max_value=2**53),
)
STEPS = st.integers(min_value=-3, max_value=40)
# Tag values the tracker takes (it refuses NUL and lone surrogates, which MLflow would mangle).
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=4)
CALL = st.one_of(
    st.tuples(st.just("metric"), KEYS, VALUES, STEPS),
    st.tuples(st.just("metrics"), st.dictionaries(KEYS, VALUES, min_size=1, max_size=3), STEPS),
    st.tuples(st.just("param"), st.sampled_from(["p", "q", "r", "s"]), st.integers(0, 3)),
    st.tuples(st.just("tag"), st.sampled_from(["t", "u", "mlflow.note.content"]), TEXT),
    # A logged file: its name, the folder it is logged under, its bytes (a path logged twice
    # keeps the later bytes).
    st.tuples(
        st.just("file"),
        st.sampled_from(["a.txt", "b.bin"]),
        st.sampled_from([None, "plots", "x/y"]),
        st.binary(max_size=64),
    ),
)
END = st.one_of(
    st.none(),  # left open: the run stays RUNNING
    st.tuples(st.sampled_from(["FINISHED", "FAILED", "KILLED"]), st.none() | st.just("why")),
)
RUN = st.tuples(st.lists(CALL, max_size=25), END, st.booleans())  # calls, end, nested
PROGRAM = st.lists(RUN, min_size=1, max_size=3)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def _settings(root: Path, workers: int = 1) -> Settings:
    """``workers`` > 1: a server-like destination URI (never opened: the sink is in memory),
    so the pass replays that many runs at once (formula_foundry.sync.engine.parallel)."""
    base = load_settings(None, start=root)
    uri = (
        f"sqlite:///{root / 'never-opened.db'}"
        if workers == 1
        else "postgresql://ff@127.0.0.1:9/never-opened"
    )
    return dataclasses.replace(
        base,
        project_root=root,
        spool_root=root / "runs",
        sync_state_dir=root / "state",
        backend_store_uri=uri,
        sync_workers=workers,
        heartbeat_s=3600.0,
        stale_after_s=1e9,
        sync_retries=0,
        sync_backoff_s=0.0,
        sync_lock_timeout_s=5.0,
    )


def _spool(root: Path, program: list[tuple[Any, Any, bool]], workers: int = 1) -> Settings:
    """Run the program with the real tracker: one run per entry, nested under the run still
    active (if any) when the entry says so or when a run is still active (a top-level start
    would be refused then)."""
    s = _settings(root, workers)
    tracker = Tracker(s)
    params: dict[tuple[int, str], str] = {}
    open_runs: list[Any] = []
    for i, (calls, end, nested) in enumerate(program):
        nested = bool(open_runs) and (nested or True)
        run = tracker.start_run(run_name=f"r{i}", experiment_name="fast", nested=nested)
        for call in calls:
            if call[0] == "metric":
                run.log_metric(call[1], call[2], step=call[3])
            elif call[0] == "metrics":
                run.log_metrics(call[1], step=call[2])
            elif call[0] == "file":
                local = root / "files" / f"{i}-{len(open_runs)}" / call[1]
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(call[3])
                run.log_artifact(local, call[2])
            elif call[0] == "param":
                value = params.setdefault((i, call[1]), str(call[2]))  # params are write-once
                run.log_param(call[1], value)
            else:
                run.set_tag(call[1], call[2])
        if end is not None:
            run.end(end[0], reason=end[1])
        else:
            open_runs.append(run)
    for run in list(tracker._active.values()):
        run._writer.close()  # left open: the process "dies" without an end event
    tracker._active.clear()
    return s


def _expected(s: Settings) -> dict[str, dict[str, Any]]:
    by_run: dict[str, list[Any]] = {}
    for seg in scan_spool(s.spool_root):
        by_run.setdefault(seg.spool_run_id, []).append(seg)
    out = {}
    for uuid, segs in by_run.items():
        e = expected_run(uuid, segs)
        out[uuid] = {
            "experiment": e.experiment,
            "name": e.name,
            "status": e.status,
            "end_time": e.end_time,
            "params": e.params,
            "tags": e.tags,
            "metrics": e.metrics,
            "files": {path: ref.digest for path, ref in e.artifacts.items()},
        }
    return out


def _got(sink: MemorySink) -> dict[str, dict[str, Any]]:
    out = {}
    for uuid, r in sink.comparable().items():
        tags = {k: v for k, v in r["tags"].items() if not k.startswith("ff.sync.")}
        tags.pop("mlflow.parentRunId", None)  # the destination's own id; verify checks links
        metrics = {
            k: {(step, t, metric_value(v) if isinstance(v, float) else v) for step, t, v in pts}
            for k, pts in r["metrics"].items()
        }
        out[uuid] = {
            "experiment": r["experiment"],
            "name": r["name"],
            "status": r["status"],
            "end_time": r["end_time"],
            "params": r["params"],
            "tags": tags,
            "metrics": metrics,
            "files": {p: "sha256:" + hashlib.sha256(b).hexdigest() for p, b in r["files"].items()},
        }
    return out


def _pass(s: Settings, sink: MemorySink, **kw: Any) -> int:
    try:
        report = sync_once(s, sink_factory=sink.factory(), retry=NO_RETRY, **kw)
    except StoreUnavailable:
        return 75
    return report.exit_code


SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(program=PROGRAM, small=st.booleans(), workers=st.sampled_from([1, 3]))
def test_the_engine_sends_what_verify_expects(
    workdir: Path, program: list[Any], small: bool, workers: int
) -> None:
    root = Path(tempfile.mkdtemp(dir=workdir))
    s = _spool(root, program, workers)
    sink = MemorySink(limits=SMALL if small else BatchLimits())
    assert _pass(s, sink) == EXIT_OK
    got, expected = _got(sink), _expected(s)
    assert got == expected
    # Ended runs carry their reason; verify leaves ff.sync.* out, so check it here.
    runs = sorted(sink.runs.values(), key=lambda r: r.name)
    for (calls, end, _), run in zip(program, runs, strict=True):
        reason = end[1] if end is not None else None
        assert run.tags.get("ff.sync.end_reason") == reason, (calls, end)


@SETTINGS
@given(
    program=PROGRAM,
    at=st.integers(min_value=1, max_value=60),
    after=st.booleans(),
    workers=st.sampled_from([1, 3]),
)
def test_a_destination_down_at_any_call_then_a_second_pass_gives_the_same_state(
    workdir: Path, program: list[Any], at: int, after: bool, workers: int
) -> None:
    root = Path(tempfile.mkdtemp(dir=workdir))
    s = _spool(root, program, workers)
    clean = MemorySink(limits=SMALL)
    assert _pass(dataclasses.replace(s, sync_state_dir=root / "clean-state"), clean) == EXIT_OK
    if at > len(clean.calls):
        at = 1 + at % len(clean.calls)
    broken = MemorySink(limits=SMALL, fail_at={at}, after=after)
    assert _pass(s, broken) == 75
    broken._fail_at = set()
    assert _pass(s, broken) == EXIT_OK
    assert broken.comparable().keys() == clean.comparable().keys()
    assert _normalised(broken) == _normalised(clean)
    before = _normalised(broken)
    assert _pass(s, broken, replay=True) == EXIT_OK
    assert _normalised(broken) == before


def _normalised(sink: MemorySink) -> dict[str, Any]:
    """The sink's runs with destination ids replaced by the spool ids they stand for."""
    ids = {r.mlflow_run_id: uuid for uuid, r in sink.by_spool_run_id().items()}
    out = sink.comparable()
    for run in out.values():
        if "mlflow.parentRunId" in run["tags"]:
            run["tags"]["mlflow.parentRunId"] = ids[run["tags"]["mlflow.parentRunId"]]
        run["metrics"] = {
            k: {(st_, t, "nan" if isinstance(v, float) and math.isnan(v) else v) for st_, t, v in p}
            for k, p in run["metrics"].items()
        }
    return out


def test_a_silent_run_is_ended_at_its_last_sign_of_life_and_revived_by_new_events(
    workdir: Path,
) -> None:
    # A pass sends the open run; a later pass, with sync.stale_after_s of silence behind it,
    # ends it KILLED at its last event. A process resuming it later makes it RUNNING again.
    s = _spool(workdir, [([("metric", "loss", 1.0, 0)], None, False)])
    s = dataclasses.replace(s, stale_after_s=0.0)
    sink = MemorySink()
    assert _pass(s, sink) == EXIT_OK
    ((uuid, run),) = sink.by_spool_run_id().items()
    assert run.status == "RUNNING"  # sent in this pass: not judged by it
    assert _pass(s, sink) == EXIT_OK
    last_t = max(t for _, t, _ in run.metrics["loss"])
    assert (run.status, run.end_time) == ("KILLED", last_t)
    tracker = Tracker(s)
    resumed = tracker.start_run(run_id=uuid, experiment_name="fast")
    resumed.log_metric("loss", 0.5, step=1)
    resumed.end()
    assert _pass(s, sink) == EXIT_OK
    assert (run.status, sorted(p[0] for p in run.metrics["loss"])) == ("FINISHED", [0, 1])
    assert "ff.sync.end_reason" not in run.tags


def test_every_run_id_the_tracker_accepts_is_synced(workdir: Path) -> None:
    # One run-id rule (formula_foundry.ids): a run the tracker writes is never an "odd folder"
    # the sync skips. The edge forms: 128 characters, dots and dashes, `..` inside a name.
    s = _settings(workdir)
    tracker = Tracker(s)
    ids = ["r" * 128, "sweep..2", "a.b-c_d", "0"]
    for run_id in ids:
        run = tracker.start_run(run_id=run_id, experiment_name="fast")
        run.log_metric("x", 1.0)
        run.end()
    sink = MemorySink()
    report = sync_once(s, sink_factory=sink.factory(), retry=NO_RETRY)
    assert report.exit_code == EXIT_OK
    assert not [w for w in report.warnings if "not a run id" in w], report.warnings
    assert sorted(sink.by_spool_run_id()) == sorted(ids)
