"""``ff-sync``: replay spooled runs into an MLflow tracking store, exactly once.

    from formula_foundry.sync import load_sync_settings, sync_once

    report = sync_once(load_sync_settings())
    print(report.summary())      # ff-sync: synced: 3 runs, 1204 events, 0 quarantined in ...
    raise SystemExit(report.exit_code)

Importing this package does not import MLflow; a pass imports it only when there is
something to send. See docs/sync.md.
"""

from formula_foundry.sync.engine import check_destination, load_sync_settings, sync_once
from formula_foundry.sync.report import Progress, SyncReport
from formula_foundry.sync.retry import RetryPolicy
from formula_foundry.sync.sink import (
    ArtifactRef,
    BatchLimits,
    DestinationRejected,
    ParamConflict,
    RemoteRun,
    RunMissing,
    RunSpec,
    Sink,
)
from formula_foundry.sync.sync_state import destination_key

__all__ = [
    "ArtifactRef",
    "BatchLimits",
    "DestinationRejected",
    "ParamConflict",
    "Progress",
    "RemoteRun",
    "RetryPolicy",
    "RunMissing",
    "RunSpec",
    "Sink",
    "SyncReport",
    "check_destination",
    "destination_key",
    "load_sync_settings",
    "sync_once",
]
