"""A comparable dump of what an MLflow tracking store holds, keyed by spool run id.

``snapshot(uri)`` reads every experiment and run and returns plain JSON-ready data in which
nothing depends on the store's own ids, so two stores synced from the same spools compare
equal exactly when they hold the same things:

* ``experiments``: name → lifecycle stage and tags;
* ``runs``: ``ff.run_uuid`` → experiment name, run name, status, start/end time, lifecycle
  stage, params, tags (minus :data:`VOLATILE_TAGS`), parent's ``ff.run_uuid``, full metric
  histories (``get_metric_history``, sorted by step, timestamp, value), latest metrics, and
  the JSON of each artifact reference;
* ``duplicates``: spool run ids with more than one MLflow run (should always be empty);
* ``untracked_runs``: number of runs without ``ff.run_uuid`` (not written by ff-sync).

Floats are written with ``repr`` so NaN compares equal to NaN. Read-only; imports MLflow
when called (it is also the basis of ``ff-sync verify``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Final

from formula_foundry.sync.sink import ARTIFACT_REF_DIR

VOLATILE_TAGS: Final = frozenset({"mlflow.parentRunId", "mlflow.log-model.history"})


def _f(value: float) -> str:
    return repr(float(value))


def snapshot(tracking_uri: str, *, artifacts: bool = True) -> dict[str, Any]:
    """Dump the store at ``tracking_uri`` (see the module docstring)."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments: dict[str, Any] = {}
    names: dict[str, str] = {}
    token: str | None = None
    while True:
        exps = client.search_experiments(view_type=ViewType.ALL, max_results=1000, page_token=token)
        for exp in exps:
            names[exp.experiment_id] = exp.name
            experiments[exp.name] = {
                "lifecycle_stage": exp.lifecycle_stage,
                "tags": {k: v for k, v in exp.tags.items() if not k.startswith("mlflow.")},
            }
        token = exps.token
        if not token:
            break

    all_runs: list[Any] = []
    ids = sorted(names)
    for i in range(0, len(ids), 100):
        token = None
        while True:
            page = client.search_runs(
                ids[i : i + 100],
                run_view_type=ViewType.ALL,
                max_results=1000,
                page_token=token,
            )
            all_runs.extend(page)
            token = page.token
            if not token:
                break

    uuid_of = {r.info.run_id: r.data.tags.get("ff.run_uuid") for r in all_runs}
    runs: dict[str, Any] = {}
    seen: dict[str, list[str]] = {}
    untracked = 0
    for run in all_runs:
        uuid = run.data.tags.get("ff.run_uuid")
        if uuid is None:
            untracked += 1
            continue
        seen.setdefault(uuid, []).append(run.info.run_id)
        if uuid in runs:
            continue
        runs[uuid] = _run(client, run, names, uuid_of, artifacts)
    return {
        "experiments": experiments,
        "runs": runs,
        "duplicates": {k: sorted(v) for k, v in seen.items() if len(v) > 1},
        "untracked_runs": untracked,
    }


def _run(
    client: Any,
    run: Any,
    names: dict[str, str],
    uuid_of: dict[str, str | None],
    artifacts: bool,
) -> dict[str, Any]:
    info, data = run.info, run.data
    history: dict[str, list[list[Any]]] = {}
    for key in sorted(data.metrics):
        points = client.get_metric_history(info.run_id, key)
        history[key] = sorted([m.step, m.timestamp, _f(m.value)] for m in points)
    parent_id = data.tags.get("mlflow.parentRunId")
    out: dict[str, Any] = {
        "experiment": names.get(info.experiment_id),
        "name": info.run_name,
        "status": info.status,
        "lifecycle_stage": info.lifecycle_stage,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "params": dict(sorted(data.params.items())),
        "tags": {k: v for k, v in sorted(data.tags.items()) if k not in VOLATILE_TAGS},
        "parent": uuid_of.get(parent_id) if parent_id else None,
        "metrics": history,
        "latest_metrics": {k: _f(v) for k, v in sorted(data.metrics.items())},
    }
    if artifacts:
        out["artifact_refs"] = _refs(client, info.run_id)
    return out


def _refs(client: Any, run_id: str) -> dict[str, Any]:
    refs: dict[str, Any] = {}
    pending = [ARTIFACT_REF_DIR]
    files: list[str] = []
    while pending:
        for item in client.list_artifacts(run_id, pending.pop()):
            (pending if item.is_dir else files).append(item.path)
    if not files:
        return refs
    with tempfile.TemporaryDirectory(prefix="ff-snapshot-") as tmp:
        for path in sorted(files):
            local = client.download_artifacts(run_id, path, tmp)
            refs[path] = json.loads(Path(local).read_text(encoding="utf-8"))
    return refs
