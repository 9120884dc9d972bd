"""Reading ``model_*`` events into a logged model's state: the one reading of them.

A logged model's events live in its source run's spool (``K_MODEL_*`` in
:mod:`formula_foundry.tracking.events`). Three readers must agree on what they make of a
model: the replay (:mod:`formula_foundry.sync.engine.models`), ``verify``'s expected state
(:mod:`formula_foundry.sync.commands.expected_models`) and the drop-in answering
``get_logged_model`` on the node (:mod:`formula_foundry.dropin.models`). The rules live here:
a model exists from its first valid ``model_start``, params are write-once, tags
last-write-wins with deletions in order, ``model_end`` sets the status, each
``model_artifact`` is a file (the last of a path wins), linked metric points accumulate with
their dataset. An event of a model without a ``model_start`` before it applies to nothing.

The checks of keys, values and files are the sync's payload checker
(``sync/engine/payloads.PayloadChecker``), passed in as :class:`PayloadRules`: the tracker
imports nothing of the sync, and a second copy of those checks would drift. What this module
checks itself raises :class:`~formula_foundry.errors.ValidationError`; what the checker
checks raises the checker's error. Either way nothing of the event was applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from formula_foundry.errors import ValidationError
from formula_foundry.tracking.events import (
    DATASET_FIELD_LIMITS,
    INT64_MAX,
    INT64_MIN,
    K_MODEL_ARTIFACT,
    K_MODEL_END,
    K_MODEL_METRICS,
    K_MODEL_OUTPUT,
    K_MODEL_PARAMS,
    K_MODEL_START,
    K_MODEL_TAG_DELETE,
    K_MODEL_TAGS,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    MODEL_END_STATUSES,
    check_model_id,
)
from formula_foundry.tracking.spool_reader import Event

__all__ = [
    "ModelMetric",
    "ModelStart",
    "ModelState",
    "PayloadRules",
    "fold_model_event",
    "metric_dataset",
    "model_end_status",
    "model_output_step",
    "model_start",
]


class _File(Protocol):
    @property
    def path(self) -> str: ...


F = TypeVar("F", bound=_File)
F_co = TypeVar("F_co", bound=_File, covariant=True)


class PayloadRules(Protocol[F_co]):
    """The payload checks the fold applies (the sync's ``PayloadChecker``)."""

    def strings(self, ev: Event, limit: int) -> list[tuple[str, str]]: ...

    def tag_keys(self, ev: Event) -> list[str]: ...

    def metric_rows(self, ev: Event) -> Sequence[tuple[str, float, int, int]]: ...

    def artifact(self, ev: Event) -> F_co: ...


class ModelMetric(NamedTuple):
    """A metric point of the source run linked to the model, as MLflow's ``Metric`` holds it."""

    key: str
    value: float
    timestamp: int
    step: int
    dataset_name: str | None = None
    dataset_digest: str | None = None


@dataclass
class ModelState(Generic[F]):
    """A logged model as its events made it (``get_logged_model``'s fields)."""

    model_id: str
    run_id: str  # its source run: the spool that holds its events
    experiment: str
    name: str
    created: int
    model_type: str | None = None
    status: str = "PENDING"
    updated: int = 0
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: list[ModelMetric] = field(default_factory=list)
    files: dict[str, F] = field(default_factory=dict)


class ModelStart(NamedTuple):
    """What a ``model_start`` creates."""

    experiment: str
    name: str
    model_type: str | None
    params: dict[str, str]
    tags: dict[str, str]


def model_start(model_id: str, d: dict[str, Any]) -> ModelStart:
    """The model a ``model_start`` payload creates; ValidationError if it cannot create one."""
    experiment, name, model_type = d.get("experiment"), d.get("name"), d.get("model_type")
    if not isinstance(experiment, str) or not experiment:
        raise ValidationError(
            f"model_start of model {model_id}: experiment {experiment!r} is not a name"
        )
    if not isinstance(name, str) or not name:
        raise ValidationError(f"model_start of model {model_id}: name {name!r} is not a name")
    if model_type is not None and not isinstance(model_type, str):
        raise ValidationError(
            f"model_start of model {model_id}: model_type {model_type!r} is not a str"
        )
    pairs: list[dict[str, str]] = []
    for what in ("params", "tags"):
        value = d.get(what) or {}
        if type(value) is not dict or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ValidationError(f"model_start of model {model_id}: {what} must map str to str")
        pairs.append(dict(value))
    return ModelStart(experiment, name, model_type, pairs[0], pairs[1])


def model_end_status(model_id: str, d: dict[str, Any]) -> str:
    """The status a ``model_end`` sets."""
    status = d.get("status")
    if type(status) is not str or status not in MODEL_END_STATUSES:
        raise ValidationError(
            f"model_end of model {model_id}: status {status!r} is not READY or FAILED"
        )
    return status


def model_output_step(model_id: str, d: dict[str, Any]) -> int:
    """The step a ``model_output`` lists the model at."""
    step = d.get("step", 0)
    if type(step) is not int or not INT64_MIN <= step <= INT64_MAX:
        raise ValidationError(f"model_output of model {model_id}: step {step!r} is not an int64")
    return step


def metric_dataset(name: object, digest: object) -> tuple[str, str] | None:
    """The dataset a model's metric points were computed on: both ``dataset_name`` and
    ``dataset_digest``, or neither (MLflow's ``Metric`` refuses one alone), each within the
    column MLflow stores it in (``logged_model_metrics``). The drop-in checks a call with it,
    the readers an event."""
    if name is None and digest is None:
        return None
    for what, value in (("name", name), ("digest", digest)):
        limit = DATASET_FIELD_LIMITS[what]
        if not isinstance(value, str) or len(value) > limit or "\x00" in value:
            raise ValidationError(
                f"model metric dataset_{what} {value!r} is not a string of at most {limit} "
                "characters (a linked metric names both its dataset's name and digest, or neither)"
            )
    return str(name), str(digest)


def fold_model_event(
    models: dict[str, ModelState[F]],
    run_id: str,
    ev: Event,
    rules: PayloadRules[F],
    *,
    keep_file: bool = True,
) -> None:
    """Apply one ``model_*`` event of run ``run_id``'s spool to ``models`` (by model id).

    ``keep_file=False``: a ``model_artifact`` is checked but not recorded (the destination
    refused it). Raises (nothing applied) if the replay quarantines the event.
    """
    d = ev.data
    mid = check_model_id(d.get("model"))
    if ev.kind == K_MODEL_START:
        start = model_start(mid, d)
        if mid not in models:  # a second start (a retried write) changes nothing
            models[mid] = ModelState(
                mid, run_id, start.experiment, start.name, ev.t, start.model_type,
                "PENDING", ev.t, start.params, start.tags,
            )  # fmt: skip
        return
    state = models.get(mid)
    if state is None:
        raise ValidationError(f"{ev.kind}: no model_start of model {mid} before this event")
    if ev.kind == K_MODEL_PARAMS:
        for key, value in rules.strings(ev, MAX_PARAM_VALUE_LENGTH):
            state.params.setdefault(key, value)
    elif ev.kind == K_MODEL_TAGS:
        state.tags.update(rules.strings(ev, MAX_TAG_VALUE_LENGTH))
    elif ev.kind == K_MODEL_TAG_DELETE:
        for key in rules.tag_keys(ev):
            state.tags.pop(key, None)
    elif ev.kind == K_MODEL_END:
        state.status = model_end_status(mid, d)
    elif ev.kind == K_MODEL_METRICS:
        dataset = metric_dataset(d.get("dataset_name"), d.get("dataset_digest")) or (None, None)
        state.metrics.extend(ModelMetric(*row, *dataset) for row in rules.metric_rows(ev))
    elif ev.kind == K_MODEL_OUTPUT:
        model_output_step(mid, d)  # the model's state has no outputs; the run lists it
    elif ev.kind == K_MODEL_ARTIFACT:
        ref = rules.artifact(ev)
        if keep_file:
            state.files[ref.path] = ref
    else:
        raise ValidationError(f"{ev.kind} is not a model event")
    state.updated = max(state.updated, ev.t)
