"""Uploading logged files into a destination run's artifacts, through MLflow's client.

MLflow's client writes each file where the run's artifact URI says (a local folder, an
``mlflow server`` proxying ``mlflow-artifacts:``, any store MLflow supports). A local folder
gets a hidden temporary file renamed into place, so a file is never left half-written under
its name; a server receives the whole body or fails the request. Afterwards the run's listing
must show each file at its full size before the engine records the upload as done.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from formula_foundry.errors import FormulaFoundryError, StoreUnavailable
from formula_foundry.sync.engine.refusals import local_refusal, quoted
from formula_foundry.sync.engine.sink import ArtifactRef
from formula_foundry.sync.mlflow.internals import list_run_artifacts
from formula_foundry.sync.mlflow.local_upload import LocalRoot

if TYPE_CHECKING:
    from formula_foundry.sync.mlflow.client_sink import MlflowSink


def upload_artifacts(
    sink: MlflowSink, client: Any, mlflow_run_id: str, files: Sequence[tuple[ArtifactRef, Path]]
) -> list[tuple[ArtifactRef, str]]:
    """The sink's ``upload_artifacts`` (see :class:`~formula_foundry.sync.engine.sink.Sink`)."""
    rejected: list[tuple[ArtifactRef, str]] = []
    sent: list[ArtifactRef] = []
    local = local_root(sink, mlflow_run_id)
    send: Callable[[Path, str, int], str | None]
    with tempfile.TemporaryDirectory(prefix="ff-upload-") as tmp:
        if local is not None:
            for folder in {ref.path.rpartition("/")[0] for ref, _ in files}:
                local.sweep(folder)
            send = local.copy_in
        else:
            send = _Staged(client, mlflow_run_id, Path(tmp)).send
        for ref, obj in files:
            why = _upload_one(sink, mlflow_run_id, ref, partial(send, obj, ref.path, ref.size))
            if why is None:
                sent.append(ref)
            else:
                rejected.append((ref, why))
    if local is None:  # a local copy checked its size itself
        _check_uploaded(sink, client, mlflow_run_id, sent)
    return rejected


def local_root(sink: MlflowSink, mlflow_run_id: str) -> LocalRoot | None:
    """The run's artifact folder when it is on this host (a local artifact root), which
    uploads write by MLflow's own protocol; ``None`` for any other store. Asked once per run
    and pass: the folders are checked, and swept of a killed upload's leftovers, once."""
    roots = sink._local_roots
    if mlflow_run_id not in roots:
        roots[mlflow_run_id] = sink._find_local_root(mlflow_run_id)
    return roots[mlflow_run_id]


class _Staged:
    """Uploads through MLflow's client, which names an uploaded file after the local one;
    objects are named by digest, so each goes up through a link carrying its artifact name
    (its content is read through the link)."""

    def __init__(self, client: Any, mlflow_run_id: str, staging: Path) -> None:
        self.client = client
        self.mlflow_run_id = mlflow_run_id
        self.staging = staging
        self.seen: dict[str, int] = {}

    def send(self, obj: Path, artifact_path: str, size: int) -> str | None:
        del size  # checked in the listing afterwards
        folder, _, name = artifact_path.rpartition("/")
        # One staging folder; a name met again goes one folder deeper per repeat.
        repeat = self.seen[name] = self.seen.get(name, -1) + 1
        link = Path(self.staging, *([str(repeat)] if repeat else []), name)
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(obj)
        self.client.log_artifact(self.mlflow_run_id, str(link), folder or None)
        return None


def _upload_one(
    sink: MlflowSink, mlflow_run_id: str, ref: ArtifactRef, send: Callable[[], str | None]
) -> str | None:
    """Upload one file; the reason the destination can never take it, or ``None``."""
    what = f"upload {quoted(ref.path)} to run {mlflow_run_id}"
    try:
        why = send()
    except FormulaFoundryError:
        raise
    except Exception as exc:
        why = local_refusal(exc)
        if why is None:
            err = sink.classify(exc, what)
            if err is None:
                raise
            raise err from exc
    if why is None:
        return None
    return (
        f"{sink.description} cannot store artifact {quoted(ref.path)} of run {mlflow_run_id}: {why}"
    )


def _check_uploaded(
    sink: MlflowSink, client: Any, mlflow_run_id: str, sent: Sequence[ArtifactRef]
) -> None:
    """The destination holds each file sent, at its full size; ``StoreUnavailable`` (the
    retry uploads again) if not."""
    listing = list_run_artifacts(client, mlflow_run_id)
    check_listed(
        sent,
        lambda folder: sink.call(
            f"list the artifacts of run {mlflow_run_id}", partial(listing, folder or None)
        ),
        f"{sink.description}: artifact {{path}} of run {mlflow_run_id}",
    )


def check_listed(sent: Sequence[ArtifactRef], list_folder: Callable[[str], Any], what: str) -> None:
    """Each file sent is listed at its full size (one listing per folder); otherwise
    ``StoreUnavailable`` naming it (``what``, with ``{path}``), and the retry uploads again."""
    by_folder: dict[str, dict[str, int]] = {}
    for ref in sent:
        by_folder.setdefault(ref.path.rpartition("/")[0], {})[ref.path] = ref.size
    for folder, want in by_folder.items():
        have = {info.path: info.file_size for info in list_folder(folder) if not info.is_dir}
        for path, size in want.items():
            # A server's listing leaves a size of 0 out (protobuf defaults), hence None.
            if path not in have or (have[path] or 0) != size:
                raise StoreUnavailable(
                    f"{what.format(path=quoted(path))} holds {have.get(path)} bytes after the "
                    f"upload, not {size}; uploading it again"
                )
