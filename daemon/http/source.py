"""Where the dashboard's data comes from: a running daemon, or a state directory without one.

- `LiveSource` reads through the daemon's store writer (the one connection to the live database; reads are
  small and bounded, so they wait behind at most one ingest batch), and knows the live state: streams,
  MQTT, the champion, readiness.
- `SnapshotSource` opens the published snapshot read-only for each request (a new snapshot replaces the
  file by rename, so every request sees the newest one) and the model registry on disk: `kronosd dashboard`
  after a demo, or on a copy of a server's state directory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb

from daemon.health import pair_health, readiness
from storage.views import pairs_with_candles

if TYPE_CHECKING:
    from daemon.service import Daemon

T = TypeVar("T")
Pair = tuple[str, str]


class LiveSource:
    mode = "live"

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.started = time.time()

    @property
    def state_dir(self) -> Path:
        return self.daemon.state_dir

    async def read(self, query: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        return await self.daemon.writer.run(lambda store: query(store.con))

    async def pairs(self) -> list[Pair]:
        return list(self.daemon.config.markets.pairs)

    def horizon(self) -> int:
        return self.daemon.config.forecast.horizon

    def status(self) -> dict[str, Any]:
        daemon = self.daemon
        forecaster = getattr(daemon, "forecaster", None)
        champion = forecaster.champion if forecaster is not None else None
        publisher = getattr(daemon, "publisher", None)
        continual = getattr(daemon, "continual", None)
        checks = readiness(daemon)
        return {
            "mode": self.mode, "uptime_s": round(time.time() - self.started, 1),
            "model_version": champion.version if champion else None,
            "forecasts_published": forecaster.published if forecaster is not None else 0,
            "mqtt": "off" if publisher is None else ("up" if publisher.connected else "down"),
            "finetune_running": bool(continual and continual.running),
            "finetune_runs": continual.runs if continual is not None else 0,
            "ready": all(c["ok"] for c in checks), "checks": checks,
            "pairs": [h.to_dict() for h in pair_health(daemon)],
        }

    def ingest_counts(self) -> dict[Pair, dict[str, int]]:
        counters = self.daemon.ingest_counters
        return {pair: {"candles_stored": counters.candles[pair], "backfills": counters.resyncs[pair]}
                for pair in self.daemon.config.markets.pairs}

    def reconnects(self) -> dict[str, int]:
        return dict(self.daemon.ingest_counters.reconnects)


class SnapshotSource:
    mode = "snapshot"

    def __init__(self, state_dir: Path, database: str = "kronos.duckdb", horizon: int | None = None):
        self.state_dir = Path(state_dir)
        self.snapshot = self.state_dir / database
        self._horizon = horizon
        self._pairs: tuple[float, list[Pair]] | None = None

    def _query(self, query: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        if not self.snapshot.exists():
            raise FileNotFoundError(f"no published snapshot at {self.snapshot}")
        con = duckdb.connect(str(self.snapshot), read_only=True)
        try:
            con.execute("SET TimeZone = 'UTC'")
            return query(con)
        finally:
            con.close()

    async def read(self, query: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        return await asyncio.to_thread(self._query, query)

    def version(self) -> float:
        """Changes whenever a new snapshot is published (it is renamed over the old one)."""
        try:
            stat = self.snapshot.stat()
        except FileNotFoundError:
            return 0.0
        return stat.st_mtime + stat.st_ino

    async def pairs(self) -> list[Pair]:
        """The pairs the snapshot holds candles of (cached until a new snapshot appears)."""
        version = self.version()
        if self._pairs is None or self._pairs[0] != version:
            self._pairs = (version, await self.read(pairs_with_candles))
        return self._pairs[1]

    def horizon(self) -> int | None:
        return self._horizon

    def status(self) -> dict[str, Any]:
        published = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.snapshot.stat().st_mtime)) \
            if self.snapshot.exists() else None
        return {"mode": self.mode, "snapshot": str(self.snapshot), "snapshot_time": published,
                "model_version": None, "ready": None, "checks": [], "pairs": []}

    def ingest_counts(self) -> dict[Pair, dict[str, int]]:
        return {}

    def reconnects(self) -> dict[str, int]:
        return {}
