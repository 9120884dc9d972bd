"""Spool events: kinds, framing with a checksum, and the validation rules applied at log time.

Format (version 1, documented in docs/spool-format.md). A segment is UTF-8 JSON Lines; each line
is one object whose first keys are::

    {"v": 1, "s": <seq>, "t": <ms>, "k": <kind>, ...payload..., "c": "<crc32 hex>"}

``c`` is the CRC-32 (zlib) of the line's bytes up to, not including, ``,"c":"`` — the object with
its closing brace removed. It is always the last key, so a writer frames a record by cutting
the brace off orjson's output and appending ``,"c":"%08x"}\\n``.

Metric values that JSON cannot hold are spelled as strings: ``"NaN"``, ``"Infinity"``,
``"-Infinity"`` (orjson would silently write ``null``).

The rules below are MLflow's (``mlflow/utils/validation.py``), applied on the compute node so a
mistake is reported by the call that made it, not hours later by the sync.
"""

from __future__ import annotations

import math
import numbers
import operator
import posixpath
import re
import zlib
from typing import Any, Final

import orjson

from formula_foundry.errors import ValidationError

FORMAT_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({1})

K_SEGMENT: Final = "segment"
K_RUN_START: Final = "run_start"
K_PARAMS: Final = "params"
K_METRICS: Final = "metrics"
K_TAGS: Final = "tags"
K_ARTIFACT_REF: Final = "artifact_ref"
K_ARTIFACT: Final = "artifact"
K_RUN_END: Final = "run_end"
K_HEARTBEAT: Final = "heartbeat"
K_TAG_DELETE: Final = "tag_delete"
# Bytes a process wrote to its stdout or stderr while a run captured them (tracking/console.py);
# ff-sync uploads them as the run's files ``console/<host>-<pid>.log``
# (sync/engine/console_upload.py), ``ff-sync tail`` prints them.
K_CONSOLE: Final = "console"
# A run's inputs, logged through the drop-in (``log_inputs``, dropin/inputs.py): ``datasets``
# (each with name, digest, source_type, source, schema, profile and its input tags) and
# ``models`` (model ids the run used); ff-sync replays them with MLflow's ``log_inputs``
# (sync/engine/inputs.py), which keeps one dataset per (name, digest) and one input per run.
K_INPUTS: Final = "inputs"
# MLflow 3 logged models, logged through the drop-in (dropin/models.py). They live in the spool
# of the run that logged them (their source run); ff-sync creates each model under that run's
# destination run and replays the rest in order (sync/engine/models.py). Every one names its
# model (``"model"``, a model id); ``model_artifact`` has the fields of ``artifact``.
K_MODEL_START: Final = "model_start"  # experiment, name, model_type, params, tags
K_MODEL_PARAMS: Final = "model_params"  # d: {key: value}, write-once as a run's
K_MODEL_TAGS: Final = "model_tags"  # d: {key: value}
K_MODEL_TAG_DELETE: Final = "model_tag_delete"  # keys: [key]
# step, d: {key: value} (run metrics linked to it), optionally dataset_name and dataset_digest
# (the dataset they were computed on: both or neither; tracking/model_events.py reads them)
K_MODEL_METRICS: Final = "model_metrics"
K_MODEL_OUTPUT: Final = "model_output"  # step: the run lists the model among its outputs
K_MODEL_END: Final = "model_end"  # status: READY or FAILED (finalize_logged_model)
K_MODEL_ARTIFACT: Final = "model_artifact"  # a file of the model: path, digest, size, store
MODEL_KINDS: Final = frozenset(
    {
        K_MODEL_START,
        K_MODEL_PARAMS,
        K_MODEL_TAGS,
        K_MODEL_TAG_DELETE,
        K_MODEL_METRICS,
        K_MODEL_OUTPUT,
        K_MODEL_END,
        K_MODEL_ARTIFACT,
    }
)
KINDS: Final = frozenset(
    {
        K_SEGMENT,
        K_RUN_START,
        K_PARAMS,
        K_METRICS,
        K_TAGS,
        K_ARTIFACT_REF,
        K_ARTIFACT,
        K_RUN_END,
        K_HEARTBEAT,
        K_TAG_DELETE,
        K_CONSOLE,
        K_INPUTS,
        *MODEL_KINDS,
    }
)

