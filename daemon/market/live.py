"""Live ingestion: websocket streams for the present, REST for everything they miss.

After every (re)connect the affected pairs switch to buffering: closed candles from the stream are
held while a REST backfill runs from the last stored candle up to the last closed one by server time;
then the buffer is drained through the same idempotent upsert and the pairs go live. A closed
candle that does not follow the previous one (a gap inside a connection) triggers the same
resynchronisation. Interim (`x=false`) updates are never stored.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import structlog

from daemon.market.backfill import backfill
from daemon.market.klines import ws_rows_to_candles
from daemon.market.rest import BinanceRestClient, IpBannedError
from daemon.market.websocket import KlineConnection, StreamSettings, split_pairs
from storage.intervals import interval_ms
from storage.writer import StoreWriter

log = structlog.get_logger("daemon.market.live")

Pair = tuple[str, str]


class LiveIngestor:
    def __init__(
        self,
        writer: StoreWriter,
        rest: BinanceRestClient,
        pairs: list[Pair],
        settings: StreamSettings,
        *,
        initial_start_ms: Callable[[], int],
        resync_retry_s: float = 5.0,
        on_stored: Callable[[Pair, int], None] | None = None,
    ) -> None:
        self.writer, self.rest, self.settings = writer, rest, settings
        self.pairs = [(symbol.upper(), interval) for symbol, interval in pairs]
        self.initial_start_ms = initial_start_ms
        self.resync_retry_s = resync_retry_s
        self.on_stored = on_stored
        self.buffers: dict[Pair, list[dict[str, Any]] | None] = dict.fromkeys(self.pairs)
        self.last_closed: dict[Pair, int | None] = dict.fromkeys(self.pairs)
        self.resyncs = 0
        self.drained = 0  # stream candles held during a backfill and stored after it
        self._resync_tasks: dict[Pair, asyncio.Task] = {}
        self._fatal: BaseException | None = None
        self._late_handled: dict[Pair, int] = {}
        self.late_closes = 0  # candles fetched through REST because their close event never came
        self.connections = [
            KlineConnection(group, settings, self._on_row, self._on_connect) for group in split_pairs(self.pairs)
        ]

    async def run(self) -> None:
        """Run until stop(); re-raises what made ingestion impossible (a ban, a refused host)."""
        watch = asyncio.create_task(self._watch_closes())
        try:
            await asyncio.gather(*(connection.run() for connection in self.connections))
        finally:
            watch.cancel()
            for task in self._resync_tasks.values():
                task.cancel()
        if self._fatal is not None:
            raise self._fatal

    async def stop(self) -> None:
        for connection in self.connections:
            await connection.stop()

    # -- stream callbacks -----------------------------------------------------------------------
    async def _on_connect(self, pairs: list[Pair]) -> None:
        for pair in pairs:
            self._start_resync(pair)

    def _start_resync(self, pair: Pair) -> None:
        if self.buffers[pair] is None:
            self.buffers[pair] = []
        running = self._resync_tasks.get(pair)
        if running is not None and not running.done():
            running.cancel()  # its window is covered by the new run, which starts from the store
        self._resync_tasks[pair] = asyncio.create_task(self._resync(pair))

    async def _on_row(self, row: dict[str, Any]) -> None:
        pair = (row["symbol"], row["interval"])
        if pair not in self.buffers or not row["is_closed"]:
            return
        buffer = self.buffers[pair]
        if buffer is not None:
            buffer.append(row)
            return
        last = self.last_closed[pair]
        if last is not None and row["open_time"] > last + interval_ms(pair[1]):
            log.warning("ws_candle_gap", pair=pair, after=last, got=row["open_time"])
            self._start_resync(pair)
            self.buffers[pair].append(row)  # type: ignore[union-attr]
            return
        await self._store([row], pair)

    async def _watch_closes(self) -> None:
        """Resync a pair whose next closed candle is overdue by the exchange's own clock (the newest
        event time on its connection), once per missing candle."""
        grace_ms = int(self.settings.close_grace_s * 1000)
        while True:
            await asyncio.sleep(self.settings.close_check_s)
            for connection in self.connections:
                now = connection.exchange_time_ms
                if now is None:
                    continue
                for pair in connection.pairs:
                    last = self.last_closed[pair]
                    if self.buffers[pair] is not None or last is None:
                        continue
                    step = interval_ms(pair[1])
                    overdue = last + step  # opens here, closes at + step - 1
                    if now >= overdue + step + grace_ms and self._late_handled.get(pair) != overdue:
                        self._late_handled[pair] = overdue
                        self.late_closes += 1
                        log.warning("close_event_missing", pair=pair, open_time=overdue)
                        self._start_resync(pair)

    async def _store(self, rows: list[dict[str, Any]], pair: Pair) -> None:
        if not rows:
            return
        await self.writer.upsert(ws_rows_to_candles(rows))
        newest = max(row["open_time"] for row in rows)
        self.last_closed[pair] = max(self.last_closed[pair] or newest, newest)
        if self.on_stored:
            self.on_stored(pair, newest)

    # -- resynchronisation ----------------------------------------------------------------------
    async def _resync(self, pair: Pair) -> None:
        symbol, interval = pair
        known_before = self.last_closed[pair]
        attempt = 0
        while True:
            try:
                last = await self.writer.run(lambda store: store.last_open_time(symbol, interval))
                start = last + interval_ms(interval) if last is not None else self.initial_start_ms()
                report = await backfill(self.writer, self.rest, symbol, interval, start, source="rest")
                break
            except (IpBannedError, ValueError) as exc:
                # Retrying cannot help (banned, restricted location, unknown symbol): stop everything
                # and let the owner report it.
                log.error("live_ingestion_stopped", pair=pair, error=str(exc))
                self._fatal = exc
                await self.stop()
                return
            except (OSError, RuntimeError, TimeoutError) as exc:
                attempt += 1
                delay = min(60.0, self.resync_retry_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.warning("resync_retry", pair=pair, error=str(exc), delay_s=round(delay, 3))
                await asyncio.sleep(delay)
        self.resyncs += 1
        last = await self.writer.run(lambda store: store.last_open_time(symbol, interval))
        # No await between taking the buffer and going live, so no row can slip in between.
        buffered = self.buffers[pair] or []
        self.buffers[pair] = None
        newest_buffered = max((row["open_time"] for row in buffered), default=None)
        known = [t for t in (last, newest_buffered) if t is not None]
        self.last_closed[pair] = max(known) if known else None
        self.drained += len(buffered)
        log.info("resynced", pair=pair, backfilled=report.rows_received, drained=len(buffered))
        if buffered:
            await self._store(buffered, pair)
        elif last is not None and (known_before is None or last > known_before) and self.on_stored:
            # The newest candle came through REST: whoever follows the stream must still hear of it.
            self.on_stored(pair, last)
