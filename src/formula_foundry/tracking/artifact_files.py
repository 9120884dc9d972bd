"""Files logged to a run: their bytes stored once in the artifact store, one event per file.

``Run.log_artifact`` and the MLflow drop-in's artifact repository both come here, so a file
is recorded the same way whoever logs it: its content goes into the content-addressed
:class:`~formula_foundry.substrate.ArtifactStore` (streamed, hashed, fsynced, deduplicated),
and the run's spool gets an ``artifact`` event naming the run's artifact path, the digest, the
size and the store. ``ff-sync`` uploads the file to the destination run's artifacts
(docs/spool-format.md). Nothing is copied into the spool itself.

The store write happens before the event: an event never names an object that is not durable.
A process killed between the two leaves an unreferenced object, which costs space only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from formula_foundry.errors import ValidationError
from formula_foundry.tracking.events import FORMAT_VERSION, K_ARTIFACT
from formula_foundry.tracking.spool_writer import now_ms

if TYPE_CHECKING:
    from formula_foundry.substrate import ArtifactStore


def artifact_records(
    store: ArtifactStore, local_path: str | os.PathLike[str], artifact_path: str | None, run: str
) -> list[dict[str, Any]]:
    """Store ``local_path`` (a file, or every file under a folder) and return its events.

    A file lands at ``<artifact_path>/<its name>``; a folder's files at
    ``<artifact_path>/<path inside the folder>`` (MLflow's ``log_artifact`` and
    ``log_artifacts``). ``artifact_path`` ``None`` or ``""``: the run's artifact root.
    """
    from formula_foundry.substrate import validate_logical_path

    source = Path(local_path)
    prefix = artifact_prefix(artifact_path, run)
    if source.is_dir():
        files = sorted(_walk(source))
        pairs = [(source / rel, prefix + rel) for rel in files]
    elif source.is_file():
        pairs = [(source, prefix + source.name)]
    else:
        raise ValidationError(f"run {run}: cannot log artifact {source}: no such file or folder")
    records = []
    for path, logical in pairs:
        try:
            validate_logical_path(logical)
        except ValidationError as exc:
            raise ValidationError(f"run {run}: cannot log artifact {path}: {exc}") from None
        entry = store.add_file(path, logical)
        records.append(
            {
                "v": FORMAT_VERSION,
                "s": 0,
                "t": now_ms(),
                "k": K_ARTIFACT,
                "path": logical,
                "digest": str(entry.digest),
                "size": entry.size_bytes,
                "store": str(store.root),
            }
        )
    return records


def artifact_prefix(artifact_path: str | None, run: str) -> str:
    """``artifact_path`` checked, as the prefix of the files under it (``""`` or ``"a/b/"``)."""
    if artifact_path is None or artifact_path == "":
        return ""
    if not isinstance(artifact_path, str):
        raise ValidationError(
            f"run {run}: artifact_path must be a str or None, got {artifact_path!r}"
        )
    from formula_foundry.substrate import validate_logical_path

    try:
        return validate_logical_path(artifact_path.rstrip("/")) + "/"
    except ValidationError as exc:
        raise ValidationError(f"run {run}: artifact_path {artifact_path!r}: {exc}") from None


def _walk(folder: Path) -> list[str]:
    """Relative POSIX paths of the files under ``folder`` (links to files included, linked
    folders not entered: MLflow's own upload walks the same way)."""
    out = []

    def fail(exc: OSError) -> None:
        # os.walk skips what it cannot read unless told: a silently missing file is lost data.
        raise ValidationError(f"cannot log artifacts of {folder}: {exc}") from None

    for root, _dirs, names in os.walk(folder, onerror=fail):
        rel_root = os.path.relpath(root, folder)
        for name in names:
            if os.path.isfile(os.path.join(root, name)):
                rel = name if rel_root == "." else f"{rel_root}/{name}"
                out.append(rel.replace(os.sep, "/"))
    return out