RUN_STATUSES: Final = frozenset({"RUNNING", "FINISHED", "FAILED", "KILLED"})
# What finalize_logged_model may set (MLflow's LoggedModelStatus; a new model is PENDING).
MODEL_END_STATUSES: Final = frozenset({"READY", "FAILED"})
# The tag that names a synced model's spool model id: how a replay finds the model again.
MODEL_ID_TAG: Final = "ff.model_id"
# A model id: MLflow's own form (``m-`` and 32 hex digits), drawn on the node.
_MODEL_ID = re.compile(r"m-[0-9a-f]{32}")


def check_model_id(value: object) -> str:
    """A model id as the spool records it (MLflow's form); ValidationError otherwise."""
    if not isinstance(value, str) or not _MODEL_ID.fullmatch(value):
        raise ValidationError(f"model id {value!r} is not m-<32 lower-case hex digits>")
    return value


# What a run_end may set (a run never ends RUNNING).
END_STATUSES: Final = RUN_STATUSES - {"RUNNING"}

MAX_KEY_LENGTH: Final = 250
MAX_PARAM_VALUE_LENGTH: Final = 6000
MAX_TAG_VALUE_LENGTH: Final = 8000
# MLflow's limits of a dataset input (mlflow/utils/validation.py), in characters.
DATASET_FIELD_LIMITS: Final = {
    "name": 500,
    "digest": 36,
    "source_type": 36,  # not checked by MLflow, but its column: PostgreSQL refuses longer
    "source": 65535,
    "schema": 1048575,
    "profile": 16777215,
}
MAX_INPUT_TAG_KEY_LENGTH: Final = 255
MAX_INPUT_TAG_VALUE_LENGTH: Final = 500
# Why a run ended: a run_end's "reason", or the scheduler's word when the sync ends a run
# itself (sync/engine/scheduler.py). Under ff.sync.*, which verify leaves out of its comparison.
END_REASON_TAG: Final = "ff.sync.end_reason"
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
# The longest line a reader accepts (see docs/spool-format.md); the writer refuses longer ones.
MAX_LINE_BYTES: Final = 64 << 20

_CHECKSUM_TAIL_LEN: Final = 16  # len(',"c":"') + 8 hex + len('"}')
# MLflow's own pattern, "$" included: it accepts a key ending in one newline, and so do we
# (MLflow code logging through the spool must see the same rules as MLflow).
_KEY_CHARS = re.compile(r"^[/\w.\- :]*$")

_NONFINITE_OUT: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# The checksum tail appended to a record's bytes (its closing brace cut off): ``% (head, crc)``.
CHECKSUM_TAIL: Final = b'%b,"c":"%08x"}\n'
# The bytes orjson writes for a one-key metrics record, as a template for the writer's fast path:
# ``% (seq, t, step, json(key), json(value))``. frame() of the same record gives the same bytes.
METRIC_HEAD: Final = b'{"v":%d,"s":%%d,"t":%%d,"k":"%s","step":%%d,"d":{%%b:%%b}' % (
    FORMAT_VERSION,
    K_METRICS.encode(),
)


def frame(record: dict[str, Any]) -> bytes:
    """Serialise ``record`` as one checksummed line, newline included."""
    head = orjson.dumps(record)[:-1]
    return CHECKSUM_TAIL % (head, zlib.crc32(head))


def frame_metric(seq: int, t: int, step: int, key_json: bytes, value_json: bytes) -> bytes:
    """The line of ``{"v", "s": seq, "t", "k": "metrics", "step", "d": {key: value}}``.

    ``key_json``/``value_json`` are ``orjson.dumps`` of the key and of the spool spelling of
    the value (:func:`metric_value`). Byte-identical to :func:`frame` of that record, without
    building the dict; the writer inlines the same two formatting steps.
    """
    head = METRIC_HEAD % (seq, t, step, key_json, value_json)
    return CHECKSUM_TAIL % (head, zlib.crc32(head))


