"""``ff-sync verify`` for what a run logged besides its own data: logged models and inputs.

For each model the run's spool holds (:mod:`formula_foundry.sync.commands.expected_models`):
exactly one destination model carries its id as ``ff.model_id``, in the model's experiment,
with the synced run as its source, the same name, status, params and tags (tags MLflow adds
itself, ``mlflow.*``, and the sync's ``ff.*`` other than ``ff.model_id`` aside), the same
linked metric points with their dataset (name and digest), and every file the spool logged to
it, downloaded and hashed. For the run's inputs: each dataset, by (name,
digest), with the input's tags, and each model the run used (the synced model of that id).

A dataset's own fields (source, schema, profile) are not compared: MLflow keeps one dataset per
(experiment, name, digest), as the first run that logged it described it, and every run
logging it later points at that one — in the destination as when logging straight into MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from formula_foundry.sync.commands.expected import ExpectedRun
from formula_foundry.sync.commands.expected_models import ExpectedModel
from formula_foundry.tracking.events import MODEL_ID_TAG

if TYPE_CHECKING:
    from formula_foundry.sync.mlflow.model_snapshot import ModelReader, StoredModel
    from formula_foundry.sync.mlflow.snapshot import StoredRun

# kind, key, expected, actual, message (without the run): verify.py makes a Difference of it.
Found = tuple[str, str | None, Any, Any, str]


def model_differences(models: ModelReader, exp: ExpectedRun, stored: StoredRun) -> Iterator[Found]:
    """Every way the run's logged models and inputs differ from the spool."""
    for mid, want in sorted(exp.models.items()):
        ids = models.find(mid)
        if not ids:
            yield (
                "missing_model",
                mid,
                want.name,
                None,
                f"logged model {mid} ({want.name!r}) is not in the destination",
            )
            continue
        if len(ids) > 1:
            yield (
                "duplicate_model",
                mid,
                1,
                ids,
                f"logged model {mid} has {len(ids)} models in the destination: {', '.join(ids)}",
            )
        got = models.model(ids[0])
        yield from _model(want, got, stored.mlflow_run_id)
        yield from _metrics(want, got)
        yield from _files(models, want, got)
    yield from _inputs(models, exp, stored)


def _model(want: ExpectedModel, got: StoredModel, run: str) -> Iterator[Found]:
    mid = want.model_id
    facts: tuple[tuple[str, str | None, str | None], ...] = (
        ("experiment", want.experiment, got.experiment),
        ("source run", run, got.source_run_id),
        ("name", want.name, got.name),
        ("status", want.status, got.status),
    )
    for what, w, g in facts:
        if w != g:
            yield (
                "model_mismatch",
                mid,
                w,
                g,
                f"logged model {mid}: {what} is {g!r}, the spool says {w!r}",
            )
    for key in sorted(want.params.keys() | got.params.keys()):
        w, g = want.params.get(key), got.params.get(key)
        if w != g:
            yield (
                difference_kind("model_param", w, g),
                f"{mid} {key}",
                w,
                g,
                f"logged model {mid}: param {key!r} is {g!r}, the spool says {w!r}",
            )
    for key in sorted(want.tags.keys() | got.tags.keys()):
        w, g = want.tags.get(key), got.tags.get(key)
        if w == g or (w is None and _added_by_mlflow_or_sync(key)):
            continue
        yield (
            difference_kind("model_tag", w, g),
            f"{mid} {key}",
            w,
            g,
            f"logged model {mid}: tag {key!r} is {g!r}, the spool says {w!r}",
        )


def _files(models: ModelReader, want: ExpectedModel, got: StoredModel) -> Iterator[Found]:
    if not want.files:
        return
    actual = models.files(got)
    mid = want.model_id
    for path, ref in sorted(want.files.items()):
        w, g = (ref.size, ref.digest), actual.get(path)
        if w == g:
            continue
        key = f"{mid}/{path}"
        if g is None:
            yield (
                "missing_model_artifact",
                key,
                list(w),
                None,
                f"file {path!r} of logged model {mid} ({ref.size} bytes) is missing",
            )
        else:
            yield (
                "model_artifact_mismatch",
                key,
                list(w),
                list(g),
                f"file {path!r} of logged model {mid} holds {g[0]} bytes, {g[1]}; the spool "
                f"logged {ref.size} bytes, {ref.digest}",
            )


