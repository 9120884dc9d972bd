"""The spool line format and the validation rules of formula_foundry.tracking.events."""

from __future__ import annotations

import math
import zlib
from decimal import Decimal
from enum import Enum
from fractions import Fraction

import numpy as np
import orjson
import pytest

from formula_foundry.errors import ValidationError
from formula_foundry.tracking.events import (
    FORMAT_VERSION,
    INT64_MAX,
    INT64_MIN,
    K_METRICS,
    KINDS,
    MAX_KEY_LENGTH,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    SUPPORTED_VERSIONS,
    check_key,
    checksum_ok,
    decode_metric_value,
    frame,
    frame_metric,
    int64,
    metric_value,
    string_value,
)

RECORD = {"v": 1, "s": 7, "t": 1700000000123, "k": "metrics", "step": 3, "d": {"loss": 0.25}}


# --- framing ----------------------------------------------------------------------------------


def test_frame_is_one_json_line_with_the_crc32_of_the_bytes_before_the_checksum_key() -> None:
    line = frame(dict(RECORD))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    cut = line.index(b',"c":"')
    head = line[:cut]
    # Written out independently of events.py: the documented algorithm.
    assert head == b'{"v":1,"s":7,"t":1700000000123,"k":"metrics","step":3,"d":{"loss":0.25}'
    assert line[cut:] == b',"c":"%08x"}\n' % zlib.crc32(head)
    decoded = orjson.loads(line)
    assert list(decoded) == ["v", "s", "t", "k", "step", "d", "c"]
    assert decoded["c"] == format(zlib.crc32(head), "08x")


def test_checksum_ok_accepts_framed_lines_and_rejects_any_changed_byte() -> None:
    line = frame(dict(RECORD))[:-1]
    assert checksum_ok(line)
    for i in range(len(line)):
        damaged = bytearray(line)
        damaged[i] ^= 0x01
        assert not checksum_ok(bytes(damaged)), f"flipping byte {i} went unnoticed"


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"{}",
        b'{"v":1,"s":1,"t":1,"k":"metrics"}',
        b'{"v":1,"c":"zzzzzzzz"}',
        b'{"v":1,"c":"1234567"}',
        b'{"v":1,"c":"12345678",}',
    ],
)
def test_checksum_ok_rejects_lines_without_a_valid_checksum(line: bytes) -> None:
    assert not checksum_ok(line)


def test_checksum_ok_wants_the_checksum_spelled_exactly_as_the_writer_does() -> None:
    line = frame(dict(RECORD))[:-1]
    digits = line[-10:-2]
    crc = int(digits, 16)
    assert digits != digits.upper(), "pick a record whose checksum has a letter"
    # Same number, other spelling: int(..., 16) would take it; the reader must not.
    assert int(digits.upper(), 16) == crc
    assert not checksum_ok(line[:-10] + digits.upper() + b'"}')


def test_frame_metric_writes_the_same_bytes_as_frame() -> None:
    for key, value, step in [
        ("loss", 0.25, 3),
        ("a/b c:d-e.f_g", 1e300, -(2**63)),
        ("é λ 中", -0.0, 2**63 - 1),
        ("x", "NaN", 0),
        ("x", "-Infinity", 0),
        ("x", 5e-324, 1),
    ]:
        record = {"v": 1, "s": 12, "t": 99, "k": K_METRICS, "step": step, "d": {key: value}}
        assert frame_metric(12, 99, step, orjson.dumps(key), orjson.dumps(value)) == frame(record)


def test_versions_and_kinds() -> None:
    assert FORMAT_VERSION in SUPPORTED_VERSIONS
    assert {"segment", "run_start", "params", "metrics", "tags", "artifact_ref", "run_end"} <= KINDS


# --- keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["loss", "a/b", "a.b-c_d e:f", "train/épsilon", "λ", "中文", "x" * MAX_KEY_LENGTH, "٣"],
)
def test_check_key_accepts_mlflow_keys(key: str) -> None:
    assert check_key(key, "metric", "R") == key


def test_check_key_messages_name_run_key_and_rule() -> None:
    with pytest.raises(ValidationError) as e:
        check_key("a!", "param", "run42")
    assert str(e.value) == (
        "run run42: param key 'a!' has a character MLflow rejects "
        "(allowed: letters, digits, _ - . space : /)"
    )
    with pytest.raises(ValidationError) as e:
        check_key("a" * 251, "metric", "run42")
    assert str(e.value) == (
        f"run run42: metric key {'a' * 40!r}... is 251 characters (MLflow allows at most 250)"
    )
    with pytest.raises(ValidationError) as e:
        check_key("a//b", "tag", "run42")
    assert str(e.value) == (
        "run run42: tag key 'a//b' is not a unique path (empty, leading or trailing '/', "
        "'//', '.' or '..' components are rejected by MLflow)"
    )
    with pytest.raises(ValidationError, match=r"^run run42: tag key 3 must be a str$"):
        check_key(3, "tag", "run42")


@pytest.mark.parametrize(
    "key", ["", ".", "..", "/a", "a/", "a/../b", "./a", "a/.", "a\tb", "emoji😀"]
)
def test_check_key_rejects(key: str) -> None:
    with pytest.raises(ValidationError, match=r"^run R: metric key "):
        check_key(key, "metric", "R")


def test_check_key_turns_str_subclasses_into_str() -> None:
    class Name(str, Enum):
        LOSS = "loss"

    out = check_key(Name.LOSS, "metric", "R")
    assert type(out) is str and out == "loss"
    out = check_key(np.str_("acc"), "metric", "R")
    assert type(out) is str and out == "acc"


