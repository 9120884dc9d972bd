"""Which store failures are the user's to fix (exit 2) and which pass with time (exit 75)."""

from __future__ import annotations

import pytest

from formula_foundry.errors import EXIT_UNAVAILABLE, EXIT_USAGE, ConfigError, StoreUnavailable
from formula_foundry.sync.mlflow.store_access import access_error

URI = "postgresql://ff:hunter2@db.example:5432/mlflow"


def _operational(text: str) -> Exception:
    import sqlalchemy.exc

    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception(text))


@pytest.mark.parametrize(
    "text",
    [
        'connection to server at "db.example" (10.0.0.5), port 5432 failed: FATAL:  '
        'password authentication failed for user "ff"',
        "fe_sendauth: no password supplied",
        'connection to server failed: FATAL:  database "mlflw" does not exist',
        'connection to server failed: FATAL:  role "fff" does not exist',
    ],
)
def test_login_failures_are_configuration_errors(text: str) -> None:
    err = access_error(_operational(text), "open the store", URI)
    assert isinstance(err, ConfigError) and err.exit_code == EXIT_USAGE
    assert "hunter2" not in str(err) and "ff:***@db.example" in str(err)
    assert "~/.pgpass" in str(err)


def test_an_http_401_is_a_configuration_error() -> None:
    from mlflow.exceptions import MlflowException

    exc = MlflowException(
        "API request to endpoint /api/2.0/mlflow/runs/create failed with error code 401 != 200."
    )
    err = access_error(exc, "create run", "http://127.0.0.1:5000")
    assert isinstance(err, ConfigError)


@pytest.mark.parametrize(
    "text",
    [
        'connection to server at "db.example", port 5432 failed: Connection refused',
        "server closed the connection unexpectedly",
        "FATAL:  the database system is starting up",
        "database is locked",
    ],
)
def test_outages_stay_retryable(text: str) -> None:
    err = access_error(_operational(text), "open the store", URI)
    assert isinstance(err, StoreUnavailable) and err.exit_code == EXIT_UNAVAILABLE
    assert "hunter2" not in str(err)


def test_other_errors_are_not_ours_to_classify() -> None:
    assert access_error(TypeError("a bug"), "x", URI) is None
