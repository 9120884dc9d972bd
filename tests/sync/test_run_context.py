"""RunContext and RunRecord stay one set of fields: a run read from the sync state and written
back is the same record, field by field, whatever fields RunRecord grows."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from formula_foundry.sync.engine.runs import RunContext
from formula_foundry.sync.engine.sync_state import RunRecord

# What a pass knows of a run but the sync state does not keep.
CONTEXT_ONLY = {"params"}


def _sample(field: dataclasses.Field[object], n: int) -> Any:
    """A value for ``field`` unlike its default and unlike every other field's value, so a
    dropped or swapped field shows in the round trip."""
    kind = str(field.type)
    if kind in ("str", "str | None"):
        return f"{field.name}-{n}"
    if kind in ("int", "int | None"):
        return 1000 + n
    if kind == "bool":
        assert isinstance(field.default, bool), field.name
        return not field.default
    pytest.fail(f"RunRecord.{field.name}: no sample value for type {kind}; add one here")


def _full_record() -> RunRecord:
    fields = dataclasses.fields(RunRecord)
    rec = RunRecord(**{f.name: _sample(f, n) for n, f in enumerate(fields)})
    for f in fields:
        assert getattr(rec, f.name) != f.default, f"RunRecord.{f.name} kept its default"
    return rec


def test_every_field_survives_a_round_trip() -> None:
    rec = _full_record()
    ctx = RunContext.from_record(rec)
    assert ctx.record() == rec
    assert (ctx.spool_run_id, ctx.mlflow_run_id) == (rec.spool_run_id, rec.mlflow_run_id)
    assert ctx.params is None  # a run from the state: its params are not fetched yet


def test_a_changed_context_is_what_gets_saved() -> None:
    ctx = RunContext.from_record(_full_record())
    ctx.status, ctx.parent_linked, ctx.last_t, ctx.end_time = "FINISHED", True, 7, 8
    rec = ctx.record()
    assert (rec.status, rec.parent_linked, rec.last_t, rec.end_time) == ("FINISHED", True, 7, 8)


def test_the_context_adds_only_what_the_state_does_not_keep() -> None:
    record_fields = {f.name for f in dataclasses.fields(RunRecord)}
    context_fields = {f.name for f in dataclasses.fields(RunContext)}
    assert context_fields - CONTEXT_ONLY == record_fields
