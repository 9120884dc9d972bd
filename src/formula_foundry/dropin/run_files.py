"""The files of a ``spool:`` run: logged into the artifact store, listed and read back on the node.

The spool store gives each run the artifact URI ``spool:///<spool root>/<run id>/artifacts``;
MLflow appends a path to it when it resolves ``runs:/<run id>/<path>``. Logging a file stores
its bytes in the content-addressed :class:`~formula_foundry.substrate.ArtifactStore` (hashed,
fsynced, stored once) and appends one ``artifact`` event per file to the run's spool through
the run's writer in this process (:func:`~formula_foundry.dropin.run_book.run_book`): one
write for a whole folder, in the kernel before the call returns, flushed even in buffered
mode. The tracker's ``Run.log_artifact`` records files the same way
(:mod:`formula_foundry.tracking.artifact_files`); ``ff-sync`` uploads them.

Which store: ``artifacts.store_root`` when a configuration file is found (``FF_CONFIG``,
``config/mlflow.yaml``), as for the tracker; without one, ``artifacts`` beside the spool root
(``/x/data/runs`` -> ``/x/data/artifacts``, the default layout), so a job that names its spool
in ``MLFLOW_TRACKING_URI`` keeps its files on the same filesystem wherever it runs from. Each
event names its store, so readers never guess.

Reading back answers what the run's spool holds (:func:`expected_run`, the sync's own reading:
last event per path wins), whichever process logged the file; objects are read through
:meth:`ArtifactStore.open`, which checks their digest.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from formula_foundry.config import Settings, load_settings, spool_uri_path
from formula_foundry.dropin.models import ModelState, model_book
from formula_foundry.dropin.run_book import RunBook, run_book
from formula_foundry.dropin.spool_uri import spool_root
from formula_foundry.errors import (
    ArtifactNotFound,
    DigestMismatch,
    FormulaFoundryError,
    ValidationError,
)
from formula_foundry.substrate import ArtifactStore, validate_logical_path
from formula_foundry.sync.commands.expected import expected_run
from formula_foundry.sync.engine.scan import scan_run
from formula_foundry.sync.engine.sink import ArtifactRef
from formula_foundry.tracking.artifact_files import artifact_prefix, artifact_records
from formula_foundry.tracking.events import check_model_id
from formula_foundry.tracking.resume import check_run_id
from formula_foundry.tracking.spool_writer import is_segment_name

ARTIFACTS = "artifacts"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Location:
    """Where an artifact URI points: a run of a spool, and a path among its artifacts."""

    root: Path
    run_id: str
    sub: str  # "" (the run's artifact root) or "a/b"
    model: str | None = None  # a logged model of the run: its files, not the run's


MODELS = "models"


def parse_artifact_uri(uri: str, tracking_uri: str | None = None) -> Location:
    """The run and path of ``spool:///<root>/<run id>/artifacts[/<path>]``, or the model and
    path of ``spool:///<root>/<run id>/models/<model id>/artifacts[/<path>]``.

    The spool root may itself hold a folder called ``artifacts``: the split is the one whose
    run folder holds segments (the tracking URI's root first, when it is a spool).
    """
    path = Path(os.path.expanduser(spool_uri_path(uri)))
    parts = PurePosixPath((path if path.is_absolute() else Path.cwd() / path).as_posix()).parts
    splits = [i for i in range(2, len(parts)) if parts[i] == ARTIFACTS]
    if not splits:
        raise ValidationError(
            f"artifact URI {uri!r} names no run's artifacts: expected "
            "spool:///<spool root>/<run id>/artifacts[/<path>] (what the spool store gives a run)"
        )
    hint = _tracking_root(tracking_uri)
    chosen = next((i for i in splits if _run_folder(parts, i).parent == hint), None)
    if chosen is None:
        found = (i for i in splits if _holds_segments(_run_folder(parts, i)))
        chosen = next(found, splits[-1])
    sub = "/".join(parts[chosen + 1 :])
    if sub:
        validate_logical_path(sub)
    if _model_split(parts, chosen):
        run_at, model = chosen - 3, check_model_id(parts[chosen - 1])
        return Location(Path(*parts[:run_at]), check_run_id(parts[run_at]), sub, model)
    return Location(Path(*parts[: chosen - 1]), check_run_id(parts[chosen - 1]), sub)


def _model_split(parts: tuple[str, ...], i: int) -> bool:
    """Whether ``artifacts`` at ``i`` ends ``<run id>/models/<model id>``."""
    return i >= 4 and parts[i - 2] == MODELS and parts[i - 1].startswith("m-")


def _run_folder(parts: tuple[str, ...], i: int) -> Path:
    return Path(*parts[: i - 2 if _model_split(parts, i) else i])


def _tracking_root(tracking_uri: str | None) -> Path | None:
    if not tracking_uri or not tracking_uri.startswith("spool:"):
        return None
    try:
        return spool_root(tracking_uri)
    except FormulaFoundryError:
        return None


def _holds_segments(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(is_segment_name(e.name) for e in entries)
    except OSError:
        return False


def store_root(spool: Path, settings: Settings) -> Path:
    """The artifact store of files logged into the spool ``spool`` (see the module docs)."""
    if settings.config_path is not None:
        return settings.artifact_store_root
    return spool.parent / ARTIFACTS


class RunFiles:
    """The artifacts of one run, from the path an artifact URI names."""

    def __init__(self, location: Location) -> None:
        settings = load_settings()
        self.location = location
        self.store_root = store_root(location.root, settings)
        self.book: RunBook = run_book(location.root, settings.durability, settings.heartbeat_s)
        self._lock = threading.Lock()
        self._seen: tuple[tuple[str, int], ...] | None = None
        self._artifacts: dict[str, ArtifactRef] = {}

    # -- writing ---------------------------------------------------------------------------

    def log(self, local: object, artifact_path: object, *, folder: bool) -> int:
        """Log the file (``folder``: every file under the folder) ``local`` under
        ``artifact_path``; return how many files. Checked before anything is stored."""
        run = self.location.run_id
        if not isinstance(local, str | os.PathLike):
            raise ValidationError(f"run {run}: cannot log artifact {local!r}: not a path")
        source = Path(local)
        if artifact_path is not None and not isinstance(artifact_path, str):
            raise ValidationError(
                f"run {run}: artifact_path must be a str or None, got {artifact_path!r}"
            )
        target = _join(self.location.sub, _clean(artifact_path))
        artifact_prefix(target, run)  # '..', absolute, backslashes: refused here
        if folder and not source.is_dir():
            what = "not a folder" if source.exists() else "no such folder"
            raise ValidationError(f"run {run}: cannot log artifacts of {source}: {what}")
        if not folder and not source.is_file():
            what = (
                "it is a folder (log a folder with log_artifacts)"
                if source.is_dir()
                else "no such file"
            )
            raise ValidationError(f"run {run}: cannot log artifact {source}: {what}")
        live = self.book.live(run)  # a run that is not in the spool stores nothing
        model = self._model() if self.location.model else None
        records = artifact_records(ArtifactStore(self.store_root), source, target or None, run)
        if not records:
            return 0  # an empty folder: MLflow's stores keep no empty folder either
        if model is not None:
            with self._lock:
                _check_tree({p: r.size for p, r in model.files.items()}, records, run)
                model_book(self.book).add_files(model, records)
            return len(records)
        with live.lock:
            _check_tree(live.state.artifacts, records, run)
            live.writer.append_many(records)  # one write: the whole folder or none of it
            live.writer.flush()  # buffered durability too: a returned call is on disk
            for record in records:
                live.state.artifacts[record["path"]] = record["size"]
        return len(records)

    # -- reading ---------------------------------------------------------------------------

    def listing(self, path: str | None) -> list[tuple[str, bool, int | None]]:
        """The entries directly under ``path`` (MLflow's ``list_artifacts``): (path relative to
        the URI, is a folder, size of a file); none when ``path`` is a file or absent."""
        full = _join(self.location.sub, self._checked(path))
        artifacts = self._current()
        if full in artifacts:
            return []
        prefix = f"{full}/" if full else ""
        children: dict[str, tuple[bool, int | None]] = {}
        for logged, ref in artifacts.items():
            if logged.startswith(prefix):
                head, sep, _ = logged[len(prefix) :].partition("/")
                if sep:
                    children[prefix + head] = (True, None)
                else:
                    children.setdefault(prefix + head, (False, ref.size))
        cut = len(self.location.sub) + 1 if self.location.sub else 0
        return [(child[cut:], d, size) for child, (d, size) in sorted(children.items())]

    def download(self, path: str, local_path: str | os.PathLike[str]) -> None:
        """Write the bytes of the file ``path`` to ``local_path``, checked against its digest."""
        full = _join(self.location.sub, self._checked(path))
        ref = self._current().get(full)
        if ref is None:
            raise ArtifactNotFound(
                f"run {self.location.run_id} has no artifact file {full!r} in the spool "
                f"{self.location.root}"
            )
        if not (Path(ref.store) / "store.json").is_file():
            raise ArtifactNotFound(
                f"run {self.location.run_id}: artifact {full!r} is in the artifact store "
                f"{ref.store}, which is not there (moved, or not mounted on this host)"
            )
        try:
            with ArtifactStore(ref.store).open(ref.digest) as src, open(local_path, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        except BaseException as exc:
            # A corrupt object is detected at its end: no partial or wrong file stays behind.
            Path(local_path).unlink(missing_ok=True)
            if isinstance(exc, DigestMismatch):
                raise DigestMismatch(
                    f"run {self.location.run_id}: artifact {full!r}: {exc}"
                ) from exc
            raise

    def _checked(self, path: str | None) -> str:
        if path is None or path == "":
            return ""
        if not isinstance(path, str):
            raise ValidationError(f"artifact path must be a str, got {path!r}")
        cleaned = _clean(path)
        if cleaned:
            validate_logical_path(cleaned)
        return cleaned

    def _model(self) -> ModelState:
        state = model_book(self.book).get(self.location.model)
        if state.run_id != self.location.run_id:
            raise ArtifactNotFound(
                f"logged model {state.model_id} belongs to run {state.run_id}, not "
                f"{self.location.run_id}"
            )
        return state

    def _current(self) -> dict[str, ArtifactRef]:
        """The run's files as its spool holds them; read again only when a segment grew."""
        if self.location.model:
            return dict(self._model().files)
        run = self.location.run_id
        self.book.flush(run)  # a buffered writer of this process: its events into the file
        segments = scan_run(self.location.root, run)
        seen = tuple((s.rel, s.size) for s in segments)
        with self._lock:
            if seen != self._seen:
                self._artifacts = expected_run(run, segments).artifacts if segments else {}
                self._seen = seen
            return self._artifacts


def _clean(path: str | None) -> str:
    """``path`` as MLflow's local store reads it (``a//b/``, ``./a``: ``a/b``, ``a``); a path
    with ``..`` is kept as given, to be refused by name."""
    if not path:
        return ""
    if ".." in path.split("/"):
        return path
    cleaned = posixpath.normpath(path)
    return "" if cleaned == "." else cleaned


def _join(sub: str, path: str) -> str:
    return f"{sub}/{path}" if sub and path else sub or path


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _check_tree(known: dict[str, int], records: list[dict[str, Any]], run: str) -> None:
    """A path cannot be a file and a folder of one run (MLflow's stores refuse it too)."""
    folders = {a for path in known for a in _ancestors(path)}
    for record in records:
        path = record["path"]
        if path in folders:
            raise ValidationError(
                f"run {run}: cannot log artifact {path!r}: the run already has a folder of "
                "artifacts by that name"
            )
        for ancestor in _ancestors(path):
            if ancestor in known:
                raise ValidationError(
                    f"run {run}: cannot log artifact {path!r}: {ancestor!r} is already a file "
                    "of the run"
                )
