"""Property tests: MLflow's key rules, exact round trips through a real spool, damaged spools."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from formula_foundry.errors import ParamConflictError, ValidationError
from formula_foundry.tracking import Tracker
from formula_foundry.tracking.events import (
    INT64_MAX,
    INT64_MIN,
    check_key,
    decode_metric_value,
    frame,
    frame_metric,
    reserved_tag_reason,
    string_value,
)
from formula_foundry.tracking.spool_reader import Event, SegmentReader
from tests._keys import accepted_key

from ._helpers import only_segment, read_clean, same_float

mlflow_validation = pytest.importorskip("mlflow.utils.validation")
MlflowException = pytest.importorskip("mlflow.exceptions").MlflowException

FIXTURE_OK = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None, max_examples=200
)

# Characters around the edges of the rules: allowed punctuation, near misses, unicode letters and
# digits, whitespace, separators, emoji.
EDGE_CHARS = list("/_.- :aZ09\\!@#$%^&*()[]{}<>?|,;'\"`~+=\t\n\r\x00\x0b\x85éßΣ中٣Ⅻ𝔘😀\u200b\u00a0")
key_text = st.text(alphabet=st.sampled_from(EDGE_CHARS) | st.characters(), max_size=20) | st.builds(
    lambda n, c: c * n, st.integers(0, 260), st.sampled_from(["a", "é", "/", "中", "a/"])
)


def mlflow_accepts(key: str) -> bool:
    try:
        mlflow_validation._validate_param(key, "v")
        mlflow_validation._validate_metric(key, 1.0, 0, 0)
        mlflow_validation._validate_tag(key, "v")
    except MlflowException:
        return False
    return True


@given(key_text)
@settings(max_examples=600, deadline=None)
@example("a" * 250)
@example("a" * 251)
@example("loss\n")  # MLflow's regex ends with $, which also matches before a final newline
@example("")
@example("/")
@example("a/./b")
@example("..a")
def test_check_key_accepts_exactly_what_mlflow_accepts(key: str) -> None:
    try:
        check_key(key, "metric", "R")
        ours = True
    except ValidationError:
        ours = False
    assert ours == mlflow_accepts(key), repr(key)


# --- exact round trips ------------------------------------------------------------------------

KEY_ALPHABET = st.characters(categories=("L", "Nd", "Mn")) | st.sampled_from(list("/_.- :"))


keys = st.text(KEY_ALPHABET, min_size=1, max_size=40).filter(accepted_key) | st.sampled_from(
    ["loss", "a/b", "x" * 250, "é:λ 中", "a-b.c_d"]
)
floats = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True) | st.sampled_from(
    [-0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, math.nan, -math.inf]
)
metric_values = floats | st.integers(-(2**80), 2**80)
steps = st.none() | st.integers(INT64_MIN, INT64_MAX) | st.sampled_from([INT64_MIN, INT64_MAX, -1])
timestamps = st.none() | st.integers(0, INT64_MAX)
texts = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=80
) | st.sampled_from(
    ['"quoted"', "new\nline", "emoji 😀🧪", "back\\slash", "tab\there", "\u2028\u2029", ""]
)

ops = st.one_of(
    st.tuples(st.just("metric"), keys, metric_values, steps, timestamps),
    st.tuples(
        st.just("metrics"), st.dictionaries(keys, metric_values, max_size=5), steps, timestamps
    ),
    st.tuples(st.just("param"), keys, texts | st.integers() | floats),
    st.tuples(
        st.just("tags"),
        st.dictionaries(keys.filter(lambda k: reserved_tag_reason(k) is None), texts, max_size=4),
    ),
)


def as_float(value: Any) -> float:
    return float(value)


@given(st.lists(ops, max_size=25))
@FIXTURE_OK
def test_any_event_sequence_round_trips_exactly(tracker: Tracker, sequence: list[Any]) -> None:
    expected: list[tuple[str, Any, Any, Any]] = []
    params: dict[str, str] = {}
    with tracker.start_run(run_name="prop") as run:
        for op in sequence:
            kind = op[0]
            if kind == "metric":
                _, key, value, step, ts = op
                assume(not isinstance(value, int) or abs(value) < 2**1023)
                run.log_metric(key, value, step=step, timestamp=ts)
                expected.append(("metrics", {key: as_float(value)}, step or 0, ts))
            elif kind == "metrics":
                _, data, step, ts = op
                run.log_metrics(data, step=step, timestamp=ts)
                if data:
                    d = {k: as_float(v) for k, v in data.items()}
                    expected.append(("metrics", d, step or 0, ts))
            elif kind == "param":
                _, key, value = op
                text = str(value)
                if key in params and params[key] != text:
                    with pytest.raises(ParamConflictError):
                        run.log_param(key, value)
                    continue
                run.log_param(key, value)
                if key not in params:
                    params[key] = text
                    expected.append(("params", {key: text}, None, None))
            else:
                _, data = op
                run.set_tags(data)
                if data:
                    expected.append(("tags", dict(data), None, None))
    events = read_clean(only_segment(tracker.settings.spool_root, run.run_id))
    logged = events[2:-1]
    assert [e.kind for e in events[:2]] == ["segment", "run_start"] and events[-1].kind == "run_end"
    assert len(logged) == len(expected)
    for event, (kind, data, step, ts) in zip(logged, expected, strict=True):
        assert event.kind == kind
        if ts is not None:
            assert event.t == ts
        if kind == "metrics":
            assert event.data["step"] == step
            got = {k: decode_metric_value(v) for k, v in event.data["d"].items()}
            assert list(got) == list(data)
            for k in data:
                assert same_float(got[k], data[k]), (k, got[k], data[k])
        else:
            assert event.data["d"] == data
    # Every line is the canonical framing of its record (the hot path included).
    path = only_segment(tracker.settings.spool_root, run.run_id)
    raw = path.read_bytes()
    for event in events:
        record = {k: v for k, v in event.data.items() if k != "c"}
        assert raw[event.offset : event.end] == frame(record)


@given(keys, floats | st.sampled_from(["NaN", "Infinity", "-Infinity"]), steps, timestamps)
@settings(max_examples=300, deadline=None)
def test_the_metric_fast_path_frames_like_frame(key: str, value: Any, step: Any, ts: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        value = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    s, t = step or 0, ts or 0
    record = {"v": 1, "s": 5, "t": t, "k": "metrics", "step": s, "d": {key: value}}
    assert frame_metric(5, t, s, orjson.dumps(key), orjson.dumps(value)) == frame(record)


@given(st.text(st.characters(categories=("Cs",)), min_size=1, max_size=3))
@settings(max_examples=30)
def test_lone_surrogates_are_rejected_not_crashed_on(bad: str) -> None:
    with pytest.raises(ValidationError, match="not valid Unicode text"):
        string_value("ok" + bad, "k", "tag", 8000, "R")


# --- damaged spools ---------------------------------------------------------------------------

damage = st.lists(
    st.tuples(
        st.sampled_from(["flip", "zero", "insert", "delete", "truncate"]),
        st.floats(0, 1),
        st.integers(1, 300),
        st.binary(min_size=1, max_size=40),
    ),
    min_size=1,
    max_size=4,
)


@given(damage)
@FIXTURE_OK
def test_damage_after_the_header_never_yields_a_wrong_event(
    tracker: Tracker, tmp_path: Path, edits: list[Any]
) -> None:
    with tracker.start_run(run_name="victim") as run:
        for i in range(30):
            run.log_metric("m", i / 3, step=i)
            if i % 7 == 0:
                run.set_tags({"t": f"v{i}\n😀"})
    path = only_segment(tracker.settings.spool_root, run.run_id)
    original = path.read_bytes()
    header_end = original.index(b"\n") + 1
    genuine = [orjson.dumps(e.data) for e in read_clean(path)]
    data = bytearray(original)
    for op, where, length, blob in edits:
        pos = header_end + int(where * (len(data) - header_end))
        if op == "flip" and pos < len(data):
            data[pos] ^= 0x20
        elif op == "zero":
            data[pos : pos + length] = bytes(len(data[pos : pos + length]))
        elif op == "insert":
            data[pos:pos] = blob
        elif op == "delete":
            del data[pos : pos + length]
        elif op == "truncate":
            del data[pos:]
    damaged = tmp_path / f"damaged-{run.run_id}.jsonl"
    damaged.write_bytes(bytes(data))
    reader = SegmentReader(damaged)
    items = list(reader)  # never raises: the header is intact
    events = [i for i in items if isinstance(i, Event)]
    remaining = list(genuine)
    for e in events:
        dumped = orjson.dumps(e.data)
        assert dumped in remaining, f"wrong event returned: {e}"
        remaining.remove(dumped)
    assert reader.end_offset <= len(data)
