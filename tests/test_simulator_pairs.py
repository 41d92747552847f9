"""`kronosd simulate --pairs N`: many synthetic pairs, each a real run of bundled candles at its own price
level, served like any other pair."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import polars as pl
import pytest
from market_helpers import REPO, bundled_book

from daemon.simulator.data import CandleBook
from daemon.simulator.synthetic import add_synthetic_pairs, synthetic_symbol

START = 1_767_225_600_000  # 2026-01-01 00:00 UTC
MINUTE = 60_000


def log_returns(frame: pl.DataFrame) -> np.ndarray:
    return np.diff(np.log(frame["close"].to_numpy()))


def test_each_synthetic_pair_is_a_real_run_re_timed_and_rescaled():
    sources = list(bundled_book())
    book = CandleBook()
    keys = add_synthetic_pairs(book, sources, 12, "1m", START, history_candles=300, future_candles=60, seed=3)
    assert keys == [(synthetic_symbol(i), "1m") for i in range(12)]
    levels = []
    for (symbol, interval), source in zip(keys, sources * 6, strict=True):
        series = book.get(symbol, interval)
        frame = series.frame
        assert frame.height == 360
        assert np.all(np.diff(series.open_times) == MINUTE)  # a whole grid, no holes
        assert int(series.open_times[0]) == START - 300 * MINUTE
        # The returns are a contiguous run of the real series' returns: nothing invented.
        real = log_returns(source.frame)
        own = log_returns(frame)
        windows = np.lib.stride_tricks.sliding_window_view(real, own.size)
        matches = np.flatnonzero(np.isclose(windows, own, atol=1e-9).all(axis=1))
        assert matches.size, f"{symbol} is not a run of {source.symbol}"
        run = source.frame.slice(int(matches[0]), frame.height)
        # Each candle keeps its shape, trades and quote volume; only the price level moved.
        scale = frame["close"] / run["close"]
        assert np.allclose(scale, scale[0]) and np.allclose(frame["high"] / run["high"], scale[0])
        assert np.allclose(frame["volume"] * scale[0], run["volume"])
        assert frame["quote_volume"].equals(run["quote_volume"]) and frame["trades"].equals(run["trades"])
        levels.append(float(frame["close"][0]))
    assert len({round(np.log10(level), 1) for level in levels}) > 6  # different price levels


def test_too_long_a_run_is_a_clear_error():
    with pytest.raises(ValueError, match="real candles in a row"):
        add_synthetic_pairs(CandleBook(), list(bundled_book()), 2, "1m", START, history_candles=10**6,
                            future_candles=1)


@pytest.mark.slow
def test_simulate_serves_a_hundred_pairs():
    process = subprocess.Popen([sys.executable, "-m", "daemon.cli", "simulate", "--pairs", "100", "--speed", "0"],
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        urls = json.loads(process.stdout.readline())
        info = json.load(urllib.request.urlopen(f"{urls['rest_url']}/api/v3/exchangeInfo", timeout=10))
        symbols = [entry["symbol"] for entry in info["symbols"]]
        assert symbols == [synthetic_symbol(i) for i in range(100)]
        url = f"{urls['rest_url']}/api/v3/klines?symbol=SYN099USDT&interval=1m&limit=5"
        rows = json.load(urllib.request.urlopen(url, timeout=10))
        assert len(rows) == 5 and rows[-1][0] == START  # the newest is the candle open at the market start
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
