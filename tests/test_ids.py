"""One run-id rule (formula_foundry.ids) for the tracker, run directories and the sync.

Each part once had its own pattern, and they disagreed (the sync read ``a:b`` and 250-character
ids the tracker refused to write; run directories refused ``a..b``, which the tracker wrote and
the sync read: it stays valid, so no existing spool's run is left unread).
These tests pin every part to the same answer for any string.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from formula_foundry.errors import ValidationError
from formula_foundry.ids import RUN_ID_MAX_LENGTH, is_run_id, run_id_problem
from formula_foundry.substrate import InvalidRunId, validate_run_id
from formula_foundry.sync.engine.payloads import run_start_problem
from formula_foundry.tracking.resume import check_run_id
from formula_foundry.tracking.spool_reader import Event

# Mostly the characters the rule is about, so that valid ids are drawn often.
IDS = st.one_of(
    st.text(alphabet="ab9Z._-:/ \x00é", max_size=12),
    st.text(max_size=8),
    st.integers(min_value=120, max_value=135).map(lambda n: "r" * n),
    st.none(),
    st.integers(),
)


def _accepts(check: object, value: object) -> bool:
    try:
        check(value)  # type: ignore[operator]
    except (ValidationError, InvalidRunId):
        return False
    return True


def _start(parent: object) -> Event:
    data = {"k": "run_start", "experiment": "e", "name": "n", "parent": parent}
    return Event(seq=1, t=1, kind="run_start", data=data, line=2, offset=0, end=1)


@given(IDS)
def test_every_part_gives_the_same_answer(value: object) -> None:
    ok = is_run_id(value)
    assert (run_id_problem(value) is None) == ok
    assert _accepts(check_run_id, value) == ok  # the tracker: run_id=, FF_RUN_ID, attach_run
    assert _accepts(validate_run_id, value) == ok  # run directories
    # The sync: a run_start's parent (None is a top-level run, not a run id).
    if value is not None:
        assert (run_start_problem(_start(value)) is None) == ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("0f8e2a6c1d2b4c3a9e7f6a5b4c3d2e1f", True),
        ("coupon-sweep-4711", True),
        ("run_1.2-b", True),
        ("r" * RUN_ID_MAX_LENGTH, True),
        ("r" * (RUN_ID_MAX_LENGTH + 1), False),
        ("a..b", True),  # one ordinary name; the tracker always wrote such runs
        ("slurm:4711", False),
        (".hidden", False),
        ("-x", False),
        ("a/b", False),
        ("", False),
        ("é", False),
    ],
)
def test_the_rule(value: str, ok: bool) -> None:
    assert is_run_id(value) is ok
    problem = run_id_problem(value)
    assert (problem is None) is ok
    if problem is not None:
        assert repr(value) in problem  # the error names the culprit
