"""Counts of what ingestion did, kept by the service across restarts of the ingest subsystem (a fresh
LiveIngestor and fresh connections each life), so the numbers /metrics exposes only ever grow."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

Pair = tuple[str, str]

# What ended a websocket connection, as a small fixed set of label values (the reason texts vary).
RECONNECT_KINDS = ("stalled", "closed", "server_shutdown", "max_age", "refused", "error")


def reconnect_kind(reason: str) -> str:
    """The label of a KlineConnection reconnect reason (its texts are made in websocket.py)."""
    if "(stalled)" in reason:
        return "stalled"
    if reason.startswith("connection closed"):
        return "closed"
    if reason.startswith("serverShutdown"):
        return "server_shutdown"
    if reason.startswith("planned reconnect"):
        return "max_age"
    if reason.startswith("handshake refused"):
        return "refused"
    return "error"


@dataclass
class IngestCounters:
    reconnects: Counter[str] = field(default_factory=Counter)  # by reconnect_kind
    resyncs: Counter[Pair] = field(default_factory=Counter)  # REST backfills after a (re)connect or a gap
    candles: Counter[Pair] = field(default_factory=Counter)  # closed candles written, websocket and REST
