"""A content-addressed object store, safe for many writers on many nodes sharing a filesystem.

Layout of a store root::

    store.json                  format marker: {"format": "formula-foundry/object-store",
                                "version": 1}; other formats or versions are refused
    objects/ab/cdef…            one read-only (0o444) file per SHA-256; the first two hex
                                digits name the fan-out folder, the other 62 the file
    tmp/<host>.<pid>.<rand>.tmp in-flight writes; never served, removable by cleanup_temp()
    quarantine/<hex>.<time>.<host>.<pid>.<rand>
                                objects that failed verification, kept for inspection

Writing: the source is streamed once — each buffer is hashed and written to a temporary file
in ``tmp/`` (the digest, hence the final folder, is only known at the end) — then fsynced,
made read-only, and hard-linked to ``objects/ab/cdef…`` with ``os.link``, which fails rather
than overwrite when the object already exists (another writer won: the temporary file is
discarded). Filesystems without hard links fall back to ``os.replace``, equally atomic; both
stay on one filesystem. The fan-out folder is fsynced afterwards.

Guarantees: an object path exists only once its complete content is durable, so a crash
(even SIGKILL or power loss) can leave temporary files but never a partial object; identical
content is stored once; concurrent writers of the same content all receive the same entry.

Reading: ``open`` hashes what it serves and, at end of stream, raises :class:`ObjectCorrupt`
and quarantines the object if the content does not match its digest; a quarantined object is
no longer under ``objects/`` so it is never served again. ``verify``/``verify_all`` re-hash on
demand. The store keeps no logical-path index: an :class:`ArtifactEntry` (returned by ``add_*``)
is the mapping, and whoever records it (a run manifest, a tracking reference) owns it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

from formula_foundry.substrate import canonical_json
from formula_foundry.substrate.atomic import atomic_write_bytes, fsync_dir, unique_suffix, write_all
from formula_foundry.substrate.digest import (
    CHUNK_SIZE,
    BytesLike,
    Digest,
    sha256_stream,
)
from formula_foundry.substrate.errors import (
    ArtifactNotFound,
    ObjectCorrupt,
    SourceFileNotFound,
    StoreFormatError,
    StoreIOError,
)
from formula_foundry.substrate.logical_path import validate_logical_path
from formula_foundry.substrate.streaming import copy_and_hash

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "STORE_FORMAT",
    "STORE_VERSION",
    "ArtifactEntry",
    "ArtifactStore",
    "CorruptObject",
    "VerifyReport",
]

_log = logging.getLogger(__name__)

STORE_FORMAT: Final = "formula-foundry/object-store"
STORE_VERSION: Final = 1
_READ_ONLY: Final = 0o444
_INSTALL_ATTEMPTS: Final = 3
_FANOUT_RE: Final = re.compile(r"[0-9a-f]{2}")
_REST_RE: Final = re.compile(r"[0-9a-f]{62}")
# Errors meaning "this filesystem has no hard links" rather than "this link failed".
_NO_HARDLINKS: Final = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


@dataclass(frozen=True)
class ArtifactEntry:
    """What :meth:`ArtifactStore.add_file`/``add_bytes`` stored: ``path`` is the logical path,
    ``digest`` is ``sha256:<hex>`` and ``size_bytes`` the content length."""

    path: str
    digest: str
    size_bytes: int


@dataclass(frozen=True)
class CorruptObject:
    """One object that failed verification and where it went."""

    expected: Digest
    actual: Digest
    quarantined_to: Path | None


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :meth:`ArtifactStore.verify_all`."""

    checked: int
    corrupt: tuple[CorruptObject, ...]

    @property
    def ok(self) -> bool:
        """True when every object matched its digest."""
        return not self.corrupt


