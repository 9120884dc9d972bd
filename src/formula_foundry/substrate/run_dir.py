"""Run directories: one folder per run under a run root, with a fixed layout.

Layout of ``<run_root>/<run_id>/``::

    manifest.json         the run's Manifest (canonical JSON, written atomically)
    outputs/              files the run produces
    logs/                 the run's log files
    tracking_runs.jsonl   one JSON line per tracking run linked to this directory

Run ids follow the one rule of :mod:`formula_foundry.ids` (1-128 letters, digits, ``.``, ``_``,
``-``, starting with a letter or digit): a run id is always exactly one path component below the
run root, portable across filesystems, and never hidden.

``tracking_runs.jsonl`` records are canonical JSON objects
``{"experiment", "run_name", "run_uuid", "time_ms"}`` (``run_uuid``: the tracking run's spool
run id, whatever its form), one per line, each appended with a single
``O_APPEND`` write so concurrent processes never interleave within a line. Reader contract: a
last line without ``\\n`` is an unfinished write and is skipped; NUL bytes before a line (a hole
left on a shared filesystem by a crashed client) are ignored; an unparseable line is skipped
with a warning and reading goes on.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final, overload

from formula_foundry.ids import RUN_ID_MAX_LENGTH, run_id_problem
from formula_foundry.substrate import canonical_json
from formula_foundry.substrate.atomic import fsync_dir, write_all
from formula_foundry.substrate.determinism import DeterminismConfig
from formula_foundry.substrate.errors import (
    InvalidRunId,
    RunDirExists,
    SubstrateError,
    ValidationError,
)
from formula_foundry.substrate.manifest import Manifest

__all__ = [
    "RUN_ID_MAX_LENGTH",
    "RunArtifacts",
    "create_run",
    "init_run_dir",
    "new_run_id",
    "validate_run_id",
]

_log = logging.getLogger(__name__)

_CREATE_ATTEMPTS: Final = 8


def validate_run_id(run_id: object) -> str:
    """Return ``run_id`` if it is a valid run id (the rule: :mod:`formula_foundry.ids`), a safe
    single directory name, else raise :class:`InvalidRunId`."""
    problem = run_id_problem(run_id)
    if problem is not None:
        raise InvalidRunId(problem)
    assert isinstance(run_id, str)
    return run_id


def new_run_id(now: datetime | None = None) -> str:
    """A sortable id: UTC time to the millisecond plus 32 random bits, e.g.
    ``20250102T030405.678Z-1a2b3c4d``."""
    moment = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    stamp = moment.strftime("%Y%m%dT%H%M%S") + f".{moment.microsecond // 1000:03d}Z"
    return f"{stamp}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class RunArtifacts:
    """A run directory: ``run_id``, absolute ``run_dir`` and the paths of its layout."""

    run_id: str
    run_dir: Path

    def __post_init__(self) -> None:
        validate_run_id(self.run_id)
        # The tracker stores run_dir in tags; a relative path would depend on its cwd.
        object.__setattr__(self, "run_dir", Path(os.path.abspath(self.run_dir)))

    @property
    def manifest_path(self) -> Path:
        """``<run_dir>/manifest.json``."""
        return self.run_dir / "manifest.json"

    @property
    def outputs_dir(self) -> Path:
        """``<run_dir>/outputs/``: files the run produces."""
        return self.run_dir / "outputs"

    @property
    def logs_dir(self) -> Path:
        """``<run_dir>/logs/``: the run's logs."""
        return self.run_dir / "logs"

    @property
    def tracking_runs_path(self) -> Path:
        """``<run_dir>/tracking_runs.jsonl``: tracking runs linked to this directory."""
        return self.run_dir / "tracking_runs.jsonl"

    def write_manifest(self, manifest: Manifest) -> None:
        """Write ``manifest`` to :attr:`manifest_path` atomically (replacing any previous one)."""
        manifest.write(self.manifest_path)

    def load_manifest(self) -> Manifest:
        """Read :attr:`manifest_path`; raises ``ManifestError`` if absent or invalid."""
        return Manifest.load(self.manifest_path)

    def link_tracking_run(self, spool_run_id: str, experiment: str, run_name: str | None) -> None:
        """Record that tracking run ``spool_run_id`` of ``experiment`` used this run directory.

        Appends one line to ``tracking_runs.jsonl`` with a single ``O_APPEND`` write and
        fsyncs it; safe to call from several processes at once.
        """
        if not isinstance(spool_run_id, str) or not spool_run_id:
            raise ValidationError(
                f"invalid tracking run id {spool_run_id!r}: expected a non-empty str"
            )
        if not isinstance(experiment, str) or not experiment:
            raise ValidationError(f"invalid experiment {experiment!r}: expected a non-empty str")
        if run_name is not None and not isinstance(run_name, str):
            raise ValidationError(f"invalid run name {run_name!r}: expected a str or None")
        record = {
            "run_uuid": spool_run_id,
            "experiment": experiment,
            "run_name": run_name,
            "time_ms": time.time_ns() // 1_000_000,
        }
        line = canonical_json.dumps(record) + b"\n"
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(self.tracking_runs_path, flags, 0o644)
        except OSError as exc:
            raise SubstrateError(
                f"cannot link tracking run {spool_run_id} to {self.run_dir}: {exc.strerror}"
            ) from exc
        try:
            written = os.write(fd, line)
            if written < len(line):
                # Only on a full disk or a signal; finish the line so the file stays parseable.
                write_all(fd, memoryview(line)[written:])
            os.fsync(fd)
        finally:
            os.close(fd)

    def tracking_runs(self) -> list[dict[str, Any]]:
        """The records of :meth:`link_tracking_run`, oldest first (see the module's contract)."""
        try:
            raw = self.tracking_runs_path.read_bytes()
        except FileNotFoundError:
            return []
        lines = raw.split(b"\n")
        records: list[dict[str, Any]] = []
        offset = 0
        for number, line in enumerate(lines[:-1], start=1):  # lines[-1]: unfinished tail
            text = line.lstrip(b"\x00")
            if text.strip():
                try:
                    record = canonical_json.loads(text)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    records.append(record)
                else:
                    _log.warning(
                        "%s line %d (offset %d) is not a JSON object; skipped",
                        self.tracking_runs_path,
                        number,
                        offset,
                    )
            offset += len(line) + 1
        return records


