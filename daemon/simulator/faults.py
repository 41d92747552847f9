"""Scripted faults for the exchange simulator: each fault hits the next matching request/connection.

REST kinds: 429 (Retry-After = param s), 418 (ban for param s), 5xx (status = param, default 503),
slow (delay param s), reset (connection dropped without a reply), 451, 403.
Websocket kinds: drop (TCP cut mid-candle, no close frame), stall (stop sending for param s while
still answering pings), close1001 (going away), shutdown (a serverShutdown event, then close),
mute (the connection's first stream goes silent while the others keep flowing).
Archive kinds: corrupt (zip bytes that do not match the CHECKSUM), 404, 5xx.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

REST_FAULTS = {"429", "418", "5xx", "slow", "reset", "451", "403"}
WS_FAULTS = {"drop", "stall", "close1001", "shutdown", "mute"}
ARCHIVE_FAULTS = {"corrupt", "404", "5xx", "slow", "reset"}
TARGET_KINDS = {"rest": REST_FAULTS, "ws": WS_FAULTS, "archive": ARCHIVE_FAULTS}


@dataclass
class Fault:
    target: str
    kind: str
    param: float | None = None


def parse_fault(spec: str) -> tuple[Fault, int]:
    """`rest:429:2:1` → (Fault(rest, 429, param=1), count 2). Format TARGET:KIND[:COUNT[:PARAM]]."""
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] not in TARGET_KINDS:
        raise ValueError(f"fault {spec!r}: expected TARGET:KIND[:COUNT[:PARAM]] with TARGET one of rest, ws, archive")
    target, kind = parts[0], parts[1]
    if kind not in TARGET_KINDS[target]:
        raise ValueError(f"fault {spec!r}: {target} faults are {sorted(TARGET_KINDS[target])}")
    try:
        count = int(parts[2]) if len(parts) > 2 and parts[2] else 1
        param = float(parts[3]) if len(parts) > 3 else None
    except ValueError:
        raise ValueError(f"fault {spec!r}: COUNT must be an integer and PARAM a number") from None
    return Fault(target, kind, param), count


class FaultPlan:
    """FIFO queues of faults per target; thread-safe so tests can inject from any thread."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[Fault]] = {target: deque() for target in TARGET_KINDS}
        self._lock = threading.Lock()
        self.applied: list[Fault] = []

    def add(self, target: str, kind: str, count: int = 1, param: float | None = None) -> None:
        if kind not in TARGET_KINDS.get(target, set()):
            raise ValueError(f"unknown {target} fault {kind!r}")
        with self._lock:
            self._queues[target].extend(Fault(target, kind, param) for _ in range(count))

    def add_spec(self, spec: str) -> None:
        fault, count = parse_fault(spec)
        self.add(fault.target, fault.kind, count, fault.param)

    def take(self, target: str) -> Fault | None:
        with self._lock:
            if not self._queues[target]:
                return None
            fault = self._queues[target].popleft()
            self.applied.append(fault)
            return fault

    def pending(self, target: str) -> int:
        with self._lock:
            return len(self._queues[target])
