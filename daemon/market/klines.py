"""Parsing Binance kline payloads (REST rows, websocket frames) into candle rows, defensively.

No I/O here. Every parser takes whatever bytes or JSON the network delivered and returns either a valid
candle row or a `Rejection` with a stable reason; none of them raises on bad input (the fuzz tests hold
them to that). A row is valid when its fields have the right types, its numbers are finite, prices are
positive with low <= open, close <= high, volumes are not negative, and its open time lies on the
interval's grid with the close time inside its span, as Binance always sends them. Binance sends
prices and volumes as JSON strings; they become float64 on purpose.
"""

from __future__ import annotations

import json
import math
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from daemon.market.rejects import Rejection
from storage.candles import candles_from_rows, empty_candles
from storage.intervals import INTERVAL_MS, is_on_grid

Pair = tuple[str, str]

# A kline frame is about 500 bytes; anything this large is not one (the websocket library closes the
# connection itself above its own, larger, limit).
MAX_FRAME_BYTES = 64 * 1024
# Open times before 2000 or after 2286 (where milliseconds reach 10**13) are not Binance candles.
_MIN_TIME_MS, _MAX_TIME_MS = 946_684_800_000, 10**13
_PRICES = ("open", "high", "low", "close")


class _Bad(Exception):
    """Internal: one field is wrong. Never leaves this module."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.rejection = Rejection(reason, detail)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad("mistyped_field", f"{name} must be an integer, got {value!r:.60}")
    return value


def _number(value: Any, name: str, *, optional: bool = False) -> float | None:
    """A decimal string or JSON number → a finite float."""
    if value is None or value == "":
        if optional:
            return None
        raise _Bad("missing_field", f"{name} is missing")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _Bad("mistyped_field", f"{name} must be a decimal string, got {type(value).__name__}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise _Bad("not_a_number", f"{name} is not a number: {value!r:.60}") from None
    if not math.isfinite(number):
        raise _Bad("not_finite", f"{name} is {value!r:.60}")
    return number


def _check_candle(row: dict[str, Any]) -> None:
    """The rules every stored candle obeys; raises _Bad on the first broken one."""
    interval, open_time = row["interval"], row["open_time"]
    if interval not in INTERVAL_MS:
        raise _Bad("unknown_interval", f"interval {interval!r:.20} is not a Binance interval")
    if not _MIN_TIME_MS <= open_time < _MAX_TIME_MS:
        raise _Bad("time_out_of_range", f"open time {open_time} is not a millisecond time of this century")
    if not is_on_grid(open_time, interval):
        raise _Bad("off_grid", f"open time {open_time} is off the {interval} grid")
    # A candle cut short by an exchange outage closes early (real: BTCUSDT 2023-03-24 12:00), never late.
    if not open_time <= row["close_time"] <= open_time + INTERVAL_MS[interval] - 1:
        raise _Bad("close_time_mismatch", f"close time {row['close_time']} outside the candle's {interval} span")
    if min(row[name] for name in _PRICES) <= 0:
        raise _Bad("non_positive_price", f"a price is <= 0: {[row[name] for name in _PRICES]}")
    if row["high"] < row["low"]:
        raise _Bad("high_below_low", f"high {row['high']} < low {row['low']}")
    if not row["low"] <= min(row["open"], row["close"]) <= max(row["open"], row["close"]) <= row["high"]:
        raise _Bad("ohlc_inconsistent", f"open/close outside low..high: {[row[name] for name in _PRICES]}")
    for name in ("volume", "quote_volume", "taker_buy_base", "taker_buy_quote", "trades"):
        if row[name] is not None and row[name] < 0:
            raise _Bad("negative_volume", f"{name} is negative: {row[name]}")


def _build(symbol: Any, interval: Any, open_time: Any, close_time: Any, values: Sequence[Any], trades: Any,
           extras: Sequence[Any], is_closed: bool, source: str) -> dict[str, Any]:
    if not isinstance(symbol, str) or not isinstance(interval, str):
        raise _Bad("mistyped_field", "symbol and interval must be strings")
    row: dict[str, Any] = {
        "symbol": symbol, "interval": interval,
        "open_time": _integer(open_time, "open time"), "close_time": _integer(close_time, "close time"),
    }
    for name, value in zip(("open", "high", "low", "close", "volume"), values, strict=True):
        row[name] = _number(value, name)
    for name, value in zip(("quote_volume", "taker_buy_base", "taker_buy_quote"), extras, strict=True):
        row[name] = _number(value, name, optional=True)
    row["trades"] = None if trades is None else _integer(trades, "trades")
    row["is_closed"], row["source"] = is_closed, source
    _check_candle(row)
    return row


# -- REST -------------------------------------------------------------------------------------------
# Row layout: [open_time, open, high, low, close, volume, close_time, quote_volume, trades,
#              taker_buy_base, taker_buy_quote, ignore]


def parse_rest_row(row: Any, symbol: str, interval: str, *, server_now_ms: int,
                   source: str = "rest") -> dict[str, Any] | Rejection:
    """One REST kline row → a candle row; a row whose close time is not before the server's clock is the
    still-open candle and comes back marked open (so it is never stored)."""
    if not isinstance(row, list) or len(row) < 11:
        return Rejection("malformed_row", f"a kline row is a list of 12 fields, got {str(row)[:80]}")
    try:
        return _build(symbol, interval, row[0], row[6], row[1:6], row[8], (row[7], row[9], row[10]),
                      isinstance(row[6], int) and row[6] < server_now_ms, source)
    except _Bad as bad:
        return bad.rejection


@dataclass
class RestPage:
    candles: pl.DataFrame
    rejections: list[Rejection]
    newest_open_ms: int | None  # the newest valid open time inside the request: where the next page starts
    received: int  # rows in the body, valid or not


def parse_rest_klines(body: Any, symbol: str, interval: str, start_ms: int, end_ms: int, *,
                      server_now_ms: int) -> RestPage:
    """A `/api/v3/klines` body for open times in [start_ms, end_ms] → the valid rows inside the request,
    sorted and de-duplicated, plus a rejection for every row that was dropped (and why)."""
    if not isinstance(body, list):
        reason = Rejection("not_a_list", f"expected a JSON array of klines, got {type(body).__name__}")
        return RestPage(empty_candles(), [reason], None, 0)
    rows: dict[int, dict[str, Any]] = {}
    rejections: list[Rejection] = []
    previous = None
    for raw in body:
        parsed = parse_rest_row(raw, symbol, interval, server_now_ms=server_now_ms)
        if isinstance(parsed, Rejection):
            rejections.append(parsed)
            continue
        open_time = parsed["open_time"]
        if not start_ms <= open_time <= end_ms:
            rejections.append(Rejection("outside_request", f"open time {open_time} outside the requested "
                                                           f"{start_ms}..{end_ms} (endTime/startTime ignored)"))
            continue
        if open_time in rows:  # the first copy of a duplicated row wins
            rejections.append(Rejection("duplicate_row", f"open time {open_time} twice in one page"))
            continue
        if previous is not None and open_time < previous:  # kept, and sorted below
            rejections.append(Rejection("out_of_order", f"open time {open_time} after {previous}"))
        previous = open_time if previous is None else max(previous, open_time)
        rows[open_time] = parsed
    ordered = [rows[t] for t in sorted(rows)]
    candles = candles_from_rows(ordered) if ordered else empty_candles()
    return RestPage(candles, rejections, max(rows) if rows else None, len(body))


# -- websocket --------------------------------------------------------------------------------------
@dataclass
class WsMessage:
    """One websocket frame, understood: `kind` is "kline" (with `row`), "shutdown", "control" (a reply to
    a subscription request) or "rejected" (with `rejection`). `event_time` is the exchange's clock."""

    kind: str
    row: dict[str, Any] | None = None
    event_time: int | None = None
    rejection: Rejection | None = None


