from __future__ import annotations

from pathlib import Path

import pytest

from formula_foundry.errors import ValidationError
from formula_foundry.substrate import canonical_json
from formula_foundry.substrate.atomic import atomic_write_bytes, unique_suffix


def test_canonical_bytes_ignore_insertion_order() -> None:
    a = {"b": 1, "a": {"y": [1, 2], "x": None}}
    b = {"a": {"x": None, "y": [1, 2]}, "b": 1}
    assert (
        canonical_json.dumps(a) == canonical_json.dumps(b) == (b'{"a":{"x":null,"y":[1,2]},"b":1}')
    )
    assert canonical_json.loads(canonical_json.dumps(a)) == a


def test_unencodable_value_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match="canonical JSON"):
        canonical_json.dumps({"x": object()})


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "file.json"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_atomic_write_failure_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "occupied"
    (target / "child").mkdir(parents=True)  # os.replace cannot replace a non-empty directory
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]


def test_unique_suffix_names_host_and_pid() -> None:
    import os

    first, second = unique_suffix(), unique_suffix()
    assert first != second
    assert f".{os.getpid()}." in first
    assert "/" not in first and "\\" not in first
