"""The in-memory shape of a batch of candles (a polars DataFrame) and the rules that clean a batch.

Times are integer milliseconds (UTC) in frames; the database stores TIMESTAMPTZ.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import polars as pl

# Column → dtype of a candle batch handed to the writer.
CANDLE_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "interval": pl.String(),
    "open_time": pl.Int64(),
    "close_time": pl.Int64(),
    "open": pl.Float64(),
    "high": pl.Float64(),
    "low": pl.Float64(),
    "close": pl.Float64(),
    "volume": pl.Float64(),
    "quote_volume": pl.Float64(),
    "taker_buy_base": pl.Float64(),
    "taker_buy_quote": pl.Float64(),
    "trades": pl.Int64(),
    "is_closed": pl.Boolean(),
    "source": pl.String(),
}

# Which copy of a candle wins when it arrives twice: a provisional copy (a live stream's, sent as the candle
# closes) never replaces a copy of record (a REST answer, an archive file, an import). Any other source name
# is a source of record; the store does not need to know which exchange or feed it came from.
PROVISIONAL_SOURCES = frozenset({"websocket"})


def empty_candles() -> pl.DataFrame:
    return pl.DataFrame(schema=CANDLE_SCHEMA)


def candles_from_rows(rows: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=CANDLE_SCHEMA)


def conform(frame: pl.DataFrame) -> pl.DataFrame:
    """Cast and order a frame to CANDLE_SCHEMA; a missing required column is an error, not a guess."""
    optional = {"quote_volume", "taker_buy_base", "taker_buy_quote", "trades"}
    missing = [name for name in CANDLE_SCHEMA if name not in frame.columns and name not in optional]
    if missing:
        raise ValueError(f"candle batch lacks columns {missing}")
    return frame.select(
        [
            (pl.col(name) if name in frame.columns else pl.lit(None)).cast(dtype).alias(name)
            for name, dtype in CANDLE_SCHEMA.items()
        ]
    )


def dedupe_batch(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per (symbol, interval, open_time), ready for a single upsert statement.

    Open candles are dropped (they are never stored). Among the remaining versions of a candle the
    copy of record wins over a provisional one and, among equals, the later row wins.
    This must happen before the upsert: DuckDB silently keeps the *first* duplicate of a key in one
    statement.
    """
    if frame.is_empty():
        return conform(frame) if frame.columns else empty_candles()
    frame = conform(frame).filter(pl.col("is_closed"))
    ranked = frame.with_row_index("_arrival").with_columns(
        pl.col("source").is_in(list(PROVISIONAL_SOURCES)).not_().cast(pl.Int8).alias("_rank")
    )
    return (
        ranked.sort(["symbol", "interval", "open_time", "_rank", "_arrival"])
        .unique(subset=["symbol", "interval", "open_time"], keep="last", maintain_order=True)
        .drop("_arrival", "_rank")
    )
