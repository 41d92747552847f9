"""Look-backs of many pairs in one query (storage `read_newest_candles`) and in one conversion
(kronos_model `candles_to_frames`): exactly what reading and converting each pair alone gives."""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kronos_model.data import candles_to_frame, candles_to_frames
from storage.candles import candles_from_rows
from storage.store import CandleStore, read_candles, read_newest_candles

HOUR = 3_600_000
PAIRS = [("BTCUSDT", "1h"), ("ETHUSDT", "1h"), ("BTCUSDT", "15m"), ("SOLUSDT", "1h")]


def candle(symbol: str, interval: str, open_time: int, price: float) -> dict:
    return {"symbol": symbol, "interval": interval, "open_time": open_time, "close_time": open_time + HOUR - 1,
            "open": price, "high": price + 1, "low": price - 1, "close": price + 0.5, "volume": 2.0,
            "quote_volume": 2 * price, "trades": 3, "is_closed": True, "source": "rest"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Four pairs (one symbol on two intervals) with holes; SOLUSDT is never stored."""
    store = CandleStore(tmp_path_factory.mktemp("windows") / "live.duckdb", memory_limit="256MB", threads=1)
    rows = []
    for k, (symbol, interval) in enumerate(PAIRS[:3]):
        step = HOUR if interval == "1h" else HOUR // 4
        rows += [candle(symbol, interval, i * step, 100.0 * (k + 1) + i) for i in range(400) if i % 37 != 5]
    store.upsert(candles_from_rows(rows))
    yield store
    store.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PAIRS), st.integers(-50, 450), st.integers(0, 300), st.integers(1, 120)),
                min_size=0, max_size=6))
def test_one_query_reads_what_each_pair_alone_reads(store, wanted):
    windows = []
    for (symbol, interval), start, length, limit in wanted:
        step = HOUR if interval == "1h" else HOUR // 4
        windows.append((symbol, interval, start * step, (start + length) * step, limit))
    together = read_newest_candles(store.con, windows)
    assert len(together) == len(windows)
    for (symbol, interval, start, end, limit), frame in zip(windows, together, strict=True):
        alone = read_candles(store.con, symbol, interval, start, end).tail(limit)
        assert frame.columns == alone.columns
        assert frame.to_dicts() == alone.to_dicts()


def test_many_windows_convert_as_each_alone_even_when_one_symbol_has_two_intervals(store):
    windows = read_newest_candles(store.con, [("BTCUSDT", "1h", 0, 100 * HOUR, 50), ("ETHUSDT", "1h", 0, 90 * HOUR, 60),
                                              ("BTCUSDT", "15m", 0, 25 * HOUR, 50)])
    converted = candles_to_frames(windows)
    assert len(converted) == 3
    for window, frame in zip(windows, converted, strict=True):
        alone = candles_to_frame(window)
        assert frame.drop("symbol").equals(alone.drop("symbol"))
    assert candles_to_frames([]) == []


def test_a_broken_window_is_named_in_the_error(store):
    window = read_newest_candles(store.con, [("ETHUSDT", "1h", 0, 50 * HOUR, 10)])[0]
    broken = window.with_columns(pl.when(pl.col("open_time") == window["open_time"][3]).then(None)
                                 .otherwise(pl.col("close")).alias("close"))
    with pytest.raises(ValueError, match="non-finite"):
        candles_to_frames([window, broken], "look-backs")
