"""Settings: ``config/mlflow.yaml`` plus environment overrides, resolved into a frozen object.

This is the only module that reads YAML, and it imports ``yaml`` only when a file is actually
read, so ``import formula_foundry.tracking`` stays cheap.

Where the file is found:

1. ``$FF_CONFIG`` (a path to the YAML file), else
2. ``config/mlflow.yaml`` in the working directory or the nearest parent that has one
   (a job started from a subfolder of the project spools to the same place), else
3. no file: the documented defaults, with the working directory as project root.

Relative paths in the file resolve against the *project root* (the folder holding ``config/``).
Relative paths in environment variables resolve against the working directory, like any
path typed in a shell. Overrides: ``MLFLOW_TRACKING_URI`` (backend store URI),
``FF_SPOOL_ROOT`` (spool root), ``FF_TRACKING_DISABLED`` (1/true/yes: no-op tracker),
``FF_DURABILITY`` (write | fsync | buffered), ``FF_SYSTEM_METRICS`` (1/0),
``FF_SYSTEM_METRICS_INTERVAL_S`` (seconds), ``FF_SYSTEM_METRICS_NODE`` (a name),
``FF_CAPTURE_OUTPUT`` (1/0), ``FF_CONSOLE_MAX_BYTES`` (bytes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from formula_foundry.errors import ConfigError
from formula_foundry.redact import redact_uri

CONFIG_RELPATH = Path("config") / "mlflow.yaml"
DURABILITY_MODES = ("write", "fsync", "buffered")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

# The schema of config/mlflow.yaml: section -> key -> (type, default). Defaults are what a
# missing file means; docs/configuration.md documents each key.
_SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "tracking": {
        "backend_store_uri": (str, "sqlite:///data/mlflow/mlruns.db"),
        "artifact_root": (str, "data/mlflow/artifacts"),
        "default_experiment": (str, "formula-foundry"),
        "disabled": (bool, False),
        # System metrics of the runs a process starts (docs/observability.md); off by default.
        "system_metrics": (bool, False),
        "system_metrics_interval_s": ((int, float), 10.0),
        "system_metrics_node": (str, ""),
        # Console capture of the runs a process starts (docs/observability.md); off by default.
        "capture_output": (bool, False),
        # Bytes of output one process spools into one run; what comes after is counted only.
        "console_max_bytes": (int, 100 * 1024 * 1024),
    },
    "spool": {
        "root": (str, "data/runs"),
        "durability": (str, "write"),
        "heartbeat_s": ((int, float), 60.0),
    },
    "artifacts": {
        "store_root": (str, "data/artifacts"),
    },
    "sync": {
        "state_dir": (str, "data/sync"),
        "lock_timeout_s": ((int, float), 10.0),
        "retries": (int, 4),
        "backoff_s": ((int, float), 1.0),
        "stale_after_s": ((int, float), 3600.0),
        "bulk": (bool, True),
        "workers": (int, 4),
        # Logged files larger than this are referenced, not uploaded (null: upload all).
        "upload_max_bytes": ((int, type(None)), None),
    },
}


@dataclass(frozen=True)
class Settings:
    """Every setting formula-foundry uses, with paths already absolute."""

    project_root: Path
    config_path: Path | None
    backend_store_uri: str
    artifact_root: Path
    default_experiment: str
    disabled: bool
    spool_root: Path
    durability: str
    heartbeat_s: float
    artifact_store_root: Path
    sync_state_dir: Path
    sync_lock_timeout_s: float
    sync_retries: int
    sync_backoff_s: float
    stale_after_s: float
    sync_bulk: bool
    sync_workers: int
    sync_upload_max_bytes: int | None
    system_metrics: bool = False
    system_metrics_interval_s: float = 10.0
    # The node part of system metric names (system/<node>/...); None: decided per process.
    system_metrics_node: str | None = None
    capture_output: bool = False
    console_max_bytes: int = 100 * 1024 * 1024
    raw: Mapping[str, Mapping[str, Any]] = field(repr=False, compare=False, default_factory=dict)


def find_config(start: Path | None = None) -> Path | None:
    """Return the config file to use: ``$FF_CONFIG``, else the nearest ``config/mlflow.yaml``."""
    env = os.environ.get("FF_CONFIG")
    if env:
        path = Path(env).expanduser().absolute()
        if not path.is_file():
            raise ConfigError(f"FF_CONFIG points to {path}, which is not a file")
        return path
    here = (start or Path.cwd()).absolute()
    for folder in (here, *here.parents):
        candidate = folder / CONFIG_RELPATH
        if candidate.is_file():
            return candidate
    return None


def load_settings(config_path: Path | str | None = None, *, start: Path | None = None) -> Settings:
    """Load settings from ``config_path`` (or the discovered file) and the environment."""
    path = Path(config_path).expanduser().absolute() if config_path else find_config(start)
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    values = _read_values(path)
    if path is not None:
        # config/mlflow.yaml sits in <root>/config/; a file elsewhere (FF_CONFIG) anchors at
        # its own folder's parent only when that folder is called config.
        root = path.parent.parent if path.parent.name == "config" else path.parent
    else:
        root = (start or Path.cwd()).absolute()
    return _build(values, path, root)


def _read_values(path: Path | None) -> dict[str, dict[str, Any]]:
    values = {sec: {k: spec[1] for k, spec in keys.items()} for sec, keys in _SCHEMA.items()}
    if path is None:
        return values
    import yaml  # deferred: only a config read pays for it

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or _first_line(exc)
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    if loaded is None:
        return values
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for section, body in loaded.items():
        if section not in _SCHEMA:
            known = ", ".join(_SCHEMA)
            raise ConfigError(f"{path}: unknown section {section!r} (known: {known})")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        for key, value in body.items():
            spec = _SCHEMA[section].get(key)
            if spec is None:
                known = ", ".join(_SCHEMA[section])
                raise ConfigError(f"{path}: unknown key {section}.{key} (known: {known})")
            values[section][key] = _check_type(path, f"{section}.{key}", value, spec[0])
    return values


def _check_type(path: Path, name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a YAML `true` where a number belongs is a mistake.
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        want = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{path}: {name} must be {want}, got {value!r}")
    return value


def _build(values: dict[str, dict[str, Any]], path: Path | None, root: Path) -> Settings:
    where = str(path) if path else "defaults"
    tr, sp, ar, sy = values["tracking"], values["spool"], values["artifacts"], values["sync"]

    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    # On a compute node MLFLOW_TRACKING_URI=spool:... sends MLflow code into the spool (the
    # drop-in): it names the spool, never the destination ff-sync replays into.
    env_spool_uri = None
    if env_uri and env_uri.startswith(SPOOL_SCHEME + ":"):
        env_spool_uri, env_uri = env_uri, None
    try:
        uri = resolve_store_uri(tr["backend_store_uri"], root)
    except ConfigError as exc:
        raise ConfigError(f"{where}: tracking.backend_store_uri: {exc}") from None
    if env_uri:
        try:
            uri = resolve_store_uri(env_uri, Path.cwd())
        except ConfigError as exc:
            raise ConfigError(f"MLFLOW_TRACKING_URI: {exc}") from None

    spool_root = _path(root, sp["root"])
    env_spool = os.environ.get("FF_SPOOL_ROOT")
    if env_spool:
        spool_root = _path(Path.cwd(), env_spool)
    elif env_spool_uri:
        try:
            named = spool_uri_path(env_spool_uri)
        except ConfigError as exc:
            raise ConfigError(f"MLFLOW_TRACKING_URI: {exc}") from None
        if named:
            spool_root = _path(Path.cwd(), named)

    durability = os.environ.get("FF_DURABILITY") or sp["durability"]
    if durability not in DURABILITY_MODES:
        src = "FF_DURABILITY" if os.environ.get("FF_DURABILITY") else f"{where}: spool.durability"
        raise ConfigError(f"{src} must be one of {', '.join(DURABILITY_MODES)}, got {durability!r}")

    disabled = bool(tr["disabled"])
    env_disabled = os.environ.get("FF_TRACKING_DISABLED")
    if env_disabled is not None:
        flag = env_disabled.strip().lower()
        if flag not in _TRUE | _FALSE:
            raise ConfigError(f"FF_TRACKING_DISABLED must be 1 or 0, got {env_disabled!r}")
        disabled = flag in _TRUE
    system_metrics, interval_s, node = _system_metrics(tr, where)
    capture_output, console_max_bytes = _console(tr, where)

    for name, value in (
        ("spool.heartbeat_s", sp["heartbeat_s"]),
        ("sync.lock_timeout_s", sy["lock_timeout_s"]),
        ("sync.backoff_s", sy["backoff_s"]),
        ("sync.stale_after_s", sy["stale_after_s"]),
        ("sync.retries", sy["retries"]),
    ):
        if value < 0:
            raise ConfigError(f"{where}: {name} must be >= 0, got {value!r}")
    if sy["upload_max_bytes"] is not None and sy["upload_max_bytes"] < 0:
        raise ConfigError(
            f"{where}: sync.upload_max_bytes must be >= 0 or null, got {sy['upload_max_bytes']!r}"
        )
    if not 1 <= sy["workers"] <= 64:
        raise ConfigError(f"{where}: sync.workers must be between 1 and 64, got {sy['workers']!r}")
    if not tr["default_experiment"].strip():
        raise ConfigError(f"{where}: tracking.default_experiment must not be empty")

    return Settings(
        project_root=root,
        config_path=path,
        backend_store_uri=uri,
        artifact_root=_path(root, tr["artifact_root"]),
        default_experiment=tr["default_experiment"],
        disabled=disabled,
        spool_root=spool_root,
        durability=durability,
        heartbeat_s=float(sp["heartbeat_s"]),
        artifact_store_root=_path(root, ar["store_root"]),
        sync_state_dir=_path(root, sy["state_dir"]),
        sync_lock_timeout_s=float(sy["lock_timeout_s"]),
        sync_retries=int(sy["retries"]),
        sync_backoff_s=float(sy["backoff_s"]),
        stale_after_s=float(sy["stale_after_s"]),
        sync_bulk=bool(sy["bulk"]),
        sync_workers=int(sy["workers"]),
        sync_upload_max_bytes=sy["upload_max_bytes"],
        system_metrics=system_metrics,
        system_metrics_interval_s=interval_s,
        system_metrics_node=node,
        capture_output=capture_output,
        console_max_bytes=console_max_bytes,
        raw=values,
    )


# What a node name may hold: one component of a metric key (MLflow's key characters, no "/").
_NODE_NAME = re.compile(r"[\w.\- :]{1,100}")


def _system_metrics(tr: Mapping[str, Any], where: str) -> tuple[bool, float, str | None]:
    """tracking.system_metrics*, each overridden by its FF_SYSTEM_METRICS* variable."""
    on = bool(tr["system_metrics"])
    env_on = os.environ.get("FF_SYSTEM_METRICS")
    if env_on is not None:
        flag = env_on.strip().lower()
        if flag not in _TRUE | _FALSE:
            raise ConfigError(f"FF_SYSTEM_METRICS must be 1 or 0, got {env_on!r}")
        on = flag in _TRUE
    interval: Any = tr["system_metrics_interval_s"]
    src = f"{where}: tracking.system_metrics_interval_s"
    env_interval = os.environ.get("FF_SYSTEM_METRICS_INTERVAL_S")
    if env_interval:
        src = "FF_SYSTEM_METRICS_INTERVAL_S"
        try:
            interval = float(env_interval)
        except ValueError:
            raise ConfigError(f"{src} must be a number of seconds, got {env_interval!r}") from None
    if not 0.01 <= interval <= 86400:  # NaN fails too
        raise ConfigError(f"{src} must be between 0.01 and 86400 seconds, got {interval!r}")
    node = os.environ.get("FF_SYSTEM_METRICS_NODE") or tr["system_metrics_node"]
    if node:
        node_src = (
            "FF_SYSTEM_METRICS_NODE"
            if os.environ.get("FF_SYSTEM_METRICS_NODE")
            else f"{where}: tracking.system_metrics_node"
        )
        if not _NODE_NAME.fullmatch(node) or node.strip(". ") == "":
            raise ConfigError(
                f"{node_src} must be 1-100 letters, digits, '_', '-', '.', ':' or spaces (no "
                f"'/'; it becomes one part of the names system/<node>/...), got {node!r}"
            )
    return on, float(interval), node or None


def _console(tr: Mapping[str, Any], where: str) -> tuple[bool, int]:
    """tracking.capture_output and tracking.console_max_bytes, each overridden by its
    variable (FF_CAPTURE_OUTPUT, FF_CONSOLE_MAX_BYTES)."""
    on = _flag("FF_CAPTURE_OUTPUT", bool(tr["capture_output"]))
    limit: int = tr["console_max_bytes"]
    src = f"{where}: tracking.console_max_bytes"
    env_limit = os.environ.get("FF_CONSOLE_MAX_BYTES")
    if env_limit:
        src = "FF_CONSOLE_MAX_BYTES"
        try:
            limit = int(env_limit.strip())
        except ValueError:
            raise ConfigError(f"{src} must be a whole number of bytes, got {env_limit!r}") from None
    if limit < 0:
        raise ConfigError(f"{src} must be >= 0 bytes, got {limit!r}")
    return on, limit


def _flag(variable: str, default: bool) -> bool:
    """``default``, unless the environment variable says 1 or 0 (true/false, yes/no, on/off)."""
    value = os.environ.get(variable)
    if value is None:
        return default
    flag = value.strip().lower()
    if flag not in _TRUE | _FALSE:
        raise ConfigError(f"{variable} must be 1 or 0, got {value!r}")
    return flag in _TRUE


def _path(root: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (root / p)


SPOOL_SCHEME = "spool"


def spool_uri_path(uri: str) -> str:
    """The folder a ``spool:`` URI names, as written (``""`` for bare ``spool:``: the
    configured spool root). ``spool:///abs``, ``spool:rel``; never a host, query or fragment."""
    from urllib.parse import unquote

    if not uri.startswith(SPOOL_SCHEME + ":"):
        raise ConfigError(
            f"{uri!r} is not a spool URI (expected spool:///path, spool:path or spool:)"
        )
    rest = uri[len(SPOOL_SCHEME) + 1 :]
    if "?" in rest or "#" in rest:
        raise ConfigError(f"spool URI {uri!r}: a query or fragment means nothing here; remove it")
    if rest.startswith("//"):
        host, sep, path = rest[2:].partition("/")
        if host not in ("", "localhost"):
            raise ConfigError(
                f"spool URI {uri!r} names host {host!r}: a spool is a folder this machine sees; "
                "write spool:///abs/path (three slashes) or spool:relative/path"
            )
        if not sep:
            raise ConfigError(f"spool URI {uri!r} names no folder; write spool:///abs/path")
        rest = sep + path
    rest = unquote(rest)
    if "\x00" in rest:
        raise ConfigError(f"spool URI {uri!r} contains a NUL character")
    return rest


def resolve_store_uri(uri: str, root: Path) -> str:
    """Make a relative ``sqlite:///`` path absolute against ``root``; leave other URIs alone."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        rest = uri[len(prefix) :]
        if rest and not rest.startswith("/") and not rest.startswith(":memory:"):
            return prefix + str((root / rest).absolute())
    elif uri.startswith(SPOOL_SCHEME + ":"):
        raise ConfigError(
            f"tracking URI {redact_uri(uri)!r} is a spool: ff-sync replays spools into an MLflow "
            "store; set tracking.backend_store_uri to sqlite:///..., postgresql://... or "
            "http(s)://host:port (spool: URIs are for MLflow code on compute nodes)"
        )
    elif "://" not in uri:
        raise ConfigError(
            f"tracking URI {redact_uri(uri)!r} has no scheme; use sqlite:///path, "
            "postgresql://..., or http(s)://host:port"
        )
    return uri


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
