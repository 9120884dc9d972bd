"""``ff-sync``: replay spooled runs into an MLflow tracking store, exactly once.

    from formula_foundry.sync import load_sync_settings, sync_once

    report = sync_once(load_sync_settings())
    print(report.summary())      # ff-sync: synced: 3 runs, 1204 events, 0 quarantined in ...
    raise SystemExit(report.exit_code)

The operations the ``ff-sync`` commands call are here too: :func:`sync_once` (a pass),
``watch`` (passes in a loop), ``sync_status``, ``verify`` and ``collect_garbage``; the last four
are imported on first use, as the CLI does, so that ``import formula_foundry.sync`` stays cheap.

Importing this package does not import MLflow; a pass imports it only when there is
something to send. See docs/sync.md.
"""

import importlib
from typing import TYPE_CHECKING, Any

from formula_foundry.sync.engine.destination import destination_key
from formula_foundry.sync.engine.report import Progress, SyncReport
from formula_foundry.sync.engine.retry import RetryPolicy
from formula_foundry.sync.engine.sink import (
    ArtifactRef,
    BatchLimits,
    DestinationRejected,
    RemoteRun,
    RunMissing,
    RunSpec,
    Sink,
    StoredParamConflict,
)
from formula_foundry.sync.engine.sync_pass import check_destination, load_sync_settings, sync_once

if TYPE_CHECKING:
    from formula_foundry.sync.commands.gc import collect_garbage
    from formula_foundry.sync.commands.status import sync_status
    from formula_foundry.sync.commands.verify import verify
    from formula_foundry.sync.commands.watch import watch

# The command operations, imported on first use (PEP 562).
_COMMANDS = {
    "collect_garbage": "formula_foundry.sync.commands.gc",
    "sync_status": "formula_foundry.sync.commands.status",
    "verify": "formula_foundry.sync.commands.verify",
    "watch": "formula_foundry.sync.commands.watch",
}


def __getattr__(name: str) -> Any:
    module = _COMMANDS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "ArtifactRef",
    "BatchLimits",
    "DestinationRejected",
    "Progress",
    "RemoteRun",
    "RetryPolicy",
    "RunMissing",
    "RunSpec",
    "Sink",
    "StoredParamConflict",
    "SyncReport",
    "check_destination",
    "collect_garbage",
    "destination_key",
    "load_sync_settings",
    "sync_once",
    "sync_status",
    "verify",
    "watch",
]