def _prepare(run_root: Path, run_id: str) -> RunArtifacts:
    run = RunArtifacts(run_id=run_id, run_dir=run_root / run_id)
    run.outputs_dir.mkdir(exist_ok=True)
    run.logs_dir.mkdir(exist_ok=True)
    fsync_dir(run.run_dir)
    fsync_dir(run_root)
    return run


def _make_root(run_root: str | os.PathLike[str] | None) -> Path:
    if run_root is None:
        # Deferred: only this call pays for reading the configuration (and YAML). The run root
        # is the spool root, found like the tracker finds it, so both use the same folder.
        from formula_foundry.config import load_settings

        run_root = load_settings().spool_root
    root = Path(run_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SubstrateError(f"cannot create run root {root}: {exc.strerror}") from exc
    return root.resolve()


@overload
def init_run_dir(
    run_root: str | os.PathLike[str] | None, run_id: str, *, resume: bool = False
) -> RunArtifacts: ...


@overload
def init_run_dir(*, run_id: str, resume: bool = False) -> RunArtifacts: ...


def init_run_dir(
    run_root: str | os.PathLike[str] | None = None,
    run_id: str | None = None,
    *,
    resume: bool = False,
) -> RunArtifacts:
    """Create (or, with ``resume=True``, reopen) ``run_root/run_id`` with the standard layout.

    ``run_root`` is created if needed; ``None`` (or ``init_run_dir(run_id=...)``) means the
    configured spool root (``spool.root``), found like the tracker finds it, and a relative
    path is relative to the working directory. An existing empty directory is adopted; an
    existing non-empty one raises :class:`RunDirExists` unless ``resume=True``.
    ``resume=True`` on a directory that does not exist yet creates it, so a requeued job can
    always pass it.
    """
    if run_id is None:
        raise InvalidRunId("init_run_dir needs a run_id, e.g. init_run_dir(run_id='exp-001')")
    validate_run_id(run_id)
    root = _make_root(run_root)
    run_dir = root / run_id
    try:
        run_dir.mkdir()
    except FileExistsError:
        if not run_dir.is_dir():
            raise RunDirExists(
                f"run path {run_dir} exists and is not a directory; pick another run id"
            ) from None
        if not resume and any(run_dir.iterdir()):
            raise RunDirExists(
                f"run directory {run_dir} is not empty; pass resume=True to reuse it "
                "or pick another run id"
            ) from None
    except OSError as exc:
        raise SubstrateError(f"cannot create run directory {run_dir}: {exc.strerror}") from exc
    return _prepare(root, run_id)


def create_run(
    run_root: str | os.PathLike[str] | None = None,
    manifest: Manifest | None = None,
    *,
    determinism: DeterminismConfig | None = None,
) -> RunArtifacts:
    """Create a run directory with a fresh id (see :func:`new_run_id`) and write its manifest.

    ``run_root`` is as for :func:`init_run_dir` (``None``: the configured spool root). Without
    ``manifest``, one is built with ``Manifest.from_environment(determinism=...)``.
    The directory is created exclusively: an id collision draws a new id.
    """
    if manifest is not None and determinism is not None:
        raise ValidationError("pass either manifest= or determinism=, not both")
    # Built first so a failure leaves no empty run directory behind.
    if manifest is None:
        manifest = Manifest.from_environment(determinism=determinism)
    root = _make_root(run_root)
    for _ in range(_CREATE_ATTEMPTS):
        run_id = new_run_id()
        try:
            (root / run_id).mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise SubstrateError(
                f"cannot create a run directory in {root}: {exc.strerror}"
            ) from exc
        run = _prepare(root, run_id)
        run.write_manifest(manifest)
        return run
    raise SubstrateError(f"could not find a free run id in {root} after {_CREATE_ATTEMPTS} tries")
