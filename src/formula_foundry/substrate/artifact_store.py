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
is the mapping, and whoever records it (a run manifest, a tracking reference) owns it; the entry
names the store that holds it (``store_root``).

Symbolic links: the root itself may be one (``data/artifacts -> /scratch/...``), but the store
never follows a link inside its tree — a linked fan-out folder would put objects outside the
store, a linked object would be served without being stored. Writes and reads that meet one raise
:class:`UnsafeStorePath` naming it, ``has`` says False, ``verify_all`` lists it in ``unsafe``; the
store never moves or deletes a link (remove it, then add the original file again).
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
from dataclasses import dataclass, field
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
    UnsafeStorePath,
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
    "DamagedObject",
    "StoreVerifyReport",
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
# O_NOFOLLOW: an object that is a link fails to open instead of serving the link's target.
# O_NONBLOCK: a FIFO planted at an object name must fail the regular-file check, not hang open.
_NONBLOCK: Final[int] = getattr(os, "O_NONBLOCK", 0)
_READ_FLAGS: Final = (
    os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | _NONBLOCK | getattr(os, "O_BINARY", 0)
)


@dataclass(frozen=True)
class ArtifactEntry:
    """What :meth:`ArtifactStore.add_file`/``add_bytes`` stored: ``path`` is the logical path,
    ``digest`` is ``sha256:<hex>``, ``size_bytes`` the content length and ``store_root`` the
    absolute root of the store holding it (``None`` only for entries built by hand).

    Equality ignores ``store_root``: two entries are equal when they map the same logical path
    to the same content, wherever it is stored."""

    path: str
    digest: str
    size_bytes: int
    store_root: Path | None = field(default=None, compare=False)


@dataclass(frozen=True)
class DamagedObject:
    """One object that failed verification and where it went: an entry of
    :class:`StoreVerifyReport` (``verify`` of one object raises ``ObjectCorrupt`` instead)."""

    expected: Digest
    actual: Digest
    quarantined_to: Path | None


