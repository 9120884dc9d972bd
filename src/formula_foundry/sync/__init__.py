"""``ff-sync``: replay spooled runs into an MLflow tracking store, exactly once.

    from formula_foundry.sync import load_sync_settings, sync_once

    report = sync_once(load_sync_settings())
    print(report.summary())      # ff-sync: synced: 3 runs, 1204 events, 0 quarantined in ...
    raise SystemExit(report.exit_code)

Importing this package does not import MLflow; a pass imports it only when there is
something to send. See docs/sync.md.
"""

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
    "destination_key",
    "load_sync_settings",
    "sync_once",
]
