"""Logged models (``model_*`` events): replayed into the destination under their run.

A model's events live in the spool of its source run (dropin/models.py), so the replay meets
them in that run's order, after the run exists. ``model_start`` becomes the destination model:
looked up first by its tag ``ff.model_id`` (a pass that died after the create, a retry after a
lost answer, a second pass: never a second model), created with its params and tags otherwise,
in the run's experiment and with the run as its source. Every other event names the model and
goes to the model it maps to. Each is a barrier, as ``tag_delete`` is: the batch before it
goes first, the progress moves past it only once the destination acknowledged it. What a
``model_*`` payload means is read by :mod:`formula_foundry.tracking.model_events`, the
reading ``verify`` and the drop-in share.

``model_artifact`` events travel with the run's files (``uploads``): found in their store,
then uploaded into the model's artifact location through the same sink rules — replaced whole
on a retry, checked at full size before the progress moves. Unlike a run's files, a model's are
uploaded whatever their size (``sync.upload_max_bytes``): a model without its weights cannot be
loaded.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, Final, TypeVar, cast

import orjson

from formula_foundry.errors import ValidationError
from formula_foundry.sync.engine.batch import Cursor
from formula_foundry.sync.engine.inputs import replay_inputs
from formula_foundry.sync.engine.payloads import InvalidRecord, PayloadChecker
from formula_foundry.sync.engine.runs import RunContext, SyncContext
from formula_foundry.sync.engine.sink import (
    DestinationRejected,
    ModelSink,
    ModelSpec,
    Sink,
)
from formula_foundry.sync.engine.uploads import ObjectUnavailable, local_files
from formula_foundry.tracking.events import (
    K_ARTIFACT,
    K_INPUTS,
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
    MODEL_KINDS,
    check_model_id,
)
from formula_foundry.tracking.model_events import (
    metric_dataset,
    model_end_status,
    model_output_step,
    model_start,
)
from formula_foundry.tracking.spool_reader import Event

__all__ = ["FILE_KINDS", "model_sink", "other_event", "upload_model_files"]

# The events whose files the replay uploads: a run's, and a model's.
FILE_KINDS: Final = frozenset({K_ARTIFACT, K_MODEL_ARTIFACT})

# Destination model ids by spool model id, per sink: a model's events are spread over a run's
# segments, and each would otherwise cost a search.
_IDS: weakref.WeakKeyDictionary[object, dict[str, str]] = weakref.WeakKeyDictionary()
_CHECK = PayloadChecker()
T = TypeVar("T")


def model_sink(sink: Sink) -> ModelSink:
    """The sink's model calls (its ``model_sink()``), or those of the client sink a bulk SQL
    path wraps (``sql_bulk.BulkSink`` forwards the run calls only)."""
    for candidate in (sink, getattr(sink, "inner", None)):
        get = getattr(candidate, "model_sink", None)
        if callable(get):
            return cast(ModelSink, get())
    raise DestinationRejected(
        f"{sink.description}: this destination's sink ({type(sink).__name__}) cannot take "
        "logged models (it has no model_sink())"
    )


def other_event(cx: SyncContext, cur: Cursor, ev: Event, flush: Callable[[Cursor], None]) -> None:
    """Replay a ``model_*`` event (not ``model_artifact``) or an ``inputs`` event (``inputs``)
    as a barrier; any other kind left to this (a segment header, a heartbeat) has nothing to
    send."""
    if ev.kind not in MODEL_KINDS and ev.kind != K_INPUTS:
        cur.pos = (ev.end, ev.line, ev.seq)
        return
    flush(cur)  # what came before reaches the destination first
    _apply(cx, cur.ctx, ev)
    cur.pos = (ev.end, ev.line, ev.seq)
    cur.batch.events += 1
    flush(cur)


def _apply(cx: SyncContext, ctx: RunContext, ev: Event) -> None:
    sink = model_sink(cx.sink)
    d, kind = ev.data, ev.kind
    if kind == K_INPUTS:

        def log(datasets: list[Any], models: list[str]) -> None:
            cx.call(partial(sink.log_inputs, ctx.mlflow_run_id, datasets, models))

        replay_inputs(ev, log, partial(_input_model, cx, sink))
        return
    model = _model_id(d.get("model"))
    if kind == K_MODEL_START:
        start = _read(model_start, model, d)
        spec = ModelSpec(
            model, start.experiment, ctx.mlflow_run_id, start.name, start.model_type,
            tuple(start.params.items()), tuple(start.tags.items()),
        )  # fmt: skip

        def ensure() -> str:
            return sink.find_model(model, spec.experiment) or sink.create_model(spec)

        _IDS.setdefault(cx.sink, {})[model] = cx.call(ensure)
        return
    dest = _destination(cx, sink, model)
    call: Callable[[], Any]
    if kind == K_MODEL_PARAMS:
        call = partial(sink.log_model_params, dest, _CHECK.strings(ev, MAX_PARAM_VALUE_LENGTH))
    elif kind == K_MODEL_TAGS:
        call = partial(sink.set_model_tags, dest, _CHECK.strings(ev, MAX_TAG_VALUE_LENGTH))
    elif kind == K_MODEL_TAG_DELETE:
        keys = _CHECK.tag_keys(ev)

        def call() -> None:
            for key in keys:
                sink.delete_model_tag(dest, key)

    elif kind == K_MODEL_METRICS:
        rows = _CHECK.metric_rows(ev)
        dataset = _read(metric_dataset, d.get("dataset_name"), d.get("dataset_digest"))
        call = partial(sink.log_model_metrics, ctx.mlflow_run_id, dest, rows, dataset)
    elif kind == K_MODEL_OUTPUT:
        step = _read(model_output_step, model, d)
        call = partial(sink.log_model_output, ctx.mlflow_run_id, dest, step)
    elif kind == K_MODEL_END:
        call = partial(sink.finalize_model, dest, _read(model_end_status, model, d))
    else:  # pragma: no cover - the replayer sends model_artifact to the uploads
        raise InvalidRecord(f"{kind} is not a model event")
    cx.call(call)


def upload_model_files(cx: SyncContext, cur: Cursor) -> None:
    """Upload the batch's model files, model by model; the ones the destination can never
    take are quarantined as ``refused`` (the run goes on)."""
    sink = model_sink(cx.sink)
    by_model: dict[str, list[tuple[Any, Event]]] = {}
    for ref, ev in cur.batch.files:
        if ev.kind == K_MODEL_ARTIFACT:
            by_model.setdefault(_model_id(ev.data.get("model")), []).append((ref, ev))
    for model, files in by_model.items():
        events = {ref.path: ev for ref, ev in files}
        try:
            dest = _destination(cx, sink, model)
        except InvalidRecord as exc:
            rejected = [(ref, str(exc)) for ref, _ in files]
        else:
            found = local_files([ref for ref, _ in files])
            rejected = cx.call(partial(sink.upload_model_artifacts, dest, found))
            cx.report.files += len(found)
            cx.report.file_bytes += sum(ref.size for ref, _ in found)
        for ref, why in rejected:
            ev = events[ref.path]
            raw = orjson.dumps(ev.data)
            path, run = cur.seg.path, cur.ctx.spool_run_id
            cx.quarantine(run, path, ev.line, ev.offset, "refused", why, raw)


def _read(reading: Callable[..., T], *args: Any) -> T:
    """``reading(*args)``, one of the model events' readings (tracking/model_events.py): what
    it refuses is quarantined as ``invalid``."""
    try:
        return reading(*args)
    except ValidationError as exc:
        raise InvalidRecord(str(exc)) from None


def _model_id(value: object) -> str:
    try:
        return check_model_id(value)
    except Exception as exc:
        raise InvalidRecord(f"model event: {exc}") from None


def _destination(cx: SyncContext, sink: ModelSink, model: str) -> str:
    """The destination id of ``model``: known in this process, else found by its tag."""
    known = _IDS.setdefault(cx.sink, {})
    dest = known.get(model)
    if dest is None:
        found = cx.call(partial(sink.find_model, model, None))
        if found is None:
            raise InvalidRecord(
                f"logged model {model} is not in {cx.sink.description}: no model_start of it "
                "was replayed before this event"
            )
        dest = known[model] = found
    return dest


def _input_model(cx: SyncContext, sink: ModelSink, model: str) -> str:
    """A model the run used: the segment waits (and the next pass retries) until the run that
    logged it has been synced, rather than drop the input."""
    try:
        return _destination(cx, sink, model)
    except InvalidRecord:
        raise ObjectUnavailable(
            f"logged model {model}, an input of this run, is not in {cx.sink.description} yet "
            "(the run that logged it is not synced yet)"
        ) from None
