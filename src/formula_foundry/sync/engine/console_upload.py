"""Captured consoles into MLflow: ``console/<host>-<pid>.log`` among each run's artifacts.

MLflow's artifact stores replace files; none appends. So a process's console goes up in
pieces while its run is live, and as one file once the run has ended:

* **live run**: the bytes so far are cut into pieces of about :data:`PIECE_BYTES` —
  ``console/<p>.log`` holds the first, ``console/<p>.part-0002.log`` the next, and so on. A
  piece is sealed once more than :data:`PIECE_BYTES` follow its start, at the last line end
  before that size (:func:`seal`), and never sent again; only the last, open piece is sent
  again, whole, when it has grown. A pass sends at most one open piece of each process again
  (at most :data:`PIECE_BYTES`) and never what is sealed; a run has at most one file per
  :data:`PIECE_BYTES` of output (25 at the default cap of 100 MiB).
* **ended run** (its status in the sync state is no longer RUNNING: ``run_end`` replayed, or
  the sync ended it as dead): ``console/<p>.log`` is uploaded whole, then the parts are
  deleted. The final tree is one file per process holding exactly the bytes ``ff-sync tail``
  prints for it. A process that printed nothing has no file.

Each upload is acknowledged (the destination lists each file at its full size) before the
record (:mod:`formula_foundry.sync.engine.console_files`) says it is there; the whole file is
in place before any part is deleted. A pass killed anywhere leaves the record behind the
destination, and the next one uploads the same bytes under the same names again: a second
pass, a retry or a crash never leaves a duplicate, and MLflow's stores never show a file
half-written under its name. A destination that cannot delete keeps the parts (a warning
says so).

It runs after the replay and the ending of dead runs (``sync_pass``), run by run, and only
for runs whose console changed, ended, or still owes the destination something
(:func:`console_owed`, which also keeps an otherwise idle pass from being skipped).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Final, Protocol

from formula_foundry.sync.engine.console_files import (
    FOLDER,
    RunConsole,
    forget_seen,
    live_runs,
    process_bytes,
)
from formula_foundry.sync.engine.runs import SyncContext
from formula_foundry.sync.engine.scan import SegmentFile
from formula_foundry.sync.engine.sink import ArtifactRef, DestinationRejected, Sink
from formula_foundry.sync.engine.sync_state import SegmentProgress, SyncState
from formula_foundry.tracking.console_events import utf8_cut

# A live run's pieces: big enough that most consoles are one file, small enough that what a
# pass sends again stays small.
PIECE_BYTES: Final = 4 * 1024 * 1024
# Where a piece is sealed: the last line end within this many bytes before its size.
_LINE_WINDOW: Final = 64 * 1024


def artifact_path(proc: str, index: int = 0) -> str:
    """Where piece ``index`` of a process's console lives among the run's artifacts."""
    return f"{FOLDER}/{proc}.log" if index == 0 else f"{FOLDER}/{proc}.part-{index + 1:04d}.log"


def seal(window: bytes, end: int) -> int:
    """Where a piece that may end at ``end`` at most is sealed, from ``window``, the bytes from
    some way before ``end`` to one after it: after the last line end, else where no character
    is split."""
    base = end - (len(window) - 1)
    nl = window.rfind(b"\n", 0, len(window) - 1)
    if nl >= 0:
        return base + nl + 1
    return base + utf8_cut(window, len(window) - 1)


def pieces(rec: RunConsole, proc: str) -> list[tuple[int, int]]:
    """The byte ranges the destination should hold for ``proc`` now (sealing what is due)."""
    p = rec.procs[proc]
    if p.size == 0:
        return []
    if p.final:
        return [(0, p.size)]
    start = p.ends[-1] if p.ends else 0
    while p.size - start > PIECE_BYTES:
        end = start + PIECE_BYTES
        cut = seal(rec.read_copy(proc, end - _LINE_WINDOW, end + 1), end)
        p.ends.append(cut)
        start = cut
    out = list(zip([0, *p.ends[:-1]], p.ends, strict=True))
    if p.size > start:
        out.append((start, p.size))
    return out


class _Deleter(Protocol):
    def delete_artifacts(self, mlflow_run_id: str, paths: Sequence[str]) -> None: ...


def _deleter(sink: Sink) -> Callable[[str, Sequence[str]], None] | None:
    """The sink's ``delete_artifacts`` (not part of :class:`Sink`: an optional capability); a
    sink that wraps another (the bulk SQL sink) lends the inner one's."""
    for candidate in (sink, getattr(sink, "inner", None)):
        fn = getattr(candidate, "delete_artifacts", None)
        if callable(fn):
            return fn  # type: ignore[no-any-return]
    return None


def upload_console(cx: SyncContext, files: Sequence[SegmentFile]) -> None:
    """Bring every run's console files up to date (see the module docstring)."""
    folder = cx.state.folder / FOLDER
    forget_seen(cx.state.folder)
    runs = live_runs(folder)
    if not runs:
        return
    by_run: dict[str, dict[str, SegmentFile]] = {}
    for seg in files:
        by_run.setdefault(seg.spool_run_id, {})[seg.rel] = seg
    acknowledged = _acknowledged(cx.state.segments().values())
    for spool_run_id in runs:
        try:
            _run(
                cx,
                RunConsole.load(folder, spool_run_id),
                by_run.get(spool_run_id, {}),
                acknowledged,
            )
        except DestinationRejected as exc:
            cx.report.warnings.append(f"run {spool_run_id}: console not uploaded: {exc}")
        except OSError as exc:
            cx.report.unreadable.append(
                f"run {spool_run_id}: console: {exc}; not uploaded, retried next pass"
            )