# A linked metric point as compared: step, timestamp, value, dataset name, dataset digest.
_Point = tuple[int, int, float | None, str | None, str | None]


def _metrics(want: ExpectedModel, got: StoredModel) -> Iterator[Found]:
    """The model's linked metric points, key by key. MLflow keeps one row per (key,
    timestamp, step) of a run and model, so a stored point matches any the spool has there.
    A non-finite value is compared by its place and dataset only: MLflow's SQL store writes
    NaN as 0 and an infinity as the largest float into a model's rows."""
    mid = want.model_id
    expected: dict[str, dict[tuple[int, int], set[_Point]]] = {}
    for m in want.metrics:
        value = m.value if math.isfinite(m.value) else None
        point = (m.step, m.timestamp, value, m.dataset_name, m.dataset_digest)
        expected.setdefault(m.key, {}).setdefault((m.step, m.timestamp), set()).add(point)
    actual: dict[str, set[_Point]] = {}
    for key, step, t, value, name, digest in got.metrics:
        actual.setdefault(key, set()).add((step, t, value, name, digest))
    for key in sorted(expected.keys() | actual.keys()):
        want_at, got_points = expected.get(key, {}), actual.get(key, set())
        unmatched = [p for p in got_points if not _matches(p, want_at)]
        unmet = [at for at in sorted(want_at) if not any(p[:2] == at for p in got_points)]
        if not unmatched and not unmet:
            continue
        w = sorted((list(p) for at in want_at.values() for p in at), key=repr) or None
        g = sorted((list(p) for p in got_points), key=repr) or None
        yield (
            difference_kind("model_metric", w, g),
            f"{mid} {key}",
            w,
            g,
            f"logged model {mid}: metric {key!r} has {len(got_points)} points, "
            f"{len(unmatched)} not in the spool; {len(unmet)} of the spool's are missing "
            "(points: [step, timestamp, value, dataset name, dataset digest])",
        )


def _matches(point: _Point, want_at: dict[tuple[int, int], set[_Point]]) -> bool:
    return any(
        w == point or (w[2] is None and w[3:] == point[3:]) for w in want_at.get(point[:2], ())
    )


def _inputs(models: ModelReader, exp: ExpectedRun, stored: StoredRun) -> Iterator[Found]:
    actual = {(d[0], d[1]): d[-1] for d in stored.datasets}
    for (name, digest), ds in sorted(exp.datasets.items()):
        key, tags = f"{name}@{digest}", dict(ds.tags)
        got = actual.get((name, digest))
        if got is None:
            yield (
                "missing_dataset_input",
                key,
                tags,
                None,
                f"dataset {name!r} (digest {digest}) is not among its inputs",
            )
        elif got != tags:
            yield (
                "dataset_input_mismatch",
                key,
                tags,
                got,
                f"dataset {name!r} (digest {digest}): input tags are {got}, the spool says {tags}",
            )
    for name, digest in sorted(actual.keys() - exp.datasets.keys()):
        yield (
            "extra_dataset_input",
            f"{name}@{digest}",
            None,
            actual[(name, digest)],
            f"dataset {name!r} (digest {digest}) is an input not in the spool",
        )
    for mid in sorted(exp.model_inputs):
        ids = models.find(mid)
        if not ids or not stored.model_inputs & set(ids):
            yield (
                "missing_model_input",
                mid,
                mid,
                None,
                f"logged model {mid} is not among its inputs",
            )


def _added_by_mlflow_or_sync(key: str) -> bool:
    return key.startswith("mlflow.") or (key.startswith("ff.") and key != MODEL_ID_TAG)


def difference_kind(what: str, want: object, got: object) -> str:
    """``missing_<what>``, ``extra_<what>`` or ``<what>_mismatch`` (verify's kinds)."""
    if got is None:
        return f"missing_{what}"
    if want is None:
        return f"extra_{what}"
    return f"{what}_mismatch"