def _rejected(reason: str, detail: str) -> WsMessage:
    return WsMessage("rejected", rejection=Rejection(reason, detail))


def parse_ws_message(message: str | bytes, subscribed: Container[Pair] | None = None, *,
                     max_bytes: int = MAX_FRAME_BYTES) -> WsMessage:
    """A raw frame (text for Binance; binary is refused) → what it means. Never raises."""
    if isinstance(message, bytes | bytearray | memoryview):
        return _rejected("binary_frame", f"a binary frame of {len(message)} bytes (Binance sends text)")
    if not isinstance(message, str):
        return _rejected("binary_frame", f"a frame of type {type(message).__name__}")
    if len(message) > max_bytes:
        return _rejected("frame_too_large", f"a frame of {len(message)} characters (limit {max_bytes})")
    try:
        payload = json.loads(message)
    except (ValueError, RecursionError):
        return _rejected("not_json", f"not JSON: {message[:80]!r}")
    if isinstance(payload, dict) and "data" in payload and "stream" in payload:
        payload = payload["data"]  # combined-stream wrapper
    if not isinstance(payload, dict):
        return _rejected("not_an_object", f"expected a JSON object, got {type(payload).__name__}")
    if "e" not in payload and "id" in payload:
        return WsMessage("control")
    kind = payload.get("e")
    event_time = payload.get("E")
    if isinstance(event_time, bool) or not isinstance(event_time, int):
        event_time = None
    if kind == "serverShutdown":
        return WsMessage("shutdown", event_time=event_time)
    if kind != "kline":
        return _rejected("unexpected_event", f"event type {str(kind)[:40]!r} (subscribed to klines only)")
    if event_time is None:
        return _rejected("mistyped_field", f"event time E must be an integer, got {payload.get('E')!r:.40}")
    k = payload.get("k")
    if not isinstance(k, dict):
        return _rejected("missing_field", "a kline event without its `k` object")
    try:
        missing = [key for key in ("s", "i", "t", "T", "o", "h", "l", "c", "v", "x") if key not in k]
        if missing:
            raise _Bad("missing_field", f"kline fields missing: {missing}")
        if not isinstance(k["x"], bool):
            raise _Bad("mistyped_field", f"x (closed) must be true or false, got {k['x']!r:.20}")
        if subscribed is not None and (k["s"], k["i"]) not in subscribed:
            raise _Bad("unsubscribed", f"a kline for {str(k['s'])[:20]} {str(k['i'])[:10]}, not subscribed")
        row = _build(k["s"], k["i"], k["t"], k["T"], (k["o"], k["h"], k["l"], k["c"], k["v"]), k.get("n"),
                     (k.get("q"), k.get("V"), k.get("Q")), k["x"], "websocket")
    except _Bad as bad:
        return WsMessage("rejected", event_time=event_time, rejection=bad.rejection)
    except TypeError as exc:  # e.g. an unhashable symbol in the subscription check
        return WsMessage("rejected", event_time=event_time, rejection=Rejection("mistyped_field", str(exc)))
    return WsMessage("kline", row=row, event_time=event_time)


def ws_rows_to_candles(rows: Sequence[dict[str, Any]]) -> pl.DataFrame:
    return candles_from_rows(rows)


def stream_name(symbol: str, interval: str) -> str:
    return f"{symbol.lower()}@kline_{interval}"
