"""Live ingestion: websocket streams for the present, REST for everything they miss.

After every (re)connect the affected pairs switch to buffering: closed candles from the stream are
held while a REST backfill runs from the last stored candle up to the last closed one by server time;
then the buffer is drained through the same idempotent upsert and the pairs go live. A closed
candle that does not follow the previous one (a gap inside a connection) triggers the same
resynchronisation. Interim (`x=false`) updates are never stored.

Ordering: a pair's `on_stored` only ever moves forward. A closed candle at or before the newest one
already known (a duplicate, a re-sent older close, a late reordered one) is counted and dropped: the
store already holds it (backfills work from the store, so nothing behind the newest candle is missing).

Arrival (`close_seen`, for the forecast latency measured from the close): for each pair's newest closed
candle, when it reached the daemon (the closing kline message, or the REST answer of the resync that
fetched it) and, while the exchange's clock agrees with ours, when it closed on our wall clock.

Isolation: a symbol that stops trading (delisted, BREAK; seen in exchangeInfo, re-read every
`listing_check_s`, or in a REST refusal) pauses that pair alone, and it resumes with a resync when it
trades again. A failed resync of one pair is retried with backoff without touching the others. Only what
no retry can fix here (an IP ban, a host that refuses us) ends `run()`; the service decides what then.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from daemon.market.backfill import backfill
from daemon.market.counters import IngestCounters
from daemon.market.exchange import CandleStream, ExchangeRest, StreamFactory
from daemon.market.klines import ws_rows_to_candles
from daemon.market.rejects import Rejection, RejectLog
from daemon.market.rest import ExchangeConfigError, IpBannedError, SymbolUnavailableError
from daemon.market.websocket import KlineConnection, StreamSettings, split_pairs
from storage.intervals import interval_ms
from storage.writer import StoreWriter

log = structlog.get_logger("daemon.market.live")

Pair = tuple[str, str]


# How far back a resync looks for holes left open by earlier ones, and how often it asks again at once for
# holes the exchange answered with garbage.
REVISIT_CANDLES = 48
UNFILLED_RETRIES = 2
# The stream's event times and the REST-synced clock farther apart than this mean exchange time is not wall
# time (a simulator's accelerated clock, a clock jump): no wall-clock close can be given then.
CLOCKS_AGREE_MS = 5_000
# How long a stream's event times are watched before we trust that the exchange clock runs at wall speed (a
# simulator's fast clock agrees with the REST-synced one only for its first few milliseconds).
CLOCK_WATCH_S = 2.0


@dataclass(frozen=True)
class CloseSeen:
    """How a pair's newest closed candle reached the daemon."""

    received: float  # time.monotonic() when the closing kline message (or the resync's REST answer) arrived
    source: str  # "websocket" or "rest"
    close_wall_ms: int | None  # its close (open time + interval) on our wall clock; None while clocks disagree


