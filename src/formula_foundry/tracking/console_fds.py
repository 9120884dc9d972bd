"""The descriptors of a console capture: pipes and pseudo-terminals, writing on, flushing.

:mod:`formula_foundry.tracking.console` points fds 1 and 2 at what :func:`open_channel` gives
and writes what it reads on to the originals with :func:`write_all`; a :class:`Stream` is
one pipe it reads. Before the descriptors are swapped either way, :func:`flush_std` empties
Python's buffers, so that what a program printed before goes where it was printed for;
:func:`fatal_errors_to` keeps :mod:`faulthandler` writing where it would without the capture.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
from typing import Final, NamedTuple

# Asked for each pipe (Linux's F_SETPIPE_SZ; 1 MiB is what an unprivileged process may ask
# for): the pipe holds what a busy printer writes while the reader pauses.
PIPE_BYTES: Final = 1 << 20
_F_SETPIPE_SZ: Final = 1031
_F_GETPIPE_SZ: Final = 1032
# What a pipe of unknown size is taken to hold (Linux's smallest pipe).
SMALL_BUFFER: Final = 4096


class Channel(NamedTuple):
    read_fd: int  # what the capture reads
    write_fd: int  # what fds 1 and/or 2 become
    # Bytes it holds before a writer waits; 0 for a pseudo-terminal, whose reading side takes
    # 4 KiB at a time (Linux's N_TTY_BUF_SIZE): the reader must never pause on one.
    capacity: int
    is_pty: bool


def open_channel(original: int) -> Channel:
    """A pipe to stand in for ``original``, or a pseudo-terminal if ``original`` is one.

    Programs ask fd 1 whether it is a terminal (colours, progress bars, the line buffering of
    Python's own child processes): with a pipe in a terminal's place they would answer
    differently than before.
    """
    if os.isatty(original):
        return _open_pty(original)
    import fcntl

    read_fd, write_fd = os.pipe()
    with contextlib.suppress(OSError):  # above the allowed size: the default size
        fcntl.fcntl(read_fd, _F_SETPIPE_SZ, PIPE_BYTES)
    try:
        capacity = fcntl.fcntl(read_fd, _F_GETPIPE_SZ)
    except OSError:  # not Linux
        capacity = SMALL_BUFFER
    return Channel(read_fd, write_fd, capacity, False)


def _open_pty(terminal: int) -> Channel:
    """A pseudo-terminal of ``terminal``'s size that passes bytes on as they are."""
    import fcntl
    import termios

    master, slave = os.openpty()
    try:
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.OPOST  # no "\n" -> "\r\n": the real terminal does that itself
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        with contextlib.suppress(OSError):
            size = fcntl.ioctl(terminal, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
    except BaseException:
        close(master, slave)
        raise
    return Channel(master, slave, 0, True)


def same_destination(a: int, b: int) -> bool:
    """Whether descriptors ``a`` and ``b`` write to the same file, pipe or terminal."""
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def write_all(fd: int, data: bytes) -> bool:
    """Write all of ``data`` to ``fd``; False if the descriptor no longer takes bytes."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:  # an original someone left non-blocking: wait for room
            waiter = select.poll()
            waiter.register(fd, select.POLLOUT)
            waiter.poll(1000)
            continue
        except OSError:
            return False
        view = view[n:]
    return True


def close(*fds: int) -> None:
    """Close each descriptor that is not -1; one already closed is no error."""
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def flush_std() -> None:
    """Flush Python's ``sys.stdout`` and ``sys.stderr``.

    Not the C library's buffers: what it holds when the run ends goes out when it would have
    (a full buffer, an ``fflush``, the exit), so the bytes reach the original in the same
    order as without the capture (``python -u`` makes the C library write at once too).
    """
    seen: set[int] = set()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None and id(stream) not in seen:
            seen.add(id(stream))
            with contextlib.suppress(Exception):  # a closed or replaced stream
                stream.flush()


class Stream:
    """One pipe the capture reads, standing in for fd 1, fd 2, or both."""

    def __init__(self, name: str, targets: tuple[int, ...], out: int) -> None:
        self.name = name  # stdout, stderr or stdout+stderr: the stream of its events
        self.targets = targets  # the descriptors that write into it
        self.out = out  # the original, where its bytes are written on to
        self.read_fd = -1
        # A pseudo-terminal's writing end, kept open until the last chunk is read: once every
        # writer has closed it, Linux may discard what was not read yet (a pipe keeps it).
        self.hold = -1
        self.capacity = 0  # a read of half of it: the reader must not pause (0: never)
        self.open = False


def fatal_errors_to(fd: int | None) -> None:
    """Point :mod:`faulthandler`, if the program enabled it, at ``fd``.

    A fatal error (a segfault, an abort) kills the process before the reader thread can pass
    on what the pipe holds: written into the capture, its traceback would never reach the
    terminal or the job's output file. So while capturing it goes to the original fd 2 (not
    into the run's console), and back to fd 2 after.
    """
    import faulthandler

    if fd is not None and faulthandler.is_enabled():
        with contextlib.suppress(Exception):
            faulthandler.enable(file=fd, all_threads=True)
