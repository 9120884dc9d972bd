"""Signs of life for running runs, and an end event when the scheduler sends SIGTERM.

A single daemon thread per process appends one ``heartbeat`` event to each active run every
``spool.heartbeat_s`` seconds — never on the ``log_*`` path — so ``ff-sync`` can tell a quiet
run from a dead one. SIGTERM (a batch scheduler's time limit or preemption) ends the process's
active runs as KILLED before the process goes, when no other handler was installed. Ending a
run that captures the console gives the process its stdout and stderr back first
(``Run.end``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from formula_foundry.tracking.scheduler import sigterm_reason

_lock = threading.Lock()
_thread: threading.Thread | None = None
_stop = threading.Event()
_sigterm_installed = False


def start_heartbeat(interval_s: float, beat: Callable[[], None]) -> None:
    """Start the process's heartbeat thread once; ``beat`` marks every active run."""
    global _thread
    if interval_s <= 0:
        return
    with _lock:
        if _thread is not None and _thread.is_alive():
            return

        def loop() -> None:
            while not _stop.wait(interval_s):
                with contextlib.suppress(Exception):  # a full disk must not kill the thread
                    beat()

        _thread = threading.Thread(target=loop, name="ff-heartbeat", daemon=True)
        _thread.start()


# SIGTERM handling: 0 none yet, 1 the runs are being ended, 2 they are: die.
_term_stage = 0


def install_sigterm(end_all: Callable[[str], None]) -> None:
    """On SIGTERM, end active runs KILLED, then die of SIGTERM as the default would.

    ``end_all`` gets the reason the runs end with (``scheduler.sigterm_reason``).

    Only installed from the main thread and only when SIGTERM still has its default action,
    so an application's own handler is never replaced.

    The runs are ended by a short-lived thread, not by the handler: the signal may land while
    the main thread is inside a spool write, holding that writer's lock — the handler runs on
    top of it and could never take the lock. The handler returns at once, the write finishes,
    the thread writes the end events, then signals the main thread again, and the handler lets
    the process die of SIGTERM. A second SIGTERM meanwhile (Slurm signals every process of the
    job, and the recipe's shell forwards one more) is ignored. Ending a run stops its
    system-metrics sampler first (``Run.end``): its last, partial window is spooled before the
    ``run_end`` event.
    """
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    main = threading.main_thread().ident

    def finish() -> None:
        global _term_stage
        reason = "SIGTERM"
        with contextlib.suppress(Exception):
            reason = sigterm_reason()
        with contextlib.suppress(Exception):
            end_all(reason)
        _term_stage = 2
        # A signal that lands just before the main thread blocks (time.sleep, a join) is
        # handled only when that call returns; signal again until the handler has run.
        while main is not None:
            try:
                signal.pthread_kill(main, signal.SIGTERM)
            except (ProcessLookupError, OSError):
                return  # the main thread is gone: the interpreter is exiting anyway
            time.sleep(0.2)

    def handler(signum: int, frame: FrameType | None) -> Any:
        global _term_stage
        if _term_stage == 0:
            _term_stage = 1
            threading.Thread(target=finish, name="ff-sigterm", daemon=True).start()
        elif _term_stage == 2:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    _sigterm_installed = True


_excepthook_installed = False


def install_excepthook(end_all: Callable[[str, str], None]) -> None:
    """An uncaught exception ends the process's active runs FAILED (``KeyboardInterrupt``:
    KILLED), with the exception as the reason, before the previous hook prints it.

    Without it the interpreter's exit would end them FINISHED: a crashed job whose runs read
    as successes. While a run captures the console, the previous hook prints first, so the
    traceback is in the run's console. Chains to whatever hook was installed; installed once
    per process.
    """
    global _excepthook_installed
    if _excepthook_installed:
        return
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        # An interactive interpreter reports the exception and goes on: the runs go on too.
        if sys.flags.interactive or hasattr(sys, "ps1"):
            previous(exc_type, exc, tb)
            return
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        if _capturing():
            # The traceback is what the run's console most needs: printed while captured.
            try:
                previous(exc_type, exc, tb)
            finally:
                with contextlib.suppress(Exception):
                    end_all(status, _exception_reason(exc_type, exc))
            return
        with contextlib.suppress(Exception):
            end_all(status, _exception_reason(exc_type, exc))
        previous(exc_type, exc, tb)

    sys.excepthook = hook
    _excepthook_installed = True


def _capturing() -> bool:
    """Whether a run captures this process's console (tracking/console.py, loaded only then)."""
    console = sys.modules.get(__package__ + ".console") if __package__ else None
    return bool(console is not None and console.capturing())


def _exception_reason(exc_type: type[BaseException], exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not cost the end event
        text = ""
    reason = f"uncaught {exc_type.__name__}: {text}" if text else f"uncaught {exc_type.__name__}"
    reason = reason.replace("\x00", "")[:2000]
    return reason.encode("utf-8", "replace").decode("utf-8")


def _after_fork_in_child() -> None:
    global _thread, _lock, _term_stage
    _term_stage = 0
    # Threads do not survive fork; the child starts its own heartbeat on its next run.
    _thread = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
