"""No password of the destination URI in any output of ``ff-sync`` or in any state file.

The destination is PostgreSQL on a port where nothing listens, so every command that
connects fails (exit 75) and prints the URI in its error; the ones that do not connect print
it in their status. The password is given on the command line or in the config file, raw or
percent-encoded, and holds every delimiter of a URI.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formula_foundry.sync.commands.cli import main

from .conftest import CONFIG, Project

ONE_RUN = 'with tracker.start_run(run_name="r") as r:\n    r.log_metric("m", 1.0)\n'
COMMANDS: list[tuple[str, ...]] = [
    (),
    ("status",),
    ("status", "--json"),
    ("status", "--all"),
    ("status", "--all", "--json"),
    ("verify",),
    ("verify", "--json"),
    ("watch", "--max-passes", "1", "--interval", "0.1"),
    ("gc", "--older-than", "0", "--dry-run"),
]
# Each holds characters that end a password early for some parser: '/', '@', ':', '?', '#',
# '%', '&', '=', quotes, spaces, a backslash, non-ASCII.
PASSWORDS = [
    "S3cret/PW",
    "p@ss/w:rd?x#y",
    "a@b@c/d//e%41:",
    "sp ace'q\"&x=1;y",
    "pässwörd€/@\\",
]


def _configure(project: Project, backend: str) -> None:
    """The project's config with ``backend`` (any characters) and no retries."""
    project.config.parent.mkdir(parents=True, exist_ok=True)
    project.config.write_text(
        CONFIG.format(backend=json.dumps(backend)[1:-1], lock_timeout=2.0, retries=0, backoff=0.01),
        encoding="utf-8",
    )


def _spellings(password: str) -> list[str]:
    return sorted({password, quote(password, safe=""), quote(password, safe="/:@")})


def _output_leaks(password: str, texts: dict[str, str], reference: str = "") -> list[str]:
    """The outputs that show a spelling of ``password`` (one the ``reference`` outputs, for
    another password, do not show)."""
    return [
        f"{name}: {text!r}"
        for name, text in texts.items()
        for s in _spellings(password)
        if s in text and s not in reference
    ]


def _file_leaks(password: str, state_dir: Path) -> list[str]:
    """The files under ``state_dir`` that hold a spelling of ``password`` (UTF-8 bytes)."""
    files = [p for p in sorted(state_dir.rglob("*")) if p.is_file()]
    assert files, f"no state under {state_dir}"
    return [str(p) for p in files for s in _spellings(password) if s.encode() in p.read_bytes()]


# Every password once, in turn on the command line and in the config, raw and encoded.
CASES = [
    pytest.param(password, where, encoded, id=f"{where}-{'encoded' if encoded else 'raw'}-{i}")
    for i, password in enumerate(PASSWORDS)
    for where, encoded in [
        [("option", False), ("config", True), ("config", False), ("option", True)][i % 4]
    ]
]


