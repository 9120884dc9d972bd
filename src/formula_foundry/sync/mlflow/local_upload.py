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
import stat
from pathlib import Path

from formula_foundry.errors import StoreUnavailable

# The prefix of the temporary files MLflow's LocalArtifactRepository writes before renaming them
# into place (``local_artifact_repo._TEMP_ARTIFACT_PREFIX``, checked against MLflow's in the
# tests): the direct SQL path uploads into a local root without importing MLflow.
MLFLOW_TEMP_PREFIX = ".artifact.uploading."


def sweep_leftovers(folder: Path, prefix: str) -> None:
    """Remove the temporary files (``prefix``) an upload killed midway left in ``folder``."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return  # nothing uploaded there yet
    for entry in entries:
        if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


class LocalRoot:
    """A run's local artifact folder, with its folders checked (and swept) once each."""

    def __init__(self, root: Path, prefix: str) -> None:
        self.root = root
        self.prefix = prefix
        self._real_root = os.path.realpath(root)
        self._folders: dict[str, str] = {}
        self._swept: set[str] = set()

    def sweep(self, folder: str) -> None:
        """Remove what a killed upload left in ``folder`` (``/``-separated, relative), once per
        folder of this root: only ff-sync writes into a synced run's artifacts, and one ff-sync
        at a time per destination, so nothing new is left there while this process runs."""
        if folder not in self._swept:
            self._swept.add(folder)
            path = Path(self.root, *folder.split("/")) if folder else self.root
            sweep_leftovers(path, self.prefix)

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
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                out = os.open(tmp, _CREATE, 0o600)
            except FileNotFoundError:
                # The folder went away since it was checked (deleted by hand): make it again.
                del self._folders[folder]
                target_dir = self.folder(folder)
                if target_dir is None:
                    return f"its folder {folder!r} leads out of the run's artifact root (a symlink)"
                tmp = os.path.join(target_dir, os.path.basename(tmp))
                out = os.open(tmp, _CREATE, 0o600)
            try:
                written = _send_all(src, out, size)
                if written != size:
                    raise StoreUnavailable(
                        f"artifact {artifact_path!r}: {written} bytes copied from {source}, "
                        f"not {size}; uploading it again"
                    )
                # What shutil.copystat gives MLflow's copy: the source's times and mode.
                st = os.fstat(src)
                os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.chmod(out, stat.S_IMODE(st.st_mode))
            finally:
                os.close(out)
            os.replace(tmp, os.path.join(target_dir, name))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            os.close(src)
        return None


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


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
