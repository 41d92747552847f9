"""Binance REST client for market data (aiohttp): server time, exchangeInfo validation and paged
klines, with weight accounting and the error handling Binance requires.

- Weight: every response's `X-MBX-USED-WEIGHT-<n><unit>` header is the exchange's count for the
  current window; the client never lets it pass `weight_share` of the limit from exchangeInfo
  (default 50 %), waiting for the next window instead.
- 429: wait `Retry-After`, then retry (ignoring it earns an IP ban).
- 418: the IP is banned; stop, report until when, and remember it in `ban_file` so a restarted
  process does not knock again (bans grow for repeat offenders).
- 5xx, timeouts, connection resets: bounded exponential backoff with jitter.
- 451 / 403: a configuration problem (restricted location, firewall), reported with the
  alternative hosts; retrying would not help.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import polars as pl
import structlog

from daemon.market.klines import parse_rest_klines
from daemon.market.rejects import Rejection, RejectLog
from storage.intervals import format_ms, interval_ms

log = structlog.get_logger("daemon.market.rest")

KLINES_PAGE = 1000
CLOCK_TOLERANCE_MS = 5_000  # round-trip noise between two time requests
ALTERNATIVE_HOSTS = (
    "https://api1.binance.com … https://api4.binance.com, https://api-gcp.binance.com, "
    "https://data-api.binance.vision (market data only)"
)
_WINDOW_SECONDS = {"SECOND": 1, "MINUTE": 60, "HOUR": 3600, "DAY": 86400}
_WINDOW_LETTER = {"SECOND": "S", "MINUTE": "M", "HOUR": "H", "DAY": "D"}


class ExchangeConfigError(ValueError):
    """The request can never succeed as configured (restricted location, unknown symbol, …)."""


class SymbolUnavailableError(ExchangeConfigError):
    """One symbol cannot be traded or fetched (unknown, delisted, in BREAK); other pairs are unaffected."""


class MalformedResponseError(RuntimeError):
    """A 200 answer whose body is not what the endpoint returns (an HTML page, truncated JSON, …)."""


class IpBannedError(RuntimeError):
    def __init__(self, until_s: float, url: str) -> None:
        self.until_s = until_s
        when = format_ms(int(until_s * 1000))
        super().__init__(
            f"Binance has banned this IP (HTTP 418) until {when}; requests to {url} are stopped until then"
        )


class RequestFailedError(RuntimeError):
    """Retries exhausted on a transient error."""


@dataclass
class RestSettings:
    base_url: str = "https://api.binance.com"
    weight_share: float = 0.5
    timeout_s: float = 10.0
    max_retries: int = 6
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    ban_file: Path | None = None


@dataclass
class RestStats:
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    waited_for_weight_s: float = 0.0
    peak_used_weight: int = 0
    weight_limit: int = 6000
    statuses: Counter[str] = field(default_factory=Counter)  # HTTP status of every answer, or "error"

    @property
    def peak_share(self) -> float:
        return self.peak_used_weight / self.weight_limit if self.weight_limit else 0.0


@dataclass
class WeightBudget:
    """The exchange's weight count for the current window, as the last response reported it, plus
    the weight of requests still in flight. Windows are fixed and aligned on the clock."""

    limit: int = 6000
    window_s: float = 60.0
    header: str = "X-MBX-USED-WEIGHT-1M"
    share: float = 0.5
    used: int = 0
    in_flight: int = 0
    window: int = field(default=-1)

    def _roll(self) -> None:
        window = int(time.time() // self.window_s)
        if window != self.window:
            self.window, self.used = window, 0

    async def acquire(self, weight: int, stats: RestStats) -> None:
        allowed = self.limit * self.share
        while True:
            self._roll()
            if self.used + self.in_flight + weight <= allowed:
                self.in_flight += weight
                return
            # Sleep past the window boundary; the small margin absorbs clock differences.
            wait = (self.window + 1) * self.window_s - time.time() + 0.05
            stats.waited_for_weight_s += max(wait, 0)
            log.info("weight_budget_wait", used=self.used, allowed=allowed, wait_s=round(wait, 3))
            await asyncio.sleep(max(wait, 0.01))

    def settle(self, weight: int, reported: str | None) -> None:
        self.in_flight -= weight
        self._roll()
        if reported is not None and reported.isdigit():
            self.used = max(self.used, int(reported))


class BinanceRestClient:
    """Use as `async with BinanceRestClient(settings) as rest:`."""

    def __init__(self, settings: RestSettings | None = None, rejects: RejectLog | None = None) -> None:
        self.settings = settings or RestSettings()
        self.rejects = rejects or RejectLog()
        self._newest_server_ms: int | None = None
        self.base_url = self.settings.base_url.rstrip("/")
        self.budget = WeightBudget(share=self.settings.weight_share)
        self.stats = RestStats()
        self.server_offset_ms = 0
        self._session: aiohttp.ClientSession | None = None
        self._exchange_info: dict[str, Any] | None = None
        self.last_headers: Any = {}

    async def __aenter__(self) -> BinanceRestClient:
        self._check_persisted_ban()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    # -- bans -----------------------------------------------------------------------------------
    def _check_persisted_ban(self) -> None:
        ban_file = self.settings.ban_file
        if ban_file is None or not ban_file.exists():
            return
        try:
            until = float(json.loads(ban_file.read_text())["until_s"])
        except (ValueError, KeyError, OSError):
            return
        if until > time.time():
            raise IpBannedError(until, self.base_url)
        ban_file.unlink(missing_ok=True)

    def _remember_ban(self, until_s: float) -> None:
        if self.settings.ban_file is not None:
            self.settings.ban_file.parent.mkdir(parents=True, exist_ok=True)
            self.settings.ban_file.write_text(json.dumps({"until_s": until_s, "host": self.base_url}))

    # -- requests -------------------------------------------------------------------------------
    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)  # jitter keeps many clients from retrying in step

    async def request(self, path: str, params: dict[str, Any] | None = None, *, weight: int) -> Any:
        if self._session is None:
            raise RuntimeError("BinanceRestClient must be used inside `async with`")
        url = f"{self.base_url}{path}"
        attempt = 0
        while True:
            await self.budget.acquire(weight, self.stats)
            reported = None
            try:
                self.stats.requests += 1
                async with self._session.get(url, params=params) as response:
                    self.last_headers = response.headers
                    reported = response.headers.get(self.budget.header)
                    status, body = response.status, await response.read()
                    retry_after = response.headers.get("Retry-After")
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
                self.stats.statuses["error"] += 1
                self.budget.settle(weight, None)
                attempt = await self._retry_or_fail(attempt, url, f"{type(exc).__name__}: {exc}")
                continue
            self.budget.settle(weight, reported)
            self.stats.statuses[str(status)] += 1
            if reported is not None and reported.isdigit():
                self.stats.peak_used_weight = max(self.stats.peak_used_weight, int(reported))
            if status == 200:
                parsed = self._decode(body, response.headers.get("Content-Type", ""), path)
                if isinstance(parsed, Rejection):
                    attempt = await self._retry_or_fail(attempt, url, parsed.detail)
                    continue
                return parsed
            if status == 429:
                wait = _seconds(retry_after, 1.0)
                self.stats.rate_limited += 1
                log.warning("rate_limited", url=url, retry_after_s=wait)
                await asyncio.sleep(wait)
                continue
            if status == 418:
                until = time.time() + _seconds(retry_after, 120.0)
                self._remember_ban(until)
                raise IpBannedError(until, self.base_url)
            if status in (451, 403):
                reason = "a restricted location (HTTP 451)" if status == 451 else "a firewall rule (HTTP 403)"
                raise ExchangeConfigError(
                    f"{self.base_url} refuses this machine because of {reason}. Set exchange.rest_url "
                    f"(or --rest-url) to another host: {ALTERNATIVE_HOSTS}. Note that binance.us is a "
                    "different exchange with different prices."
                )
            if status >= 500:
                attempt = await self._retry_or_fail(attempt, url, f"HTTP {status}")
                continue
            text = _error_text(body)
            if "code -1121" in text:  # Invalid symbol: delisted since it was validated
                raise SymbolUnavailableError(f"{(params or {}).get('symbol')} is no longer listed on {self.base_url}")
            raise ExchangeConfigError(f"Binance rejected {path} {params or ''}: HTTP {status} {text}")

    def _decode(self, body: bytes, content_type: str, path: str) -> Any:
        """A 200 body as JSON, or a counted Rejection (retried like a 5xx: proxies and overloaded
        front ends answer 200 with an HTML page, and a reset can truncate a body)."""
        if content_type and "json" not in content_type.lower():
            rejection = Rejection("wrong_content_type", f"{path}: HTTP 200 with Content-Type {content_type[:60]!r}: "
                                                        f"{body[:80]!r}")
        else:
            try:
                return json.loads(body)
            except (ValueError, RecursionError):
                rejection = Rejection("not_json", f"{path}: HTTP 200 with a body that is not JSON ({len(body)} "
                                                  f"bytes): {body[:80]!r}")
        self.rejects.reject("rest", rejection)
        return rejection

    def _malformed(self, reason: str, detail: str) -> MalformedResponseError:
        self.rejects.reject("rest", Rejection(reason, detail))
        return MalformedResponseError(detail)

    async def _retry_or_fail(self, attempt: int, url: str, reason: str) -> int:
        if attempt >= self.settings.max_retries:
            raise RequestFailedError(f"{url}: giving up after {attempt + 1} attempts; last error: {reason}")
        delay = self._backoff(attempt)
        self.stats.retries += 1
        log.warning("request_retry", url=url, reason=reason, attempt=attempt + 1, delay_s=round(delay, 3))
        await asyncio.sleep(delay)
        return attempt + 1

    # -- endpoints ------------------------------------------------------------------------------
    async def sync_time(self) -> int:
        """Measure server − local clock offset (half the round trip corrected); returns it in ms."""
        sent = time.time()
        body = await self.request("/api/v3/time", weight=1)
        received = time.time()
        server_time = body.get("serverTime") if isinstance(body, dict) else None
        if isinstance(server_time, bool) or not isinstance(server_time, int):
            raise self._malformed("bad_server_time", f"/api/v3/time answered {str(body)[:80]}")
        offset = int(server_time - (sent + received) / 2 * 1000)
        if self._newest_server_ms is not None and offset < self.server_offset_ms - CLOCK_TOLERANCE_MS:
            # The exchange's clock jumped back: keep the clock we had (it only moves forward), or candles
            # already closed would count as open and be left out of a backfill.
            self.rejects.reject("exchange_clock", Rejection(
                "clock_backwards", f"server time went back {self.server_offset_ms - offset} ms; ignored"))
            return self.server_offset_ms
        self._newest_server_ms = server_time
        self.server_offset_ms = offset
        return self.server_offset_ms

    def server_now_ms(self) -> int:
        return int(time.time() * 1000) + self.server_offset_ms

    async def exchange_info(self, *, refresh: bool = False) -> dict[str, Any]:
        if self._exchange_info is None or refresh:
            info = await self.request("/api/v3/exchangeInfo", weight=20)
            symbols = info.get("symbols") if isinstance(info, dict) else None
            if not isinstance(symbols, list) or not all(isinstance(entry, dict) for entry in symbols):
                raise self._malformed("bad_exchange_info", f"exchangeInfo without a symbols list: {str(info)[:80]}")
            for limit in info.get("rateLimits", []):
                if not isinstance(limit, dict) or limit.get("rateLimitType") != "REQUEST_WEIGHT":
                    continue
                try:
                    number, unit, value = int(limit["intervalNum"]), limit["interval"], int(limit["limit"])
                    if unit not in _WINDOW_SECONDS or number <= 0 or value <= 0:
                        raise ValueError(unit)
                except (KeyError, TypeError, ValueError):
                    self.rejects.reject("exchange_info", Rejection("bad_rate_limit", f"ignored {str(limit)[:80]}"))
                    continue
                self.budget.limit = value
                self.budget.window_s = _WINDOW_SECONDS[unit] * number
                self.budget.header = f"X-MBX-USED-WEIGHT-{number}{_WINDOW_LETTER[unit]}"
                self.stats.weight_limit = self.budget.limit
                # The header name depends on the window, so this reply's count is read only now.
                self.budget.settle(0, self.last_headers.get(self.budget.header))
            self._exchange_info = info
        return self._exchange_info

    async def symbol_statuses(self, *, refresh: bool = False) -> dict[str, str]:
        info = await self.exchange_info(refresh=refresh)
        return {entry["symbol"]: str(entry.get("status")) for entry in info["symbols"]
                if isinstance(entry.get("symbol"), str)}

    async def validate(self, symbol: str, interval: str, *, refresh: bool = False) -> None:
        """Refuse an unknown symbol or interval before any download."""
        interval_ms(interval)
        statuses = await self.symbol_statuses(refresh=refresh)
        if symbol not in statuses:
            close = [name for name in statuses if name.startswith(symbol[:3])][:5]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise SymbolUnavailableError(f"unknown symbol {symbol!r} on {self.base_url}{hint}")
        if statuses[symbol] != "TRADING":
            raise SymbolUnavailableError(f"{symbol} is not trading on {self.base_url} (status {statuses[symbol]})")

    async def klines(self, symbol: str, interval: str, start_ms: int, end_ms: int) -> list[list[Any]]:
        """One page: at most 1000 candles with open time in [start_ms, end_ms]."""
        params = {
            "symbol": symbol,
            "interval": interval,
            "startTime": start_ms,
            "endTime": end_ms,
            "limit": KLINES_PAGE,
        }
        return await self.request("/api/v3/klines", params, weight=2)

    async def iter_klines(self, symbol: str, interval: str, start_ms: int, end_ms: int) -> AsyncIterator[pl.DataFrame]:
        """Pages of candles with open time in [start_ms, end_ms), oldest first. A still-open candle
        (close time not before the server clock) comes back marked open, so it is never stored."""
        step = interval_ms(interval)
        cursor = start_ms
        while cursor < end_ms:
            body = await self.klines(symbol, interval, cursor, end_ms - 1)
            page = parse_rest_klines(body, symbol, interval, cursor, end_ms - 1, server_now_ms=self.server_now_ms())
            for rejection in page.rejections:
                self.rejects.reject("rest", rejection, symbol=symbol, interval=interval)
            if page.candles.height:
                yield page.candles
            # A short page is the end of the data; a page with nothing usable cannot move the cursor
            # (what it should have held stays a hole, which the next backfill asks for again).
            if page.received < KLINES_PAGE or page.newest_open_ms is None:
                return
            cursor = page.newest_open_ms + step
        log.debug("klines_paged", symbol=symbol, interval=interval, until=format_ms(end_ms))


def _seconds(header: str | None, default: float) -> float:
    """A Retry-After header in seconds; a missing or unreadable one means `default`."""
    try:
        value = float(header) if header else default
    except ValueError:
        return default
    return min(value, 86_400.0) if value >= 0 and value == value else default


def _error_text(body: bytes) -> str:
    try:
        parsed = json.loads(body)
        return f"{parsed.get('msg')} (code {parsed.get('code')})"
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")