@pytest.mark.parametrize(("password", "where", "encoded"), CASES)
def test_no_command_prints_or_stores_the_password(
    project: Project, password: str, where: str, encoded: bool
) -> None:
    spelled = quote(password, safe="") if encoded else password
    uri = f"postgresql+psycopg://ff:{spelled}@127.0.0.1:1/mlflow"
    _configure(project, uri if where == "config" else "sqlite:///data/mlflow/mlruns.db")
    head = ("--tracking-uri", uri) if where == "option" else ()
    project.spool(ONE_RUN)
    # A destination synced before and down now: its state folder stays (a failed first pass
    # leaves none) and every pass rewrites its destination.txt.
    project.state_folder(uri).mkdir(parents=True)
    texts: dict[str, str] = {}
    for args in COMMANDS:
        result = project.ff_sync(*head, *args, timeout=120)
        name = " ".join(args) or "pass"
        texts[f"{name} stdout"], texts[f"{name} stderr"] = result.stdout, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        if args[:1] in ((), ("verify",)):  # 75, or 2 for a raw '@' SQLAlchemy misreads
            assert result.returncode in (2, 75), (args, result.stderr)
    # The outputs name the destination (user and host stay visible).
    assert "postgresql+psycopg://ff:***@" in texts["pass stderr"]
    assert "postgresql+psycopg://ff:***@127.0.0.1:1/mlflow" in texts["status stdout"]
    assert _output_leaks(password, texts) == []
    assert _file_leaks(password, project.state_dir) == []


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("where", ["option", "config"])
def test_a_uri_with_one_slash_or_none_is_refused_without_its_password(
    project: Project, password: str, where: str
) -> None:
    texts: dict[str, str] = {}
    for uri in (
        f"postgresql:/ff:{password}@127.0.0.1:1/mlflow",
        f"postgresql:ff:{password}@127.0.0.1:1/mlflow",
    ):
        _configure(project, uri if where == "config" else "sqlite:///data/mlflow/mlruns.db")
        head = ("--tracking-uri", uri) if where == "option" else ()
        for args in [(), ("status", "--json"), ("watch", "--max-passes", "1")]:
            result = project.ff_sync(*head, *args, timeout=60)
            assert result.returncode == 2, result.stderr
            assert "ff:***@127.0.0.1:1/mlflow" in result.stderr, result.stderr
            texts[f"{uri} {args} stderr"], texts[f"{uri} {args} stdout"] = (
                result.stderr,
                result.stdout,
            )
    assert _output_leaks(password, texts) == []


# Printable ASCII (every URI delimiter), control and non-ASCII characters; at least one
# that is no letter or digit, so that the password is no word of the normal output.
DRAWN = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00\n\r")
    | st.sampled_from(list("/@:?#%&='\" +;\\")),
    min_size=4,
    max_size=16,
).filter(lambda p: p.strip() == p and not p.isalnum())
REFERENCE = "Reference-Pw"


def _outputs(project: Project, uri: str) -> dict[str, str]:
    texts: dict[str, str] = {}
    for args in COMMANDS:
        result = CliRunner().invoke(
            main, ["--config", str(project.config), "--tracking-uri", uri, *args]
        )
        # 2: a raw '@' makes SQLAlchemy read a port that is no number or a host no resolver takes.
        assert result.exit_code in (0, 1, 2, 75), (args, result.output, result.exception)
        name = " ".join(args) or "pass"
        texts[f"{name} stdout"], texts[f"{name} stderr"] = result.stdout, result.stderr
    return texts


@given(password=DRAWN, encoded=st.booleans())
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_property_no_output_or_state_file_holds_a_drawn_password(
    project: Project, password: str, encoded: bool
) -> None:
    """The commands through ff-sync's click entry point, in process (fast enough for a
    property test). Redacted outputs do not depend on the password, so a spelling counts as
    a leak only if it is absent from the outputs for a reference password."""
    _configure(project, "sqlite:///data/mlflow/mlruns.db")
    if not project.spool_root.is_dir():
        project.spool(ONE_RUN)
    spelled = quote(password, safe="") if encoded else password
    uri = f"postgresql+psycopg://ff:{spelled}@127.0.0.1:1/mlflow"
    project.state_folder(uri).mkdir(parents=True, exist_ok=True)  # as in the test above
    texts = _outputs(project, uri)
    assert "ff:***@" in texts["pass stderr"], texts["pass stderr"]
    uri = f"postgresql+psycopg://ff:{REFERENCE}@127.0.0.1:1/mlflow"
    reference = "\n".join(_outputs(project, uri).values())
    assert _output_leaks(password, texts, reference) == []
    assert _file_leaks(password, project.state_dir) == []


def test_a_uri_sqlalchemy_cannot_parse_is_a_usage_error_without_its_password(
    project: Project,
) -> None:
    """A raw '@' in the password ends it for SQLAlchemy: the rest is read as host and port,
    here ``c:d``, a port that is not a number."""
    password = "a@b@c:d//e"
    _configure(project, "sqlite:///data/mlflow/mlruns.db")
    project.spool(ONE_RUN)
    uri = f"postgresql+psycopg://ff:{password}@127.0.0.1:1/mlflow"
    result = project.ff_sync("--tracking-uri", uri)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("ff-sync: error: ") and "ff:***@" in line, line
    assert password not in line and "internal error" not in line
