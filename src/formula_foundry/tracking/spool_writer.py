"""One segment file per writing process: append framed events, under a durability policy.

Layout: ``<spool_root>/<run id>/seg-<start ms>-<host>-<pid>-<random>.jsonl``. A process writes
only segments it created (``O_EXCL``), so writers never share a file and need no lock between
processes; threads of one process serialise on a ``threading.Lock`` so lines never interleave
and sequence numbers follow file order. A child created by ``fork`` never writes into its
parent's segment: after the fork it opens a segment of its own on its first event.

Durability modes:

``write``     one ``os.write`` per event before the call returns: the event is in the kernel,
              so killing the process (even SIGKILL) loses nothing.
``fsync``     ``write`` plus ``fdatasync``: the event survives a node crash or power loss.
``buffered``  events are collected in memory and written in blocks of 64 KiB, at run end and
              at interpreter exit: fastest, but a killed process loses the unwritten window.
              A forked child writes its events unbuffered (it may leave via ``os._exit``).

A failed write (disk full, quota, file-size limit) raises
:class:`~formula_foundry.errors.SpoolWriteError` and leaves no part of the line behind: a short
write is cut off with ``ftruncate``, so the segment stays a sequence of whole lines. In
``buffered`` mode the error also counts the events of earlier, already returned calls that were
lost with the block.

A run folder that is a symbolic link is refused (ff-sync would never read it); the spool root
itself may be one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref
import zlib
from pathlib import Path
from typing import Any, Final, NoReturn

from formula_foundry.errors import ConfigError, RunStateError, SpoolWriteError, ValidationError
from formula_foundry.tracking.events import (
    CHECKSUM_TAIL,
    FORMAT_VERSION,
    K_METRICS,
    K_SEGMENT,
    MAX_LINE_BYTES,
    METRIC_HEAD,
    frame,
)

SEGMENT_PREFIX: Final = "seg-"
SEGMENT_SUFFIX: Final = ".jsonl"
_BUFFER_LIMIT: Final = 64 * 1024
_OPEN_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LOST_THIS_CALL: Final = "nothing of this call was kept"
_crc32 = zlib.crc32
_write = os.write
_time_ns = time.time_ns
_TAIL_LEN: Final = len(CHECKSUM_TAIL % (b"", 0)) - 1  # what frame() adds to the head, "\n" aside
# What orjson writes for a metrics record, its checksum slot and closing brace cut off, with the
# ``d`` object given already serialised: ``% (seq, t, step, json(d))``. Byte-identical to
# frame() of the record (orjson writes the keys in insertion order, without spaces).
_METRICS_HEAD: Final = b'{"v":%d,"s":%%d,"t":%%d,"k":"%s","step":%%d,"d":%%b' % (
    FORMAT_VERSION,
    K_METRICS.encode(),
)


def hostname() -> str:
    """This host's name, as ``socket.gethostname()`` gives it (without importing socket)."""
    uname = getattr(os, "uname", None)
    if uname is not None:
        return str(uname().nodename)
    import socket  # pragma: no cover - not POSIX

    return socket.gethostname()  # pragma: no cover


def utf8_text(value: str) -> str:
    """``value`` as valid UTF-8 text: undecodable bytes that Python kept as lone surrogates
    (a non-UTF-8 ``sys.argv`` element, ``$USER`` or host name) are spelled ``\\xNN``."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that does not stand for a byte
        raw = value.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


_HOST: Final = utf8_text(hostname())
_live_writers: weakref.WeakSet[SegmentWriter] = weakref.WeakSet()


def now_ms() -> int:
    return _time_ns() // 1_000_000


def is_segment_name(name: str) -> bool:
    return name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX)


def segment_started_ms(name: str) -> int:
    """The start time encoded in a segment's name (0 if the name does not say)."""
    head = name[len(SEGMENT_PREFIX) :].split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def _name_time_after_existing(run_dir: int) -> int:
    """Now, or just after the newest segment already in ``run_dir`` (a descriptor of the run
    folder), whichever is later.

    The sync merges a run's segments in name-time order. A resumed run's new segment must come
    after the old ones even when both start in the same millisecond or the new node's clock is
    behind the old one's (clock skew between compute nodes is common).
    """
    newest = 0
    try:
        with os.scandir(run_dir) as entries:
            for entry in entries:
                if is_segment_name(entry.name):
                    newest = max(newest, segment_started_ms(entry.name))
    except OSError:
        pass  # the open below reports an unusable folder
    return max(now_ms(), newest + 1)