# --- metric values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.5, 0.5),
        (-0.0, -0.0),
        (3, 3.0),
        (-(2**70), float(-(2**70))),
        (np.float32(0.1), float(np.float32(0.1))),
        (np.float64(2.5), 2.5),
        (np.int64(-4), -4.0),
        (np.uint8(200), 200.0),
        (Fraction(1, 4), 0.25),
    ],
)
def test_metric_value_accepts_real_numbers(value: object, expected: float) -> None:
    out = metric_value(value, "k", "R")
    assert type(out) is float
    assert out == expected and math.copysign(1, out) == math.copysign(1, expected)


@pytest.mark.parametrize(
    ("value", "token"),
    [
        (math.nan, "NaN"),
        (math.inf, "Infinity"),
        (-math.inf, "-Infinity"),
        (np.float32("nan"), "NaN"),
        (np.float64("-inf"), "-Infinity"),
    ],
)
def test_non_finite_metric_values_are_spelled_as_tokens(value: object, token: str) -> None:
    assert metric_value(value, "k", "R") == token
    back = decode_metric_value(token)
    assert (math.isnan(back) and token == "NaN") or back == float(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (True, "True is not a real number (bool;"),
        ("1.0", "'1.0' is not a real number (str;"),
        (None, "None is not a real number (NoneType;"),
        (1j, "1j is not a real number (complex;"),
        (Decimal("1.5"), "Decimal('1.5') is not a real number (Decimal;"),
        (np.bool_(True), "is not a real number (bool"),
    ],
)
def test_metric_value_rejects_non_reals(value: object, shown: str) -> None:
    with pytest.raises(ValidationError) as e:
        metric_value(value, "loss", "run42")
    assert str(e.value).startswith("run run42: metric 'loss' value ")
    assert shown in str(e.value)


def test_metric_value_rejects_ints_too_big_for_a_float_with_a_short_message() -> None:
    with pytest.raises(ValidationError) as e:
        metric_value(10**400, "loss", "run42")
    msg = str(e.value)
    assert msg.startswith("run run42: metric 'loss' value 1000")
    assert msg.endswith("cannot be a float: int too large to convert to float")
    assert len(msg) < 200 and "\n" not in msg


def test_decode_metric_value() -> None:
    assert decode_metric_value(1.5) == 1.5
    assert decode_metric_value(2) == 2.0 and type(decode_metric_value(2)) is float
    for bad in ("nan", "inf", None, True, [1.0]):
        with pytest.raises(ValueError):
            decode_metric_value(bad)


# --- steps and timestamps ---------------------------------------------------------------------


def test_int64_bounds_and_types() -> None:
    assert int64(INT64_MIN, "step", "k", "R") == INT64_MIN
    assert int64(INT64_MAX, "step", "k", "R") == INT64_MAX
    assert int64(np.int32(-5), "step", "k", "R") == -5
    cases = [
        (INT64_MAX + 1, {}, "run R: metric 'k' step 9223372036854775808 is outside "),
        (INT64_MIN - 1, {}, "run R: metric 'k' step -9223372036854775809 is outside "),
        (True, {}, "run R: metric 'k' step must be an integer, got a bool"),
        (1.0, {}, "run R: metric 'k' step must be an integer, got 1.0"),
        ("3", {}, "run R: metric 'k' step must be an integer, got '3'"),
    ]
    for value, kw, msg in cases:
        with pytest.raises(ValidationError) as e:
            int64(value, "step", "k", "R", **kw)
        assert str(e.value).startswith(msg)
    with pytest.raises(ValidationError) as e:
        int64(-1, "timestamp", "k", "R", minimum=0)
    assert str(e.value) == "run R: metric 'k' timestamp -1 is outside [0, 9223372036854775807]"
    with pytest.raises(ValidationError) as e:
        int64(1.5e12, "timestamp", "k", "R", minimum=0)
    assert str(e.value) == (
        "run R: metric 'k' timestamp must be an integer number of milliseconds, got 1500000000000.0"
    )


# --- param and tag values ---------------------------------------------------------------------


def test_string_values_are_str_of_the_value_and_limited_not_truncated() -> None:
    assert string_value(1.0, "p", "param", MAX_PARAM_VALUE_LENGTH, "R") == "1.0"
    assert string_value(None, "p", "param", MAX_PARAM_VALUE_LENGTH, "R") == "None"
    assert string_value([1, "a"], "p", "param", MAX_PARAM_VALUE_LENGTH, "R") == "[1, 'a']"

    class Color(str, Enum):
        RED = "red"

    # MLflow stores str(value); for a (str, Enum) member that is "Color.RED", not "red".
    out = string_value(Color.RED, "p", "param", MAX_PARAM_VALUE_LENGTH, "R")
    assert type(out) is str and out == str(Color.RED)
    ok = "é" * MAX_PARAM_VALUE_LENGTH
    assert string_value(ok, "p", "param", MAX_PARAM_VALUE_LENGTH, "R") == ok
    with pytest.raises(ValidationError) as e:
        string_value(ok + "x", "p", "param", MAX_PARAM_VALUE_LENGTH, "run42")
    assert str(e.value) == (
        "run run42: param 'p' value is 6001 characters (MLflow allows at most 6000; "
        "it would truncate it silently)"
    )
    with pytest.raises(ValidationError) as e:
        string_value("x" * (MAX_TAG_VALUE_LENGTH + 1), "t", "tag", MAX_TAG_VALUE_LENGTH, "run42")
    assert "run run42: tag 't' value is 8001 characters (MLflow allows at most 8000" in str(e.value)
    with pytest.raises(ValidationError, match=r"^run R: tag 't' value contains a NUL character$"):
        string_value("a\x00b", "t", "tag", MAX_TAG_VALUE_LENGTH, "R")
