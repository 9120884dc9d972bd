"""MLflow's entry points for ``spool:`` URIs (``pyproject.toml``): builders, imported cheaply.

MLflow loads every plugin's entry point while it imports itself. Pointing the entry points at
the store classes would import their modules — which import MLflow — in the middle of that:
a module imported before ``mlflow`` would be found half-initialised and the ``spool`` scheme
silently not registered. These builders import the classes only when a store is built.
"""

from __future__ import annotations

from typing import Any


def tracking_store(store_uri: str | None = None, artifact_uri: str | None = None) -> Any:
    from formula_foundry.dropin.store import SpoolStore

    cls: Any = SpoolStore  # its abstract methods are filled in when it is defined
    return cls(store_uri, artifact_uri)


def registry_store(store_uri: str | None = None, tracking_uri: str | None = None) -> Any:
    from formula_foundry.dropin.registry import SpoolRegistryStore

    cls: Any = SpoolRegistryStore  # as above
    return cls(store_uri, tracking_uri)


def artifact_repository(artifact_uri: str, *args: Any, **kwargs: Any) -> Any:
    from formula_foundry.dropin.artifacts import SpoolArtifactRepository

    cls: Any = SpoolArtifactRepository  # as above
    return cls(artifact_uri, *args, **kwargs)
