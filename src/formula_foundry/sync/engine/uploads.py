"""Files logged to runs (``artifact`` events): found in their artifact store, handed to the sink.

The replay gathers a run's consecutive ``artifact`` events into one upload (a folder logged at
once is one write in the spool, so one upload here), sent after the batch before them. Each
object must be in its store, as a regular file of the recorded size, before anything is sent:
one that is not (a store not mounted on this host, a file removed by hand) stops the run's
segment right before the upload, reported as unreadable, and the next pass tries again from
there. Nothing is skipped, so nothing is lost: the run waits until the store is back.

The destination is checked after the upload (the sink compares what it holds with the sizes
sent); only then does the segment's progress move past the events. A pass killed mid-upload
leaves the progress before them, so the next pass uploads them again and overwrites whatever
half-written file the destination kept: a final tree never holds a partial file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from formula_foundry.substrate.artifact_store import stored_object_path
from formula_foundry.sync.engine.batch import Batch, Cursor
from formula_foundry.sync.engine.report import SyncReport
from formula_foundry.sync.engine.runs import SyncContext
from formula_foundry.sync.engine.sink import (
    ArtifactRef,
    DestinationRejected,
    RecordRejected,
    artifact_ref_file,
)
from formula_foundry.tracking.events import K_ARTIFACT
from formula_foundry.tracking.spool_reader import Event


class ObjectUnavailable(OSError):
    """A logged file's object is not (yet) readable in its store from this host."""


def local_files(refs: list[ArtifactRef]) -> list[tuple[ArtifactRef, Path]]:
    """Each file's object in its store, the last event of a path winning (as in MLflow, a file
    logged twice to one path holds the later bytes); :class:`ObjectUnavailable` if one is
    missing, is not a regular file, or has another size than its event says."""
    latest: dict[str, ArtifactRef] = {}
    for ref in refs:
        latest.pop(ref.path, None)  # re-insert: upload in the order last logged
        latest[ref.path] = ref
    out = []
    for ref in latest.values():
        path = stored_object_path(ref.store, ref.digest)
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise ObjectUnavailable(
                f"artifact {ref.path!r}: object {ref.digest} is not readable in store "
                f"{ref.store} ({exc.strerror}; is the artifact store visible from this host?)"
            ) from None
        if not stat.S_ISREG(st.st_mode) or st.st_size != ref.size:
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"{st.st_size} bytes"
            raise ObjectUnavailable(
                f"artifact {ref.path!r}: object {ref.digest} in store {ref.store} is {what}, "
                f"not the {ref.size} bytes logged"
            )
        out.append((ref, path))
    return out


def upload(cx: SyncContext, cur: Cursor) -> None:
    """Upload the files of the cursor's batch into its run; the ones the destination can never
    take are quarantined as ``refused`` (the run goes on). Files above ``sync.upload_max_bytes``
    get the reference document of ``log_artifact_reference`` instead: they stay in the store."""
    ctx, limit = cur.ctx, cx.upload_max_bytes
    batch = [(ref, ev) for ref, ev in cur.batch.files if ev.kind == K_ARTIFACT]
    if len(batch) < len(cur.batch.files):  # a model's files go into the model
        from formula_foundry.sync.engine.models import upload_model_files  # it imports this

        upload_model_files(cx, cur)
    # The last event of a path wins (as in MLflow, a file logged twice to one path holds the
    # later bytes), on whichever side of the limit each one falls.
    latest: dict[str, tuple[ArtifactRef, Event]] = {}
    for ref, ev in batch:
        latest.pop(ref.path, None)  # re-insert: upload in the order last logged
        latest[ref.path] = (ref, ev)
    files = [(ref, ev) for ref, ev in latest.values() if limit is None or ref.size <= limit]
    referenced: list[str] = []
    for ref, ev in latest.values():
        if limit is not None and ref.size > limit:
            try:
                marked = replace(ref, above_limit=True)
                cx.call(partial(cx.sink.log_artifact_ref, ctx.mlflow_run_id, marked))
                referenced.append(ref.path)
            except RecordRejected as exc:
                _refused(cx, cur, ev, str(exc))
    if files:
        found = local_files([ref for ref, _ in files])
        events = {ref.path: ev for ref, ev in files}
        for ref, why in cx.call(partial(cx.sink.upload_artifacts, ctx.mlflow_run_id, found)):
            _refused(cx, cur, events[ref.path], why)
        cx.report.files += len(found)
        cx.report.file_bytes += sum(ref.size for ref, _ in found)
    if limit is not None and (referenced or files):
        # An earlier file at a path now referenced, or the limit's document of a path whose
        # file is uploaded now (this pass or an earlier one logged it): the later one wins.
        _drop_superseded(cx, ctx.mlflow_run_id, referenced, [ref.path for ref, _ in files])


def _drop_superseded(
    cx: SyncContext, mlflow_run_id: str, files: Sequence[str], uploaded: Sequence[str]
) -> None:
    """The sink's ``delete_superseded`` (an optional capability, as deleting is)."""
    sink: Any = cx.sink
    for candidate in (sink, getattr(sink, "inner", None)):
        fn = getattr(candidate, "delete_superseded", None)
        if callable(fn):
            refs = [artifact_ref_file(path) for path in uploaded]
            try:
                cx.call(partial(fn, mlflow_run_id, files, refs))
            except DestinationRejected as exc:
                cx.report.warnings.append(f"{exc}: a superseded file or reference stays")
            return


def _refused(cx: SyncContext, cur: Cursor, ev: Event, why: str) -> None:
    raw = orjson.dumps(ev.data)
    cx.quarantine(cur.ctx.spool_run_id, cur.seg.path, ev.line, ev.offset, "refused", why, raw)


def wait_for_object(report: SyncReport, cur: Cursor, exc: ObjectUnavailable) -> None:
    """A logged file's object is missing: the segment stops right before its upload (the
    batch before it is acknowledged already) and the next pass tries again from there."""
    cur.batch, cur.pos = Batch(), cur.saved
    report.unreadable.append(
        f"run {cur.ctx.spool_run_id}: {cur.seg.path}: {exc}; not synced, retried next pass"
    )
