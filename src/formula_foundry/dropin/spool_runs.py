"""Read a run back from the spool: what MLflow will hold for it after ``ff-sync``.

The answer is :func:`formula_foundry.sync.commands.expected.expected_run` — the very reference
``ff-sync verify`` checks the destination against — so the drop-in's reads on the node and the
synced run agree rule for rule (write-once params, last tag wins, one row per distinct metric
point, damaged records skipped). Only the identity tags the sync adds (``ff.*``) are left out:
a run read on the node looks as it would in MLflow straight away.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from formula_foundry.sync.commands.expected import ExpectedRun, expected_run
from formula_foundry.sync.engine.scan import scan_run
from formula_foundry.sync.engine.sink import RunDataset
from formula_foundry.tracking.events import RESERVED_TAG_PREFIX

Point = tuple[int, int, float]  # step, timestamp ms, value (NaN and ±inf as logged)


@dataclass
class RunState:
    """A run as ``get_run`` shows it."""

    run_id: str
    experiment: str
    name: str
    user: str
    start_time: int
    parent: str | None = None
    end_time: int | None = None
    status: str = "RUNNING"
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    latest: dict[str, Point] = field(default_factory=dict)
    # The newest ``log_metrics`` group (time, step, {key: value}), not yet merged into
    # ``latest``: a group that supersedes it replaces it without touching ``latest`` key by key.
    # Readers see ``latest`` after RunBook.get() merged it.
    pending: tuple[int, int, dict[str, float]] | None = None
    # Files logged to the run, artifact path -> size, as far as this process knows (the spool
    # when the run was read, then what this process logged): what a new file must not clash with.
    artifacts: dict[str, int] = field(default_factory=dict)
    # Its inputs (log_inputs): datasets by (name, digest) as first logged, models by id.
    datasets: dict[tuple[str, str], RunDataset] = field(default_factory=dict)
    model_inputs: set[str] = field(default_factory=set)
    started: bool = True  # a valid run_start was found (a run can be resumed or logged into)
    opened_here: bool = False  # this process created or resumed it: it ends it at SIGTERM


def _value(v: float | str) -> float:
    return math.nan if v == "NaN" else float(v)


def _rank(point: tuple[int, int, float | str]) -> tuple[int, int, float]:
    step, t, v = point
    return (step, t, 0.0 if v == "NaN" else float(v))


def _expected(root: Path, run_id: str) -> ExpectedRun | None:
    segments = scan_run(root, run_id)
    return expected_run(run_id, segments) if segments else None


def read_run(root: Path, run_id: str) -> RunState | None:
    """The run ``run_id`` as the spool under ``root`` holds it, or None if it has no segment."""
    exp = _expected(root, run_id)
    if exp is None:
        return None
    tags = {k: v for k, v in exp.tags.items() if not k.startswith(RESERVED_TAG_PREFIX)}
    if exp.parent_spool_run_id:
        tags["mlflow.parentRunId"] = exp.parent_spool_run_id
    latest: dict[str, Point] = {}
    for key, points in exp.metrics.items():
        step, t, v = max(points, key=_rank)
        latest[key] = (step, t, _value(v))
    return RunState(
        run_id=run_id,
        experiment=exp.experiment,
        name=tags.get("mlflow.runName", exp.name),
        user=tags.get("mlflow.user", "unknown"),
        start_time=exp.start_time,
        parent=exp.parent_spool_run_id,
        end_time=exp.end_time,
        status=exp.status,
        params=dict(exp.params),
        tags=tags,
        latest=latest,
        artifacts={path: ref.size for path, ref in exp.artifacts.items()},
        datasets=dict(exp.datasets),
        model_inputs=set(exp.model_inputs),
        started=exp.started,
    )


def metric_history(root: Path, run_id: str, key: str) -> list[Point]:
    """Every distinct point of metric ``key``, in MLflow's order (time, step, value)."""
    exp = _expected(root, run_id)
    if exp is None:
        return []
    points = sorted(exp.metrics.get(key, ()), key=lambda p: (p[1], p[0], _rank(p)[2]))
    return [(step, t, _value(v)) for step, t, v in points]


def run_ids(root: Path) -> Iterator[str]:
    """The names of the run folders under ``root``."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
            yield entry.name
