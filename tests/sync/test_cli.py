"""The ff-sync command: exit codes and exact error lines (click's CliRunner, in process)."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import filelock
import pytest
from click.testing import CliRunner

from formula_foundry.sync.commands.cli import main

from .conftest import Project

SUMMARY = re.compile(
    r"^ff-sync: (synced|nothing new): \d+ runs?, \d+ events?, \d+ quarantined"
    r"(, \d+ refused)?(, \d+ waiting)? in \d+\.\d\d s -> \S+\n$"
)


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), prog_name="ff-sync")
    return result.exit_code, result.stdout, result.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_help_documents_the_options_and_exit_codes() -> None:
    code, out, _ = _invoke("--help")
    assert code == 0
    for text in (
        "--config",
        "--tracking-uri",
        "--spool-root",
        "--replay",
        "Exit codes:",
        "0   everything pending was synced",
        "75  destination unavailable",
    ):
        assert text in out


def test_a_pass_prints_one_summary_line_and_exits_0(project: Project) -> None:
    project.spool('with tracker.start_run(run_name="r") as r:\n    r.log_metric("m", 1.0)\n')
    code, out, err = _invoke("--config", str(project.config))
    # The first pass creates the store, and says so (a typo in the path would too).
    assert (code, err) == (
        0,
        f"ff-sync: warning: creating a new MLflow store at {project.db} (no file there yet; "
        "if the path is a typo, delete that file and its state folder and fix the tracking "
        "URI)\n",
    )
    assert SUMMARY.match(out) and out.startswith("ff-sync: synced: 1 run, 3 events, 0 quarantined")
    assert out.rstrip().endswith(f"-> {project.uri}")
    code, out, err = _invoke("--config", str(project.config))
    assert (code, err) == (0, "")
    assert out.startswith("ff-sync: nothing new: 0 runs, 0 events, 0 quarantined")


def test_command_line_overrides_win_over_config_and_environment(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.spool('with tracker.start_run(run_name="r") as r:\n    r.log_metric("m", 1.0)\n')
    moved = tmp_path / "elsewhere"
    project.spool_root.rename(moved)
    other = tmp_path / "other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    monkeypatch.setenv("FF_SPOOL_ROOT", str(tmp_path / "env-spool"))
    code, out, _ = _invoke(
        "--config",
        str(project.config),
        "--spool-root",
        str(moved),
        "--tracking-uri",
        f"sqlite:///{other}",
    )
    assert code == 0 and "1 run" in out and out.rstrip().endswith(f"-> sqlite:///{other}")
    assert other.exists() and not project.db.exists() and not (tmp_path / "env.db").exists()


def test_a_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    code, out, err = _invoke("--config", str(missing))
    assert (code, out) == (2, "")
    assert err == f"ff-sync: error: config file {missing} does not exist\n"


def test_an_invalid_config_is_a_usage_error(project: Project) -> None:
    project.config.write_text("sync:\n  retries: many\n")
    code, _, err = _invoke("--config", str(project.config))
    assert code == 2
    assert err == f"ff-sync: error: {project.config}: sync.retries must be int, got 'many'\n"


def test_a_uri_without_scheme_or_with_an_unknown_one_is_a_usage_error(project: Project) -> None:
    code, _, err = _invoke("--config", str(project.config), "--tracking-uri", "nowhere")
    assert code == 2
    assert err == (
        "ff-sync: error: tracking URI 'nowhere' has no scheme; use sqlite:///path, "
        "postgresql://..., or http(s)://host:port\n"
    )
    code, _, err = _invoke("--config", str(project.config), "--tracking-uri", "ftp://u:pw@h/x")
    assert code == 2
    assert err == (
        "ff-sync: error: tracking URI 'ftp://u:***@h/x' has an unsupported scheme 'ftp'; use "
        "sqlite:///path, postgresql://..., or http(s)://host:port\n"
    )


def test_a_second_sync_of_the_same_destination_waits_then_exits_75(project: Project) -> None:
    project.configure(lock_timeout=0.2)
    folder = project.state_folder()
    folder.mkdir(parents=True)
    with filelock.FileLock(str(folder / "sync.lock")):
        code, out, err = _invoke("--config", str(project.config))
    assert (code, out) == (75, "")
    assert err == (
        f"ff-sync: error: another ff-sync is syncing to {project.uri} (lock "
        f"{folder / 'sync.lock'} still held after 0.2 s); try again later\n"
    )
    assert _invoke("--config", str(project.config))[0] == 0


def test_an_unreachable_server_exits_75_and_never_prints_the_password(project: Project) -> None:
    project.configure(retries=0)
    project.spool('with tracker.start_run(run_name="r") as r:\n    r.log_metric("m", 1.0)\n')
    port = _closed_port()
    uri = f"postgresql://ff:s3cret-pw@127.0.0.1:{port}/mlflow"
    code, out, err = _invoke("--config", str(project.config), "--tracking-uri", uri)
    assert code == 75 and out == ""
    assert "s3cret" not in err
    (line,) = err.splitlines()
    assert line.startswith(
        f"ff-sync: error: postgresql://ff:***@127.0.0.1:{port}/mlflow is "
        "unavailable (open the store): "
    )
    assert line.endswith("(gave up after 1 attempt); nothing was lost, run ff-sync again later")
    # State and progress of that destination would live apart, named without the password;
    # a first attempt that failed leaves no state folder (it would hold back ff-sync gc).
    key = project.state_folder(uri).name
    assert key.startswith("postgresql-") and "s3cret" not in key
    assert not project.state_folder(uri).exists()


def test_without_mlflow_it_says_how_to_install_it_and_exits_2(project: Project) -> None:
    project.spool('with tracker.start_run(run_name="r") as r:\n    r.log_metric("m", 1.0)\n')
    result = project.python(
        """
        import sys
        sys.modules["mlflow"] = None  # as if MLflow were not installed
        from formula_foundry.sync.commands.cli import main
        main(["--config", sys.argv[1]], prog_name="ff-sync")
        """,
        str(project.config),
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "ff-sync: error: MLflow is not installed on this host; run: "
        "pip install 'formula-foundry[tracking]'\n"
    )


def test_python_dash_m_is_the_same_command(project: Project) -> None:
    result = project.python(
        "import runpy, sys\nsys.argv = ['ff-sync', '--help']\n"
        "runpy.run_module('formula_foundry.sync', run_name='__main__')",
        check=False,
    )
    assert result.returncode == 0 and "Usage: ff-sync [OPTIONS]" in result.stdout


def test_on_a_terminal_it_shows_progress_while_it_works(project: Project) -> None:
    import os
    import pty
    import subprocess

    project.spool(
        'with tracker.start_run(run_name="r") as r:\n'
        "    for i in range(3000):\n"
        '        r.log_metric("m", float(i), step=i)\n'
    )
    main_fd, term = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "formula_foundry.sync", "--config", str(project.config)],
        cwd=project.root, env=project.env(), stdout=subprocess.PIPE, stderr=term,
    )  # fmt: skip
    os.close(term)
    seen = b""
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    out, _ = proc.communicate(timeout=120)
    os.close(main_fd)
    assert proc.returncode == 0
    assert b"\rff-sync: run 1/1, " in seen and b" metrics" in seen
    # The progress line is cleared before the detail lines (here: the new store) and summary.
    assert b"\r\x1b[Kff-sync: warning: creating a new MLflow store at " in seen
    assert seen.rstrip(b"\r\n").endswith(b"fix the tracking URI)")
    assert out.startswith(b"ff-sync: synced: 1 run, 3002 events")


def test_a_bug_is_one_line_and_exit_70_never_a_partial_success(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    import formula_foundry.sync.commands.cli as cli

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("surprise")

    monkeypatch.setattr(cli, "sync_once", broken)
    code, out, err = _invoke("--config", str(project.config))
    assert (code, out) == (70, "")
    assert err == (
        "ff-sync: internal error: KeyError: 'surprise' (set FF_DEBUG=1 for the traceback; "
        "please report it)\n"
    )