def _safe_host(host: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in host)[:64] or "host"


class SegmentWriter:
    """Appends events of one run to this process's segment of that run."""

    def __init__(self, spool_root: Path, spool_run_id: str, durability: str = "write") -> None:
        self.run_dir = spool_root / spool_run_id
        self.spool_run_id = spool_run_id
        if durability not in ("write", "fsync", "buffered"):
            raise ConfigError(
                f"durability must be one of write, fsync, buffered, got {durability!r}"
            )
        self.durability = durability
        self._buffering = durability == "buffered"
        self._fsync = durability == "fsync"
        self._direct = durability == "write"  # the hot paths' one test
        self.path: Path | None = None
        self._fd = -1
        self._size = 0
        self._last_seq = 0
        self._lock = threading.Lock()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._forked_from: str | None = None
        # Set by end(): the run has ended; an append after it (a thread that fetched this
        # writer before the run's end) is refused rather than opening a segment after run_end.
        self._ended: str | None = None
        _live_writers.add(self)

    # -- public ---------------------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> None:
        """Frame ``record`` (its ``"s"`` slot is filled here) and write it per the policy.

        On failure nothing of the record stays in the file and the sequence is not consumed.
        """
        with self._lock:
            opening = self._fd < 0
            if opening and self._ended is not None:
                self._refuse_ended()
            seq = 1 if opening else self._last_seq + 1
            record["s"] = seq
            # Framed before a new segment is opened: a record that cannot be serialised must
            # not leave a header-only segment behind.
            line = frame(record)
            if len(line) - 1 > MAX_LINE_BYTES:
                self._refuse_long(record.get("k"), len(line) - 1)
            if opening:
                self._open()
            self._emit_locked(line, seq)

    def append_many(self, records: list[dict[str, Any]]) -> None:
        """Append ``records`` as consecutive events in one write: all of them or none.

        One call of the MLflow drop-in (a ``log_batch`` mixing steps and times) may need several
        events; a kill between two writes would keep part of a call that never returned.
        """
        if len(records) == 1:
            self.append(records[0])
            return
        with self._lock:
            opening = self._fd < 0
            if opening and self._ended is not None:
                self._refuse_ended()
            seq = 0 if opening else self._last_seq
            lines = []
            for record in records:
                seq += 1
                record["s"] = seq
                line = frame(record)
                if len(line) - 1 > MAX_LINE_BYTES:
                    self._refuse_long(record.get("k"), len(line) - 1)
                lines.append(line)
            if not lines:
                return
            if opening:
                self._open()
            self._emit_locked(b"".join(lines), seq)

    def append_split(self, kind: str, events: list[tuple[bytes, bytes]]) -> None:
        """Append ``kind`` events given as ``(head, body)`` in one write: all of them or none.

        ``head % seq + body`` is what :func:`frame` checksums (``head`` holds the one ``%d`` of
        the sequence number). The console capture's reader thread appends 64 KiB bodies this
        way: checksummed and written (``os.writev``) where they lie, never copied into a line,
        so the thread holds the GIL the program wants for as short a time as it can.
        """
        with self._lock:
            opening = self._fd < 0
            if opening and self._ended is not None:
                self._refuse_ended()
            seq = 0 if opening else self._last_seq
            parts: list[bytes] = []
            for head, body in events:
                seq += 1
                first = head % seq
                size = len(first) + len(body) + _TAIL_LEN
                if size > MAX_LINE_BYTES:
                    self._refuse_long(kind, size)
                parts += (first, body, CHECKSUM_TAIL % (b"", _crc32(body, _crc32(first))))
            if not parts:
                return
            if opening:
                self._open()
            # writev takes at most IOV_MAX (1024 on Linux) pieces; buffering and fsync go the
            # common way.
            if not self._direct or len(parts) > 1020:
                self._emit_locked(b"".join(parts), seq)
                return
            total = sum(map(len, parts))
            prev, self._last_seq = self._last_seq, seq  # see _emit_locked
            try:
                written = os.writev(self._fd, parts)
            except OSError:
                written = -1
            if written == total:
                self._size += written
            else:
                self._short_write(b"".join(parts), written, prev)

    def append_metric(self, t: int, step: int, key_json: bytes, value_json: bytes) -> None:
        """The hot path of ``log_metric``: append a one-key metrics event.

        Writes exactly what :meth:`append` writes for ``{"v", "s", "t", "k": "metrics",
        "step", "d": {key: value}}`` (see :func:`~formula_foundry.tracking.events.frame_metric`),
        without building and serialising the dict. ``key_json``/``value_json`` are the
        ``orjson.dumps`` of the key and of the value's spool spelling.
        """
        lock = self._lock
        # acquire/release rather than ``with``: half the cost, and the lock is most of what
        # this method adds to the write itself (try/finally costs nothing until it raises).
        lock.acquire()
        try:
            if self._fd < 0:
                if self._ended is not None:
                    self._refuse_ended()
                self._open()
            seq = self._last_seq + 1
            head = METRIC_HEAD % (seq, t, step, key_json, value_json)
            line = CHECKSUM_TAIL % (head, _crc32(head))
            if not self._direct:
                self._emit_locked(line, seq)
                return
            # _emit_locked inlined for the common case: a method call is a tenth of this path.
            self._last_seq = seq
            try:
                written = _write(self._fd, line)
            except OSError:
                written = -1
            if written == len(line):
                self._size += written
            else:
                self._short_write(line, written, seq - 1)
        finally:
            lock.release()

    def append_metric_events(self, events: list[tuple[int, int, bytes]]) -> None:
        """Append metrics events ``(t, step, json(d))`` as consecutive events in one write:
        :meth:`append_many` of those records, without building them."""
        lock = self._lock
        lock.acquire()
        try:
            opening = self._fd < 0
            if opening and self._ended is not None:
                self._refuse_ended()
            seq = 0 if opening else self._last_seq
            lines = []
            for t, step, data_json in events:
                seq += 1
                head = _METRICS_HEAD % (seq, t, step, data_json)
                if len(head) + _TAIL_LEN > MAX_LINE_BYTES:
                    self._refuse_long(K_METRICS, len(head) + _TAIL_LEN)
                lines.append(CHECKSUM_TAIL % (head, _crc32(head)))
            if not lines:
                return
            if opening:
                self._open()
            self._emit_locked(lines[0] if len(lines) == 1 else b"".join(lines), seq)
        finally:
            lock.release()

    def flush(self) -> None:
        """Write buffered events (buffered mode) and, in fsync mode, sync the file."""
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        """Flush and close; later appends open a new segment."""
        with self._lock:
            self._close_locked()

    def end(self, status: str) -> None:
        """Flush and close for good: the run ended (``status``); later appends raise
        :class:`~formula_foundry.errors.RunStateError` instead of opening a segment."""
        with self._lock:
            self._ended = status
            self._close_locked()

    def _close_locked(self) -> None:
        if self._fd >= 0:
            try:
                self._flush_locked()
            finally:
                # Forgotten before it is closed: a number closed but still held (an interrupt
                # between the two) could be reused by another file, and a later write land there.
                fd, self._fd = self._fd, -1
                os.close(fd)

    @property
    def last_seq(self) -> int:
        return self._last_seq

    # -- internals ------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._refuse_link()
            raise SpoolWriteError(
                f"run {self.spool_run_id}: cannot create spool folder {self.run_dir}: "
                f"{exc.strerror or exc}"
            ) from None
        dir_fd = self._open_run_dir()
        try:
            self._open_segment(dir_fd)
        finally:
            os.close(dir_fd)

    def _refuse_link(self) -> None:
        if os.path.islink(self.run_dir):
            raise SpoolWriteError(
                f"run {self.spool_run_id}: spool folder {self.run_dir} is a symbolic link; the "
                "spool must be a real folder (ff-sync does not follow links in the spool)"
            )

    def _open_run_dir(self) -> int:
        """Open the run folder itself, refusing a symbolic link in its place.

        ff-sync reads only real run folders, so events written through a link would land
        outside the spool and never be synced. The spool root may be a link: only the last
        component is checked. The segment is then created relative to this descriptor, so
        the folder cannot be swapped for a link in between.
        """
        try:
            return os.open(self.run_dir, _DIR_FLAGS)
        except OSError as exc:
            self._refuse_link()
            raise SpoolWriteError(
                f"run {self.spool_run_id}: cannot open spool folder {self.run_dir}: "
                f"{exc.strerror or exc}"
            ) from None

    def _open_segment(self, dir_fd: int) -> None:
        """Create this process's new segment in the run folder ``dir_fd``; write its header."""
        started = _name_time_after_existing(dir_fd)
        pid = os.getpid()
        for _ in range(8):
            name = (
                f"{SEGMENT_PREFIX}{started}-{_safe_host(_HOST)}-{pid}-"
                f"{os.urandom(3).hex()}{SEGMENT_SUFFIX}"
            )
            try:
                fd = os.open(name, _OPEN_FLAGS, 0o644, dir_fd=dir_fd)
            except FileExistsError:
                continue
            except OSError as exc:
                raise SpoolWriteError(
                    f"run {self.spool_run_id}: cannot create spool segment in {self.run_dir}: "
                    f"{exc.strerror}"
                ) from None
            break
        else:  # pragma: no cover - 8 random collisions in a row
            raise SpoolWriteError(f"run {self.spool_run_id}: cannot pick a new segment name")
        self._fd, self._size, self.path = fd, 0, self.run_dir / name
        self._last_seq = 0
        header: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "s": 0,
            "t": started,
            "k": K_SEGMENT,
            "format": FORMAT_VERSION,
            "run": self.spool_run_id,
            "host": _HOST,
            "pid": pid,
            "segment": name,
        }
        if self._forked_from:
            header["forked_from"] = self._forked_from
        try:
            self._write_locked(frame(header))
            if self._fsync:
                self._sync_locked()
                with contextlib.suppress(OSError):
                    os.fsync(dir_fd)
        except SpoolWriteError:
            os.close(fd)
            self._fd = -1
            # A segment without its header is unreadable; never leave one behind.
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
            raise

    def _refuse_ended(self) -> NoReturn:
        raise RunStateError(f"run {self.spool_run_id} has ended ({self._ended}); cannot log to it")

    def _refuse_long(self, kind: object, size: int) -> NoReturn:
        raise ValidationError(
            f"run {self.spool_run_id}: one {kind} event of {size} bytes is longer than a spool "
            f"line may be ({MAX_LINE_BYTES} bytes); log fewer keys per call"
        )

    def _emit_locked(self, line: bytes, seq: int) -> None:
        """Write (or buffer) the framed ``line`` of sequence number ``seq`` per the policy."""
        # The number is taken before the write: a KeyboardInterrupt raised as the write returns
        # must not leave it free for the next event (two events of one number). A write that
        # fails leaves nothing of the line, and gives it back.
        prev, self._last_seq = self._last_seq, seq
        if self._buffering:
            self._buffer.append(line)
            self._buffered += len(line)
            if self._buffered >= _BUFFER_LIMIT:
                self._flush_locked(with_current=True)
            return
        # _write_locked inlined: every append ends here.
        try:
            written = _write(self._fd, line)
        except OSError:
            written = -1
        if written == len(line):
            self._size += written
        else:
            self._short_write(line, written, prev)
        if self._fsync:
            self._sync_locked()

    def _short_write(self, data: bytes, written: int, prev_seq: int) -> None:
        """:meth:`_finish_short_write` of an event whose number was taken: given back if the
        write fails."""
        try:
            self._finish_short_write(data, written)
        except SpoolWriteError:
            self._last_seq = prev_seq
            raise

    def _write_locked(self, data: bytes, lost: str = _LOST_THIS_CALL) -> None:
        try:
            written = _write(self._fd, data)
        except OSError:
            written = -1
        if written == len(data):
            self._size += written
        else:
            self._finish_short_write(data, written, lost)

    def _finish_short_write(self, data: bytes, written: int, lost: str = _LOST_THIS_CALL) -> None:
        """Complete a short write, or undo it and raise :class:`SpoolWriteError`.

        ``written`` is what the first ``os.write`` returned (-1: it raised, writing nothing);
        ``lost`` ends the error message, saying which events are gone. A write comes up short
        when the disk or the file-size limit is reached in the middle of the line; writing the
        rest then fails with the reason.
        """
        start = self._size
        done = max(written, 0)
        view = memoryview(data)
        try:
            while done < len(data):
                done += _write(self._fd, view[done:])
        except OSError as exc:
            if done:
                # A torn line would hide every later event behind a corrupt one: cut it off.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
            raise SpoolWriteError(
                f"run {self.spool_run_id}: could not write to spool segment {self.path}: "
                f"{exc.strerror or exc} ({lost})"
            ) from None
        self._size = start + done

    def _flush_locked(self, with_current: bool = False) -> None:
        """Write the buffer; ``with_current``: its last event is the calling append's."""
        if self._buffer and self._fd >= 0:
            data = b"".join(self._buffer)
            earlier = len(self._buffer) - with_current
            self._buffer.clear()
            self._buffered = 0
            # Earlier appends already returned: say exactly what is gone with this block.
            lost = (
                f"lost: {earlier} buffered events of earlier calls"
                + (" and this call's event" if with_current else "")
                + f", {len(data)} bytes"
            )
            self._write_locked(data, lost)
        if self._fsync and self._fd >= 0:
            self._sync_locked()

    def _sync_locked(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise SpoolWriteError(
                f"run {self.spool_run_id}: fsync of {self.path} failed: {exc.strerror}"
            ) from None

    def _after_fork_in_child(self) -> None:
        # The lock may have been held by a parent thread at fork time; it must not be reused.
        self._lock = threading.Lock()
        if self._fd >= 0:
            os.close(self._fd)
        self._forked_from = self.path.name if self.path else None
        self._fd = -1
        # The parent owns and will write its own buffered events.
        self._buffer.clear()
        self._buffered = 0
        if self._buffering:
            # A forked child may leave through os._exit (multiprocessing workers do), which
            # skips the flush at exit: it writes each event at once instead.
            self._buffering = False
            self._direct = True
            self.durability = "write"


def _reset_after_fork() -> None:
    for writer in list(_live_writers):
        writer._after_fork_in_child()


def flush_all() -> None:
    """Flush every live writer (buffered mode); registered to run at interpreter exit.

    At exit nobody can catch the error any more: what was lost is said on stderr, one line.
    """
    for writer in list(_live_writers):
        try:
            writer.flush()
        except SpoolWriteError as exc:
            with contextlib.suppress(OSError, ValueError):
                print(f"formula-foundry tracker: {exc}", file=sys.stderr)


os.register_at_fork(after_in_child=_reset_after_fork)