class ArtifactStore:
    """Content-addressed storage of artifacts under ``root`` (see the module docs for layout,
    crash and concurrency guarantees). The root and its folders are created if missing."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(os.path.abspath(root))
        self._objects = self._root / "objects"
        self._tmp = self._root / "tmp"
        self._quarantine = self._root / "quarantine"
        self._open_layout()

    @property
    def root(self) -> Path:
        """Absolute path of the store root."""
        return self._root

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self._root)!r})"

    # -- writing -----------------------------------------------------------------------------

    def add_file(self, path: str | os.PathLike[str], logical_path: str) -> ArtifactEntry:
        """Store the content of file ``path`` under its digest; return its entry.

        Reads the file once, in constant memory. A missing source raises
        :class:`SourceFileNotFound` and leaves nothing behind.
        """
        logical = validate_logical_path(logical_path)
        source = Path(path)
        try:
            src = source.open("rb", buffering=0)
        except FileNotFoundError:
            raise SourceFileNotFound(
                f"cannot add {source} to the artifact store: no such file"
            ) from None
        except OSError as exc:
            raise StoreIOError(
                f"cannot add {source} to the artifact store: {exc.strerror or exc}"
            ) from exc
        with src:
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(src.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            fd, tmp = self._new_temp()
            try:
                try:
                    digest, size = copy_and_hash(src, fd)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._install(tmp, digest, size)
            except StoreIOError:
                raise
            except OSError as exc:
                raise StoreIOError(
                    f"cannot add {source} to store {self._root}: {exc.strerror or exc}"
                ) from exc
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return ArtifactEntry(path=logical, digest=str(digest), size_bytes=size)

    def add_bytes(self, data: BytesLike, logical_path: str) -> ArtifactEntry:
        """Store ``data`` under its digest; return its entry. Writes nothing if already stored."""
        logical = validate_logical_path(logical_path)
        view = memoryview(data).cast("B")
        digest = Digest.of_bytes(view)
        size = view.nbytes
        if self._stored_size(digest) == size:
            return ArtifactEntry(path=logical, digest=str(digest), size_bytes=size)
        fd, tmp = self._new_temp()
        try:
            try:
                write_all(fd, view)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._install(tmp, digest, size)
        except StoreIOError:
            raise
        except OSError as exc:
            raise StoreIOError(
                f"cannot add {logical!r} to store {self._root}: {exc.strerror or exc}"
            ) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return ArtifactEntry(path=logical, digest=str(digest), size_bytes=size)

    # -- reading -----------------------------------------------------------------------------

    def has(self, digest: Digest | str) -> bool:
        """True if an object with ``digest`` is stored (complete by construction)."""
        return self._object_path(Digest.coerce(digest)).is_file()

    def path_for(self, digest: Digest | str) -> Path:
        """Path of the stored object; :class:`ArtifactNotFound` if absent.

        The file is read-only and is not re-hashed here; use :meth:`open` or :meth:`verify`
        when the content must be checked.
        """
        parsed = Digest.coerce(digest)
        path = self._object_path(parsed)
        if not path.is_file():
            raise self._not_found(parsed)
        return path

    def open(self, digest: Digest | str, *, verify: bool = True) -> BinaryIO:
        """Open a stored object for reading.

        With ``verify=True`` (default) the stream hashes what it returns; reaching the end of a
        corrupt object quarantines it and raises :class:`ObjectCorrupt` instead of returning
        the final (empty) read. Seeking is not supported then. ``verify=False`` returns a plain
        file for random access.
        """
        parsed = Digest.coerce(digest)
        path = self._object_path(parsed)
        try:
            raw = path.open("rb", buffering=0)
        except FileNotFoundError:
            raise self._not_found(parsed) from None
        if not verify:
            return io.BufferedReader(raw, buffer_size=CHUNK_SIZE)
        return io.BufferedReader(_VerifyingReader(raw, parsed, self), buffer_size=CHUNK_SIZE)

    def iter_digests(self) -> Iterator[Digest]:
        """Digests of all stored objects, in sorted order; stray files are skipped."""
        for fanout in sorted(self._objects.iterdir()):
            if not _FANOUT_RE.fullmatch(fanout.name) or not fanout.is_dir():
                continue
            for obj in sorted(fanout.iterdir()):
                if _REST_RE.fullmatch(obj.name):
                    yield Digest(fanout.name + obj.name)

    # -- checking ----------------------------------------------------------------------------

    def verify(self, digest: Digest | str) -> None:
        """Re-hash one object. On mismatch move it to ``quarantine/`` and raise
        :class:`ObjectCorrupt`; :class:`ArtifactNotFound` if it is not stored."""
        parsed = Digest.coerce(digest)
        path = self._object_path(parsed)
        try:
            f = path.open("rb", buffering=0)
        except FileNotFoundError:
            raise self._not_found(parsed) from None
        with f:
            actual, _ = sha256_stream(f)
            if actual != parsed:
                moved = self._quarantine_object(parsed, os.fstat(f.fileno()))
                raise ObjectCorrupt(parsed, actual, moved)

    def verify_all(self) -> VerifyReport:
        """Verify every object; corrupt ones are quarantined and listed in the report."""
        checked = 0
        corrupt: list[CorruptObject] = []
        for digest in self.iter_digests():
            try:
                self.verify(digest)
            except ObjectCorrupt as exc:
                corrupt.append(CorruptObject(exc.expected, exc.actual, exc.quarantined_to))
            except ArtifactNotFound:
                continue  # quarantined by a concurrent verifier
            checked += 1
        return VerifyReport(checked=checked, corrupt=tuple(corrupt))

    def cleanup_temp(self, older_than_s: float = 24 * 3600.0) -> int:
        """Remove temporary files untouched for ``older_than_s`` seconds (leftovers of crashed
        writers); return how many were removed. A live writer touches its file continuously,
        so a threshold well above the longest pause of a writer is safe."""
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in os.scandir(self._tmp):
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    # -- internals ---------------------------------------------------------------------------

    def _open_layout(self) -> None:
        marker = self._root / "store.json"
        expected = {"format": STORE_FORMAT, "version": STORE_VERSION}
        try:
            for folder in (self._root, self._objects, self._tmp, self._quarantine):
                folder.mkdir(parents=True, exist_ok=True)
            if not marker.exists():
                atomic_write_bytes(marker, canonical_json.dumps(expected))
            raw = marker.read_bytes()
        except OSError as exc:
            raise StoreIOError(
                f"cannot open artifact store {self._root}: {exc.strerror or exc}"
            ) from exc
        try:
            found = canonical_json.loads(raw)
        except ValueError:
            found = None
        if not isinstance(found, dict) or found.get("format") != STORE_FORMAT:
            raise StoreFormatError(f"{marker} does not describe a formula-foundry artifact store")
        if found.get("version") != STORE_VERSION:
            raise StoreFormatError(
                f"artifact store {self._root} has format version {found.get('version')!r}; "
                f"this release reads version {STORE_VERSION}; upgrade formula-foundry"
            )

    def _object_path(self, digest: Digest) -> Path:
        return self._objects / digest.hexdigest[:2] / digest.hexdigest[2:]

    def _not_found(self, digest: Digest) -> ArtifactNotFound:
        return ArtifactNotFound(f"no object {digest} in artifact store {self._root}")

    def _new_temp(self) -> tuple[int, Path]:
        tmp = self._tmp / f"{unique_suffix()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        try:
            return os.open(tmp, flags, 0o600), tmp
        except OSError as exc:
            raise StoreIOError(
                f"cannot create a temporary file in {self._tmp}: {exc.strerror or exc}"
            ) from exc

    def _stored_size(self, digest: Digest) -> int | None:
        try:
            st = os.stat(self._object_path(digest))
        except FileNotFoundError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def _install(self, tmp: Path, digest: Digest, size: int) -> None:
        """Publish the complete, fsynced ``tmp`` as the object for ``digest``."""
        final = self._object_path(digest)
        fanout = final.parent
        try:
            fanout.mkdir()
            fsync_dir(self._objects)
        except FileExistsError:
            pass
        os.chmod(tmp, _READ_ONLY)
        for _ in range(_INSTALL_ATTEMPTS):
            try:
                os.link(tmp, final)
            except FileExistsError:
                # Also what NFS reports when a retransmitted LINK already succeeded.
                existing = self._stored_size(digest)
                if existing == size:
                    return
                _log.warning(
                    "object %s in %s has %s bytes instead of %d; quarantining it",
                    digest,
                    self._root,
                    existing,
                    size,
                )
                with contextlib.suppress(FileNotFoundError):
                    self._quarantine_object(digest, os.lstat(final))
                continue
            except OSError as exc:
                if exc.errno not in _NO_HARDLINKS:
                    raise
                os.replace(tmp, final)
            fsync_dir(fanout)
            return
        raise StoreIOError(
            f"could not publish object {digest} in {self._root} after "
            f"{_INSTALL_ATTEMPTS} attempts; another process keeps replacing it"
        )

    def _quarantine_object(self, digest: Digest, seen: os.stat_result) -> Path | None:
        """Move the object out of ``objects/`` if it is still the file that was checked."""
        path = self._object_path(digest)
        try:
            current = os.lstat(path)
        except FileNotFoundError:
            return None
        if (current.st_dev, current.st_ino) != (seen.st_dev, seen.st_ino):
            return None  # replaced by a fresh copy since it was checked; leave that one
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self._quarantine / f"{digest.hexdigest}.{stamp}.{unique_suffix()}"
        try:
            os.replace(path, dest)
        except FileNotFoundError:
            return None  # a concurrent verifier moved it first
        fsync_dir(path.parent)
        fsync_dir(self._quarantine)
        _log.warning("object %s in %s is corrupt; moved to %s", digest, self._root, dest)
        return dest


class _VerifyingReader(io.RawIOBase):
    """Raw stream over a stored object that checks its digest when the end is reached."""

    def __init__(self, raw: io.FileIO, digest: Digest, store: ArtifactStore) -> None:
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._store = store
        self._hasher = hashlib.sha256()
        self._checked = False

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        n = self._raw.readinto(buffer)
        if n:
            self._hasher.update(memoryview(buffer)[:n])
            return n
        if not self._checked:
            self._checked = True
            actual = Digest(self._hasher.hexdigest())
            if actual != self._digest:
                moved = self._store._quarantine_object(self._digest, os.fstat(self._raw.fileno()))
                raise ObjectCorrupt(self._digest, actual, moved)
        return 0

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()
