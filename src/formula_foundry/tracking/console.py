"""Console capture: this process's stdout and stderr, teed into a run's spool.

``start_run(capture_output=True)`` (or ``FF_CAPTURE_OUTPUT=1``, or ``tracking.capture_output:
true``) starts one :class:`ConsoleCapture` for the run. It works on the file descriptors, not
on ``sys.stdout``: fds 1 and 2 are pointed (``dup2``) at a pipe — a pseudo-terminal where the
original is a terminal, so ``isatty()`` answers as before — and so it catches C extensions,
``os.write`` and child processes as well as ``print``. A reader thread writes every byte on to
the original at once (the terminal and the Slurm output file get exactly the bytes they got
before) and collects them into ``console`` events
(:mod:`~formula_foundry.tracking.console_events`): once 64 KiB have gathered, or sooner when
the first byte is :data:`FLUSH_S` old.

stdout and stderr that go to one place (a terminal, a Slurm job's one output file) share one
pipe, captured as the stream ``stdout+stderr``: two pipes would let the reader write a line of
one before an earlier line of the other, and the place would no longer see what it saw
before. Each goes into a pipe of its own, ``stdout`` and ``stderr``, where they went apart.

Why a thread that pauses (``tools/bench/bench_console.py``, docs/observability.md): a reader
that wakes for every write of a busy printer takes the GIL from it hundreds of times a second;
after a read it waits :data:`PAUSE_S` (not when the pipe was half full, nor on a
pseudo-terminal, which holds 4 KiB), so the pipe gathers what comes next and one read takes
it; an idle stream is read the moment a byte arrives. A helper process would share no GIL, but
costs an interpreter's start in every run.

Ending the run (normally, on an exception, at exit or on SIGTERM) flushes ``sys.stdout`` and
``sys.stderr`` (not the C library's buffers: see ``console_fds.flush_std``), gives fds 1 and 2
their originals back, and waits (:data:`STOP_TIMEOUT_S` at most) until the thread has spooled
the rest: the last chunk is written before the ``run_end`` event. Children that still hold the
pipe afterwards keep being teed to the original, no longer spooled. Bytes still in the pipe or
the thread when the process is killed with SIGKILL are lost; every event written before
survives it.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from formula_foundry.errors import RunStateError
from formula_foundry.quiet_threads import start_quietly
from formula_foundry.tracking.console_events import MERGED, Chunker, split_record
from formula_foundry.tracking.console_fds import (
    PIPE_BYTES,
    Stream,
    close,
    fatal_errors_to,
    flush_std,
    open_channel,
    same_destination,
    write_all,
)
from formula_foundry.tracking.events import K_CONSOLE
from formula_foundry.tracking.spool_writer import SegmentWriter

if TYPE_CHECKING:
    from formula_foundry.config import Settings
    from formula_foundry.tracking.run import Run

# A chunk is spooled at most this long after its first byte was read, or once this many
# bytes have gathered (then as events of up to CHUNK_BYTES).
FLUSH_S: Final = 0.25
FLUSH_BYTES: Final = 64 * 1024
FLUSH_MS: Final = int(FLUSH_S * 1000)
# After a read, the reader waits this long before reading again (see the module docstring).
PAUSE_S: Final = 0.005
PAUSE_MS: Final = round(PAUSE_S * 1000)
# How long ending a run waits for the last chunk (a terminal stopped with Ctrl-S blocks it).
STOP_TIMEOUT_S: Final = 5.0
_READ_BYTES: Final = 1 << 20
_POLL_IN: Final = select.POLLIN | select.POLLHUP | select.POLLERR

# Spools console records in one write (the run's writer); RunStateError once the run ended.
EmitFn = Callable[[list[dict[str, Any]]], None]

_lock = threading.Lock()
_active: ConsoleCapture | None = None
_warned: set[str] = set()


def capturing() -> bool:
    """Whether a run of this process captures its output now."""
    active = _active
    return active is not None and active.pid == os.getpid()


class ConsoleCapture:
    """The tee of one run's output. :meth:`start` swaps the descriptors; :meth:`stop` ends it."""

    def __init__(self, emit: EmitFn, max_bytes: int) -> None:
        self._emit = emit
        self._chunker = Chunker(max_bytes)
        self.pid = os.getpid()
        self._saved: dict[int, int] = {}  # fd -> a copy of its original
        self._streams: list[Stream] = []
        self._wake_r = self._wake_w = -1
        self._stopping = threading.Event()
        self._drained = threading.Event()
        self._spooling = True
        self._reader = 0  # the reader thread's id, once it runs
        # The originals' copies serve stop() (to give them back) and the reader (to write on
        # to them, also after the run); the one of the two that finishes last closes them,
        # and the wake pipe's writing end: a closed number may be reused by another file.
        self._fd_lock = threading.Lock()
        self._restored = False
        self._reader_done = False

    def _fds(self) -> list[int]:
        own = [fd for s in self._streams for fd in (s.read_fd, s.hold)]
        return [*own, *self._saved.values(), self._wake_r, self._wake_w]

    # -- the caller's side -----------------------------------------------------------------

    def start(self) -> None:
        """Point fds 1 and 2 at the capture and start the reader (a closed fd is left alone)."""
        flush_std()
        try:
            for fd in (1, 2):
                # Not inheritable: children get the capture. A closed fd is written nothing.
                with contextlib.suppress(OSError):
                    self._saved[fd] = os.dup(fd)
            saved = self._saved
            if not saved:
                raise OSError("fds 1 and 2 are both closed")
            if len(saved) == 2 and same_destination(saved[1], saved[2]):
                self._streams = [Stream(MERGED, (1, 2), saved[1])]
            else:
                names = {1: "stdout", 2: "stderr"}
                self._streams = [Stream(names[fd], (fd,), saved[fd]) for fd in saved]
            for s in self._streams:
                self._open(s)
            fatal_errors_to(saved.get(2))
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            # Not threading.Thread: its start() waits until the new thread runs, which on a
            # busy node can take milliseconds of the program's time. Daemon-like: it never
            # holds the interpreter's exit.
            start_quietly(lambda: _thread.start_new_thread(self._main, ()))
        except BaseException:
            self._restore()
            close(*self._fds())
            raise

    def _open(self, s: Stream) -> None:
        channel = open_channel(s.out)
        s.read_fd, s.capacity = channel.read_fd, channel.capacity
        try:
            os.set_blocking(channel.read_fd, False)
            for fd in s.targets:
                os.dup2(channel.write_fd, fd)  # inheritable: children write into it too
        except BaseException:
            close(channel.write_fd)
            raise
        if channel.is_pty:
            s.hold = channel.write_fd
        else:
            close(channel.write_fd)
        s.open = True

    def _restore(self) -> None:
        """Point fds 1 and 2 at their originals again (once)."""
        with self._fd_lock:
            if self._restored:
                return
            self._restored = True
            for fd, saved in self._saved.items():
                with contextlib.suppress(OSError):
                    os.dup2(saved, fd)
            fatal_errors_to(2 if 2 in self._saved else None)

    def _close_shared(self) -> None:
        with self._fd_lock:
            if self._restored and self._reader_done:
                close(*self._saved.values(), self._wake_w)
                self._saved, self._wake_w = {}, -1

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Give fds 1 and 2 back; wait (``timeout`` at most) until the rest is spooled."""
        if os.getpid() != self.pid or self._stopping.is_set():
            return  # a forked child (the capture is its parent's), or stopped already
        flush_std()
        self._restore()  # from here on, what this process writes goes straight out
        self._stopping.set()
        with self._fd_lock, contextlib.suppress(OSError):
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")
        if threading.get_ident() != self._reader:
            self._drained.wait(timeout)
        self._close_shared()
        _release(self)

    # -- the reader thread -----------------------------------------------------------------

    def _main(self) -> None:
        self._reader = threading.get_ident()
        try:
            self._loop()
        except Exception:  # the capture must never take the program down
            self._spooling = False
            if not self._stopping.is_set():
                self._restore()  # its output goes on, straight to the originals
                _release(self)
        finally:
            for s in self._streams:
                s.open = False
                close(s.read_fd, s.hold)
            close(self._wake_r)
            with self._fd_lock:
                self._reader_done = True
            self._drained.set()
            self._close_shared()

    def _loop(self) -> None:
        poller = select.poll()
        by_fd = {s.read_fd: s for s in self._streams}
        for fd in by_fd:
            poller.register(fd, _POLL_IN)
        poller.register(self._wake_r, select.POLLIN)
        # The pause: a poll of the wake pipe alone, so that a stop ends it at once (one system
        # call, as time.sleep; an Event's wait takes the GIL several times more).
        pauser = select.poll()
        pauser.register(self._wake_r, select.POLLIN)
        chunker = self._chunker
        # The streams that had bytes at the last read: after the pause they are read without
        # asking poll first (each system call costs the thread the GIL once more).
        flowing: list[Stream] = []
        while any(s.open for s in self._streams):
            if flowing:
                ready = [(s.read_fd, 0) for s in flowing if s.open]
            else:
                oldest = chunker.oldest_ms() if self._spooling else None
                wait = -1 if oldest is None else max(0, oldest + FLUSH_MS - _now_ms())
                ready = poller.poll(wait)
            flowing = []
            got, pause = 0, True
            for fd, _ in ready:
                stream = by_fd.get(fd)
                if stream is not None:
                    n = self._read(stream, poller)
                    if n:
                        flowing.append(stream)
                    got += n
                    # Half full: the pipe would fill during a pause, the printer wait.
                    pause = pause and n < stream.capacity // 2
                elif fd == self._wake_r:
                    poller.unregister(fd)  # the stop asked; _stopping says so from now on
            if self._spooling:
                if self._stopping.is_set():
                    self._finish(poller)
                else:
                    self._spool(final=False)
            if got and pause:
                pauser.poll(PAUSE_MS)  # let the pipe gather what comes next
        if self._spooling:  # every writer closed fds 1 and 2 before the run ended
            self._spool(final=True)

    def _read(self, s: Stream, poller: select.poll) -> int:
        """Read what ``s`` holds, write it on, collect it; how many bytes."""
        try:
            data = os.read(s.read_fd, _READ_BYTES)
        except BlockingIOError:
            return 0
        except OSError:  # a pseudo-terminal whose every writer closed it: its end
            data = b""
        if not data:
            s.open = False
            poller.unregister(s.read_fd)
            return 0
        if not write_all(s.out, data):
            # The reader of the original went away (`| head`) or the terminal hung up: pass it
            # on, so the program's next write fails as it would have without the capture.
            s.open = False
            poller.unregister(s.read_fd)
            close(s.read_fd, s.hold)
            s.read_fd = s.hold = -1
        if self._spooling:
            self._chunker.add(s.name, data, _now_ms())
        return len(data)

    def _spool(self, *, final: bool) -> None:
        chunker = self._chunker
        if not final:
            oldest = chunker.oldest_ms()
            if oldest is None:
                return
            if _now_ms() - oldest < FLUSH_MS and chunker.largest() < FLUSH_BYTES:
                return
        items = chunker.take(_now_ms(), final=final)
        if not items:
            return
        try:
            self._emit([record for record, _, _ in items])
        except RunStateError:
            self._spooling = False  # the run ended without waiting for us
        except Exception:  # a full disk: the bytes count as dropped, the next chunk may fit
            for _, stream, n in items:
                chunker.drop(stream, n)

    def _finish(self, poller: select.poll) -> None:
        """The run is ending: spool what the pipes hold now, then only write on."""
        for s in self._streams:
            drained = 0
            while s.open and drained < 4 * PIPE_BYTES:  # bounded: a child may write on
                n = self._read(s, poller)
                if not n:
                    break
                drained += n
            if s.hold >= 0:
                close(s.hold)  # the pseudo-terminal ends with its last writer now
                s.hold = -1
        self._spool(final=True)
        self._spooling = False
        self._drained.set()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _warn_once(topic: str, message: str) -> None:
    with _lock:
        if topic in _warned:
            return
        _warned.add(topic)
    import logging  # deferred: a capture that starts never warns, and logging is slow to load

    logging.getLogger(__name__).warning("formula-foundry console capture: %s", message)


def _release(capture: ConsoleCapture) -> None:
    global _active
    with _lock:
        if _active is capture:
            _active = None


def capture_run(run: Run, settings: Settings) -> ConsoleCapture | None:
    """Start capturing this process's output into ``run``.

    ``None`` (with one warning) when another run of the process captures it already, or the
    descriptors cannot be swapped: the run goes on without.
    """
    global _active

    def emit(records: list[dict[str, Any]]) -> None:
        writer = run._writer
        if isinstance(writer, SegmentWriter):
            writer.append_split(K_CONSOLE, [split_record(r) for r in records])
        else:
            writer.append_many(records)  # after the run's end: RunStateError

    capture = ConsoleCapture(emit, settings.console_max_bytes)
    with _lock:
        other = _active if _active is not None and _active.pid == os.getpid() else None
        if other is None:
            _active = capture
    if other is not None:
        _warn_once(
            "twice",
            f"run {run.run_id} does not capture the console: another run of this process "
            "captures it already (one capture per process)",
        )
        return None
    try:
        capture.start()
    except OSError as exc:
        _release(capture)
        _warn_once("start", f"run {run.run_id} cannot capture the console ({exc}); the run goes on")
        return None
    return capture


def _after_fork_in_child() -> None:
    # The child writes into its parent's capture (that is the point); the reading ends and the
    # originals it inherited are its parent's business: without them, a child whose parent
    # died gets EPIPE rather than blocking on a pipe nobody reads.
    global _active, _lock
    _lock = threading.Lock()
    capture, _active = _active, None
    if capture is not None:
        close(*capture._fds())
        fatal_errors_to(2)  # not at the parent's copy of fd 2, closed here (its number reused)


os.register_at_fork(after_in_child=_after_fork_in_child)
