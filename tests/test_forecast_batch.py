"""The forecaster batches pairs that close together, and a pair's stored forecast is the one it gets alone.

In process: a real DuckDB store (StoreWriter) holding real bundled candles and synthetic pairs derived from
them (daemon/simulator/synthetic.py: real runs at other price levels, on 1h and 15m), the tiny model, and the
ForecastService as the daemon runs it. Through the daemon: tests/test_daemon_e2e.py-style subprocesses.
"""

from __future__ import annotations

import asyncio

import numpy as np
import polars as pl
import pytest
import torch
from market_helpers import bundled_book

from daemon.config import KronosConfig
from daemon.forecaster import ForecastService, PendingForecast
from daemon.simulator.data import CandleBook
from daemon.simulator.synthetic import add_synthetic_pairs
from kronos_model import Kronos, KronosTokenizer
from kronos_model.finetune.config import TINY_PREDICTOR, TINY_TOKENIZER
from storage.candles import conform
from storage.writer import StoreWriter

NOW_MS = 1_767_225_600_000  # 2026-01-01 00:00 UTC: the bundled series end just before
LOOKBACK = 48
COMPARED_OUT = {"issued_at"}  # the only column that may differ: when it was issued


def market() -> dict[tuple[str, str], pl.DataFrame]:
    """Closed candles of 8 pairs at very different price levels: BTC and ETH 1h, 3 synthetic 1h, 2 synthetic
    15m, and one pair with too little history to forecast."""
    real = bundled_book()
    series = [(real, "BTCUSDT", "1h", "BTCUSDT"), (real, "ETHUSDT", "1h", "ETHUSDT")]
    for interval, seed in (("1h", 5), ("15m", 6)):
        book = CandleBook()
        keys = add_synthetic_pairs(book, list(real), 3 if interval == "1h" else 2, interval, NOW_MS,
                                   history_candles=300, future_candles=0, seed=seed)
        series += [(book, symbol, interval, f"{symbol[:3]}{interval.upper()}{symbol[3:]}") for symbol, _ in keys]
    frames = {}
    for book, symbol, interval, name in series:
        frame = book.get(symbol, interval).closed_truth(NOW_MS).tail(300)
        frames[(name, interval)] = frame.with_columns(pl.lit(name).alias("symbol"), pl.lit(interval).alias("interval"))
    short = frames[("ETHUSDT", "1h")].tail(LOOKBACK // 2)
    frames[("SHORTUSDT", "1h")] = short.with_columns(pl.lit("SHORTUSDT").alias("symbol"))
    return frames


def config(batch_size: int) -> KronosConfig:
    return KronosConfig.model_validate({
        "forecast": {"lookback": LOOKBACK, "horizon": 6, "sample_paths": 8, "batch_size": batch_size, "seed": 3},
        "mqtt": {"enabled": False}})


async def open_service(tmp, name: str, batch_size: int, frames) -> tuple[StoreWriter, ForecastService]:
    writer = StoreWriter(tmp / f"{name}.duckdb").start()
    for frame in frames.values():
        await writer.upsert(conform(frame))
    settings = config(batch_size)
    service = ForecastService(writer, settings.forecast, settings.model, None)
    torch.manual_seed(0)
    service.set_champion("v-test", KronosTokenizer(**TINY_TOKENIZER), Kronos(**TINY_PREDICTOR))
    return writer, service


async def stored_forecasts(writer: StoreWriter) -> pl.DataFrame:
    frame = await writer.run(lambda store: store.con.sql("SELECT * FROM forecasts").pl())
    return frame.sort("symbol", "interval", "origin_time", "step")


def assert_same_forecasts(batched: pl.DataFrame, alone: pl.DataFrame) -> None:
    assert batched.height == alone.height > 0
    for column in batched.columns:
        if column in COMPARED_OUT:
            continue
        if batched[column].dtype.is_float():
            np.testing.assert_allclose(batched[column].to_numpy(), alone[column].to_numpy(), rtol=1e-6,
                                       err_msg=column)
        else:
            assert batched[column].to_list() == alone[column].to_list(), column


def newest_origins(frames) -> dict[tuple[str, str], int]:
    return {pair: int(frame["open_time"].max()) for pair, frame in frames.items()}


def test_pairs_forecast_in_one_batch_store_what_each_gets_alone(tmp_path):
    frames = market()
    origins = newest_origins(frames)

    async def scenario():
        writer_a, batched = await open_service(tmp_path, "batched", 16, frames)
        writer_b, alone = await open_service(tmp_path, "alone", 1, frames)
        try:
            published = await batched.forecast_pairs([PendingForecast(p, o, 0.0) for p, o in origins.items()])
            one_by_one = [await alone.forecast_pair(p, o) for p, o in origins.items()]
            return published, one_by_one, await stored_forecasts(writer_a), await stored_forecasts(writer_b)
        finally:
            writer_a.close()
            writer_b.close()

    published, one_by_one, batched_rows, alone_rows = asyncio.run(scenario())
    assert published == len(origins) - 1  # every pair but the one without a full look-back
    assert one_by_one.count(True) == len(origins) - 1 and not one_by_one[-1]
    assert set(batched_rows["interval"]) == {"1h", "15m"}
    assert batched_rows["symbol"].n_unique() == len(origins) - 1
    assert_same_forecasts(batched_rows, alone_rows)
    # different price levels and seeds really give different forecasts (the comparison is not vacuous)
    levels = batched_rows.group_by("symbol").agg(pl.col("last_close").first())["last_close"]
    assert levels.max() / levels.min() > 100


def test_the_loop_forecasts_whatever_is_pending_in_batches_of_batch_size(tmp_path):
    """One tick's candles (several pairs and intervals) become ceil(n / batch_size) generations; a second tick
    forecasts the next origins the same way, and its rows equal the pair-by-pair loop's."""
    frames = market()
    del frames[("SHORTUSDT", "1h")]
    first = {pair: frame.head(frame.height - 1) for pair, frame in frames.items()}

    async def run(name: str, batch_size: int):
        writer, service = await open_service(tmp_path, name, batch_size, first)
        loop = asyncio.create_task(service.run())
        try:
            for tick in (first, frames):
                if tick is frames:
                    for frame in frames.values():
                        await writer.upsert(conform(frame.tail(1)))
                for pair, origin in newest_origins(tick).items():
                    service.on_candle(pair, origin)
                expected = service.published + len(tick)
                while service.published < expected:
                    await asyncio.sleep(0.02)
            return service.batches, await stored_forecasts(writer)
        finally:
            loop.cancel()
            writer.close()

    batches_3, rows_3 = asyncio.run(run("by-three", 3))
    batches_1, rows_1 = asyncio.run(run("by-one", 1))
    assert batches_3 == 2 * -(-len(frames) // 3)  # two ticks, each in batches of at most 3
    assert batches_1 == 2 * len(frames)
    assert rows_3.select("symbol", "interval", "origin_time").unique().height == 2 * len(frames)  # both ticks
    assert_same_forecasts(rows_3, rows_1)


def test_batch_size_is_validated():
    with pytest.raises(ValueError, match="batch_size"):
        config(0)
