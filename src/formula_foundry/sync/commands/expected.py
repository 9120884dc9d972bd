"""What a destination should hold for one spooled run, computed from its segments alone.

This is the reference ``ff-sync verify`` compares the destination with. It follows the replay
(:mod:`formula_foundry.sync.engine.replayer`, :mod:`formula_foundry.sync.engine.runs`) rule for
rule, but without a destination:

* the run is created from the first valid ``run_start`` in merge order (name, experiment,
  start time, the tags ``create_run`` writes);
* records the reader rejects, and payloads :mod:`formula_foundry.sync.engine.payloads` rejects (any
  field ill-typed or out of range, in any event kind), are skipped — the replay quarantines
  exactly those, so they are expected to be absent; so are tags the sync owns
  (``reserved``), which a ``tags`` event never sets;
* params are write-once: the first value in merge order is expected, later different
  values are conflicts (any value the spool logged is accepted when the quarantine log holds
  a ``param_conflict`` of the run, since which value was synced first depends on timing);
* artifact references the destination refused (``refused`` in the quarantine log, passed as
  ``refused``) are expected to be absent;
* tags are last-write-wins in event order, ``tag_delete`` removes them; ``run_end`` sets
  status and end time, a later ``run_start`` makes the run RUNNING again;
* metric points are a set of ``(step, timestamp, value)`` per key (MLflow keeps one row per
  distinct point), with ±inf stored as ±``sys.float_info.max`` and NaN equal to NaN;
* inputs: one dataset per (name, digest), as first logged, and the models the run used;
  logged models as :mod:`formula_foundry.sync.commands.expected_models` folds them.

One run at a time: nothing here holds more than one run's data.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from formula_foundry.errors import SpoolError
from formula_foundry.sync.commands.expected_models import ExpectedModel, fold_model_event
from formula_foundry.sync.engine import payloads
from formula_foundry.sync.engine.inputs import run_inputs
from formula_foundry.sync.engine.payloads import (
    InvalidRecord,
    PayloadChecker,
    check_time,
    run_spec,
)
from formula_foundry.sync.engine.scan import SegmentFile
from formula_foundry.sync.engine.sink import ArtifactRef, RunDataset
from formula_foundry.tracking.events import (
    K_ARTIFACT,
    K_ARTIFACT_REF,
    K_INPUTS,
    K_METRICS,
    K_PARAMS,
    K_RUN_END,
    K_RUN_START,
    K_TAG_DELETE,
    K_TAGS,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    MODEL_KINDS,
)
from formula_foundry.tracking.spool_reader import Event, SegmentReader

__all__ = ["ExpectedRun", "Point", "expected_run", "metric_value"]

MetricValue = float | str  # a float, or "NaN" (so that NaN compares equal to NaN)
Point = tuple[int, int, MetricValue]  # step, timestamp ms, value


def metric_value(value: float) -> MetricValue:
    """A metric value as MLflow stores it, in a form where NaN equals NaN."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return math.copysign(sys.float_info.max, value)
    return float(value)


@dataclass
class ExpectedRun:
    """The destination run one spooled run should have become."""

    spool_run_id: str
    experiment: str = ""
    name: str = ""
    start_time: int = 0
    parent_spool_run_id: str | None = None
    started: bool = False  # a valid run_start was found: the run can be created at all
    status: str = "RUNNING"
    end_time: int | None = None
    last_t: int = 0
    params: dict[str, str] = field(default_factory=dict)
    param_values: dict[str, set[str]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, set[Point]] = field(default_factory=dict)
    refs: dict[str, dict[str, object]] = field(default_factory=dict)
    # Files logged to the run (``artifact`` events): artifact path -> the object, last one wins.
    artifacts: dict[str, ArtifactRef] = field(default_factory=dict)
    # Inputs: (name, digest) -> the dataset as first logged (MLflow keeps that one), and the
    # node's ids of the models the run used.
    datasets: dict[tuple[str, str], RunDataset] = field(default_factory=dict)
    model_inputs: set[str] = field(default_factory=set)
    # Logged models whose events the run's spool holds, by the node's model id.
    models: dict[str, ExpectedModel] = field(default_factory=dict)
    events: int = 0


