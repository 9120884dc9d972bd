"""Reaching an MLflow tracking store, and what its failures mean — for every module that does.

Both the writer (:mod:`formula_foundry.sync.mlflow.client_sink`) and the reader
(:mod:`formula_foundry.sync.mlflow.snapshot`, used by ``verify``) open stores; they must agree on
which failures are "try again later" (exit 75), which are the user's to fix (exit 2), and
which are refusals. Nothing here imports MLflow; SQLAlchemy only inside :func:`probe_database`.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Final

from formula_foundry.errors import ConfigError, FormulaFoundryError, StoreUnavailable
from formula_foundry.redact import redact_uri
from formula_foundry.sync.engine.destination import scheme_of
from formula_foundry.sync.engine.report import one_line

UNAVAILABLE_CODES: Final = frozenset(
    {
        "TEMPORARILY_UNAVAILABLE",
        "INTERNAL_ERROR",
        "REQUEST_LIMIT_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "DEADLINE_EXCEEDED",
        "SERVICE_UNDER_MAINTENANCE",
        "ENDPOINT_NOT_FOUND",
    }
)
UNAVAILABLE_TEXT: Final = re.compile(
    r"database is locked|database table is locked|could not connect|connection refused|"
    r"connection reset|connection aborted|server closed the connection|timed out|timeout|"
    r"max retries exceeded|failed with exception|name or service not known|"
    r"temporarily unavailable|failed with error code 5\d\d|too many connections|"
    r"the database system is (starting up|shutting down)",
    re.IGNORECASE,
)
UNAVAILABLE_TYPES: Final = frozenset(
    {"OperationalError", "InterfaceError", "DisconnectionError", "TimeoutError"}
)
# Waiting will not fix these: a wrong password, user or database name is the user's to fix.
# They arrive as "OperationalError" too, so they are told apart by their text, first.
LOGIN_TEXT: Final = re.compile(
    r"password authentication failed|no password supplied|authentication failed|"
    r'role "[^"]*" does not exist|database "[^"]*" does not exist|'
    r"access denied for user|unknown database|failed with error code 40[13]\b",
    re.IGNORECASE,
)
LOGIN_CODES: Final = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})
MLFLOW_ENV_DEFAULTS: Final = {
    # MLflow's own HTTP retries take minutes by default; ff-sync retries with its own policy.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def prepare_mlflow_env() -> None:
    """Bounded HTTP retries, and quiet MLflow loggers: our errors say once what went wrong."""
    for name, value in MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _chain(exc: BaseException) -> list[BaseException]:
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 8:
        chain.append(chain[-1].__cause__)
    return chain


def is_login_error(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in LOGIN_CODES or any(
        LOGIN_TEXT.search(str(e)) for e in _chain(exc)
    )


def is_unavailable(exc: BaseException) -> bool:
    chain = _chain(exc)
    return (
        getattr(exc, "error_code", None) in UNAVAILABLE_CODES
        or any(type(e).__name__ in UNAVAILABLE_TYPES for e in chain)
        or any(isinstance(e, OSError) for e in chain)
        or bool(UNAVAILABLE_TEXT.search(str(exc)))
    )


def access_error(exc: BaseException, what: str, uri: str) -> FormulaFoundryError | None:
    """A login or reachability failure as our error (exit 2 or 75); ``None``: neither."""
    description = redact_uri(uri)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = one_line(first, uri, limit=240)
    if isinstance(exc, ModuleNotFoundError):
        return ConfigError(
            f"{description}: the database driver {exc.name!r} is not installed; "
            "pip install 'formula-foundry[postgres]' (PostgreSQL) or the driver your URI names"
        )
    if is_login_error(exc):
        return ConfigError(
            f"{description} refused the login or does not have that database ({what}): {text}; "
            "check the user, the password (~/.pgpass or PGPASSWORD) and the database name"
        )
    if is_unavailable(exc):
        return StoreUnavailable(f"{description} is unavailable ({what}): {text}")
    return None


def probe_database(uri: str) -> None:
    """Connect once: MLflow itself retries an unreachable database for ~100 s, silently."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    args = {"connect_timeout": 10} if scheme_of(uri) == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args=args)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except (sqlalchemy.exc.ArgumentError, ValueError):
        # A raw '@', ':' or '/' in the password: SQLAlchemy ends the password at the first '@'
        # and reads the rest as host, port and database (a port that is no number, a host no
        # resolver takes: UnicodeError is a ValueError).
        raise ConfigError(
            f"tracking URI {redact_uri(uri)!r} cannot be parsed or names no valid host; "
            "percent-encode the at signs, colons, slashes and percent signs of the password "
            "(%40, %3A, %2F, %25)"
        ) from None
