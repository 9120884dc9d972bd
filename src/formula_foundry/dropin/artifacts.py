"""``SpoolArtifactRepository``: MLflow's artifact repository for the runs of a ``spool:`` URI.

MLflow builds it (entry point ``mlflow.artifact_repository``) for the artifact URI the spool
store gives each run, and routes every file of a run through it: ``log_artifact(s)``,
``log_text``, ``log_dict``, ``log_figure``, ``log_image``, ``log_table``, ``list_artifacts``,
``download_artifacts``, ``mlflow.artifacts.load_*``. The work is
:class:`~formula_foundry.dropin.run_files.RunFiles`; this module speaks MLflow: its
``FileInfo``, its exceptions, and a clear refusal (naming the call and ``ff-sync``) for what a
spool does not do (deleting artifacts, traces).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final, TypeVar

from mlflow.entities.file_info import FileInfo
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.store.artifact.artifact_repo import ArtifactRepository

from formula_foundry.dropin.run_files import RunFiles, parse_artifact_uri
from formula_foundry.dropin.store import mlflow_error
from formula_foundry.errors import FormulaFoundryError

T = TypeVar("T")
# ArtifactRepository methods whose base implementation works here: they only call the methods
# below (download_artifacts lists, then calls _download_file per file).
INHERITED: Final = frozenset({"download_artifacts", "flush_async_logging", "get_local_path"})


def _mlflow_errors(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except FormulaFoundryError as exc:
            raise mlflow_error(exc) from None

    return wrapper


class SpoolArtifactRepository(ArtifactRepository):
    """The files of one ``spool:`` run (or of a folder among them)."""

    def __init__(
        self, artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None
    ) -> None:
        super().__init__(artifact_uri, tracking_uri, registry_uri)
        # A URI that names no run fails at the first use, not here: MLflow may build a
        # repository it never uses (an experiment's artifact location).
        self._files: RunFiles | FormulaFoundryError
        try:
            self._files = RunFiles(parse_artifact_uri(artifact_uri, tracking_uri))
        except FormulaFoundryError as exc:
            self._files = exc

    @property
    def files(self) -> RunFiles:
        if isinstance(self._files, FormulaFoundryError):
            raise self._files
        return self._files

    @_mlflow_errors
    def log_artifact(self, local_file: Any, artifact_path: str | None = None) -> None:
        self.files.log(local_file, artifact_path, folder=False)

    @_mlflow_errors
    def log_artifacts(self, local_dir: Any, artifact_path: str | None = None) -> None:
        self.files.log(local_dir, artifact_path, folder=True)

    @_mlflow_errors
    def list_artifacts(self, path: str | None = None) -> list[FileInfo]:
        return [FileInfo(p, is_dir, size) for p, is_dir, size in self.files.listing(path)]

    @_mlflow_errors
    def _download_file(self, remote_file_path: str, local_path: str) -> None:
        self.files.download(remote_file_path, local_path)


def _refusal(name: str) -> Callable[..., Any]:
    def refuse(self: SpoolArtifactRepository, *args: Any, **kwargs: Any) -> Any:
        raise MlflowException(
            f"{name}() is not available on a spool ({self.artifact_uri}): a spool run's "
            "artifacts can be logged, listed and downloaded. Run ff-sync to replay the spool "
            f"(it uploads the files into the MLflow run), then call {name}() against the MLflow "
            "store it replays into",
            INVALID_PARAMETER_VALUE,
        )

    refuse.__name__ = name
    return refuse


def _refuse_the_rest() -> None:
    """Every other public method of MLflow's repository refuses clearly (the base class would
    silently do nothing for some, e.g. ``delete_artifacts``)."""
    abstract: frozenset[str] = getattr(ArtifactRepository, "__abstractmethods__", frozenset())
    for name in dir(ArtifactRepository):
        if name.startswith("_") and name not in abstract:
            continue
        if name in SpoolArtifactRepository.__dict__ or name in INHERITED:
            continue
        attr = getattr(ArtifactRepository, name, None)
        if callable(attr) and not isinstance(attr, type):
            setattr(SpoolArtifactRepository, name, _refusal(name))
    setattr(SpoolArtifactRepository, "__abstractmethods__", frozenset())  # noqa: B010


_refuse_the_rest()
