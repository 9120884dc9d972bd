"""The destination of a pass, parsed once from its tracking URI.

Every rule that depends on the kind of store lives here, so that the engine, the MLflow
adapter and the commands agree: which URIs the sync accepts at all, which stores are SQL
databases (MLflow's SQL store, the bulk metric path), which take several runs at once
(:mod:`~formula_foundry.sync.engine.parallel`), and the name of the destination's state
folder. No MLflow import.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from formula_foundry.errors import ConfigError
from formula_foundry.redact import redact_uri

INSTALL_HINT: Final = "pip install 'formula-foundry[tracking]'"
KNOWN_SCHEMES: Final = frozenset(
    {"sqlite", "postgresql", "postgres", "mysql", "mssql", "http", "https", "file", "databricks"}
)
# MLflow's SQL store (SQLAlchemy). "postgres" is not among them: SQLAlchemy refuses it.
SQL_SCHEMES: Final = frozenset({"sqlite", "postgresql", "mysql", "mssql"})
# The stores whose metrics table the bulk path writes straight into (mlflow/sql_bulk.py).
BULK_SCHEMES: Final = frozenset({"sqlite", "postgresql"})
# The stores that take several runs at once (a server, or a database server).
PARALLEL_SCHEMES: Final = frozenset({"http", "https", "postgresql", "postgres"})


def scheme_of(uri: str) -> str:
    """``postgresql`` for ``postgresql+psycopg://...``; ``""`` for a URI without ``://``."""
    return uri.split("://", 1)[0].lower().split("+", 1)[0] if "://" in uri else ""


def destination_key(uri: str) -> str:
    """Folder name of a destination: ``<scheme>-<sha256 of the redacted URI, 12 hex>``.

    The scheme keeps its driver (``postgresql_psycopg``): the name of every existing state
    folder, so it never changes.
    """
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "uri"
    scheme = re.sub(r"[^a-z0-9]+", "_", scheme).strip("_") or "uri"
    digest = hashlib.sha256(redact_uri(uri).encode("utf-8")).hexdigest()[:12]
    return f"{scheme}-{digest}"


@dataclass(frozen=True, slots=True)
class Destination:
    """A tracking store the sync writes to. :meth:`parse` refuses one it cannot use."""

    uri: str
    scheme: str

    @classmethod
    def parse(cls, uri: str) -> Destination:
        """Parse ``uri``; raise :class:`ConfigError` (naming it, password hidden) if the sync
        cannot use it."""
        scheme = scheme_of(uri)
        if scheme not in KNOWN_SCHEMES:
            raise ConfigError(
                f"tracking URI {redact_uri(uri)!r} has an unsupported scheme {scheme!r}; use "
                "sqlite:///path, postgresql://..., or http(s)://host:port"
            )
        if scheme == "sqlite" and not uri.startswith("sqlite:///"):
            raise ConfigError(
                f"tracking URI {redact_uri(uri)!r}: write sqlite:///relative/path.db "
                "or sqlite:////absolute/path.db"
            )
        return cls(uri, scheme)

    @property
    def shown(self) -> str:
        """The URI as every message shows it: without its password."""
        return redact_uri(self.uri)

    @property
    def key(self) -> str:
        """The name of the destination's state folder (:func:`destination_key`)."""
        return destination_key(self.uri)

    @property
    def is_sql(self) -> bool:
        return self.scheme in SQL_SCHEMES

    @property
    def takes_bulk_metrics(self) -> bool:
        return self.scheme in BULK_SCHEMES

    @property
    def takes_parallel_runs(self) -> bool:
        return self.scheme in PARALLEL_SCHEMES
