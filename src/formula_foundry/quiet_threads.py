"""Starting formula-foundry's own threads so that they never take the process's signals, and
holding signals back while a few lines must run whole.

Linux delivers a signal sent to the process (Slurm's SIGTERM, Ctrl-C's SIGINT) to any one of
its threads that does not block it. Python runs its handlers only in the main thread, and
only once that thread next runs Python code: a signal that lands on a helper thread leaves
the main thread sleeping or blocked in a system call, so a job in ``time.sleep(600)``, a
``join`` or a read would hear of its SIGTERM only when that call returns — after the
scheduler's grace period, when SIGKILL has come. Each thread the tracker starts (heartbeat,
console reader, system metrics, the SIGTERM ender, the artifact writer) is started with these
signals blocked, so the kernel hands them to the program's own threads, as if the tracker's
threads were not there. A new thread inherits its creator's mask, so the creator blocks them
for the moment of the start only.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Final, TypeVar

T = TypeVar("T")

# The signals sent to a process to stop, pause or tell it something; never the ones a thread's
# own fault raises (SIGSEGV, SIGBUS, SIGFPE, SIGILL: blocked, the kernel would kill the
# process outright), nor SIGPIPE, which goes to the thread whose write failed.
BLOCKED: Final = frozenset(
    getattr(signal, name)
    for name in (
        "SIGINT",
        "SIGTERM",
        "SIGHUP",
        "SIGQUIT",
        "SIGUSR1",
        "SIGUSR2",
        "SIGALRM",
        "SIGCONT",
        "SIGTSTP",
        "SIGXCPU",
        "SIGCHLD",
        "SIGWINCH",
    )
    if hasattr(signal, name)
)


@contextlib.contextmanager
def _blocked() -> Iterator[None]:
    """:data:`BLOCKED` blocked in this thread while the block runs; the mask restored after."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: nothing to hold back
        yield
        return
    # Read first, changed second: a call that changes the mask runs the Python handlers of
    # signals already pending, and one that raises (KeyboardInterrupt) must not leave this
    # thread with the signals blocked and the old mask unknown.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_quietly(start: Callable[[], T]) -> T:
    """Call ``start`` (which starts a thread) with :data:`BLOCKED` blocked in this thread, so
    the new thread begins with them blocked; this thread's mask is restored afterwards.

    A signal arriving meanwhile waits, pending, for the moment the mask is restored (or goes
    to another thread that takes it): none is lost.
    """
    with _blocked():
        return start()


def signals_deferred() -> contextlib.AbstractContextManager[None]:
    """Hold :data:`BLOCKED` back while the block runs, in the main thread (the only one whose
    code Python's handlers interrupt): a Ctrl-C arriving meanwhile raises its
    ``KeyboardInterrupt`` once the block is done, not halfway through it."""
    if threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()
    return _blocked()
