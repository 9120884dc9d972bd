"""Copy a stream into a file descriptor while hashing it, in one pass and constant memory.

The caller's thread reads into a fixed pool of buffers and hashes each one; a writer thread
writes the same buffer out and then returns it to the pool. Hashing and writing both release
the GIL, so they overlap: throughput approaches the slower of the two instead of their sum.
The writer also flushes to disk every ``sync_every`` bytes, so the final fsync of a huge file
is short and the dirty page cache stays bounded.

A stream that ends within its first :data:`SMALL` bytes (plots, configs, the text and JSON
files MLflow code logs one by one) is hashed and written in the caller's thread: no buffers
to allocate, no thread to start, for files where those would cost more than the copy.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from typing import Final

from formula_foundry.quiet_threads import start_quietly
from formula_foundry.substrate.atomic import write_all
from formula_foundry.substrate.digest import CHUNK_SIZE, Digest, SupportsReadinto

__all__ = ["copy_and_hash"]

BUFFERS: Final = 4  # 4 x 4 MiB in flight: enough to keep both threads busy
SMALL: Final = 256 * 1024
SYNC_EVERY: Final = 64 * 1024 * 1024
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def copy_and_hash(
    src: SupportsReadinto,
    dst_fd: int,
    *,
    chunk_size: int = CHUNK_SIZE,
    buffers: int = BUFFERS,
    sync_every: int = SYNC_EVERY,
) -> tuple[Digest, int]:
    """Copy ``src`` to ``dst_fd`` and return the SHA-256 and size of the bytes copied.

    The digest always describes exactly the bytes written, even if ``src`` changes meanwhile.
    Errors of either side are raised here after the writer thread has stopped. The caller
    still has to fsync ``dst_fd``.
    """
    head = memoryview(bytearray(SMALL))
    filled = _fill(src, head)
    hasher = hashlib.sha256(head[:filled])
    write_all(dst_fd, head[:filled])
    if filled < SMALL:
        return Digest(hasher.hexdigest()), filled
    return _copy_rest(src, dst_fd, hasher, filled, chunk_size, buffers, sync_every)


def _fill(src: SupportsReadinto, view: memoryview) -> int:
    """Read into ``view`` until it is full or the stream ends; the bytes read."""
    filled = 0
    while filled < len(view):
        n = src.readinto(view[filled:])
        if not n:
            break
        filled += n
    return filled


def _copy_rest(
    src: SupportsReadinto,
    dst_fd: int,
    hasher: hashlib._Hash,
    size: int,
    chunk_size: int,
    buffers: int,
    sync_every: int,
) -> tuple[Digest, int]:
    """The threaded copy of a large stream, after its first ``size`` bytes."""
    free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
    full: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
    for _ in range(buffers):
        free.put(memoryview(bytearray(chunk_size)))
    failure: list[BaseException] = []

    def writer() -> None:
        unsynced = 0
        while (item := full.get()) is not None:
            view, n = item
            if not failure:
                try:
                    write_all(dst_fd, view[:n])
                    unsynced += n
                    if unsynced >= sync_every:
                        _datasync(dst_fd)
                        unsynced = 0
                except BaseException as exc:  # re-raised in the caller's thread below
                    failure.append(exc)
            free.put(view)  # always, so the reader never waits for a dead writer

    thread = threading.Thread(target=writer, name="ff-artifact-writer", daemon=True)
    start_quietly(thread.start)
    try:
        while not failure:
            view = free.get()
            n = src.readinto(view)
            if not n:
                break
            hasher.update(view[:n])
            size += n
            full.put((view, n))
    finally:
        full.put(None)
        thread.join()
    if failure:
        raise failure[0]
    return Digest(hasher.hexdigest()), size
