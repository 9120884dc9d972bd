"""config/mlflow.yaml plus environment overrides, as the tracker sees them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from formula_foundry.config import load_settings
from formula_foundry.errors import ConfigError
from formula_foundry.tracking import get_tracker

from ._helpers import only_segment

WriteConfig = Callable[[Path, str], Path]

# The configuration block of the workflow document, verbatim.
DOC_CONFIG = """\
tracking:
  # SQLite backend for experiment metadata
  backend_store_uri: "sqlite:///data/mlflow/mlruns.db"

  # Local artifact storage root
  artifact_root: "data/mlflow/artifacts"

  # Default experiment name
  default_experiment: "formula-foundry"
"""


def test_the_documented_default_file_gives_the_defaults(ff_project: Path) -> None:
    settings = load_settings()
    assert settings.config_path == ff_project / "config" / "mlflow.yaml"
    assert settings.project_root == ff_project
    assert settings.backend_store_uri == f"sqlite:///{ff_project}/data/mlflow/mlruns.db"
    assert settings.artifact_root == ff_project / "data" / "mlflow" / "artifacts"
    assert settings.default_experiment == "formula-foundry"
    assert settings.spool_root == ff_project / "data" / "runs"
    assert settings.durability == "write" and settings.disabled is False
    assert settings.artifact_store_root == ff_project / "data" / "artifacts"
    assert settings.sync_state_dir == ff_project / "data" / "sync"


def test_the_workflow_documents_config_block_loads(
    ff_project: Path, write_config: WriteConfig
) -> None:
    write_config(ff_project, DOC_CONFIG)
    settings = load_settings()
    assert settings.backend_store_uri == f"sqlite:///{ff_project}/data/mlflow/mlruns.db"
    assert settings.default_experiment == "formula-foundry"
    assert settings.spool_root == ff_project / "data" / "runs"  # a default


def test_no_file_means_defaults_rooted_at_the_working_directory(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.chdir(tmp_path)
    settings = load_settings()
    assert settings.config_path is None and settings.project_root == tmp_path
    assert settings.spool_root == tmp_path / "data" / "runs"
    assert settings.backend_store_uri == f"sqlite:///{tmp_path}/data/mlflow/mlruns.db"
    assert settings.sync_retries == 4 and settings.stale_after_s == 3600.0


def test_an_empty_file_or_empty_section_means_defaults(
    ff_project: Path, write_config: WriteConfig
) -> None:
    for text in ("", "# nothing\n", "tracking:\nspool:\n"):
        write_config(ff_project, text)
        assert load_settings().spool_root == ff_project / "data" / "runs"


def test_the_file_is_found_from_a_subfolder_and_spools_land_in_the_same_place(
    ff_project: Path, clean_env: pytest.MonkeyPatch, write_config: WriteConfig
) -> None:
    write_config(ff_project, 'spool:\n  root: "spool/here"\n')
    deep = ff_project / "src" / "jobs" / "deep"
    deep.mkdir(parents=True)
    clean_env.chdir(deep)
    tracker = get_tracker()
    assert tracker.settings.project_root == ff_project
    assert tracker.settings.spool_root == ff_project / "spool" / "here"
    with tracker.start_run() as run:
        run.log_metric("m", 1.0)
    assert only_segment(ff_project / "spool" / "here", run.run_id)
    assert not (deep / "spool").exists() and not (deep / "data").exists()


def test_relative_paths_resolve_against_the_project_root_not_the_cwd(
    ff_project: Path, clean_env: pytest.MonkeyPatch, write_config: WriteConfig
) -> None:
    write_config(
        ff_project,
        "tracking:\n"
        '  backend_store_uri: "sqlite:///db/x.db"\n'
        '  artifact_root: "arts"\n'
        "spool:\n"
        '  root: "../outside/spool"\n'
        "artifacts:\n"
        '  store_root: "/abs/store"\n'
        "sync:\n"
        '  state_dir: "state"\n',
    )
    elsewhere = ff_project / "sub"
    elsewhere.mkdir()
    clean_env.chdir(elsewhere)
    s = load_settings()
    assert s.backend_store_uri == f"sqlite:///{ff_project}/db/x.db"
    assert s.artifact_root == ff_project / "arts"
    assert s.spool_root == ff_project / ".." / "outside" / "spool"
    assert s.artifact_store_root == Path("/abs/store")
    assert s.sync_state_dir == ff_project / "state"


@pytest.mark.parametrize(
    "uri",
    ["sqlite:////abs/db.sqlite", "sqlite:///:memory:", "postgresql://u:p@h/db", "http://h:5000"],
)
def test_absolute_and_remote_uris_are_kept(
    ff_project: Path, write_config: WriteConfig, uri: str
) -> None:
    write_config(ff_project, f'tracking:\n  backend_store_uri: "{uri}"\n')
    assert load_settings().backend_store_uri == uri


def test_ff_config_points_to_a_file_anywhere(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, write_config: WriteConfig
) -> None:
    other = tmp_path / "other"
    path = write_config(other, 'spool:\n  root: "s"\n')
    clean_env.chdir(tmp_path)
    clean_env.setenv("FF_CONFIG", str(path))
    settings = load_settings()
    assert settings.config_path == path and settings.project_root == other
    assert settings.spool_root == other / "s"
    # A file outside a config/ folder anchors at its own folder.
    loose = tmp_path / "loose.yaml"
    loose.write_text('spool:\n  root: "s"\n')
    clean_env.setenv("FF_CONFIG", "loose.yaml")  # relative to the cwd
    settings = load_settings()
    assert settings.config_path == loose and settings.spool_root == tmp_path / "s"


def test_ff_config_wins_over_discovery(
    ff_project: Path, clean_env: pytest.MonkeyPatch, write_config: WriteConfig
) -> None:
    other = write_config(ff_project / "elsewhere", 'spool:\n  root: "other"\n')
    clean_env.setenv("FF_CONFIG", str(other))
    assert get_tracker().settings.spool_root == ff_project / "elsewhere" / "other"


def test_ff_config_to_a_missing_file_is_an_error(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.chdir(tmp_path)
    clean_env.setenv("FF_CONFIG", "nope.yaml")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert str(e.value) == f"FF_CONFIG points to {tmp_path / 'nope.yaml'}, which is not a file"
    with pytest.raises(ConfigError, match=r"^config file /no/such\.yaml does not exist$"):
        load_settings("/no/such.yaml")


def test_environment_overrides_resolve_against_the_cwd(
    ff_project: Path, clean_env: pytest.MonkeyPatch
) -> None:
    sub = ff_project / "sub"
    sub.mkdir()
    clean_env.chdir(sub)
    clean_env.setenv("MLFLOW_TRACKING_URI", "sqlite:///local.db")
    clean_env.setenv("FF_SPOOL_ROOT", "myspool")
    clean_env.setenv("FF_DURABILITY", "fsync")
    s = load_settings()
    assert s.backend_store_uri == f"sqlite:///{sub}/local.db"
    assert s.spool_root == sub / "myspool"
    assert s.durability == "fsync"
    clean_env.setenv("MLFLOW_TRACKING_URI", "postgresql://u@h/db")
    clean_env.setenv("FF_SPOOL_ROOT", "/abs/spool")
    s = load_settings()
    assert s.backend_store_uri == "postgresql://u@h/db" and s.spool_root == Path("/abs/spool")
    tracker = get_tracker()
    assert tracker.settings.spool_root == Path("/abs/spool")


@pytest.mark.parametrize(
    ("value", "disabled"),
    [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("no", False)],
)
def test_ff_tracking_disabled(
    ff_project: Path, clean_env: pytest.MonkeyPatch, value: str, disabled: bool
) -> None:
    clean_env.setenv("FF_TRACKING_DISABLED", value)
    assert load_settings().disabled is disabled


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("FF_TRACKING_DISABLED", "maybe", "FF_TRACKING_DISABLED must be 1 or 0, got 'maybe'"),
        (
            "FF_DURABILITY",
            "sometimes",
            "FF_DURABILITY must be one of write, fsync, buffered, got 'sometimes'",
        ),
        (
            "MLFLOW_TRACKING_URI",
            "mlruns",
            "MLFLOW_TRACKING_URI: tracking URI 'mlruns' has no scheme; use sqlite:///path, "
            "postgresql://..., or http(s)://host:port",
        ),
    ],
)
def test_bad_environment_values_are_errors_naming_the_variable(
    ff_project: Path, clean_env: pytest.MonkeyPatch, var: str, value: str, message: str
) -> None:
    clean_env.setenv(var, value)
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tracking: [unclosed\n", " (line 2): not valid YAML: expected ',' or ']', but got"),
        (
            "tracking:\n  a: 1\n b: 2\n",
            " (line 3): not valid YAML: expected <block end>, but found '<block mapping start>'",
        ),
        (
            "tracking:\n\tbackend_store_uri: x\n",
            " (line 2): not valid YAML: found character '\\t' that cannot start any token",
        ),
        ("- a\n- b\n", ": the top level must be a mapping of sections"),
        ("spool: 5\n", ": section 'spool' must be a mapping"),
        (
            "spool:\n  durabilty: fsync\n",
            ": unknown key spool.durabilty (known: root, durability, heartbeat_s)",
        ),
        ("bogus:\n  x: 1\n", ": unknown section 'bogus' (known: tracking, spool, artifacts, sync)"),
        ("spool:\n  root: 5\n", ": spool.root must be str, got 5"),
        ("spool:\n  heartbeat_s: true\n", ": spool.heartbeat_s must be int or float, got True"),
        ("tracking:\n  disabled: 'no'\n", ": tracking.disabled must be bool, got 'no'"),
        ("sync:\n  retries: 1.5\n", ": sync.retries must be int, got 1.5"),
        ("sync:\n  retries: -1\n", ": sync.retries must be >= 0, got -1"),
        ("sync:\n  backoff_s: -0.5\n", ": sync.backoff_s must be >= 0, got -0.5"),
        ("sync:\n  workers: 0\n", ": sync.workers must be between 1 and 64, got 0"),
        ("sync:\n  workers: 65\n", ": sync.workers must be between 1 and 64, got 65"),
        (
            "spool:\n  durability: sometimes\n",
            ": spool.durability must be one of write, fsync, buffered, got 'sometimes'",
        ),
        (
            "tracking:\n  backend_store_uri: mlruns\n",
            ": tracking.backend_store_uri: tracking URI 'mlruns' has no scheme; use "
            "sqlite:///path, postgresql://..., or http(s)://host:port",
        ),
        (
            'tracking:\n  default_experiment: " "\n',
            ": tracking.default_experiment must not be empty",
        ),
    ],
)
def test_a_malformed_file_is_an_error_naming_the_file_and_the_key(
    ff_project: Path, write_config: WriteConfig, text: str, message: str
) -> None:
    path = write_config(ff_project, text)
    with pytest.raises(ConfigError) as e:
        get_tracker()
    assert str(e.value).startswith(f"{path}{message}"), str(e.value)
    assert "\n" not in str(e.value)
    assert not (ff_project / "data").exists()


def test_a_file_that_is_not_utf8_is_an_error(ff_project: Path) -> None:
    path = ff_project / "config" / "mlflow.yaml"
    path.write_bytes(b"tracking:\n  default_experiment: \xff\n")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert str(e.value) == f"{path}: not valid UTF-8 (byte 32)"
