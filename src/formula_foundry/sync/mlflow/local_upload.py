"""Uploading into a run whose artifact root is a folder on this host, by MLflow's own protocol.

MLflow's ``LocalArtifactRepository.log_artifact`` writes a hidden ``.artifact.uploading.*``
file in the target folder, copies the bytes, copies the source's mode and times, and renames
it into place. For each file it also resolves the destination's real path four times (its
check against escaping the root through a symlink) and copies through a Python buffer: half
of an upload of many small files, where MLflow's own ``log_artifacts`` copies a folder with
``shutil.copy2`` (no temporary file, no check). This does what ``log_artifact`` does, with
the symlink check once per folder and the copy through ``sendfile`` into a file opened once,
so a killed upload still leaves only a temporary file that the next upload sweeps
(:func:`~formula_foundry.sync.mlflow.artifact_upload.upload_artifacts`), never a partial
file under its name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path

from formula_foundry.errors import StoreUnavailable


class LocalRoot:
    """A run's local artifact folder, with its folders checked once each."""

    def __init__(self, root: Path, prefix: str) -> None:
        self.root = root
        self.prefix = prefix
        self._real_root = os.path.realpath(root)
        self._folders: dict[str, str] = {}

    def folder(self, folder: str) -> str | None:
        """The folder ``folder`` (``/``-separated, relative) of the root, created if needed;
        ``None`` if it leads out of the root."""
        found = self._folders.get(folder)
        if found is not None:
            return found
        path = os.path.join(self.root, *folder.split("/")) if folder else str(self.root)
        os.makedirs(path, exist_ok=True)
        real = os.path.realpath(path)
        # The spool's logical paths never climb ("..", absolute: refused when logged), so only
        # a symlink planted in the destination could lead out of the root: refuse it, as MLflow.
        if os.path.commonpath([self._real_root, real]) != self._real_root:
            return None
        self._folders[folder] = path
        return path

    def copy_in(self, source: Path, artifact_path: str, size: int) -> str | None:
        """Copy ``source`` to ``artifact_path``: a temporary file of ``size`` bytes renamed into
        place (what the listing of a server's upload is checked for; here the written file is
        checked before it gets its name). The reason the root can never hold it, or ``None``."""
        folder, _, name = artifact_path.rpartition("/")
        if name.startswith(self.prefix):
            # MLflow refuses these names too: the sweep of killed uploads would delete it.
            return f"the name {name!r} is reserved for MLflow's temporary files"
        target_dir = self.folder(folder)
        if target_dir is None:
            return f"its folder {folder!r} leads out of the run's artifact root (a symlink)"
        # MLflow's temporary name (mkstemp's, without its second open of the file).
        tmp = os.path.join(target_dir, f"{self.prefix}{secrets.token_hex(6)}")
        try:
            with open(source, "rb") as src:
                out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    written = _send_all(src.fileno(), out, size)
                finally:
                    os.close(out)
            if written != size:
                raise StoreUnavailable(
                    f"artifact {artifact_path!r}: {written} bytes copied from {source}, "
                    f"not {size}; uploading it again"
                )
            shutil.copystat(source, tmp)
            os.replace(tmp, os.path.join(target_dir, name))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return None


def _send_all(src: int, out: int, size: int) -> int:
    """Copy up to ``size`` bytes in the kernel (what ``shutil.copyfile`` does on Linux); the
    number copied, fewer if the source is shorter."""
    offset = 0
    while offset < size:
        sent = os.sendfile(out, src, offset, min(size - offset, 1 << 30))
        if sent == 0:
            break
        offset += sent
    if offset == size and os.pread(src, 1, size):
        return size + 1  # longer than logged: not the logged bytes either
    return offset
