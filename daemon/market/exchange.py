"""What ingestion needs from an exchange, as protocols: the seam for a second exchange.

Backfill and live ingestion are written against these; Binance is the first implementation
(`BinanceRestClient`, `KlineConnection`, `ArchiveClient`, with its kline file format in kline_files.py).
Another exchange brings its own three pieces — a REST client, a stream connection and, where it publishes
one, a bulk archive — that hand over candles as frames in `storage.candles.CANDLE_SCHEMA`; nothing in
storage, forecasting or the service changes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import polars as pl

from daemon.market.counters import IngestCounters
from daemon.market.rejects import RejectLog
from storage.writer import StoreWriter

Pair = tuple[str, str]


class ExchangeRest(Protocol):
    """Request/response side: the exchange's clock, its listing and historical candles."""

    rejects: RejectLog

    async def sync_time(self) -> int:
        """Measure the offset to the exchange clock; returns the exchange time (ms)."""
        ...

    def server_now_ms(self) -> int:
        """The exchange's time now (ms), from the last sync."""
        ...

    async def validate(self, symbol: str, interval: str, *, refresh: bool = False) -> None:
        """Raise ExchangeConfigError (SymbolUnavailableError for one symbol) if the pair cannot be fetched."""
        ...

    async def symbol_statuses(self, *, refresh: bool = False) -> dict[str, str]:
        """Trading status per listed symbol (`TRADING` when it trades)."""
        ...

    def iter_klines(self, symbol: str, interval: str, start_ms: int, end_ms: int) -> AsyncIterator[pl.DataFrame]:
        """Closed candles with open time in [start, end), page by page, as CANDLE_SCHEMA frames."""
        ...


class CandleStream(Protocol):
    """One live connection carrying the candle streams of some pairs; `run` reconnects until stopped."""

    pairs: list[Pair]
    connects: int
    exchange_time_ms: int | None  # the exchange's clock as the stream last told it (health: candle age)
    last_message_at: float | None  # monotonic time of the newest message (health: a silent stream)

    @property
    def connected(self) -> bool: ...

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


# Builds a stream for `pairs`: rows (CANDLE_SCHEMA dicts) go to on_row, every (re)connect to on_connect,
# refusals to the RejectLog, reconnects (by reconnect_kind) to the IngestCounters.
StreamFactory = Callable[
    [list[Pair], Any, Callable[[dict[str, Any]], Awaitable[None]], Callable[[list[Pair]], Awaitable[None]],
     RejectLog, IngestCounters],
    CandleStream,
]


class CandleArchive(Protocol):
    """Bulk history files, verified, straight into the store (Binance: data.binance.vision)."""

    async def import_range(self, writer: StoreWriter, symbol: str, interval: str, start_ms: int, end_ms: int,
                           server_now_ms: int, on_rows: Callable[[int], None] | None = None) -> Any: ...