# Tags the sync writes itself when it creates a run: ``ff.*`` carry the run's identity
# (``ff.run_uuid`` is how a replay finds the run again), the ``mlflow.*`` ones link and
# attribute it. A user value for one of them would forge identity or lineage, so the tracker
# refuses them and the sync quarantines them in old spools.
RESERVED_TAG_PREFIX: Final = "ff."
# The tag that names a run: set by a resume under a new name (tracker) or a rename (drop-in);
# MLflow renames the run when it gets it.
RUN_NAME_TAG: Final = "mlflow.runName"
RESERVED_TAGS: Final = frozenset(
    {"mlflow.parentRunId", "mlflow.user", "mlflow.source.name", "mlflow.source.type"}
)


# MLflow's source types (``mlflow.entities.SourceType``). A ``run_start`` may carry one as
# ``source_type`` (the MLflow drop-in passes the client's ``mlflow.source.type`` on); without
# it, or with another value, the run's source type is LOCAL.
SOURCE_TYPES: Final = frozenset({"NOTEBOOK", "JOB", "PROJECT", "LOCAL", "RECIPE", "UNKNOWN"})


# The system tags a created run gets from its run_start's user and source. A run_start may
# list the ones its run has as ``system_tags`` (the MLflow drop-in does: MLflow's client adds
# them only where the fluent API resolved them); without the field, a run has all three.
CREATION_SYSTEM_TAGS: Final = ("mlflow.user", "mlflow.source.name", "mlflow.source.type")


def system_tags(run_start: dict[str, Any]) -> frozenset[str]:
    """Which of :data:`CREATION_SYSTEM_TAGS` the run started by ``run_start`` gets."""
    value = run_start.get("system_tags")
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value).intersection(CREATION_SYSTEM_TAGS)
    return frozenset(CREATION_SYSTEM_TAGS)


def source_type(run_start: dict[str, Any]) -> str:
    """The ``mlflow.source.type`` a run started by ``run_start`` gets."""
    value = run_start.get("source_type")
    return value if isinstance(value, str) and value in SOURCE_TYPES else "LOCAL"


def reserved_tag_reason(key: str) -> str | None:
    """Why a user may not set tag ``key`` (it belongs to the sync), or None if it may."""
    if key.startswith(RESERVED_TAG_PREFIX):
        return (
            f"tag {key!r} is reserved: tags starting with {RESERVED_TAG_PREFIX!r} carry the "
            "run's identity and are written by ff-sync"
        )
    if key in RESERVED_TAGS:
        return (
            f"tag {key!r} is reserved: ff-sync sets it from the run's start "
            "(parent, user, source); pass these to start_run instead"
        )
    return None


def checksum_ok(line: bytes) -> bool:
    """Whether ``line`` (without its newline) ends with a checksum that matches its bytes."""
    if len(line) < _CHECKSUM_TAIL_LEN + 2 or line[-_CHECKSUM_TAIL_LEN:-10] != b',"c":"':
        return False
    if line[-2:] != b'"}':
        return False
    # Exactly the writer's spelling (8 lower-case hex digits), not anything int() would parse.
    return line[-10:-2] == b"%08x" % zlib.crc32(line[:-_CHECKSUM_TAIL_LEN])


# --- validation (log time) -------------------------------------------------------------------


def check_key(key: object, what: str, run: str) -> str:
    """Validate a param/metric/tag key with MLflow's rules; return it."""
    if type(key) is not str:
        if not isinstance(key, str):
            raise ValidationError(f"run {run}: {what} key {key!r} must be a str")
        # A str subclass (StrEnum, numpy.str_): orjson refuses it as a dict key.
        key = str.__str__(key)
    if len(key) > MAX_KEY_LENGTH:
        raise ValidationError(
            f"run {run}: {what} key {key[:40]!r}... is {len(key)} characters "
            f"(MLflow allows at most {MAX_KEY_LENGTH})"
        )
    if not _KEY_CHARS.match(key):
        raise ValidationError(
            f"run {run}: {what} key {key!r} has a character MLflow rejects "
            "(allowed: letters, digits, _ - . space : /)"
        )
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith("..") or norm.startswith("/"):
        raise ValidationError(
            f"run {run}: {what} key {key!r} is not a unique path (empty, leading or trailing "
            "'/', '//', '.' or '..' components are rejected by MLflow)"
        )
    return key


