"""Parsing Binance kline payloads (REST rows, websocket events, archive CSV) into candle batches.

No I/O here. Binance sends prices and volumes as JSON strings; they become float64 on purpose.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import polars as pl

from storage.candles import candles_from_rows, empty_candles

# REST row layout: [open_time, open, high, low, close, volume, close_time, quote_volume, trades,
#                   taker_buy_base, taker_buy_quote, ignore]


def _number(value: Any) -> float | None:
    return None if value is None or value == "" else float(value)


def rest_rows_to_candles(
    rows: Sequence[Sequence[Any]], symbol: str, interval: str, *, server_now_ms: int, source: str = "rest"
) -> pl.DataFrame:
    """REST klines → candle batch. A row whose close time is not before the server's clock is the
    still-open candle; it is marked open (and so never stored)."""
    if not rows:
        return empty_candles()
    return candles_from_rows(
        {
            "symbol": symbol,
            "interval": interval,
            "open_time": int(row[0]),
            "open": float(row[1]),
            "high": float(row[2]),
            "low": float(row[3]),
            "close": float(row[4]),
            "volume": float(row[5]),
            "close_time": int(row[6]),
            "quote_volume": _number(row[7]),
            "trades": None if row[8] is None else int(row[8]),
            "taker_buy_base": _number(row[9]),
            "taker_buy_quote": _number(row[10]),
            "is_closed": int(row[6]) < server_now_ms,
            "source": source,
        }
        for row in rows
    )


def ws_event_to_row(event: dict[str, Any]) -> dict[str, Any] | None:
    """A kline websocket event → one candle row (closed or not), or None for other event types."""
    if event.get("e") != "kline":
        return None
    k = event["k"]
    return {
        "symbol": k["s"],
        "interval": k["i"],
        "open_time": int(k["t"]),
        "close_time": int(k["T"]),
        "open": float(k["o"]),
        "high": float(k["h"]),
        "low": float(k["l"]),
        "close": float(k["c"]),
        "volume": float(k["v"]),
        "quote_volume": _number(k.get("q")),
        "trades": None if k.get("n") is None else int(k["n"]),
        "taker_buy_base": _number(k.get("V")),
        "taker_buy_quote": _number(k.get("Q")),
        "is_closed": bool(k["x"]),
        "source": "websocket",
    }


def ws_rows_to_candles(rows: Iterable[dict[str, Any]]) -> pl.DataFrame:
    return candles_from_rows(rows)


def stream_name(symbol: str, interval: str) -> str:
    return f"{symbol.lower()}@kline_{interval}"
