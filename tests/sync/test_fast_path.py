"""The replay's fast metric path takes exactly what the checked path takes, and sends the same.

``Replayer._items`` checks one-point metric events inline (the common case, and the sync's hot
loop) and hands everything else to ``PayloadChecker``. Hypothesis writes segments of raw,
correctly framed metric events whose keys, values, steps and times range over valid and
invalid spellings (what an old, hand-written or foreign spool may hold), and the same spool is
replayed twice into in-memory destinations: once as is, once with the fast path off. The
destinations, the quarantines and the reports must be identical.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formula_foundry.sync import sync_once
from formula_foundry.sync.engine.replayer import Replayer
from formula_foundry.sync.engine.sink import BatchLimits
from formula_foundry.tracking.events import INT64_MAX, INT64_MIN, frame
from formula_foundry.tracking.tracker import Tracker
from tests.memory_sink import MemorySink
from tests.sync.test_engine_memory import NO_RETRY, _settings

GOOD_KEYS = st.sampled_from(["loss", "a/b", "x.y"])
ODD_KEYS = st.sampled_from(["", " lead", "bad\x00", "ü", "k" * 251, "../up"])
GOOD_VALUES = st.floats(allow_nan=True, allow_infinity=True)
ODD_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", "1.5", None, [], {}]),
)
GOOD_STEPS = st.one_of(st.integers(min_value=-3, max_value=3), st.just("absent"))
ODD_STEPS = st.sampled_from(
    [INT64_MAX, INT64_MIN, INT64_MAX + 1, INT64_MIN - 1, 1.0, True, False, "1", None]
)
GOOD_TIMES = st.integers(min_value=1_700_000_000_000, max_value=1_700_000_000_100)
ODD_TIMES = st.sampled_from([0, -1, INT64_MAX, INT64_MAX + 1, 1.5, "1", True])
FIELDS = {
    "key": (GOOD_KEYS, ODD_KEYS),
    "value": (GOOD_VALUES, ODD_VALUES),
    "step": (GOOD_STEPS, ODD_STEPS),
    "t": (GOOD_TIMES, ODD_TIMES),
}


@st.composite
def _event(draw: st.DrawFn) -> tuple[Any, Any, Any, Any, int]:
    """A metric event with at most one field spelled oddly: the case where the fast path's
    check of that one field alone decides (several odd fields would hide each other)."""
    odd = draw(st.sampled_from([None, *FIELDS]))
    key, value, step, t = (draw(FIELDS[f][f == odd]) for f in FIELDS)
    return key, value, step, t, draw(st.sampled_from([1, 1, 1, 2, 3]))


EVENT = _event()


def _spool(root: Path, events: list[tuple[Any, Any, Any, Any, int]]) -> Any:
    s = _settings(root)
    run = Tracker(s).start_run(run_name="raw", experiment_name="fast")
    run.log_metric("loss", 1.0, step=0)  # so the key cache knows one key before the raw lines
    run._writer.close()
    (seg,) = (s.spool_root / run.run_id).glob("seg-*.jsonl")
    seq = sum(1 for _ in seg.open("rb"))
    lines = []
    for key, value, step, t, width in events:
        # width > 1: the same point under extra keys, so multi-point events are mixed in.
        d = {key: value, **{f"{key}_{i}": value for i in range(1, width)}}
        rec: dict[str, Any] = {"v": 1, "s": seq, "t": t, "k": "metrics", "d": d}
        if step != "absent":
            rec["step"] = step
        try:
            lines.append(frame(rec))
        except (orjson.JSONEncodeError, TypeError):
            continue  # not even JSON (an int beyond 64 bits): the writer of any spool can't
        seq += 1
    with seg.open("ab") as f:
        f.write(b"".join(lines))
    return s


def _replay(s: Any, fast: bool, limits: BatchLimits) -> tuple[Any, Any, Any]:
    s = dataclasses.replace(s, sync_state_dir=s.sync_state_dir / ("fast" if fast else "checked"))
    sink = MemorySink(limits=limits)
    Replayer.fast_metrics = fast
    try:
        report = sync_once(s, sink_factory=sink.factory(), retry=NO_RETRY)
    finally:
        Replayer.fast_metrics = True
    qfile = report.state_folder / "quarantine.jsonl"
    quarantine = qfile.read_bytes().splitlines() if qfile.exists() else []
    kept = [{k: v for k, v in orjson.loads(q).items() if k != "at"} for q in quarantine]
    counts = (report.exit_code, report.events, report.metrics, report.quarantined, report.problems)
    return sink.comparable(), kept, counts


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events=st.lists(EVENT, max_size=30), small=st.booleans())
def test_the_fast_path_sends_what_the_checked_path_sends(
    tmp_path: Path, events: list[Any], small: bool
) -> None:
    s = _spool(Path(tempfile.mkdtemp(dir=tmp_path)), events)
    limits = BatchLimits(metrics=4, params=3, tags=3, total=5) if small else BatchLimits()
    assert _replay(s, True, limits) == _replay(s, False, limits)


def test_the_switch_is_off_only_while_a_test_turns_it_off() -> None:
    assert Replayer.fast_metrics is True
