"""``ff-sync verify``: does the destination hold exactly what the spools say?

Run by run, the state expected from the spools (:mod:`formula_foundry.sync.commands.expected`) is
compared with what the destination holds (:class:`formula_foundry.sync.mlflow.snapshot.StoreReader`,
the one module here that imports MLflow). Every difference is reported: a missing or
duplicated run, missing or extra metric points, params and tags that are missing, extra or
different, a wrong experiment, start time, status or end time, missing or different artifact
reference documents, logged files and an ended run's console files (one per process) missing
or with other bytes (each downloaded and hashed); logged models and inputs (``verify_models``).

What the replay legitimately leaves out or changes is not a difference: records it
quarantines (the same reader and payload checks decide), the value of a param whose conflict
is in the quarantine log, tags MLflow adds itself (``mlflow.*`` but ``mlflow.runName`` and
``mlflow.parentRunId``), KILLED for a run the sync ended as silent (``stale_ended``).

What verify cannot read is a difference too, never an abort: a run folder or segment that
cannot be read (``unreadable``, "permission denied"), is a symbolic link (``symlink``; the
sync never follows one) or no regular file (``not_regular``). The rest of such a run is
compared as usual: the sync skipped the same paths. A segment the replay quarantines whole —
broken header, unknown format, a header naming another run (a copied file) — is expected to
be absent; a run made only of such segments is expected not to exist at all.

One run at a time. Kinds and JSON keys: docs/operations.md.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

from formula_foundry.config import Settings
from formula_foundry.errors import EXIT_OK, EXIT_PARTIAL, MlflowMissing, SpoolError
from formula_foundry.ids import is_run_id
from formula_foundry.redact import redact_uri
from formula_foundry.sync.commands.differences import Difference, diff_of, points_of
from formula_foundry.sync.commands.expected import ExpectedRun, expected_run, metric_value
from formula_foundry.sync.commands.status import StateView
from formula_foundry.sync.commands.verify_models import difference_kind as _kind
from formula_foundry.sync.commands.verify_models import model_differences
from formula_foundry.sync.engine.console_upload import expected_console
from formula_foundry.sync.engine.destination import INSTALL_HINT, destination_key
from formula_foundry.sync.engine.scan import (
    SegmentFile,
    Skipped,
    scan_spool_report,
    unreadable_reason,
)
from formula_foundry.sync.engine.sink import ABOVE_LIMIT, RunMissing
from formula_foundry.sync.engine.sync_pass import check_destination
from formula_foundry.tracking.events import END_STATUSES
from formula_foundry.tracking.spool_reader import read_header

if TYPE_CHECKING:
    from formula_foundry.sync.mlflow.snapshot import StoredRun, StoreReader

CHECKED_SYSTEM_TAGS: Final = frozenset({"mlflow.runName", "mlflow.parentRunId"})
JSON_VERSION: Final = 1


@dataclass
class VerifyReport:
    """The outcome of ``ff-sync verify`` for one destination."""

    destination: str
    runs_checked: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_PARTIAL if self.differences else EXIT_OK

    def summary(self) -> str:
        if not self.differences:
            return f"ff-sync: verify: OK: {self.runs_checked} runs match -> {self.destination}"
        runs = len({d.run for d in self.differences})
        return (
            f"ff-sync: verify: {len(self.differences)} differences in {runs} of "
            f"{self.runs_checked} runs -> {self.destination}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JSON_VERSION,
            "destination": self.destination,
            "ok": not self.differences,
            "runs_checked": self.runs_checked,
            "runs_differing": len({d.run for d in self.differences}),
            "differences": [d.to_json() for d in self.differences],
        }


DifferenceFn = Callable[[Difference], None]


def verify(settings: Settings, *, on_difference: DifferenceFn | None = None) -> VerifyReport:
    """Compare the configured destination with the spools (see the module docstring).

    Raises :class:`~formula_foundry.errors.StoreUnavailable` (exit 75) when the destination
    cannot be read, :class:`ConfigError`/:class:`MlflowMissing` (exit 2).
    """
    uri = settings.backend_store_uri
    check_destination(uri)
    if importlib.util.find_spec("mlflow") is None:
        raise MlflowMissing(f"MLflow is not installed on this host; run: {INSTALL_HINT}")
    from formula_foundry.sync.mlflow.snapshot import StoreReader

    report = VerifyReport(redact_uri(uri))
    view = StateView(settings.sync_state_dir / destination_key(uri))
    reader = StoreReader(uri)
    checker = _RunChecker(reader, reader.index(), view, settings.sync_upload_max_bytes)

    def add(diff: Difference) -> None:
        report.differences.append(diff)
        if on_difference is not None:
            on_difference(diff)

    scan = scan_spool_report(settings.spool_root)
    skipped: dict[str | None, list[Skipped]] = {}
    for skip in scan.skipped:
        skipped.setdefault(skip.spool_run_id, []).append(skip)
    for skip in skipped.pop(None, []):
        add(Difference("", skip.kind, f"spool root {skip.path}: {skip.reason}; nothing checked"))
    for spool_run_id, segments in _runs(scan.segments, skipped):
        report.runs_checked += 1
        folder = settings.spool_root / spool_run_id
        for skip in skipped.get(spool_run_id, []):
            add(
                Difference(
                    spool_run_id, skip.kind, f"run {spool_run_id}: {skip.path}: {skip.reason}"
                )
            )
        if any(skip.path == folder for skip in skipped.get(spool_run_id, [])):
            continue  # the whole run folder: nothing to compare with
        usable = _usable_segments(spool_run_id, segments, add)
        if not usable and spool_run_id not in checker.index:
            continue  # nothing of the run can reach the destination; the reasons are reported
        exp = expected_run(spool_run_id, usable, checker.refused)
        ended, limit = exp.status != "RUNNING", checker.upload_max_bytes
        exp.artifacts.update(expected_console(usable, ended, limit))  # checked as logged files
        for diff in checker.check(exp):
            add(diff)
    return report


def _runs(
    files: list[SegmentFile], skipped: dict[str | None, list[Skipped]]
) -> Iterator[tuple[str, list[SegmentFile]]]:
    """The segments of each run (those of runs with skipped paths only included), by run id;
    folders that are no run skipped."""
    by_run: dict[str, list[SegmentFile]] = {
        spool_run_id: [] for spool_run_id in skipped if spool_run_id is not None
    }
    for seg in files:
        by_run.setdefault(seg.spool_run_id, []).append(seg)
    for spool_run_id in sorted(by_run):
        if is_run_id(spool_run_id):
            yield spool_run_id, by_run[spool_run_id]


def _usable_segments(
    spool_run_id: str, segments: list[SegmentFile], add: DifferenceFn
) -> list[SegmentFile]:
    """The segments the replay reads: not unreadable (reported), not quarantined whole."""
    usable: list[SegmentFile] = []
    for seg in segments:
        try:
            header = read_header(seg.path)
        except SpoolError:
            continue  # broken header, unknown format: quarantined whole by the replay
        except OSError as exc:
            why = unreadable_reason(exc)
            add(Difference(spool_run_id, "unreadable", f"run {spool_run_id}: {seg.path}: {why}"))
            continue
        if header is None or header.get("run") == spool_run_id:
            usable.append(seg)  # (no complete header yet: nothing of it is expected)
        # else: a copied segment, quarantined whole by the replay
    return usable


class _RunChecker:
    def __init__(
        self,
        reader: StoreReader,
        index: dict[str, list[str]],
        view: StateView,
        upload_max_bytes: int | None = None,
    ) -> None:
        self.reader, self.index, self.view = reader, index, view
        self.models = reader.models()  # after index(): it knows every experiment by then
        self.upload_max_bytes = upload_max_bytes  # larger logged files: a reference document
        quarantined = list(view.quarantine())
        self.conflicted = {
            str(q.get("run")) for q in quarantined if q.get("kind") == "param_conflict"
        }
        # Records the destination can never take (see sink.RecordRejected): not expected there.
        self.refused = {
            (str(q.get("file")), _int(q.get("offset")))
            for q in quarantined
            # a refused record carries its bytes; a refused run (kind refused too) does not,
            # and its records are expected once the run is accepted again
            if q.get("kind") == "refused" and q.get("raw")
        }

    def check(self, exp: ExpectedRun) -> Iterator[Difference]:
        spool_run_id = exp.spool_run_id
        ids = self.index.get(spool_run_id, [])
        if not ids:
            why = "" if exp.started else " (its segments hold no valid run_start yet)"
            yield Difference(
                spool_run_id, "missing_run", f"run {spool_run_id} is not in the destination{why}"
            )
            return
        if len(ids) > 1:
            yield Difference(
                spool_run_id,
                "duplicate_run",
                f"run {spool_run_id} has {len(ids)} runs in the destination: {', '.join(ids)}",
                actual=ids,
                count=len(ids),
            )
        try:
            stored = self.reader.run(ids[0])
        except RunMissing:  # deleted for good since the index was read
            yield Difference(
                spool_run_id, "missing_run", f"run {spool_run_id} is not in the destination"
            )
            return
        yield from self._info(exp, stored)
        yield from self._params(exp, stored)
        yield from self._tags(exp, stored)
        yield from self._metrics(exp, stored)
        yield from self._refs(exp, stored)
        yield from self._files(exp, stored)
        for kind, key, want, got, why in model_differences(self.models, exp, stored):
            yield Difference(spool_run_id, kind, f"run {spool_run_id}: {why}", key, want, got)

    def _info(self, exp: ExpectedRun, stored: StoredRun) -> Iterator[Difference]:
        spool_run_id = exp.spool_run_id
        if stored.lifecycle_stage != "active":
            yield diff_of(spool_run_id, "deleted_run", None, "active", stored.lifecycle_stage)
        if exp.started and stored.experiment != exp.experiment:
            yield diff_of(
                spool_run_id, "experiment_mismatch", None, exp.experiment, stored.experiment
            )
        if exp.started and stored.start_time != exp.start_time:
            yield diff_of(
                spool_run_id, "start_time_mismatch", None, exp.start_time, stored.start_time
            )
        status, end_time = exp.status, exp.end_time
        known = self.view.runs.get(spool_run_id)
        if status == "RUNNING" and known is not None and known.stale_ended:
            status, end_time = "KILLED", known.last_t  # ended by the sync: legitimately KILLED
        if stored.status != status:
            yield diff_of(spool_run_id, "status_mismatch", None, status, stored.status)
        elif status in END_STATUSES and stored.end_time != end_time:
            yield diff_of(spool_run_id, "end_time_mismatch", None, end_time, stored.end_time)

    def _params(self, exp: ExpectedRun, stored: StoredRun) -> Iterator[Difference]:
        actual: dict[str, str] = stored.params
        for key in sorted(exp.params.keys() | actual.keys()):
            want, got = exp.params.get(key), actual.get(key)
            if want == got:
                continue
            if (
                want is not None
                and got is not None
                and exp.spool_run_id in self.conflicted
                and got in exp.param_values.get(key, set())
            ):
                continue  # a quarantined conflict: whichever value was synced first stays
            yield diff_of(exp.spool_run_id, _kind("param", want, got), key, want, got)

    def _tags(self, exp: ExpectedRun, stored: StoredRun) -> Iterator[Difference]:
        want = dict(exp.tags)
        if exp.parent_spool_run_id and exp.parent_spool_run_id in self.index:
            want["mlflow.parentRunId"] = self.index[exp.parent_spool_run_id][0]
        actual: dict[str, str] = stored.tags
        for key in sorted(want.keys() | actual.keys()):
            w, g = want.get(key), actual.get(key)
            if w == g:
                continue
            if w is None and (not exp.started or _system_tag(key)):
                continue
            yield diff_of(exp.spool_run_id, _kind("tag", w, g), key, w, g)

    def _metrics(self, exp: ExpectedRun, stored: StoredRun) -> Iterator[Difference]:
        for key in sorted(exp.metrics.keys() | stored.metric_keys):
            want = exp.metrics.get(key, set())
            got = {
                (step, t, metric_value(v))
                for step, t, v in self.reader.metric_points(stored.mlflow_run_id, key)
            }
            for kind, points in (("missing", want - got), ("extra", got - want)):
                if points:
                    yield points_of(exp.spool_run_id, kind, key, points)

    def _too_big(self, size: int) -> bool:
        return self.upload_max_bytes is not None and size > self.upload_max_bytes

    def _refs(self, exp: ExpectedRun, stored: StoredRun) -> Iterator[Difference]:
        actual: dict[str, Any] = self.reader.artifact_refs(stored.mlflow_run_id)
        want = dict(exp.refs)
        for path, ref in exp.artifacts.items():
            if self._too_big(ref.size):
                # Referenced, not uploaded (sync.upload_max_bytes); a document written before
                # it carried ABOVE_LIMIT matches too.
                want[path] = replace(ref, above_limit=True).to_json()
                if isinstance(g := actual.get(path), dict) and ABOVE_LIMIT[0] not in g:
                    want[path] = {k: v for k, v in want[path].items() if k != ABOVE_LIMIT[0]}
        for path in sorted(want.keys() | actual.keys()):
            w, g = want.get(path), actual.get(path)
            if w != g:
                yield diff_of(exp.spool_run_id, _kind("artifact_ref", w, g), path, w, g)

    def _files(self, exp: ExpectedRun, stored: StoredRun) -> Iterator[Difference]:
        files = {p: ref for p, ref in exp.artifacts.items() if not self._too_big(ref.size)}
        referenced = {p for p, ref in exp.artifacts.items() if self._too_big(ref.size)}
        if not files and not referenced:
            return  # files the run never logged through the spool are not ours to judge
        actual = self.reader.artifact_files(stored.mlflow_run_id)
        for path in sorted(referenced & actual.keys()):
            # An earlier, smaller file at a path whose last file is a reference now.
            yield diff_of(exp.spool_run_id, "superseded_artifact", path, None, list(actual[path]))
        for path, ref in sorted(files.items()):
            w, g = (ref.size, ref.digest), actual.get(path)
            if w != g:
                kind = "missing_artifact" if g is None else "artifact_mismatch"
                yield diff_of(exp.spool_run_id, kind, path, list(w), None if g is None else list(g))


def _system_tag(key: str) -> bool:
    # ff.sync.*: what the sync itself notes on a run, e.g. why it ended a dead run.
    return (key.startswith("mlflow.") and key not in CHECKED_SYSTEM_TAGS) or key.startswith(
        "ff.sync."
    )


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else -1
