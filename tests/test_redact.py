"""Passwords never survive redaction, whatever they hold and however the URI spells them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from formula_foundry.redact import redact_uri, uri_secrets
from formula_foundry.sync.engine.report import one_line

# Printable ASCII (every URI delimiter: / @ : ? # % & = ' " and space), a few control
# characters, and non-ASCII letters and symbols.
ALPHABET = st.characters(
    codec="utf-8", exclude_categories=("Cs",), exclude_characters="\n\r"
) | st.sampled_from(list("/@:?#%&='\" +;\\!$*()[]{}<>|,~`^"))
PASSWORDS = st.text(ALPHABET, min_size=4, max_size=24).filter(lambda p: p.strip() == p)

# Userinfo forms: ``{p}`` is the password as written; the host and the user stay visible.
USERINFO_FORMS = [
    ("postgresql://ff:{p}@db.example:5432/mlflow", "postgresql://ff:***@db.example:5432/mlflow"),
    (
        "postgresql+psycopg://ff:{p}@db.example/mlflow",
        "postgresql+psycopg://ff:***@db.example/mlflow",
    ),
    (
        "postgres://ff:{p}@db.example/mlflow?sslmode=require",
        "postgres://ff:***@db.example/mlflow?sslmode=require",
    ),
    ("mysql+pymysql://ff:{p}@db.example/mlflow", "mysql+pymysql://ff:***@db.example/mlflow"),
    ("https://ff:{p}@mlflow.example:5000/", "https://ff:***@mlflow.example:5000/"),
    ("http://:{p}@mlflow.example", "http://:***@mlflow.example"),
    ("postgresql:/ff:{p}@db.example/mlflow", "postgresql:/ff:***@db.example/mlflow"),
    ("postgresql:ff:{p}@db.example/mlflow", "postgresql:ff:***@db.example/mlflow"),
    ("postgresql:///ff:{p}@db.example/mlflow", "postgresql:///ff:***@db.example/mlflow"),
    ("sqlite+pysqlcipher://:{p}@/data/x.db", "sqlite+pysqlcipher://:***@/data/x.db"),
]
# Forms where the password must not hold the separators of its own syntax raw (a driver
# would split it there too): a query value and an unquoted libpq keyword value.
PARAM_NAMES = ["password", "passwd", "pwd", "token", "secret", "access_token", "sslpassword",
               "api_key", "PASSWORD", "client_secret"]  # fmt: skip
PARAM_FORMS = [
    "postgresql://ff@db.example:5432/mlflow?{k}={p}",
    "postgresql://ff@db.example:5432/mlflow?sslmode=require&{k}={p}&application_name=ff",
    "https://mlflow.example/api?{k}={p}",
    "host=db.example user=ff {k}={p} dbname=mlflow",
    "{k}={p} host=db.example",
]


def _spellings(password: str) -> list[str]:
    return [password, quote(password, safe=""), quote(password, safe="/:@")]


def _libpq_quoted(password: str) -> str:
    return "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"


@pytest.mark.parametrize(("form", "expected"), USERINFO_FORMS)
@given(password=PASSWORDS)
@example(password="S3cret/PW")
@example(password="a@b/c@d")
@example(password="p:w?x#y")
@example(password="pass word")
@settings(max_examples=150)
def test_a_userinfo_password_is_hidden_whole_and_host_and_user_stay(
    form: str, expected: str, password: str
) -> None:
    for spelled in _spellings(password):
        uri = form.format(p=spelled)
        assert redact_uri(uri) == expected
        # A message quoting the URI (repr, quotes, around other text) hides it too.
        for wrap in ("cannot open {!r}: refused", "x {} y", '"{}"'):
            text = wrap.format(uri)
            out = one_line(text, limit=10_000)
            # Only a password that appears nowhere else in the message can be looked for.
            elsewhere = wrap.format(form.format(p=""))
            if spelled not in elsewhere and password not in elsewhere:
                assert spelled not in out and password not in out, out
            assert "db.example" in out or "mlflow.example" in out or "/data/x.db" in out


@pytest.mark.parametrize("form", PARAM_FORMS)
@pytest.mark.parametrize("key", PARAM_NAMES)
@given(password=PASSWORDS.filter(lambda p: not set(p) & set("&;'\"\\")))
@settings(max_examples=25)
def test_a_secret_parameter_is_hidden_in_a_query_or_a_keyword_dsn(
    form: str, key: str, password: str
) -> None:
    assume(not any(ch.isspace() for ch in password))
    for spelled in _spellings(password):
        uri = form.format(k=key, p=spelled)
        out = redact_uri(uri)
        if "@" not in spelled:
            assert out == form.format(k=key, p="***")
        else:  # it extends the userinfo of ``ff@db.example:5432`` (unsure: hide more)
            assert spelled not in out and password not in out
        assert "db.example" in out or "mlflow.example" in out


@given(password=PASSWORDS)
@example(password="a b' c")
@example(password="x\\'y z")
def test_a_quoted_libpq_password_is_hidden(password: str) -> None:
    dsn = f"host=db.example user=ff password = {_libpq_quoted(password)} dbname=mlflow"
    assert redact_uri(dsn) == "host=db.example user=ff password = *** dbname=mlflow"
    # Any spelling a driver message may quote is known to one_line's uri argument.
    out = one_line(f"connection failed: password {password!r} / {password} rejected", dsn)
    assert password not in out


@given(password=PASSWORDS)
def test_one_line_hides_the_spellings_of_the_configured_uri(password: str) -> None:
    assume(password not in "login for ff with ")
    uri = f"postgresql+psycopg://ff:{quote(password, safe='')}@db.example/mlflow"
    message = f"login for ff with {password} / {quote(password, safe='')} failed"
    out = one_line(message, uri, limit=10_000)
    assert password not in out and quote(password, safe="") not in out
    assert out.startswith("login for ff with ")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        # SQLAlchemy's password ends at the first '@' and may hold '/'; urllib's at the last.
        ("postgresql+psycopg://u:S3cret/PW@host/db", "postgresql+psycopg://u:***@host/db"),
        ("postgresql://u:a@b@host:5432/db", "postgresql://u:***@host:5432/db"),
        ("postgresql://u@x:pw@host/db", "postgresql://u@x:***@host/db"),
        ("postgresql://u:@host/db", "postgresql://u:***@host/db"),
        # No password: nothing changes (the state folder's name hashes this text).
        ("postgresql://u@host:5432/db", "postgresql://u@host:5432/db"),
        ("postgresql://host:5432/db?sslmode=require", "postgresql://host:5432/db?sslmode=require"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:///data/mlflow/mlruns.db", "sqlite:///data/mlflow/mlruns.db"),
        ("sqlite:////home/a:b@c/x.db", "sqlite:////home/a:b@c/x.db"),
        ("nowhere", "nowhere"),
        # Secret parameters, any case; other parameters stay.
        (
            "postgresql://h/db?user=u&PassWord=x%26y&sslmode=require",
            "postgresql://h/db?user=u&PassWord=***&sslmode=require",
        ),
        (
            "postgresql://h/db?sslkey=/k.pem&sslrootcert=/ca.pem",
            "postgresql://h/db?sslkey=***&sslrootcert=/ca.pem",
        ),
        ("host=h password='a b\\' c' port=5432", "host=h password=*** port=5432"),
        ("host=h password=a b port=5432", "host=h password=*** port=5432"),
        # When unsure, more is hidden: an '@' after the host extends the userinfo to it.
        ("postgresql://u:pw@host/db?application_name=me@x", "postgresql://u:***@x"),
    ],
)
def test_examples(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected


def test_the_spellings_a_message_may_quote() -> None:
    assert uri_secrets("postgresql://u:a%40b@h/db") == ["a%40b", "a@b"]
    assert uri_secrets("postgresql://u:p w@h/db?token=t+1") == ["p w", "t 1", "t+1"]
    assert uri_secrets("postgresql://u@h/db") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "tracking URI 'postgresql:/u:S3cret/PW@host/db' has no scheme",
            "tracking URI 'postgresql:/u:***@host/db' has no scheme",
        ),
        (
            "could not connect to postgresql://u:a b@host/db: refused",
            "could not connect to postgresql://u:***@host/db: refused",
        ),
        ("connect(password=hunter2 host=h) failed", "connect(password=*** host=h) failed"),
        # Ordinary text is left alone: paths with line numbers, key:value, e-mail addresses.
        (
            "quarantined: data/runs/a/seg.jsonl:12: bad key 'x:y' at offset 7 (ask me@example.org)",
            "quarantined: data/runs/a/seg.jsonl:12: bad key 'x:y' at offset 7 (ask me@example.org)",
        ),
        (
            "ff-sync: synced: 1 run, 3 events -> http://127.0.0.1:5000",
            "ff-sync: synced: 1 run, 3 events -> http://127.0.0.1:5000",
        ),
    ],
)
def test_one_line_examples(text: str, expected: str) -> None:
    assert one_line(text) == expected


def test_redaction_is_fast_on_long_hostile_input() -> None:
    import time

    hostile: list[Callable[[int], str]] = [
        lambda n: "postgresql://u:" + "@" * n,
        lambda n: "postgresql://u:" + "a:" * n + "@h",
        lambda n: "host=h " + "password=" * n,
        lambda n: "x " + "passkey" * n + "=1",
        lambda n: "x " + "passkey" * n,
        lambda n: "x " + "pass" * n + " " + "user:" * n,
        lambda n: "?token=" + "& " * n,
        lambda n: "password='\\' " * n,
        lambda n: "@ " + "https://b: " * n,
        lambda n: "@ " + "postgresql:b: " * n,
    ]
    # A guard against catastrophic backtracking (seconds to hours of CPU on these inputs),
    # not a benchmark: this process's CPU time, which other processes on the machine (the
    # other test worker) do not inflate as they do wall time.
    for make in hostile:
        text = make(20_000)
        started = time.process_time()
        redact_uri(text)
        one_line(text, text, limit=100)
        assert time.process_time() - started < 1.0, make(3)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("admin:S3cret/x@host/db", "admin:***@host/db"),
        ("mlflow:S3cret@db:5432/mlflow", "mlflow:***@db:5432/mlflow"),
        ("//u:S3cret@host/db", "//u:***@host/db"),
        ("S3cret@host", "***@host"),
    ],
)
def test_a_uri_without_a_scheme_hides_what_may_be_a_password(uri: str, expected: str) -> None:
    from formula_foundry.config import resolve_store_uri
    from formula_foundry.errors import ConfigError

    assert redact_uri(uri) == expected
    with pytest.raises(ConfigError) as err:  # the "no scheme" error quotes the URI
        resolve_store_uri(uri, Path("."))
    assert "S3cret" not in one_line(str(err.value))
