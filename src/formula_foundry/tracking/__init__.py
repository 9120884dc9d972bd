"""Log runs on compute nodes: every call appends one event to the run's spool segment.

    from formula_foundry.tracking import get_tracker

    tracker = get_tracker()
    with tracker.start_run(run_name="my-coupon-build") as run:
        run.log_param("coupon_family", "F1_SINGLE_ENDED_VIA")
        run.log_metric("build_time_seconds", 12.5)

This package never imports MLflow; ``ff-sync`` (:mod:`formula_foundry.sync`) replays the spools
into the tracking store.
"""

from formula_foundry.tracking.run import Run
from formula_foundry.tracking.tracker import Tracker, get_tracker

__all__ = ["Run", "Tracker", "get_tracker"]
