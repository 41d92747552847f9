"""Many pairs from the bundled real ones, for scale tests: `kronosd simulate --pairs N`.

Nothing is invented. Pair k is a run of consecutive real candles of one bundled series (BTCUSDT or ETHUSDT
1h), starting at its own place in that history, re-timed onto the chosen interval's grid (candle j of the run
opens at slot j) and moved to its own price level: prices × s_k and base volumes ÷ s_k, so every candle keeps
its real returns, OHLC shape, trade count and quote volume. A real 1h series re-timed to 1m is a fast market
with the statistics of an hourly one; that is what a load test needs (many series that move like markets),
not a claim about 1m dynamics.
"""

from __future__ import annotations

import random

import polars as pl

from daemon.simulator.data import CandleBook, Series
from storage.intervals import floor_to_grid, interval_ms

PRICE_COLUMNS = ("open", "high", "low", "close")
BASE_VOLUME_COLUMNS = ("volume", "taker_buy_base")


def synthetic_symbol(index: int) -> str:
    return f"SYN{index:03d}USDT"


def add_synthetic_pairs(book: CandleBook, sources: list[Series], count: int, interval: str, start_ms: int,
                        history_candles: int, future_candles: int, seed: int = 0) -> list[tuple[str, str]]:
    """Add `count` pairs on `interval` covering `history_candles` before `start_ms` and `future_candles` from
    it (the part the simulator streams live); returns their (symbol, interval) keys."""
    if count < 1:
        raise ValueError("--pairs must be at least 1")
    if not sources:
        raise ValueError("synthetic pairs need at least one real series to derive from")
    length = history_candles + future_candles
    usable = [series for series in sources if series.frame.height >= length]
    if not usable:
        longest = max(series.frame.height for series in sources)
        raise ValueError(f"a synthetic pair needs {length} real candles in a row but the longest series has "
                         f"{longest}; ask for fewer history/future candles")
    step = interval_ms(interval)
    first_open = floor_to_grid(start_ms, interval) - history_candles * step
    rng = random.Random(seed)
    keys = []
    for index in range(count):
        source = usable[index % len(usable)]
        # Spread the pairs' starting places over the source's history so they do not move in lockstep.
        offset = rng.randrange(0, source.frame.height - length + 1)
        scale = 10 ** rng.uniform(-3, 2)
        run = source.frame.slice(offset, length)
        frame = run.with_columns(
            *[(pl.col(name) * scale).alias(name) for name in PRICE_COLUMNS],
            *[(pl.col(name) / scale).alias(name) for name in BASE_VOLUME_COLUMNS if name in run.columns],
            (pl.int_range(0, length, dtype=pl.Int64) * step + first_open).alias("open_time"),
        ).with_columns((pl.col("open_time") + step - 1).alias("close_time"))
        symbol = synthetic_symbol(index)
        book.add(symbol, interval, frame)
        keys.append((symbol, interval))
    return keys
