"""Atomic file writes and the helpers that make them durable.

A file written here is either absent or complete, also on a shared filesystem and after a crash:
data goes to a unique temporary name in the target's folder, is fsynced, renamed over the target
with :func:`os.replace`, and the folder is fsynced so the rename itself survives a power loss.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Final

__all__ = ["atomic_write_bytes", "fsync_dir", "unique_suffix", "write_all"]

_UNSAFE_HOST_CHARS: Final = re.compile(r"[^A-Za-z0-9-]")


def unique_suffix() -> str:
    """``<host>.<pid>.<random>``: unique across processes and nodes sharing a filesystem.

    The host and pid make leftovers attributable; the random part guards against pid reuse
    and identical host names in containers.
    """
    host = _UNSAFE_HOST_CHARS.sub("-", socket.gethostname())[:64] or "host"
    return f"{host}.{os.getpid()}.{secrets.token_hex(8)}"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (new names, renames) to stable storage."""
    if os.name == "nt":  # Windows cannot open directories; NTFS journals metadata itself.
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte of ``data``; :func:`os.write` may write less than asked."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes | bytearray | memoryview, *, mode: int = 0o644
) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Readers see the old content or the new one, never a mix; the temporary file is removed on
    any error (including ``KeyboardInterrupt``).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{unique_suffix()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)
