"""The model registry and artifact repository of ``spool:`` URIs: present, and honest.

MLflow resolves a model-registry store for the tracking URI even in code that only logs, and
an artifact repository for each run's artifact URI; an unknown scheme fails there. These
answer every call with an error naming the call and what to do instead.
"""

from __future__ import annotations

from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.store.artifact.artifact_repo import ArtifactRepository
from mlflow.store.model_registry.abstract_store import AbstractStore as RegistryStore


def _refusal(what: str, name: str) -> Any:
    def refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise MlflowException(
            f"{name}() is not available on a spool: the {what} of a spool: tracking URI is not "
            "recorded on the node. Run ff-sync to replay the spool into your MLflow tracking "
            f"store, then call {name}() against that store",
            INVALID_PARAMETER_VALUE,
        )

    refuse.__name__ = name
    return refuse


class SpoolRegistryStore(RegistryStore):
    """Model registry of a ``spool:`` URI: registering models happens after the sync."""

    def __init__(self, store_uri: str | None = None, tracking_uri: str | None = None) -> None:
        super().__init__(store_uri, tracking_uri)


class SpoolArtifactRepository(ArtifactRepository):
    """Artifacts of ``spool:`` runs: not recorded yet; listing finds none."""

    def list_artifacts(self, path: str | None = None) -> list[Any]:
        return []


for _cls, _what in ((SpoolRegistryStore, "model registry"), (SpoolArtifactRepository, "artifacts")):
    for _name in sorted(getattr(_cls, "__abstractmethods__", ())):
        if _name != "list_artifacts":
            setattr(_cls, _name, _refusal(_what, _name))
    setattr(_cls, "__abstractmethods__", frozenset())  # noqa: B010 - mypy knows no such attribute
for _name in ("log_artifact", "log_artifacts", "download_artifacts", "_download_file"):
    setattr(SpoolArtifactRepository, _name, _refusal("artifacts", _name))
