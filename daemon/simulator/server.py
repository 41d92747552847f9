"""A Binance-compatible exchange on 127.0.0.1: REST (`/api/v3/ping`, `/time`, `/exchangeInfo`,
`/klines` with weight headers), websocket kline streams (raw `/ws/<stream>` and combined
`/stream?streams=…`) and a data.binance.vision archive tree, answering from real candles on an
accelerated clock, with scripted faults (faults.py) and a hostile profile (hostile.py). `kronosd simulate`
runs it; the client tests and the backfill benchmark run against it.

Rate limiting imitates Binance: weight per client IP in fixed windows of real time (windows stay on
the real clock even when the market clock is accelerated); going over the limit answers 429 with
Retry-After; a client that keeps calling during a Retry-After period is banned (418).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import math
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from aiohttp import web
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from daemon.simulator.data import CandleBook, Series, SimClock, format_number, kline_row, ws_kline_event
from daemon.simulator.faults import FaultPlan
from daemon.simulator.hostile import HostileProfile
from storage.intervals import INTERVAL_MS

MICROSECOND_ARCHIVE_FROM_MS = 1_735_689_600_000  # 2025-01-01: spot archive files switch to µs
_WEIGHTS = {"/api/v3/ping": 1, "/api/v3/time": 1, "/api/v3/exchangeInfo": 20, "/api/v3/klines": 2}
_UNIT_LETTER = {"SECOND": "S", "MINUTE": "M", "HOUR": "H", "DAY": "D"}
_UNIT_SECONDS = {"SECOND": 1, "MINUTE": 60, "HOUR": 3600, "DAY": 86400}


@dataclass
class SimStats:
    requests: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    peak_used_weight: int = 0
    archive_files: int = 0
    ws_connections: int = 0
    bans: int = 0


@dataclass
class _IpState:
    window: int = -1
    used: int = 0
    retry_after_until: float = 0.0
    violations: int = 0
    banned_until: float = 0.0


class ExchangeSimulator:
    def __init__(
        self,
        book: CandleBook,
        clock: SimClock,
        *,
        host: str = "127.0.0.1",
        weight_limit: int = 6000,
        weight_interval: str = "MINUTE",
        weight_interval_num: int = 1,
        latency_s: float = 0.0,
        ban_after_violations: int = 2,
        ban_s: float = 120.0,
        ws_update_s: float = 0.25,
        ws_tick_s: float = 0.02,
        ws_lifetime_s: float | None = None,
        hostile: HostileProfile | None = None,
    ) -> None:
        self.book, self.clock, self.host = book, clock, host
        self.weight_limit = weight_limit
        self.weight_interval, self.weight_interval_num = weight_interval, weight_interval_num
        self.weight_window_s = _UNIT_SECONDS[weight_interval] * weight_interval_num
        self.weight_header = f"X-MBX-USED-WEIGHT-{weight_interval_num}{_UNIT_LETTER[weight_interval]}"
        self.latency_s = latency_s
        self.ban_after_violations, self.ban_s = ban_after_violations, ban_s
        self.ws_update_s, self.ws_tick_s, self.ws_lifetime_s = ws_update_s, ws_tick_s, ws_lifetime_s
        self.faults = FaultPlan()
        self.hostile = hostile
        self.statuses: dict[str, str] = {}  # symbol → status other than TRADING (set through /_sim/status)
        self.stats = SimStats()
        self._ips: dict[str, _IpState] = {}
        self._archive_cache: dict[str, bytes] = {}
        self._runner: web.AppRunner | None = None
        self._ws_server: Any = None
        self._ws_tasks: set[asyncio.Task] = set()
        self.rest_url = self.ws_url = self.archive_url = ""

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, rest_port: int = 0, ws_port: int = 0) -> ExchangeSimulator:
        app = web.Application()
        app.router.add_get("/api/v3/ping", self._ping)
        app.router.add_get("/api/v3/time", self._time)
        app.router.add_get("/api/v3/exchangeInfo", self._exchange_info)
        app.router.add_get("/api/v3/klines", self._klines)
        app.router.add_get("/data/spot/{period}/klines/{symbol}/{interval}/{filename}", self._archive)
        app.router.add_post("/_sim/fault", self._add_fault)
        app.router.add_post("/_sim/status", self._set_status)
        app.router.add_get("/_sim/stats", self._stats)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, rest_port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.rest_url = self.archive_url = f"http://{self.host}:{port}"
        self._ws_server = await serve(self._ws_handler, self.host, ws_port, ping_interval=20, ping_timeout=60)
        self.ws_url = f"ws://{self.host}:{self._ws_server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        if self._ws_server is not None:
            self._ws_server.close()
            for task in list(self._ws_tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._ws_server.wait_closed()
        if self._runner is not None:
            await self._runner.cleanup()

    def urls(self) -> dict[str, str]:
        return {"rest_url": self.rest_url, "ws_url": self.ws_url, "archive_url": self.archive_url}

    # -- weight and faults ----------------------------------------------------------------------
    def _ip(self, request: web.Request) -> _IpState:
        return self._ips.setdefault(request.remote or "?", _IpState())

    def _error(self, status: int, code: int, msg: str, retry_after: float | None = None) -> web.Response:
        headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else {}
        self.stats.statuses[status] += 1
        return web.json_response({"code": code, "msg": msg}, status=status, headers=headers)

    async def _gate(self, request: web.Request, weight: int, *, faultable: bool) -> web.Response | dict:
        """Apply latency, scripted faults, bans and the weight limit. Returns an error response,
        or the headers for a successful one."""
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        self.stats.requests[request.path] += 1
        state, now = self._ip(request), time.time()
        if state.banned_until > now:
            return self._error(418, -1003, "Way too many requests; IP banned.", state.banned_until - now)
        if state.retry_after_until > now:
            state.violations += 1
            if state.violations >= self.ban_after_violations:
                state.banned_until = now + self.ban_s
                self.stats.bans += 1
                return self._error(418, -1003, "Way too many requests; IP banned.", self.ban_s)
            return self._error(
                429, -1003, "Too many requests; retry after the given time.", state.retry_after_until - now
            )
        fault = self.faults.take("rest") if faultable else None
        if fault is not None:
            response = await self._apply_rest_fault(request, fault, state, now)
            if response is not None:
                return response
        window = int(now // self.weight_window_s)
        if window != state.window:
            state.window, state.used = window, 0
        if state.used + weight > self.weight_limit:
            state.retry_after_until = (window + 1) * self.weight_window_s
            return self._error(429, -1003, "Too much request weight used.", state.retry_after_until - now)
        state.used += weight
        self.stats.peak_used_weight = max(self.stats.peak_used_weight, state.used)
        return {self.weight_header: str(state.used)}

    async def _apply_rest_fault(self, request: web.Request, fault: Any, state: _IpState, now: float) -> Any:
        if fault.kind == "429":
            wait = fault.param or 1.0
            state.retry_after_until = now + wait
            return self._error(429, -1003, "Too many requests (injected).", wait)
        if fault.kind == "418":
            state.banned_until = now + (fault.param or self.ban_s)
            self.stats.bans += 1
            return self._error(418, -1003, "IP banned (injected).", fault.param or self.ban_s)
        if fault.kind == "5xx":
            return self._error(int(fault.param or 503), -1000, "An unknown error occurred (injected).")
        if fault.kind == "451":
            return self._error(451, 0, "Service unavailable from a restricted location (injected).")
        if fault.kind == "403":
            return self._error(403, 0, "Forbidden by the web application firewall (injected).")
        if fault.kind == "slow":
            await asyncio.sleep(fault.param or 2.0)
            return None
        if fault.kind == "reset":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)  # never delivered: the connection is gone
        return None

    # -- REST -----------------------------------------------------------------------------------
    async def _ping(self, request: web.Request) -> web.Response:
        gate = await self._gate(request, _WEIGHTS[request.path], faultable=False)
        return gate if isinstance(gate, web.Response) else web.json_response({}, headers=gate)

    async def _time(self, request: web.Request) -> web.Response:
        gate = await self._gate(request, _WEIGHTS[request.path], faultable=False)
        if isinstance(gate, web.Response):
            return gate
        now = self.clock.now_ms()
        return web.json_response({"serverTime": self.hostile.server_time(now) if self.hostile else now}, headers=gate)

    async def _exchange_info(self, request: web.Request) -> web.Response:
        gate = await self._gate(request, _WEIGHTS[request.path], faultable=False)
        if isinstance(gate, web.Response):
            return gate
        symbols = [
            {"symbol": s, "status": self.statuses.get(s, "TRADING"), "baseAsset": s[:-4], "quoteAsset": s[-4:]}
            for s in self.book.symbols() if self.statuses.get(s) != "DELISTED"
        ]
        wanted = request.query.get("symbol")
        if wanted:
            symbols = [entry for entry in symbols if entry["symbol"] == wanted]
            if not symbols:
                return self._error(400, -1121, "Invalid symbol.")
        body = {
            "timezone": "UTC",
            "serverTime": self.clock.now_ms(),
            "rateLimits": [
                {
                    "rateLimitType": "REQUEST_WEIGHT",
                    "interval": self.weight_interval,
                    "intervalNum": self.weight_interval_num,
                    "limit": self.weight_limit,
                },
            ],
            "symbols": symbols,
        }
        return web.json_response(body, headers=gate)

    async def _klines(self, request: web.Request) -> web.Response:
        gate = await self._gate(request, _WEIGHTS[request.path], faultable=True)
        if isinstance(gate, web.Response):
            return gate
        query = request.query
        symbol, interval = query.get("symbol", ""), query.get("interval", "")
        if interval not in INTERVAL_MS:
            return self._error(400, -1120, "Invalid interval.")
        series = self.book.get(symbol, interval)
        if series is None:
            return self._error(400, -1121, "Invalid symbol.")
        try:
            limit = int(query.get("limit", 500))
            start = int(query["startTime"]) if "startTime" in query else None
            end = int(query["endTime"]) if "endTime" in query else None
        except ValueError:
            return self._error(400, -1100, "Illegal characters found in a parameter.")
        if not 1 <= limit <= 1000:
            return self._error(400, -1100, "limit must be between 1 and 1000.")
        now = self.clock.now_ms()
        last_allowed = now if end is None else min(end, now)
        if start is not None:
            first, stop = series.index_range(start, last_allowed)
            stop = min(stop, first + limit)
        else:
            _, stop = series.index_range(-(2**62), last_allowed)
            first = max(0, stop - limit)
        if self.statuses.get(symbol) == "DELISTED":
            return self._error(400, -1121, "Invalid symbol.")
        rows = [kline_row(series, index, now) for index in range(first, stop)]
        if self.hostile is not None:
            return self._hostile_klines(series, rows, first, stop, now, start, gate)
        return web.json_response(rows, headers=gate)

    def _hostile_klines(self, series: Series, rows: list, first: int, stop: int, now: int, start: int | None,
                        headers: dict) -> web.Response:
        assert self.hostile is not None
        kind = self.hostile.klines_kind(series.symbol, series.interval, start)
        if kind == "html_page":
            return web.Response(text="<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html",
                                headers=headers)
        if kind == "truncated_json":
            body = json.dumps(rows)
            return web.Response(text=body[: max(1, len(body) // 2)], content_type="application/json", headers=headers)
        before = len(rows)
        if kind == "reversed":
            rows = rows[::-1]
        elif kind == "end_ignored":
            _, last = series.index_range(-(2**62), now)
            rows += [kline_row(series, index, now) for index in range(stop, min(last, stop + 3))]
        elif kind == "overlap" and first > 0:
            rows = [kline_row(series, first - 1, now), *rows]
        elif kind == "empty":
            rows = []
        if (kind == "reversed" and before < 2) or (kind in ("end_ignored", "overlap") and len(rows) == before):
            self.hostile.injected[kind] -= 1  # nothing to reverse or add: the reply stayed true
        return web.json_response(rows, headers=headers)

    # -- archive --------------------------------------------------------------------------------
    async def _archive(self, request: web.Request) -> web.Response:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        self.stats.requests["archive"] += 1
        info = request.match_info
        filename, checksum = info["filename"], info["filename"].endswith(".CHECKSUM")
        zip_name = filename.removesuffix(".CHECKSUM")
        fault = None if checksum else self.faults.take("archive")
        if fault is not None and fault.kind == "404":
            return web.Response(status=404, text="Not Found")
        if fault is not None and fault.kind == "5xx":
            return web.Response(status=int(fault.param or 503), text="Service Unavailable")
        if fault is not None and fault.kind == "slow":
            await asyncio.sleep(fault.param or 2.0)
        if fault is not None and fault.kind == "reset":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)  # never delivered: the connection is gone
        data = self._archive_zip(info["period"], info["symbol"], info["interval"], zip_name)
        if data is None:
            return web.Response(status=404, text="Not Found")
        if checksum:
            digest = hashlib.sha256(data).hexdigest()
            return web.Response(text=f"{digest}  {zip_name}\n")
        self.stats.archive_files += 1
        if fault is not None and fault.kind == "corrupt":
            data = data[: len(data) // 2] + bytes(len(data) - len(data) // 2)
        return web.Response(body=data, content_type="application/zip")

    def _archive_zip(self, period: str, symbol: str, interval: str, zip_name: str) -> bytes | None:
        key = f"{period}/{symbol}/{interval}/{zip_name}"
        if key in self._archive_cache:
            return self._archive_cache[key]
        series = self.book.get(symbol, interval)
        prefix = f"{symbol}-{interval}-"
        if series is None or not zip_name.startswith(prefix) or not zip_name.endswith(".zip"):
            return None
        stamp = zip_name[len(prefix) : -len(".zip")]
        try:
            if period == "monthly":
                begin = datetime.strptime(stamp, "%Y-%m").replace(tzinfo=UTC)
                finish = (begin + timedelta(days=32)).replace(day=1)
                published = finish + timedelta(days=(7 - finish.weekday()) % 7)  # first Monday
            elif period == "daily":
                begin = datetime.strptime(stamp, "%Y-%m-%d").replace(tzinfo=UTC)
                finish = begin + timedelta(days=1)
                published = finish + timedelta(hours=6)
            else:
                return None
        except ValueError:
            return None
        if published.timestamp() * 1000 > self.clock.now_ms():
            return None  # not published yet
        first, stop = series.index_range(int(begin.timestamp() * 1000), int(finish.timestamp() * 1000) - 1)
        if first == stop:
            return None
        data = _build_archive_zip(series, first, stop, zip_name.removesuffix(".zip") + ".csv")
        self._archive_cache[key] = data
        return data

    # -- control --------------------------------------------------------------------------------
    async def _add_fault(self, request: web.Request) -> web.Response:
        try:
            self.faults.add_spec(request.query.get("spec", ""))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True})

    async def _set_status(self, request: web.Request) -> web.Response:
        """`?symbol=ETHUSDT&status=BREAK`: exchangeInfo reports it, its streams fall silent; `DELISTED` also
        drops it from exchangeInfo and refuses its klines; `TRADING` restores it."""
        symbol, status = request.query.get("symbol", ""), request.query.get("status", "")
        if symbol not in self.book.symbols() or not status.isalpha():
            return web.json_response({"error": "need a known symbol and a status word"}, status=400)
        if status == "TRADING":
            self.statuses.pop(symbol, None)
        else:
            self.statuses[symbol] = status
        return web.json_response({"ok": True})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats_dict())

    def stats_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(self.stats.requests),
            "statuses": {str(k): v for k, v in self.stats.statuses.items()},
            "peak_used_weight": self.stats.peak_used_weight,
            "weight_limit": self.weight_limit,
            "archive_files": self.stats.archive_files,
            "ws_connections": self.stats.ws_connections,
            "bans": self.stats.bans,
            "now_ms": self.clock.now_ms(),
            "hostile_injected": {k: n for k, n in self.hostile.injected.items() if n} if self.hostile else {},
        }

    # -- websocket ------------------------------------------------------------------------------
    async def _ws_handler(self, ws: ServerConnection) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._ws_tasks.add(task)
        try:
            await _StreamSession(self, ws).run()
        finally:
            if task is not None:
                self._ws_tasks.discard(task)


def _build_archive_zip(series: Series, first: int, stop: int, csv_name: str) -> bytes:
    lines = []
    for index in range(first, stop):
        row = series.frame.row(index, named=True)
        scale = 1000 if row["open_time"] >= MICROSECOND_ARCHIVE_FROM_MS else 1
        fields = [
            str(row["open_time"] * scale),
            *(format_number(row[name]) for name in ("open", "high", "low", "close", "volume")),
            str(row["close_time"] * scale + (999 if scale == 1000 else 0)),
            format_number(row["quote_volume"]),
            str(int(row["trades"] or 0)),
            format_number(row["taker_buy_base"]),
            format_number(row["taker_buy_quote"]),
            "0",
        ]
        lines.append(",".join(fields))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(csv_name, "\n".join(lines) + "\n")
    return buffer.getvalue()


class _StreamSession:
    """One websocket client: parses the requested streams, then pushes kline events on the clock."""

    def __init__(self, sim: ExchangeSimulator, ws: ServerConnection) -> None:
        self.sim, self.ws = sim, ws
        self.combined = False
        self.streams: dict[str, Series] = {}
        self.last_closed: dict[str, int] = {}
        self.stalled_until = 0.0
        self.muted: set[str] = set()
        self.history: dict[str, list[dict]] = {}  # closes sent per stream (the hostile profile re-sends them)
        self.held: dict[str, dict] = {}  # a close the hostile profile holds back until the next one

    def _subscribe(self, names: list[str]) -> None:
        now = self.sim.clock.now_ms()
        for name in names:
            symbol, _, interval = name.partition("@kline_")
            series = self.sim.book.get(symbol.upper(), interval)
            if series is not None and name not in self.streams:
                self.streams[name] = series
                # Like Binance, start from the present: nothing already closed is replayed.
                self.last_closed[name] = int(np.searchsorted(series.close_times, now, "left")) - 1

    async def run(self) -> None:
        path = self.ws.request.path if self.ws.request else "/"
        if path.startswith("/stream"):
            self.combined = True
            query = path.partition("?")[2]
            names = [p for part in query.split("&") if part.startswith("streams=") for p in part[8:].split("/") if p]
        elif path.startswith("/ws"):
            names = [p for p in path[3:].split("/") if p]
        else:
            await self.ws.close(1008, "unknown path")
            return
        self.sim.stats.ws_connections += 1
        self._subscribe(names)
        reader = asyncio.create_task(self._read_control())
        try:
            await self._push_loop()
        except ConnectionClosed:
            pass  # the client went away; nothing to clean up
        finally:
            reader.cancel()

    async def _read_control(self) -> None:
        with contextlib.suppress(Exception):
            async for message in self.ws:
                request = json.loads(message)
                method, params, request_id = (
                    request.get("method"),
                    request.get("params") or [],
                    request.get("id"),
                )
                if method == "SUBSCRIBE":
                    self._subscribe(params)
                    await self.ws.send(json.dumps({"result": None, "id": request_id}))
                elif method == "UNSUBSCRIBE":
                    for name in params:
                        self.streams.pop(name, None)
                    await self.ws.send(json.dumps({"result": None, "id": request_id}))
                elif method == "LIST_SUBSCRIPTIONS":
                    await self.ws.send(json.dumps({"result": sorted(self.streams), "id": request_id}))

    async def _send(self, name: str, event: dict) -> None:
        payload = {"stream": name, "data": event} if self.combined else event
        await self.ws.send(json.dumps(payload))

    async def _push_loop(self) -> None:
        sim, opened = self.sim, time.monotonic()
        last_update = 0.0
        while self.ws.state is State.OPEN:
            if sim.ws_lifetime_s is not None and time.monotonic() - opened > sim.ws_lifetime_s:
                await self.ws.close(1001, "connection lifetime reached")  # the 24 h cut
                return
            if await self._apply_fault():
                return
            now = sim.clock.now_ms()
            stalled = time.monotonic() < self.stalled_until
            send_update = time.monotonic() - last_update >= sim.ws_update_s
            for name, series in list(self.streams.items()):
                closed_until = int(np.searchsorted(series.close_times, now, "left"))
                silent = stalled or name in self.muted or series.symbol in sim.statuses
                for index in range(self.last_closed[name] + 1, closed_until):
                    if not silent:
                        await self._send_close(name, ws_kline_event(series, index, now))
                self.last_closed[name] = max(self.last_closed[name], closed_until - 1)
                current = closed_until
                in_progress = current < len(series.open_times) and series.open_times[current] <= now
                if send_update and not silent and in_progress:
                    await self._send(name, ws_kline_event(series, current, now))
            if send_update:
                last_update = time.monotonic()
            await asyncio.sleep(sim.ws_tick_s)

    async def _send_close(self, name: str, event: dict) -> None:
        hostile = self.sim.hostile
        if hostile is None:
            await self._send(name, event)
            return
        history = self.history.setdefault(name, [])
        extra, action = hostile.after_close(event, history)
        held = self.held.pop(name, None)
        if action == "hold":
            self.held[name] = event
        elif action == "send":
            await self._send(name, event)
        if held is not None:
            await self._send(name, held)
        history.append(event)
        del history[:-10]
        for frame in extra:
            if isinstance(frame, dict):
                await self._send(name, frame)
            else:
                await self.ws.send(frame)

    async def _apply_fault(self) -> bool:
        """Returns True when the fault ended this connection."""
        fault = self.sim.faults.take("ws")
        if fault is None:
            return False
        if fault.kind == "drop":
            self.ws.transport.abort()  # no close frame: the client sees an abnormal closure
            return True
        if fault.kind == "close1001":
            await self.ws.close(1001, "going away")
            return True
        if fault.kind == "shutdown":
            event = {"e": "serverShutdown", "E": self.sim.clock.now_ms()}
            await self._send("!serverShutdown", event)
            await asyncio.sleep(fault.param or 0.2)
            await self.ws.close(1001, "server shutdown")
            return True
        if fault.kind == "mute" and self.streams:
            self.muted.add(next(iter(self.streams)))
        if fault.kind == "stall":
            self.stalled_until = time.monotonic() + (fault.param or 3600.0)
        return False