def expected_run(
    spool_run_id: str, segments: Iterable[SegmentFile], refused: Collection[tuple[str, int]] = ()
) -> ExpectedRun:
    """Read ``segments`` (one run's, any order) and return what the destination should hold.

    ``refused``: ``(file, offset)`` of the records the quarantine log reports as ``refused``.
    """
    run = ExpectedRun(spool_run_id)
    builder = _Builder(run, refused)
    for seg in sorted(segments, key=lambda s: s.order):
        builder.segment(seg)
    return run


class _Builder:
    def __init__(self, run: ExpectedRun, refused: Collection[tuple[str, int]] = ()) -> None:
        self.run = run
        self.refused = refused
        self.path = ""
        self.check = PayloadChecker()
        self.tag_events: list[tuple[str, str]] = []

    def segment(self, seg: SegmentFile) -> None:
        reader = SegmentReader(seg.path)
        self.path = str(seg.path)
        try:
            for item in reader:
                if reader.header is not None and reader.header.get("run") != self.run.spool_run_id:
                    return  # quarantined as ``header`` by the replay: none of it is synced
                if isinstance(item, Event):
                    self.event(item)
        except (SpoolError, OSError):
            return  # quarantined (``version``/``header``) or unreadable: nothing of it synced

    def event(self, ev: Event) -> None:
        run = self.run
        try:
            check_time(ev)
        except InvalidRecord:
            return  # quarantined as ``invalid`` by the replay, before it moves the last sign
        run.last_t = max(run.last_t, ev.t)
        try:
            if ev.kind == K_RUN_START:
                self.run_start(ev)
            elif ev.kind == K_RUN_END:
                self.run_end(ev)
            elif ev.kind == K_METRICS:
                for key, number, t, step in self.check.metric_rows(ev):
                    run.metrics.setdefault(key, set()).add((step, t, metric_value(number)))
            elif ev.kind == K_PARAMS:
                for key, value in self.check.strings(ev, MAX_PARAM_VALUE_LENGTH):
                    run.params.setdefault(key, value)
                    run.param_values.setdefault(key, set()).add(value)
            elif ev.kind == K_TAGS:
                tags, _reserved = self.check.tags(ev, MAX_TAG_VALUE_LENGTH)
                run.tags.update(tags)
            elif ev.kind == K_TAG_DELETE:
                for key in self.check.tag_keys(ev):
                    run.tags.pop(key, None)
            elif ev.kind == K_ARTIFACT_REF:
                ref: ArtifactRef = self.check.artifact_ref(ev)
                if (self.path, ev.offset) in self.refused:
                    return  # the destination could never store its document
                run.refs[ref.path] = ref.to_json()
            elif ev.kind == K_ARTIFACT:
                obj = self.check.artifact(ev)
                if (self.path, ev.offset) in self.refused:
                    return  # the destination refused the file (docs/sync.md, quarantine)
                run.artifacts[obj.path] = obj
            elif ev.kind in MODEL_KINDS:
                fold_model_event(run.models, ev, self.check, self.refused, self.path)
            elif ev.kind == K_INPUTS:
                datasets, models = run_inputs(ev)
                for ds in datasets:
                    run.datasets.setdefault((ds.name, ds.digest), ds)
                run.model_inputs.update(models)
            else:
                return  # segment headers, heartbeats: nothing reaches the destination
        except InvalidRecord:
            return  # quarantined as ``invalid`` by the replay
        run.events += 1

    def run_start(self, ev: Event) -> None:
        run = self.run
        # The replay's own reading: invalid for both or neither.
        spec = run_spec(run.spool_run_id, ev)
        if run.started:
            if run.status != "RUNNING" and ev.data.get("resume") is not False:
                run.status, run.end_time = "RUNNING", None  # a resumed run runs again
            return
        run.started = True
        run.experiment, run.name, run.start_time = spec.experiment, spec.name, spec.start_time
        run.parent_spool_run_id = spec.parent_spool_run_id
        # The tags create_run writes; tag events logged before the run_start do not exist
        # for the destination yet, so these go first and events override them in order.
        run.tags = {**spec.creation_tags(), **run.tags}

    def run_end(self, ev: Event) -> None:
        # The replay's own reading: a malformed reason makes the run_end invalid for both.
        self.run.status, self.run.end_time, _ = payloads.run_end(ev)


def _text(value: object) -> str:
    return value if isinstance(value, str) and value else "unknown"
