"""Deleting files among a destination run's artifacts: a live console's parts, once the whole
file is in place (:mod:`formula_foundry.sync.engine.console_upload`).

``MlflowClient`` has no delete; the run's artifact repository has (a local folder, an ``mlflow
server`` proxying ``mlflow-artifacts:``, the cloud stores). A file that is not there is deleted
already, so a pass killed between deleting and recording it deletes again harmlessly.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from formula_foundry.sync.engine.refusals import quoted
from formula_foundry.sync.engine.sink import DestinationRejected

if TYPE_CHECKING:
    from formula_foundry.sync.mlflow.client_sink import MlflowSink


def delete_run_artifacts(sink: MlflowSink, mlflow_run_id: str, paths: Sequence[str]) -> None:
    """``MlflowSink.delete_artifacts``: each path deleted; :class:`DestinationRejected` where
    the run's artifact store cannot delete (the parts stay, the caller says so)."""

    def delete(path: str) -> None:
        # Private: the client's cached repository of the run (one per run, as for uploads).
        repo = sink._client._tracking_client._get_artifact_repo(mlflow_run_id)
        try:
            repo.delete_artifacts(path)
        except NotImplementedError:
            raise DestinationRejected(
                f"{sink.description}: the artifact store of run {mlflow_run_id} "
                f"({type(repo).__name__}) cannot delete {quoted(path)}"
            ) from None

    for path in paths:
        sink.call(f"delete {quoted(path)} of run {mlflow_run_id}", partial(delete, path))
