"""Counting and logging what the exchange sent that we refused.

Every boundary (websocket frames, REST bodies and rows, archive files, exchangeInfo, the exchange clock)
hands a rejected item here with a stable reason key. The first item of each (boundary, reason) is logged
at once with its detail; later ones only bump the count, and a summary line follows at most once per
`log_every_s` while more keep coming, so a stream of garbage cannot flood the journal. The counts go
into the daemon's summary and its shutdown log line.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import structlog

log = structlog.get_logger("daemon.market.rejects")


@dataclass(frozen=True)
class Rejection:
    """Why one item was refused: `reason` is a stable key for counting, `detail` says it to a human."""

    reason: str
    detail: str


class RejectLog:
    def __init__(self, log_every_s: float = 60.0) -> None:
        self.log_every_s = log_every_s
        self.counts: Counter[tuple[str, str]] = Counter()
        self._logged_at: dict[tuple[str, str], float] = {}
        self._logged_count: dict[tuple[str, str], int] = {}

    def reject(self, boundary: str, rejection: Rejection, **context: object) -> None:
        key = (boundary, rejection.reason)
        self.counts[key] += 1
        now = time.monotonic()
        last = self._logged_at.get(key)
        if last is not None and now - last < self.log_every_s:
            return
        since = self.counts[key] - self._logged_count.get(key, 0)
        self._logged_at[key], self._logged_count[key] = now, self.counts[key]
        log.warning("input_rejected", boundary=boundary, reason=rejection.reason, detail=rejection.detail[:300],
                    count=self.counts[key], since_last_log=since, **context)

    def total(self, boundary: str | None = None) -> int:
        return sum(n for (b, _), n in self.counts.items() if boundary is None or b == boundary)

    def summary(self) -> dict[str, int]:
        """`{"websocket:not_json": 3, ...}`, sorted, for summaries and logs."""
        return {f"{b}:{r}": n for (b, r), n in sorted(self.counts.items())}
