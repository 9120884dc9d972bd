"""Bounded retries with exponential backoff for calls to a destination that may be unavailable.

Only :class:`~formula_foundry.errors.StoreUnavailable` is retried: anything else is an answer,
not an outage. After the last attempt the error is raised again with the number of attempts,
so the sync stops the pass (exit 75) having recorded nothing it did not see committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from formula_foundry.errors import StoreUnavailable

T = TypeVar("T")


@dataclass
class RetryPolicy:
    """``retries`` extra attempts; the n-th retry waits ``backoff_s * 2**(n-1)`` seconds."""

    retries: int
    backoff_s: float
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    on_retry: Callable[[int, float, StoreUnavailable], None] | None = field(
        default=None, repr=False
    )

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        return float(self.backoff_s * (2 ** (attempt - 1)))

    def call(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` until it returns, retrying :class:`StoreUnavailable` up to the limit."""
        attempt = 0
        while True:
            try:
                return fn()
            except StoreUnavailable as exc:
                attempt += 1
                if attempt > self.retries:
                    tries = "1 attempt" if attempt == 1 else f"{attempt} attempts"
                    raise StoreUnavailable(
                        f"{exc} (gave up after {tries}); nothing was lost, run ff-sync again later"
                    ) from None
                wait = self.delay(attempt)
                if self.on_retry is not None:
                    self.on_retry(attempt, wait, exc)
                self.sleep(wait)
