"""Deleting files among a destination run's artifacts: a live console's parts, once the whole
file is in place (:mod:`formula_foundry.sync.engine.console_upload`); what a later file at the
same path supersedes across ``sync.upload_max_bytes`` (:mod:`formula_foundry.sync.engine.uploads`).

``MlflowClient`` has no delete; the run's artifact repository has (a local folder, an ``mlflow
server`` proxying ``mlflow-artifacts:``, the cloud stores). A file that is not there is deleted
already, so a pass killed between deleting and recording it deletes again harmlessly.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from formula_foundry.sync.engine.refusals import quoted
from formula_foundry.sync.engine.sink import ABOVE_LIMIT, DestinationRejected

if TYPE_CHECKING:
    from formula_foundry.sync.mlflow.client_sink import MlflowSink


def delete_run_artifacts(sink: MlflowSink, mlflow_run_id: str, paths: Sequence[str]) -> None:
    """``MlflowSink.delete_artifacts``: each path deleted; :class:`DestinationRejected` where
    the run's artifact store cannot delete (the parts stay, the caller says so)."""
    repo = _repo(sink, mlflow_run_id)
    for path in paths:
        _delete(sink, repo, mlflow_run_id, path, f"delete {quoted(path)} of run {mlflow_run_id}")


def _repo(sink: MlflowSink, mlflow_run_id: str) -> Any:
    # Private: the client's cached repository of the run (one per run, as for uploads).
    return sink.call(
        f"open the artifacts of run {mlflow_run_id}",
        lambda: sink._client._tracking_client._get_artifact_repo(mlflow_run_id),
    )


def _delete(sink: MlflowSink, repo: Any, mlflow_run_id: str, path: str, what: str) -> None:
    try:
        sink.call(what, partial(repo.delete_artifacts, path))
    except NotImplementedError:
        raise DestinationRejected(
            f"{sink.description}: the artifact store of run {mlflow_run_id} "
            f"({type(repo).__name__}) cannot delete {quoted(path)}"
        ) from None


def delete_superseded(
    sink: MlflowSink, mlflow_run_id: str, files: Sequence[str], limit_refs: Sequence[str]
) -> None:
    """``MlflowSink.delete_superseded``: each of ``files`` deleted if the run holds a file
    there (its path's last logged file went above ``sync.upload_max_bytes``: a reference
    now), and each of ``limit_refs`` (reference documents) if the limit wrote it (its path's
    last logged file is uploaded now); a reference the program logged itself stays. Nothing
    else is touched: a folder at such a path (files logged under it) is no file."""
    repo = _repo(sink, mlflow_run_id)
    wanted = [(path, False) for path in files] + [(path, True) for path in limit_refs]
    by_folder: dict[str, list[tuple[str, bool]]] = {}
    for path, is_ref in wanted:
        by_folder.setdefault(posixpath.dirname(path), []).append((path, is_ref))
    for folder, paths in by_folder.items():
        listed = sink.call(
            f"list the artifacts of run {mlflow_run_id}",
            partial(repo.list_artifacts, folder or None),
        )
        present = {info.path for info in listed if not info.is_dir}
        for path, is_ref in paths:
            if path not in present or (is_ref and not _written_for_the_limit(sink, repo, path)):
                continue
            what = f"delete the superseded {quoted(path)} of run {mlflow_run_id}"
            _delete(sink, repo, mlflow_run_id, path, what)


def _written_for_the_limit(sink: MlflowSink, repo: Any, path: str) -> bool:
    with tempfile.TemporaryDirectory(prefix="ff-ref-") as tmp:
        local = sink.call(f"read {quoted(path)}", partial(repo.download_artifacts, path, tmp))
        try:
            doc = json.loads(Path(local).read_bytes())
        except ValueError:
            return False  # not a document of ours: left alone
    return isinstance(doc, dict) and doc.get(ABOVE_LIMIT[0]) == ABOVE_LIMIT[1]