def _acknowledged(progress: Iterable[SegmentProgress]) -> dict[str, int]:
    return {p.rel: p.offset for p in progress}


def _run(
    cx: SyncContext, rec: RunConsole, files: dict[str, SegmentFile], acknowledged: dict[str, int]
) -> None:
    known = cx.state.run(rec.spool_run_id)
    if known is None:
        return  # not in the destination yet
    mlflow_run_id, ended = known.mlflow_run_id, known.status != "RUNNING"
    rec.catch_up(files, acknowledged)
    rec.synced = False
    rec.save()  # the copies' sizes and the read positions, before anything is sent
    delete = _deleter(cx.sink)
    synced = True
    with tempfile.TemporaryDirectory(prefix=".upload-", dir=rec.folder) as tmp:
        for proc, p in rec.procs.items():
            if p.gone:
                if p.run != mlflow_run_id:
                    cx.report.warnings.append(
                        f"run {rec.spool_run_id}: console of {proc} not uploaded to run "
                        f"{mlflow_run_id}: its segments are gone (ff-sync gc archives ended runs)"
                    )
                continue  # nothing to send it from, and what the destination holds stays
            p.final = p.final or ended or delete is None
            if p.resend or p.run != mlflow_run_id:
                p.sent, p.run, p.resend = [], mlflow_run_id, False
            plan = pieces(rec, proc)
            todo = [i for i, r in enumerate(plan) if i >= len(p.sent) or p.sent[i] != r]
            if todo:
                got = _send(cx, rec, proc, plan, todo, Path(tmp), mlflow_run_id)
                for i in got:
                    p.sent.extend([(-1, -1)] * (i + 1 - len(p.sent)))
                    p.sent[i] = plan[i]
                rec.save()
                synced = synced and len(got) == len(todo)
            # Parts beyond the plan, once the plan's pieces are in place; never the first
            # piece (a plan of no bytes keeps what was sent: nothing replaces it).
            extra = [artifact_path(proc, i) for i in range(max(len(plan), 1), len(p.sent))]
            if extra and delete is not None and plan and p.sent[: len(plan)] == plan:
                try:
                    cx.call(partial(delete, mlflow_run_id, extra))
                except DestinationRejected as exc:
                    cx.report.warnings.append(
                        f"run {rec.spool_run_id}: console parts of {proc} left in place: {exc}"
                    )
                else:
                    del p.sent[len(plan) :]
                    rec.save()
            synced = synced and p.sent == plan
    rec.synced = synced
    if ended and synced:
        rec.finish()
    else:
        rec.save()


def _send(
    cx: SyncContext,
    rec: RunConsole,
    proc: str,
    plan: list[tuple[int, int]],
    todo: list[int],
    tmp: Path,
    mlflow_run_id: str,
) -> list[int]:
    """Upload pieces ``todo`` of ``proc``; the ones the destination acknowledged."""
    batch: list[tuple[ArtifactRef, Path]] = []
    for i in todo:
        start, end = plan[i]
        if (start, end) == (0, rec.procs[proc].size):
            local = rec.copy_path(proc)  # the whole copy: sent as it is
            digest = _sha256_file(local)
        else:
            data = rec.read_copy(proc, start, end)
            local = tmp / f"{proc}.{i}"
            local.write_bytes(data)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
        batch.append(
            (ArtifactRef(artifact_path(proc, i), digest, end - start, str(local), 0), local)
        )
    refused = cx.call(partial(cx.sink.upload_artifacts, mlflow_run_id, batch))
    for ref, why in refused:
        cx.report.warnings.append(f"run {rec.spool_run_id}: console {ref.path} refused: {why}")
    no = {ref.path for ref, _ in refused}
    cx.report.files += len(batch) - len(no)
    cx.report.file_bytes += sum(ref.size for ref, _ in batch if ref.path not in no)
    return [i for i in todo if artifact_path(proc, i) not in no]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def console_owed(state: SyncState) -> bool:
    """Whether a pass has console work even with no segment pending: a record not synced,
    behind the replay's progress, or of a run that has ended (a pass died before finishing)."""
    folder = state.folder / FOLDER
    runs = live_runs(folder)
    if not runs:
        return False
    acknowledged = _acknowledged(state.segments().values())
    for spool_run_id in runs:
        rec = RunConsole.load(folder, spool_run_id)
        known = state.run(spool_run_id)
        if known is None:
            continue
        if not rec.synced or rec.behind(acknowledged) or known.status != "RUNNING":
            return True
    return False


def expected_console(
    segments: Iterable[SegmentFile], ended: bool, max_bytes: int | None = None
) -> dict[str, ArtifactRef]:
    """The console files an ended run should hold (``verify``; a live run's are not judged):
    artifact path → size and digest. Files above ``max_bytes`` are left out (``verify``
    expects a reference document for logged files that large)."""
    if not ended:
        return {}
    out: dict[str, ArtifactRef] = {}
    for proc, chunks in process_bytes(segments):
        h = hashlib.sha256()
        size = 0
        for chunk in chunks:
            h.update(chunk)
            size += len(chunk)
        if max_bytes is None or size <= max_bytes:
            path = artifact_path(proc)
            out[path] = ArtifactRef(path, "sha256:" + h.hexdigest(), size, "", 0)
    return out
