"""The model registry of ``spool:`` URIs: present, and honest.

MLflow resolves a model-registry store for the tracking URI even in code that only logs; an
unknown scheme fails there. This one answers every call with an error naming the call and what
to do instead. (The files of spool runs: :mod:`formula_foundry.dropin.artifacts`.)
"""

from __future__ import annotations

from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.store.model_registry.abstract_store import AbstractStore as RegistryStore

_WHY = (
    "the model registry of a spool: tracking URI is not kept on the node; register models "
    "after ff-sync has replayed the spool, against the MLflow store it replays into"
)


def _refusal(name: str) -> Any:
    def refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise MlflowException(
            f"{name}() is not available on a spool: {_WHY}", INVALID_PARAMETER_VALUE
        )

    refuse.__name__ = name
    return refuse


class SpoolRegistryStore(RegistryStore):
    """Model registry of a ``spool:`` URI: registering models happens after the sync."""

    def __init__(self, store_uri: str | None = None, tracking_uri: str | None = None) -> None:
        super().__init__(store_uri, tracking_uri)


def _refuse_the_rest(cls: type, base: type) -> None:
    """Every public method of ``base`` that ``cls`` does not define refuses clearly."""
    abstract: frozenset[str] = getattr(base, "__abstractmethods__", frozenset())
    for name in dir(base):
        if name in cls.__dict__ or (name.startswith("_") and name not in abstract):
            continue
        if callable(getattr(base, name, None)) and not isinstance(getattr(base, name), type):
            setattr(cls, name, _refusal(name))
    setattr(cls, "__abstractmethods__", frozenset())  # noqa: B010 - mypy knows no such attribute


_refuse_the_rest(SpoolRegistryStore, RegistryStore)
