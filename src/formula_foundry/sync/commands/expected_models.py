"""The logged models a destination should hold for one spooled run (``model_*`` events).

Part of ``verify``'s reference (:mod:`formula_foundry.sync.commands.expected`), following the
model replay (:mod:`formula_foundry.sync.engine.models`) rule for rule: a model exists from its
first valid ``model_start`` (name, experiment, params, tags, with ``ff.model_id``), params are
write-once, tags last-write-wins with deletions in order, ``model_end`` sets the status, each
``model_artifact`` is a file (the last of a path wins) unless the destination refused it.
Events of a model without a valid ``model_start`` before them are quarantined by the replay:
not expected. Metric points linked to a model and its outputs are not compared.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from formula_foundry.sync.engine.payloads import InvalidRecord, PayloadChecker
from formula_foundry.sync.engine.sink import ArtifactRef
from formula_foundry.tracking.events import (
    K_MODEL_ARTIFACT,
    K_MODEL_END,
    K_MODEL_PARAMS,
    K_MODEL_START,
    K_MODEL_TAG_DELETE,
    K_MODEL_TAGS,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    MODEL_END_STATUSES,
    MODEL_ID_TAG,
    check_model_id,
)
from formula_foundry.tracking.spool_reader import Event


@dataclass
class ExpectedModel:
    """The destination model one spooled model should have become."""

    spool_model_id: str
    experiment: str
    name: str
    model_type: str | None
    status: str = "PENDING"
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    files: dict[str, ArtifactRef] = field(default_factory=dict)


def fold_model_event(
    models: dict[str, ExpectedModel],
    ev: Event,
    check: PayloadChecker,
    refused: Collection[tuple[str, int]],
    path: str,
) -> None:
    """Apply one ``model_*`` event to ``models``; :class:`InvalidRecord` if the replay
    quarantines it (nothing applied)."""
    d = ev.data
    try:
        mid = check_model_id(d.get("model"))
    except Exception as exc:
        raise InvalidRecord(f"model event: {exc}") from None
    if ev.kind == K_MODEL_START:
        if mid not in models:
            models[mid] = _start(mid, d)
        return
    model = models.get(mid)
    if model is None:
        raise InvalidRecord(f"no model_start of model {mid} before this event")
    if ev.kind == K_MODEL_PARAMS:
        for key, value in check.strings(ev, MAX_PARAM_VALUE_LENGTH):
            model.params.setdefault(key, value)
    elif ev.kind == K_MODEL_TAGS:
        model.tags.update(check.strings(ev, MAX_TAG_VALUE_LENGTH))
    elif ev.kind == K_MODEL_TAG_DELETE:
        for key in check.tag_keys(ev):
            model.tags.pop(key, None)
    elif ev.kind == K_MODEL_END:
        status = d.get("status")
        if status not in MODEL_END_STATUSES:
            raise InvalidRecord(f"model_end of model {mid}: status {status!r}")
        model.status = str(status)
    elif ev.kind == K_MODEL_ARTIFACT:
        ref = check.artifact(ev)
        if (path, ev.offset) not in refused:  # refused: never in the destination
            model.files[ref.path] = ref


def _start(mid: str, d: dict[str, object]) -> ExpectedModel:
    experiment, name, model_type = d.get("experiment"), d.get("name"), d.get("model_type")
    if not isinstance(experiment, str) or not experiment or not isinstance(name, str) or not name:
        raise InvalidRecord(f"model_start of model {mid} lacks an experiment or a name")
    if model_type is not None and not isinstance(model_type, str):
        raise InvalidRecord(f"model_start of model {mid}: model_type {model_type!r}")
    pairs: list[dict[str, str]] = []
    for name_of in ("params", "tags"):
        value = d.get(name_of) or {}
        if type(value) is not dict or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise InvalidRecord(f"model_start of model {mid}: {name_of} must map str to str")
        pairs.append(dict(value))
    params, tags = pairs
    tags[MODEL_ID_TAG] = mid  # ModelSpec.creation_tags: how the replay finds it again
    return ExpectedModel(mid, experiment, name, model_type, params=params, tags=tags)
