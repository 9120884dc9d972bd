"""``ff-sync watch``: sync passes in a loop, for a login node (tmux) or a systemd service.

Every ``interval`` seconds (measured from the start of a pass) one pass runs, exactly as
``ff-sync`` would run it. Each pass builds its state, sink and report afresh and drops them
after, so memory does not grow with the number of passes.

* SIGTERM / SIGINT: the current pass finishes (what it commits is recorded), then the loop
  returns 0. A second signal during the same pass does nothing more.
* Destination unavailable or its lock held by another ff-sync (exit 75 for a single pass):
  one line on stderr (password redacted), and the next interval tries again.
* A configuration error or MLflow missing ends the loop with its exit code (2); any other
  failure of a pass is logged on one line and the next interval tries again.
"""

from __future__ import annotations

import gc
import signal
import time
from collections.abc import Callable
from types import FrameType

from formula_foundry.config import Settings
from formula_foundry.errors import (
    EXIT_OK,
    ConfigError,
    MlflowMissing,
    StoreUnavailable,
    SyncLocked,
)
from formula_foundry.redact import redact_uri
from formula_foundry.sync.engine.report import SyncReport, one_line
from formula_foundry.sync.engine.sync_pass import sync_once

LogFn = Callable[[str], None]
_SLICE_S = 0.2


class _Stop:
    """Set by SIGTERM/SIGINT; checked between passes and while sleeping."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def watch(
    settings: Settings,
    interval_s: float,
    *,
    log: LogFn,
    max_passes: int | None = None,
    quiet: bool = False,
) -> int:
    """Run passes every ``interval_s`` seconds until a signal (or ``max_passes``); exit code."""
    stop = _Stop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    uri = settings.backend_store_uri
    log(
        f"ff-sync watch: syncing {settings.spool_root} -> {redact_uri(uri)} every "
        f"{interval_s:g} s (SIGTERM/SIGINT to stop)"
    )
    passes = 0
    try:
        while not stop.requested:
            started = time.monotonic()
            _one_pass(settings, log, quiet)
            passes += 1
            gc.collect()
            if max_passes is not None and passes >= max_passes:
                break
            while not stop.requested:
                left = interval_s - (time.monotonic() - started)
                if left <= 0:
                    break
                time.sleep(min(_SLICE_S, left))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log(f"ff-sync watch: stopped after {passes} pass{'es' if passes != 1 else ''}")
    return EXIT_OK


def _one_pass(settings: Settings, log: LogFn, quiet: bool) -> None:
    uri = settings.backend_store_uri
    try:
        report: SyncReport = sync_once(settings)
    except (StoreUnavailable, SyncLocked) as exc:
        log(f"ff-sync watch: {one_line(str(exc), uri)}; retrying in the next interval")
        return
    except (ConfigError, MlflowMissing):
        raise
    except Exception as exc:  # a failed pass must not end the watcher: log, retry later
        log(f"ff-sync watch: pass failed: {one_line(f'{type(exc).__name__}: {exc}', uri)}")
        return
    if report.idle and not report.warnings:
        return
    if not quiet:
        for detail in report.details():
            log(f"ff-sync: {one_line(detail, uri, limit=1000)}")
    log(one_line(report.summary(), uri, limit=1000))