@dataclass(frozen=True)
class StoreVerifyReport:
    """Outcome of :meth:`ArtifactStore.verify_all`: ``checked`` objects, the ``corrupt`` ones,
    and the ``unsafe`` paths under ``objects/`` — symbolic links and other non-regular entries
    where a fan-out folder or an object belongs, never followed and left in place."""

    checked: int
    corrupt: tuple[DamagedObject, ...]
    unsafe: tuple[Path, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every object matched its digest and nothing under ``objects/`` is unsafe."""
        return not self.corrupt and not self.unsafe


def stored_object_path(root: str | os.PathLike[str], digest: Digest | str) -> Path:
    """Where the object ``digest`` lives in the store at ``root``, computed without opening the
    store (which would create its folders): for readers on another host, such as ``ff-sync``
    uploading files, which check what they find there themselves."""
    hexdigest = Digest.coerce(digest).hexdigest
    # One join and one Path: called per file of an upload, where pathlib's operator costs.
    return Path(os.path.join(root, "objects", hexdigest[:2], hexdigest[2:]))


class ArtifactStore:
    """Content-addressed storage of artifacts under ``root`` (see the module docs for layout,
    crash and concurrency guarantees). The root and its folders are created if missing.

    Without ``root``, the configured ``artifacts.store_root`` (``config/mlflow.yaml``, found
    upwards from the working directory like the tracker does); a relative ``root`` is relative
    to the working directory."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        if root is None:
            # Deferred: only this call pays for reading the configuration (and YAML).
            from formula_foundry.config import load_settings

            root = load_settings().artifact_store_root
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
        return self._entry(logical, digest, size)

    def add_bytes(self, data: BytesLike, logical_path: str) -> ArtifactEntry:
        """Store ``data`` under its digest; return its entry. Writes nothing if already stored."""
        logical = validate_logical_path(logical_path)
        view = memoryview(data).cast("B")
        digest = Digest.of_bytes(view)
        size = view.nbytes
        if self._stored_size(digest) == size:
            return self._entry(logical, digest, size)
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
        return self._entry(logical, digest, size)

    # -- reading -----------------------------------------------------------------------------

    def has(self, digest: Digest | str) -> bool:
        """True if an object with ``digest`` is stored (complete by construction); a symbolic
        link in its place is not a stored object."""
        try:
            return self._object_stat(Digest.coerce(digest)) is not None
        except UnsafeStorePath:
            return False

    def path_for(self, digest: Digest | str) -> Path:
        """Path of the stored object; :class:`ArtifactNotFound` if absent,
        :class:`UnsafeStorePath` if it or its fan-out folder is a symbolic link.

        The file is read-only and is not re-hashed here; use :meth:`open` or :meth:`verify`
        when the content must be checked.
        """
        parsed = Digest.coerce(digest)
        if self._object_stat(parsed) is None:
            raise self._not_found(parsed)
        return self._object_path(parsed)

    def open(self, digest: Digest | str, *, verify: bool = True) -> BinaryIO:
        """Open a stored object for reading.

        With ``verify=True`` (default) the stream hashes what it returns; reaching the end of a
        corrupt object quarantines it and raises :class:`ObjectCorrupt` instead of returning
        the final (empty) read. Seeking is not supported then. ``verify=False`` returns a plain
        file for random access.
        """
        parsed = Digest.coerce(digest)
        raw = self._open_object(parsed)
        if not verify:
            return io.BufferedReader(raw, buffer_size=CHUNK_SIZE)
        return io.BufferedReader(_VerifyingReader(raw, parsed, self), buffer_size=CHUNK_SIZE)

    def iter_digests(self) -> Iterator[Digest]:
        """Digests of all stored objects, in sorted order; stray files and links are skipped."""
        for item in self._walk():
            if isinstance(item, Digest):
                yield item

    # -- checking ----------------------------------------------------------------------------

    def verify(self, digest: Digest | str) -> None:
        """Re-hash one object. On mismatch move it to ``quarantine/`` and raise
        :class:`ObjectCorrupt`; :class:`ArtifactNotFound` if it is not stored."""
        parsed = Digest.coerce(digest)
        with self._open_object(parsed) as f:
            actual, _ = sha256_stream(f)
            if actual != parsed:
                moved = self._quarantine_object(parsed, os.fstat(f.fileno()))
                raise ObjectCorrupt(parsed, actual, moved)

    def verify_all(self) -> StoreVerifyReport:
        """Verify every object; corrupt ones are quarantined and listed in the report, links
        and other unsafe entries under ``objects/`` are listed (and left alone)."""
        checked = 0
        corrupt: list[DamagedObject] = []
        unsafe: list[Path] = []
        for item in self._walk():
            if isinstance(item, Path):
                unsafe.append(item)
                continue
            try:
                self.verify(item)
            except ObjectCorrupt as exc:
                corrupt.append(DamagedObject(exc.expected, exc.actual, exc.quarantined_to))
            except ArtifactNotFound:
                continue  # quarantined by a concurrent verifier
            except UnsafeStorePath as exc:
                unsafe.append(exc.path)  # replaced by a link since the listing
                continue
            checked += 1
        return StoreVerifyReport(checked=checked, corrupt=tuple(corrupt), unsafe=tuple(unsafe))

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
            # The root may be a link; nothing below it may be (checked before any use).
            self._root.mkdir(parents=True, exist_ok=True)
            for sub in (self._objects, self._tmp, self._quarantine):
                with contextlib.suppress(FileExistsError):
                    sub.mkdir()
                _check_kind(sub, os.lstat(sub), folder=True)
            try:
                _check_kind(marker, os.lstat(marker), folder=False)
            except FileNotFoundError:
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
        return stored_object_path(self._root, digest)

    def _entry(self, logical: str, digest: Digest, size: int) -> ArtifactEntry:
        return ArtifactEntry(logical, str(digest), size, store_root=self._root)

    def _fanout(self, digest: Digest, *, create: bool) -> Path | None:
        """The digest's fan-out folder, checked to be a real folder (created if asked);
        ``None`` if absent; :class:`UnsafeStorePath` if it is a link or not a folder."""
        fanout = self._objects / digest.hexdigest[:2]
        try:
            st = os.lstat(fanout)
        except FileNotFoundError:
            if not create:
                return None
            try:
                fanout.mkdir()
                fsync_dir(self._objects)
            except FileExistsError:
                pass  # another writer created it, or something else is there: checked below
            st = os.lstat(fanout)
        _check_kind(fanout, st, folder=True)
        return fanout

    def _object_stat(self, digest: Digest) -> os.stat_result | None:
        """``lstat`` of the object; ``None`` if absent; :class:`UnsafeStorePath` if it or its
        fan-out folder is a link or not the expected kind of file."""
        fanout = self._fanout(digest, create=False)
        if fanout is None:
            return None
        path = fanout / digest.hexdigest[2:]
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        _check_kind(path, st, folder=False)
        return st

    def _open_object(self, digest: Digest) -> io.FileIO:
        """Open the object for reading without following a link at any level below the root."""
        if self._fanout(digest, create=False) is None:
            raise self._not_found(digest)
        path = self._object_path(digest)
        try:
            fd = os.open(path, _READ_FLAGS)
        except FileNotFoundError:
            raise self._not_found(digest) from None
        except OSError as exc:
            # ELOOP (Linux), EMLINK (FreeBSD), EFTYPE (NetBSD): O_NOFOLLOW met a link.
            with contextlib.suppress(OSError):
                _check_kind(path, os.lstat(path), folder=False)
            raise StoreIOError(f"cannot read {path}: {exc.strerror or exc}") from exc
        try:
            _check_kind(path, os.fstat(fd), folder=False)
            if _NONBLOCK:
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return io.FileIO(fd, "rb", closefd=True)

    def _walk(self) -> Iterator[Digest | Path]:
        """Stored objects (as digests) and unsafe entries under ``objects/`` (as paths), in
        sorted order; a linked fan-out folder is reported, never entered."""
        with os.scandir(self._objects) as it:
            fanouts = sorted((e for e in it if _FANOUT_RE.fullmatch(e.name)), key=_name)
        for fanout in fanouts:
            if not fanout.is_dir(follow_symlinks=False):
                yield Path(fanout.path)  # a link, or a file that blocks writes into this folder
                continue
            try:
                with os.scandir(fanout.path) as it:
                    objects = sorted((e for e in it if _REST_RE.fullmatch(e.name)), key=_name)
            except FileNotFoundError:
                continue
            for obj in objects:
                if obj.is_file(follow_symlinks=False):
                    yield Digest(fanout.name + obj.name)
                else:
                    yield Path(obj.path)

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
        st = self._object_stat(digest)
        return None if st is None else st.st_size

    def _install(self, tmp: Path, digest: Digest, size: int) -> None:
        """Publish the complete, fsynced ``tmp`` as the object for ``digest``."""
        fanout = self._fanout(digest, create=True)
        assert fanout is not None  # create=True
        final = fanout / digest.hexdigest[2:]
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


def _check_kind(path: Path, st: os.stat_result, *, folder: bool) -> None:
    """Raise :class:`UnsafeStorePath` unless ``st`` (an ``lstat``) is a folder / regular file."""
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeStorePath(path, "is a symbolic link inside the artifact store")
    if folder and not stat.S_ISDIR(st.st_mode):
        raise UnsafeStorePath(path, "is not a folder (artifact store layout)")
    if not folder and not stat.S_ISREG(st.st_mode):
        raise UnsafeStorePath(path, "is not a regular file (artifact store layout)")


def _name(entry: os.DirEntry[str]) -> str:
    return entry.name


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