# MLflow's limits on names (experiments: mlflow/utils/validation.py; runs: the 250-character
# ``runs.name`` column, which PostgreSQL and MySQL enforce).
MAX_EXPERIMENT_NAME_LENGTH: Final = 500
MAX_RUN_NAME_LENGTH: Final = 250


def check_name(field: str, value: object, limit: int) -> str:
    """An experiment or run name (``field`` names it in errors): a non-empty str MLflow can
    store as it is."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{field} must be a non-empty str, got {value!r}")
    if len(value) > limit:
        raise ValidationError(
            f"{field} {value[:40]!r}... is {len(value)} characters (MLflow allows at most {limit})"
        )
    if "\x00" in value:
        raise ValidationError(f"{field} {value!r} contains a NUL character")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValidationError(
                f"{field} {value!r} is not valid Unicode text (lone surrogate "
                f"{value[exc.start]!r} at index {exc.start}; decode bytes before passing them)"
            ) from None
    return value


def string_value(value: object, key: str, what: str, limit: int, run: str) -> str:
    """MLflow stores params and tags as ``str(value)``; reject what it would truncate."""
    if type(value) is str:
        text = value
    else:
        try:
            text = str(value)
        except Exception as exc:  # a broken __str__ of a user object
            raise ValidationError(
                f"run {run}: {what} {key!r} value: str() of the {type(value).__name__} "
                f"raised {type(exc).__name__}: {exc}"
            ) from None
    if len(text) > limit:
        raise ValidationError(
            f"run {run}: {what} {key!r} value is {len(text)} characters "
            f"(MLflow allows at most {limit}; it would truncate it silently)"
        )
    if "\x00" in text:
        raise ValidationError(f"run {run}: {what} {key!r} value contains a NUL character")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValidationError(
                f"run {run}: {what} {key!r} value is not valid Unicode text "
                f"(lone surrogate {text[exc.start]!r} at index {exc.start})"
            ) from None
    return text


def metric_value(value: object, key: str, run: str) -> float | str:
    """Return the spool spelling of a metric value: a finite float, or a non-finite token."""
    f: float
    if type(value) is float:
        f = value
    else:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValidationError(
                f"run {run}: metric {key!r} value {value!r} is not a real number "
                f"({type(value).__name__}; bool, str and None are rejected)"
            )
        try:
            f = float(value)
        except (OverflowError, ValueError, TypeError) as exc:
            shown = repr(value)
            shown = shown if len(shown) <= 60 else f"{shown[:40]}...({len(shown)} characters)"
            raise ValidationError(
                f"run {run}: metric {key!r} value {shown} cannot be a float: {exc}"
            ) from None
    # x - x is 0.0 exactly for finite x, NaN for NaN and ±inf: one cheap test for the hot path.
    if f - f == 0.0:
        return f
    if f != f:
        return "NaN"
    return "Infinity" if f > 0 else "-Infinity"


def decode_metric_value(value: object) -> float:
    """Inverse of :func:`metric_value` for the reader and the sync."""
    if isinstance(value, float):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value in _NONFINITE_OUT:
        return _NONFINITE_OUT[value]
    raise ValueError(f"not a metric value: {value!r}")


def int64(value: object, name: str, key: str, run: str, *, minimum: int = INT64_MIN) -> int:
    """Validate an int64 (step or timestamp); numpy integers are accepted, bools are not."""
    if isinstance(value, bool):
        raise ValidationError(f"run {run}: metric {key!r} {name} must be an integer, got a bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValidationError(
            f"run {run}: metric {key!r} {name} must be an integer"
            + (" number of milliseconds" if name == "timestamp" else "")
            + f", got {value!r}"
        ) from None
    if not minimum <= number <= INT64_MAX:
        raise ValidationError(
            f"run {run}: metric {key!r} {name} {number} is outside [{minimum}, {INT64_MAX}]"
        )
    return number
