"""Binance kline streams over websockets (≥ 14, asyncio implementation).

One `KlineConnection` carries up to 1024 streams (a raw `/ws/<stream>` URL for one, a combined
`/stream?streams=a/b/…` URL for more). It reconnects on every kind of end — abnormal closure, a
normal close (1000/1001, which websockets reports as a plain end of iteration), a `serverShutdown`
event, the connection age nearing Binance's 24 h cut, and a silent stall caught by the staleness
watchdog — with exponential backoff and jitter, reset once a new connection delivers a message.
Nothing sent while disconnected is replayed by Binance, so every (re)connect is reported to the
owner (live.py), which backfills the gap through REST.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from daemon.market.counters import IngestCounters, reconnect_kind
from daemon.market.klines import parse_ws_message, stream_name
from daemon.market.rejects import Rejection, RejectLog

log = structlog.get_logger("daemon.market.websocket")

MAX_STREAMS_PER_CONNECTION = 1024
# Binance refuses a websocket URL longer than about 8,004 characters (measured by unicorn-binance-websocket-api,
# issue #17): at ~19 characters a kline stream name, a combined URL holds ~400 streams, well before the 1,024
# streams a connection may carry. Groups are cut to stay below both.
MAX_URL_CHARS = 8000
# The websocket library closes a connection (code 1009) on a frame above this; the parser refuses frames
# far below it, so only absurd ones cost a reconnect.
MAX_MESSAGE_BYTES = 1024 * 1024
# Events of one connection may arrive a little out of time order; a larger step back is the exchange's
# clock jumping, which is counted and ignored (the connection's clock only moves forward).
CLOCK_TOLERANCE_MS = 5_000


@dataclass
class StreamSettings:
    base_url: str = "wss://stream.binance.com:9443"
    watchdog_s: float = 120.0
    # Binance cuts every connection at 24 h; reconnecting earlier, at a moment we choose, is kinder.
    max_connection_age_s: float = 23.5 * 3600
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    open_timeout_s: float = 10.0
    # A closed candle that has not arrived this long (exchange time) after its close is fetched
    # through REST: a single stream of a combined connection can fall silent without the
    # connection's watchdog noticing, and Binance may not push a close for a trade-less interval.
    close_grace_s: float = 15.0
    close_check_s: float = 1.0


def stream_url(base_url: str, streams: list[str]) -> str:
    base = base_url.rstrip("/")
    if len(streams) == 1:
        return f"{base}/ws/{streams[0]}"
    return f"{base}/stream?streams={'/'.join(streams)}"


def split_pairs(pairs: list[tuple[str, str]], base_url: str) -> list[list[tuple[str, str]]]:
    """Consecutive groups of `pairs`, one per connection: at most MAX_STREAMS_PER_CONNECTION streams and a
    combined URL of at most MAX_URL_CHARS characters each. Fewest connections (a connection's pings and pongs
    count against Binance's 5 incoming messages per second per connection, and reconnect attempts against its
    300 per 5 minutes per IP)."""
    groups: list[list[tuple[str, str]]] = []
    for pair in pairs:
        if groups and len(groups[-1]) < MAX_STREAMS_PER_CONNECTION and len(
                stream_url(base_url, [stream_name(*p) for p in (*groups[-1], pair)])) <= MAX_URL_CHARS:
            groups[-1].append(pair)
        else:
            groups.append([pair])
    return groups


class KlineConnection:
    """Keeps one websocket connection alive for `pairs`; hands every kline row to `on_row` and every
    successful (re)connect to `on_connect`."""

    def __init__(
        self,
        pairs: list[tuple[str, str]],
        settings: StreamSettings,
        on_row: Callable[[dict[str, Any]], Awaitable[None]],
        on_connect: Callable[[list[tuple[str, str]]], Awaitable[None]],
        rejects: RejectLog | None = None,
        counters: IngestCounters | None = None,
    ) -> None:
        if not 1 <= len(pairs) <= MAX_STREAMS_PER_CONNECTION:
            raise ValueError(f"a connection carries 1..{MAX_STREAMS_PER_CONNECTION} streams, got {len(pairs)}")
        self.pairs = pairs
        self.settings = settings
        self.url = stream_url(settings.base_url, [stream_name(s, i) for s, i in pairs])
        self.on_row, self.on_connect = on_row, on_connect
        self.rejects = rejects or RejectLog()
        self.subscribed = frozenset(pairs)
        self.connects = 0
        self.exchange_time_ms: int | None = None  # the newest event time seen: the exchange's clock
        self.reconnect_reasons: list[str] = []
        self.counters = counters or IngestCounters()
        self.last_message_at: float | None = None  # monotonic time of the newest message (readiness)
        self._stopping = False
        self._ws: ClientConnection | None = None

    @property
    def connected(self) -> bool:
        return self._ws is not None

    async def stop(self) -> None:
        self._stopping = True
        if self._ws is not None:
            await self._ws.close()

    async def run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                async with connect(
                    self.url, open_timeout=self.settings.open_timeout_s, proxy=None, max_queue=1024,
                    max_size=MAX_MESSAGE_BYTES,
                ) as ws:
                    self._ws = ws
                    self.connects += 1
                    log.info("ws_connected", url=self.url, connects=self.connects)
                    await self.on_connect(self.pairs)
                    reason, delivered = await self._read(ws)
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (451, 403):
                    raise ValueError(
                        f"{self.settings.base_url} refuses the websocket (HTTP {status}); set exchange.ws_url "
                        "(or --ws-url) to another host, e.g. wss://data-stream.binance.vision"
                    ) from None
                reason, delivered = f"handshake refused: HTTP {status}", False
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                reason, delivered = f"{type(exc).__name__}: {exc}", False
            finally:
                self._ws = None
            if self._stopping:
                return
            failures = 0 if delivered else failures + 1
            self.reconnect_reasons.append(reason)
            self.counters.reconnects[reconnect_kind(reason)] += 1
            delay = self._delay(failures)
            log.warning("ws_reconnect", url=self.url, reason=reason, delay_s=round(delay, 3))
            await asyncio.sleep(delay)

    def _delay(self, failures: int) -> float:
        # Even a planned reconnect waits a little: Binance allows 300 connection attempts per 5 min.
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** max(failures - 1, 0))
        return random.uniform(ceiling / 2, ceiling) if failures else self.settings.backoff_base_s / 4

    async def _read(self, ws: ClientConnection) -> tuple[str, bool]:
        """Read until the connection should be replaced; returns (why, whether anything arrived)."""
        opened = time.monotonic()
        delivered = False
        while True:
            age_left = self.settings.max_connection_age_s - (time.monotonic() - opened)
            if age_left <= 0:
                return "planned reconnect before the 24 h cut", delivered
            try:
                # The watchdog clock restarts with every message and every new connection.
                message = await asyncio.wait_for(ws.recv(), timeout=min(self.settings.watchdog_s, age_left))
            except TimeoutError:
                if time.monotonic() - opened >= self.settings.max_connection_age_s:
                    continue
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), timeout=2)
                return f"no message for {self.settings.watchdog_s} s (stalled)", delivered
            except ConnectionClosed as exc:
                code = exc.sent.code if exc.sent and exc.sent.code == 1009 else (exc.rcvd.code if exc.rcvd else None)
                if code == 1009:
                    self.rejects.reject("websocket", Rejection(
                        "frame_too_large", f"a frame above {MAX_MESSAGE_BYTES} bytes closed the connection"))
                return f"connection closed (code {code})", delivered
            delivered = True
            self.last_message_at = time.monotonic()
            parsed = parse_ws_message(message, self.subscribed)
            self._advance_clock(parsed.event_time)
            if parsed.rejection is not None:
                self.rejects.reject("websocket", parsed.rejection, url=self.url)
                continue
            if parsed.kind == "shutdown":
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), timeout=2)
                return "serverShutdown event", delivered
            if parsed.row is not None:
                await self.on_row(parsed.row)

    def _advance_clock(self, event_time: int | None) -> None:
        if event_time is None:
            return
        newest = self.exchange_time_ms
        if newest is None or event_time > newest:
            self.exchange_time_ms = event_time
        elif event_time < newest - CLOCK_TOLERANCE_MS:
            self.rejects.reject("exchange_clock", Rejection(
                "clock_backwards", f"an event {newest - event_time} ms older than the newest seen"), url=self.url)
