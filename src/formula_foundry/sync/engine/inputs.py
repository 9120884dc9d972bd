"""A run's inputs (``inputs`` events): the datasets and logged models it used.

The drop-in writes one ``inputs`` event per ``log_inputs`` call (``mlflow.log_input``,
``mlflow.sklearn.autolog()``'s training data). The replay sends it as a barrier, as the model
events (:mod:`formula_foundry.sync.engine.models`), through the sink's ``log_inputs``: MLflow's
store keeps one dataset per (experiment, name, digest) and one input per (dataset, run), and
merges a model input on its key, so sending an event again after a crash adds nothing.

A model input names the node's model id; the destination's is found by its tag
``ff.model_id``. A model logged by another run that is not synced yet makes the segment wait
(as a missing artifact object does) and the next pass tries again: the input is never dropped.

:func:`run_inputs` is the one reading of the payload: the replay, ``verify``'s expected state
and the drop-in's reads on the node share it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from formula_foundry.sync.engine.payloads import InvalidRecord, shown
from formula_foundry.sync.engine.sink import RunDataset
from formula_foundry.tracking.events import (
    DATASET_FIELD_LIMITS,
    MAX_INPUT_TAG_KEY_LENGTH,
    MAX_INPUT_TAG_VALUE_LENGTH,
    check_model_id,
)
from formula_foundry.tracking.spool_reader import Event

__all__ = ["dataset_record", "run_inputs"]

_OPTIONAL = frozenset({"schema", "profile"})


def run_inputs(ev: Event) -> tuple[list[RunDataset], list[str]]:
    """The datasets and the node's model ids an ``inputs`` event logs, checked with MLflow's
    rules (:class:`InvalidRecord` otherwise: the whole event is quarantined, as MLflow refuses
    the whole call)."""
    d = ev.data
    datasets, models = d.get("datasets", []), d.get("models", [])
    if type(datasets) is not list or type(models) is not list or not (datasets or models):
        raise InvalidRecord("inputs payload needs a non-empty list 'datasets' or 'models'")
    out = [_dataset(item) for item in datasets]
    try:
        model_ids = [check_model_id(m) for m in models]
    except Exception as exc:
        raise InvalidRecord(f"inputs: {exc}") from None
    return out, model_ids


def _dataset(item: object) -> RunDataset:
    if type(item) is not dict:
        raise InvalidRecord(f"inputs: dataset {shown(item)} is not an object")
    values: dict[str, str | None] = {}
    for name, limit in DATASET_FIELD_LIMITS.items():
        value = item.get(name)
        if value is None and name in _OPTIONAL:
            values[name] = None
            continue
        if type(value) is not str or len(value) > limit or "\x00" in value:
            raise InvalidRecord(
                f"inputs: dataset {name} {shown(value)} is not a string of at most {limit} "
                "characters"
            )
        values[name] = value
    tags = item.get("tags", {})
    if type(tags) is not dict:
        raise InvalidRecord(f"inputs: dataset tags {shown(tags)} are not an object")
    for key, value in tags.items():
        if len(key) > MAX_INPUT_TAG_KEY_LENGTH or "\x00" in key:
            raise InvalidRecord(f"inputs: dataset tag key {shown(key)} is too long")
        if type(value) is not str or len(value) > MAX_INPUT_TAG_VALUE_LENGTH:
            raise InvalidRecord(
                f"inputs: dataset tag {key!r}: value must be a string of at most "
                f"{MAX_INPUT_TAG_VALUE_LENGTH} characters"
            )
    return RunDataset(
        str(values["name"]),
        str(values["digest"]),
        str(values["source_type"]),
        str(values["source"]),
        values["schema"],
        values["profile"],
        tuple(tags.items()),
    )


def dataset_record(ds: RunDataset) -> dict[str, Any]:
    """A dataset as an ``inputs`` event holds it (what :func:`run_inputs` reads back)."""
    return {
        "name": ds.name,
        "digest": ds.digest,
        "source_type": ds.source_type,
        "source": ds.source,
        "schema": ds.schema,
        "profile": ds.profile,
        "tags": dict(ds.tags),
    }


def replay_inputs(
    ev: Event, log: Callable[[list[RunDataset], list[str]], None], resolve: Callable[[str], str]
) -> None:
    """Send an ``inputs`` event: ``resolve`` maps each node model id to the destination's (or
    raises to wait for it), ``log`` is the sink call (through the retry policy)."""
    datasets, models = run_inputs(ev)
    log(datasets, [resolve(m) for m in models])