class LiveIngestor:
    def __init__(
        self,
        writer: StoreWriter,
        rest: ExchangeRest,
        pairs: list[Pair],
        settings: StreamSettings,
        *,
        initial_start_ms: Callable[[], int],
        resync_retry_s: float = 5.0,
        listing_check_s: float = 300.0,
        on_stored: Callable[[Pair, int], None] | None = None,
        rejects: RejectLog | None = None,
        open_stream: StreamFactory = KlineConnection,
        counters: IngestCounters | None = None,
    ) -> None:
        self.writer, self.rest, self.settings = writer, rest, settings
        self.counters = counters or IngestCounters()
        self.pairs = [(symbol.upper(), interval) for symbol, interval in pairs]
        self.initial_start_ms = initial_start_ms
        self.resync_retry_s = resync_retry_s
        self.on_stored = on_stored
        self.listing_check_s = listing_check_s
        self.rejects = rejects or rest.rejects
        self.paused: dict[Pair, str] = {}  # pair → why it is not trading
        self.notified: dict[Pair, int] = {}  # the newest open time handed to on_stored, per pair
        self.buffers: dict[Pair, list[dict[str, Any]] | None] = dict.fromkeys(self.pairs)
        self.last_closed: dict[Pair, int | None] = dict.fromkeys(self.pairs)
        self.resyncs = 0
        self.drained = 0  # stream candles held during a backfill and stored after it
        self._resync_tasks: dict[Pair, asyncio.Task] = {}
        self._fatal: BaseException | None = None
        self._storing: set[asyncio.Task] = set()  # submitted stream rows waiting for their transaction
        self._late_handled: dict[Pair, int] = {}
        self.close_seen: dict[Pair, CloseSeen] = {}  # the newest candle handed to on_stored, per pair
        self._stream_closes: dict[Pair, tuple[int, CloseSeen]] = {}  # the newest close the stream delivered
        self.late_closes = 0  # candles fetched through REST because their close event never came
        self.connections: list[CandleStream] = [
            open_stream(group, settings, self._on_row, self._on_connect, self.rejects, self.counters)
            for group in split_pairs(self.pairs, self.settings.base_url)
        ]
        self._connection_of = {pair: connection for connection in self.connections for pair in connection.pairs}
        self._stream_clock_start: dict[int, tuple[int, float]] = {}  # per connection: first (event time, monotonic)

    async def run(self) -> None:
        """Run until stop(); re-raises what made ingestion impossible (a ban, a refused host)."""
        watchers = [asyncio.create_task(self._watch_closes()), asyncio.create_task(self._watch_listing())]
        try:
            await asyncio.gather(*(connection.run() for connection in self.connections))
        finally:
            for task in [*watchers, *self._resync_tasks.values()]:
                task.cancel()
            if self._storing:  # let submitted rows report back (or fail) before the caller moves on
                await asyncio.gather(*self._storing, return_exceptions=True)
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
        if pair in self.paused:
            return
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
        newest_seen = self._stream_closes.get(pair)
        if newest_seen is None or row["open_time"] > newest_seen[0]:
            self._stream_closes[pair] = (row["open_time"], self._seen(pair, row["open_time"], "websocket",
                                                                      time.monotonic()))
        if pair in self.paused:
            self.rejects.reject("websocket", Rejection("pair_not_trading", f"{pair}: {self.paused[pair]}"))
            return
        buffer = self.buffers[pair]
        if buffer is not None:
            buffer.append(row)
            return
        last = self.last_closed[pair]
        if last is not None and row["open_time"] <= last:
            self.rejects.reject("websocket", Rejection(
                "stale_close", f"{pair[0]} {pair[1]} close of {row['open_time']} at or before the newest {last}"))
            return
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
                    if self.buffers[pair] is not None or last is None or pair in self.paused:
                        continue
                    step = interval_ms(pair[1])
                    overdue = last + step  # opens here, closes at + step - 1
                    if now >= overdue + step + grace_ms and self._late_handled.get(pair) != overdue:
                        self._late_handled[pair] = overdue
                        self.late_closes += 1
                        log.warning("close_event_missing", pair=pair, open_time=overdue)
                        self._start_resync(pair)

    async def _watch_listing(self) -> None:
        """Re-read exchangeInfo now and then: pause pairs whose symbol stopped trading, resume the rest."""
        while True:
            await asyncio.sleep(self.listing_check_s)
            try:
                statuses = await self.rest.symbol_statuses(refresh=True)
            except (OSError, RuntimeError, TimeoutError, ExchangeConfigError) as exc:
                log.warning("listing_check_failed", error=str(exc))
                continue
            for pair in self.pairs:
                status = statuses.get(pair[0], "not listed")
                if status != "TRADING" and pair not in self.paused:
                    self._pause(pair, f"status {status} in exchangeInfo")
                elif status == "TRADING" and pair in self.paused:
                    del self.paused[pair]
                    log.info("pair_resumed", pair=pair)
                    self._start_resync(pair)

    def _pause(self, pair: Pair, why: str) -> None:
        self.paused[pair] = why
        self.buffers[pair] = None
        self.rejects.reject("exchange_info", Rejection("pair_not_trading", f"{pair[0]} {pair[1]}: {why}"))
        log.warning("pair_paused", pair=pair, reason=why)

    async def _store(self, rows: list[dict[str, Any]], pair: Pair) -> asyncio.Task | None:
        """Hand rows to the writer without waiting for their transaction, so the stream reader goes on to the
        next message at once and the writer merges every candle of a tick into one transaction; on_stored
        hears of them when that transaction has committed (the writer keeps submission order)."""
        if not rows:
            return None
        newest = max(row["open_time"] for row in rows)
        self.last_closed[pair] = max(self.last_closed[pair] or newest, newest)
        stored = asyncio.wrap_future(self.writer.submit(ws_rows_to_candles(rows)))
        task = asyncio.create_task(self._after_store(stored, pair, len(rows), newest))
        self._storing.add(task)
        task.add_done_callback(self._storing.discard)
        return task

    async def _after_store(self, stored: asyncio.Future, pair: Pair, rows: int, newest: int) -> None:
        try:
            await stored
        except Exception as exc:
            # The store refused a write: nothing later can be stored either; end ingestion with the cause.
            log.error("live_store_failed", pair=pair, error=str(exc))
            self._fatal = self._fatal or exc
            await self.stop()
            return
        self.counters.candles[pair] += rows
        self._notify(pair, newest)

    def _notify(self, pair: Pair, newest: int, fetched: float | None = None) -> None:
        """Tell on_stored about a new newest candle; never about one at or before the last it heard of.
        `fetched`: when the REST answer holding it arrived, if the stream did not deliver it."""
        if newest <= self.notified.get(pair, -1):
            return
        self.notified[pair] = newest
        streamed = self._stream_closes.get(pair)
        if streamed is not None and streamed[0] == newest:
            self.close_seen[pair] = streamed[1]
        else:
            self.close_seen[pair] = self._seen(pair, newest, "rest", fetched or time.monotonic())
        if self.on_stored:
            self.on_stored(pair, newest)

    def _seen(self, pair: Pair, open_time: int, source: str, received: float) -> CloseSeen:
        """The arrival of a closed candle; its close on our wall clock when the stream's clock (its newest event
        time, run on at wall speed) and the REST-synced clock agree."""
        connection = self._connection_of.get(pair)
        close_wall_ms = None
        if connection is not None and connection.exchange_time_ms is not None and connection.last_message_at:
            first_time, first_at = self._stream_clock_start.setdefault(
                id(connection), (connection.exchange_time_ms, connection.last_message_at))
            watched_s = connection.last_message_at - first_at
            at_wall_speed = watched_s >= CLOCK_WATCH_S and abs(
                (connection.exchange_time_ms - first_time) - watched_s * 1000) <= CLOCKS_AGREE_MS
            now = time.monotonic()
            stream_now = connection.exchange_time_ms + (now - connection.last_message_at) * 1000
            wall_ms, exchange_now = time.time() * 1000, self.rest.server_now_ms()
            if at_wall_speed and abs(stream_now - exchange_now) <= CLOCKS_AGREE_MS:
                close_wall_ms = int(open_time + interval_ms(pair[1]) - (exchange_now - wall_ms))
        return CloseSeen(received, source, close_wall_ms)

    # -- resynchronisation ----------------------------------------------------------------------
    async def _resync(self, pair: Pair) -> None:
        symbol, interval = pair
        attempt = unfilled_tries = 0
        while True:
            try:
                last, first = await self.writer.run(lambda store: (store.last_open_time(symbol, interval),
                                                                   store.first_open_time(symbol, interval)))
                # Not only what follows the newest candle: a hole a few candles back that an earlier resync could
                # not fill (the exchange answered garbage twice) is asked again. Present candles cost nothing,
                # the backfill only requests holes, and ranges the exchange showed empty are skipped.
                step = interval_ms(interval)
                start = (max(first, last + step - REVISIT_CANDLES * step)
                         if last is not None and first is not None else self.initial_start_ms())
                report = await backfill(self.writer, self.rest, symbol, interval, start, source="rest",
                                        on_rows=lambda rows: self.counters.candles.update({pair: rows}))
                fetched = time.monotonic()
                # Up to the first candle the stream is holding too: a lying exchange clock can end the backfill
                # before candles the stream has already delivered after a hole.
                held_from = min((row["open_time"] for row in self.buffers[pair] or []), default=report.end_ms)
                until = max(report.end_ms, held_from)
                left = await self.writer.run(
                    lambda store, a=report.start_ms, b=until: store.find_holes(symbol, interval, a, b))
                if left and unfilled_tries < UNFILLED_RETRIES:
                    # Holes the exchange neither filled nor showed empty (garbage answers): ask again shortly,
                    # still buffering the stream, rather than go live over them.
                    unfilled_tries += 1
                    log.info("resync_holes_left", pair=pair, holes=len(left), retry=unfilled_tries)
                    await asyncio.sleep(self.resync_retry_s * unfilled_tries)
                    continue
                break
            except SymbolUnavailableError as exc:
                # This symbol alone: pause it; the listing watch resumes it when it trades again.
                self._pause(pair, str(exc))
                return
            except (IpBannedError, ExchangeConfigError) as exc:
                # Retrying here cannot help (banned, restricted location): stop and let the owner decide.
                log.error("live_ingestion_stopped", pair=pair, error=str(exc))
                self._fatal = exc
                await self.stop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # transient, or a bug: retried with backoff, the other pairs go on
                attempt += 1
                delay = min(60.0, self.resync_retry_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.warning("resync_retry", pair=pair, error=str(exc), delay_s=round(delay, 3))
                await asyncio.sleep(delay)
        self.resyncs += 1
        self.counters.resyncs[pair] += 1
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
            stored = await self._store(buffered, pair)
            if stored is not None:
                await stored  # on_stored below must not hear of candles before they are committed
        if self.last_closed[pair] is not None:
            # The newest candle may have come through REST: whoever follows the stream must still hear of it.
            self._notify(pair, self.last_closed[pair], fetched)
