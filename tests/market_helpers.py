"""Shared pieces of the storage/market tests: the bundled real candles, a simulator on loopback,
and the comparison of a store with the simulator's truth. (A plain module, not a conftest, so the
model tests' conftest stays untouched.)"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import polars as pl
import structlog

from daemon.simulator.data import CandleBook, SimClock
from daemon.simulator.server import ExchangeSimulator

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "daemon" / "assets" / "data"
HOUR = 3_600_000
# 2024-03-01 00:00 UTC: inside both bundled series, with every column real.
MARCH_2024 = 1_709_251_200_000
# BTCUSDT misses 2023-03-24 13:00 (a real exchange outage).
OUTAGE_2023 = 1_679_662_800_000

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

_BOOK: CandleBook | None = None


def bundled_book() -> CandleBook:
    """Both bundled series (read once per test session; the book is never mutated)."""
    global _BOOK
    if _BOOK is None:
        _BOOK = CandleBook()
        _BOOK.add_file(BUNDLED / "BTCUSDT_1h.parquet")
        _BOOK.add_file(BUNDLED / "ETHUSDT_1h.parquet")
    return _BOOK


@contextlib.asynccontextmanager
async def running_simulator(now_ms: int, speed: float = 0.0, **options: object) -> AsyncIterator[ExchangeSimulator]:
    simulator = ExchangeSimulator(bundled_book(), SimClock(now_ms, speed), **options)
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


COMPARED = ("open_time", "close_time", "open", "high", "low", "close", "volume", "quote_volume", "trades")


def truth(symbol: str, interval: str, start_ms: int, now_ms: int) -> pl.DataFrame:
    """Candles closed by `now_ms` with open time >= start, as the exchange serves them."""
    series = bundled_book().get(symbol, interval)
    assert series is not None
    return series.closed_truth(now_ms).filter(pl.col("open_time") >= start_ms)


def assert_store_matches_truth(stored: pl.DataFrame, expected: pl.DataFrame) -> None:
    """Same candles (nothing lost, nothing extra, no duplicate), same values."""
    assert stored["open_time"].is_unique().all(), "duplicate candles stored"
    stored_times, expected_times = stored["open_time"].to_list(), expected["open_time"].to_list()
    missing = sorted(set(expected_times) - set(stored_times))
    extra = sorted(set(stored_times) - set(expected_times))
    assert not missing and not extra, f"missing {missing[:5]} ({len(missing)}), extra {extra[:5]} ({len(extra)})"
    left = stored.sort("open_time").select(COMPARED).with_columns(pl.col("trades").cast(pl.Int64))
    right = expected.sort("open_time").select(COMPARED).with_columns(pl.col("trades").cast(pl.Int64))
    # The simulator sends 0 where the bundled data has no value, as Binance always sends a number.
    left, right = left.fill_null(0), right.fill_null(0)
    assert left.equals(right), "stored values differ from the exchange's"
