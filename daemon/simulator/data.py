"""What the exchange simulator serves: a clock that can run faster than real time, and the candles
(the "truth") it answers from, loaded from a store, a CSV or a Parquet file.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from daemon.market.kline_files import read_kline_file
from storage.intervals import interval_ms
from storage.snapshot import open_read_only
from storage.store import read_candles, stored_pairs


class SimClock:
    """Simulated exchange time in ms: `start_ms` plus real elapsed time × `speed` (0 freezes it)."""

    def __init__(self, start_ms: int, speed: float = 1.0) -> None:
        self.speed = speed
        self._anchor_ms = start_ms
        self._anchor_real = time.monotonic()

    def now_ms(self) -> int:
        return int(self._anchor_ms + (time.monotonic() - self._anchor_real) * 1000 * self.speed)

    def set(self, now_ms: int, speed: float | None = None) -> None:
        self._anchor_ms = now_ms
        self._anchor_real = time.monotonic()
        if speed is not None:
            self.speed = speed

    def advance(self, delta_ms: int) -> None:
        self.set(self.now_ms() + delta_ms)




@dataclass
class Series:
    """One symbol/interval of truth, as sorted numpy arrays for fast windowing."""

    symbol: str
    interval: str
    frame: pl.DataFrame
    open_times: np.ndarray
    close_times: np.ndarray

    @classmethod
    def from_frame(cls, symbol: str, interval: str, frame: pl.DataFrame) -> Series:
        frame = frame.sort("open_time")
        step = interval_ms(interval)
        if "close_time" not in frame.columns:
            frame = frame.with_columns((pl.col("open_time") + step - 1).alias("close_time"))
        frame = frame.with_columns(pl.col("close_time").fill_null(pl.col("open_time") + step - 1))
        return cls(
            symbol,
            interval,
            frame,
            frame["open_time"].to_numpy().astype(np.int64),
            frame["close_time"].to_numpy().astype(np.int64),
        )

    def index_range(self, first_open_ms: int, last_open_ms: int) -> tuple[int, int]:
        """Row indices [i, j) whose open time lies in [first, last]."""
        return (
            int(np.searchsorted(self.open_times, first_open_ms, "left")),
            int(np.searchsorted(self.open_times, last_open_ms, "right")),
        )

    def closed_truth(self, now_ms: int) -> pl.DataFrame:
        """The candles a correct client must end up with at `now_ms`: those whose close time has passed."""
        return self.frame.filter(pl.col("close_time") < now_ms)


class CandleBook:
    """All series the simulator serves, keyed by (symbol, interval)."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], Series] = {}

    def add(self, symbol: str, interval: str, frame: pl.DataFrame) -> None:
        self.series[(symbol.upper(), interval)] = Series.from_frame(symbol.upper(), interval, frame)

    def add_file(self, path: str | Path, symbol: str | None = None, interval: str | None = None) -> tuple[str, str]:
        frame, _ = read_kline_file(path, symbol=symbol, interval=interval, allow_off_grid=True)
        name = (frame["symbol"][0], frame["interval"][0]) if frame.height else (symbol, interval)
        self.add(name[0], name[1], frame)
        return name[0], name[1]

    def add_store(self, db_path: str | Path) -> list[tuple[str, str]]:
        con = open_read_only(db_path)
        try:
            pairs = stored_pairs(con)
            for symbol, interval in pairs:
                self.add(symbol, interval, read_candles(con, symbol, interval))
        finally:
            con.close()
        return pairs

    def symbols(self) -> list[str]:
        return sorted({symbol for symbol, _ in self.series})

    def get(self, symbol: str, interval: str) -> Series | None:
        return self.series.get((symbol, interval))

    def __iter__(self) -> Iterator[Series]:
        return iter(self.series.values())


def format_number(value: float | None) -> str:
    """Binance sends decimals as strings with 8 places."""
    return "0.00000000" if value is None else f"{value:.8f}"


def kline_row(series: Series, index: int, now_ms: int) -> list:
    """REST kline row for candle `index`; a candle still open at `now_ms` is shown partly formed."""
    row = series.frame.row(index, named=True)
    values = _partial(row, now_ms)
    return [
        int(row["open_time"]),
        format_number(values["open"]),
        format_number(values["high"]),
        format_number(values["low"]),
        format_number(values["close"]),
        format_number(values["volume"]),
        int(row["close_time"]),
        format_number(values["quote_volume"]),
        int(values["trades"] or 0),
        format_number(values["taker_buy_base"]),
        format_number(values["taker_buy_quote"]),
        "0",
    ]


def _partial(row: dict, now_ms: int) -> dict:
    """The values of a candle as seen at `now_ms`. A closed candle is the truth; an open one is a
    synthetic in-progress version (a share of the volume, the close moved part of the way), which a
    correct client must never store."""
    if row["close_time"] < now_ms:
        return row
    span = row["close_time"] - row["open_time"] + 1
    share = min(max((now_ms - row["open_time"]) / span, 0.0), 1.0)
    close = row["open"] + (row["close"] - row["open"]) * share
    partial = dict(row)
    partial.update(
        close=close,
        high=max(row["open"], close),
        low=min(row["open"], close),
        trades=int((row["trades"] or 0) * share),
    )
    for name in ("volume", "quote_volume", "taker_buy_base", "taker_buy_quote"):
        partial[name] = None if row[name] is None else row[name] * share
    return partial


def ws_kline_event(series: Series, index: int, now_ms: int) -> dict:
    row = series.frame.row(index, named=True)
    values = _partial(row, now_ms)
    closed = row["close_time"] < now_ms
    return {
        "e": "kline",
        # The closing event arrives just after the close time, as on Binance.
        "E": max(now_ms, int(row["close_time"]) + 1) if closed else now_ms,
        "s": series.symbol,
        "k": {
            "t": int(row["open_time"]),
            "T": int(row["close_time"]),
            "s": series.symbol,
            "i": series.interval,
            "f": 0,
            "L": 0,
            "o": format_number(values["open"]),
            "c": format_number(values["close"]),
            "h": format_number(values["high"]),
            "l": format_number(values["low"]),
            "v": format_number(values["volume"]),
            "n": int(values["trades"] or 0),
            "x": closed,
            "q": format_number(values["quote_volume"]),
            "V": format_number(values["taker_buy_base"]),
            "Q": format_number(values["taker_buy_quote"]),
            "B": "0",
        },
    }
