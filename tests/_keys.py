"""Which keys the tracker lets into a spool, for strategies that must draw only those."""

from __future__ import annotations

from formula_foundry.errors import ValidationError
from formula_foundry.tracking.events import check_key


def accepted_key(key: str) -> bool:
    """``check_key`` (MLflow's rules: characters, length, path-like uniqueness) accepts it."""
    try:
        check_key(key, "metric", "R")
    except ValidationError:
        return False
    return True
