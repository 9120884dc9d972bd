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

from formula_foundry.quiet_threads import start_quietly
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
        start_quietly(_thread.start)


# SIGTERM handling: 0 none yet, 1 the runs are being ended, 2 they are: die.
_term_stage = 0
# What ends the runs on SIGTERM: one callable per tracker or drop-in run book of the process
# (a job may use both), keyed by its owner.
_sigterm_enders: dict[int, Callable[[str], None]] = {}
_ended = threading.Event()  # set once the SIGTERM's ender has ended every run
# How long the ender keeps signalling the main thread to die; then the interpreter's own
# exit goes on (a program that replaced the handler meanwhile keeps its say).
_SIGNAL_FOR_S = 10.0


def install_sigterm(owner: object, end_all: Callable[[str], None]) -> None:
    """On SIGTERM, end active runs KILLED, then die of SIGTERM as the default would.

    ``end_all`` (one per ``owner``: every tracker and drop-in run book of the process is
    called) gets the reason the runs end with (``scheduler.sigterm_reason``).

    The handler is installed once, from the main thread and only when SIGTERM still has its
    default action, so an application's own handler is never replaced.

    The runs are ended by a short-lived thread, not by the handler: the signal may land while
    the main thread is inside a spool write, holding that writer's lock — the handler runs on
    top of it and could never take the lock. The handler returns at once, the write finishes,
    the thread writes the end events, then signals the main thread again, and the handler lets
    the process die of SIGTERM. A second SIGTERM meanwhile (Slurm signals every process of the
    job, and the recipe's shell forwards one more) is ignored. Ending a run stops its
    system-metrics sampler first (``Run.end``): its last, partial window is spooled before the
    ``run_end`` event.

    The thread is not a daemon: a main thread that reaches the interpreter's exit meanwhile
    (the signal came as the program finished) waits for it before any at-exit end, so the runs
    end KILLED, once, with the console's last bytes written out — not FINISHED by the at-exit
    end while the thread is cut off.
    """
    global _sigterm_installed
    _sigterm_enders[id(owner)] = end_all
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    main = threading.main_thread().ident

    def end_runs() -> None:
        global _term_stage
        reason = "SIGTERM"
        with contextlib.suppress(Exception):
            reason = sigterm_reason()
        for end_all in list(_sigterm_enders.values()):
            with contextlib.suppress(Exception):  # one failing owner must not keep the others
                end_all(reason)
        # The process dies of SIGTERM next, without the interpreter's exit: what buffered
        # writers hold (durability "buffered") goes out now.
        with contextlib.suppress(Exception):
            from formula_foundry.tracking.spool_writer import flush_all

            flush_all()
        _term_stage = 2
        _ended.set()

    def finish() -> None:
        end_runs()
        # A signal that lands just before the main thread blocks (time.sleep, a join) is
        # handled only when that call returns; signal again until the handler has run — as
        # long as it is ours: a handler the program installed since is not called again.
        deadline = time.monotonic() + _SIGNAL_FOR_S
        while main is not None and time.monotonic() < deadline:
            if signal.getsignal(signal.SIGTERM) is not handler:
                return
            try:
                signal.pthread_kill(main, signal.SIGTERM)
            except (ProcessLookupError, OSError):
                return  # the main thread is gone: the interpreter is exiting anyway
            time.sleep(0.2)

    def handler(signum: int, frame: FrameType | None) -> Any:
        global _term_stage, _finisher
        if _term_stage == 0:
            _term_stage = 1
            thread = threading.Thread(target=finish, name="ff-sigterm", daemon=False)
            try:
                start_quietly(thread.start)
            except RuntimeError:
                # No new thread (the interpreter is finalizing, or at the thread limit). Ending
                # the runs here, on top of whatever the main thread was doing, could wait
                # forever on a lock it holds (a spool write): die as the default would; the
                # sync ends the runs once they go silent.
                _term_stage = 2
                _die()
            else:
                _finisher = thread
        elif _term_stage == 2:
            _die()

    def _die() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    _sigterm_installed = True


_finisher: threading.Thread | None = None


def terminating() -> bool:
    """Whether a SIGTERM is ending this process's runs: no new run may start now (the end
    would miss it, and the process dies next)."""
    return _term_stage != 0


def sigterm_ending(timeout_s: float) -> bool:
    """Whether a SIGTERM is ending this process's runs; if so, wait (``timeout_s`` at most)
    until it has. The at-exit end asks first: its FINISHED must not race the KILLED."""
    if _term_stage == 0:
        return False
    if _finisher is not threading.current_thread():
        _ended.wait(timeout_s)
    return True


_excepthook_installed = False


_exception_enders: dict[int, Callable[[str, str], None]] = {}


def install_excepthook(owner: object, end_all: Callable[[str, str], None]) -> None:
    """An uncaught exception ends the process's active runs FAILED (``KeyboardInterrupt``:
    KILLED), with the exception as the reason, before the previous hook prints it.

    Without it the interpreter's exit would end them FINISHED: a crashed job whose runs read
    as successes. While a run captures the console, the previous hook prints first, so the
    traceback is in the run's console. Chains to whatever hook was installed; installed once
    per process, calling the ``end_all`` of every ``owner`` (each tracker of the process).
    """
    global _excepthook_installed
    _exception_enders[id(owner)] = end_all
    if _excepthook_installed:
        return
    previous = sys.excepthook

    def end_all_owners(status: str, reason: str) -> None:
        for end in list(_exception_enders.values()):
            with contextlib.suppress(Exception):
                end(status, reason)

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
                end_all_owners(status, _exception_reason(exc_type, exc))
            return
        end_all_owners(status, _exception_reason(exc_type, exc))
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
    global _thread, _lock, _term_stage, _finisher, _ended
    _term_stage = 0
    _finisher, _ended = None, threading.Event()
    # Threads do not survive fork; the child starts its own heartbeat on its next run.
    _thread = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
