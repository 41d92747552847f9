"""The forecaster batches pairs that close together, and a pair's stored forecast is the one it gets alone.

In process: a real DuckDB store (StoreWriter) holding real bundled candles and synthetic pairs derived from
them (daemon/simulator/synthetic.py: real runs at other price levels, on 1h and 15m), the tiny model, and the
ForecastService as the daemon runs it. Through the daemon: tests/test_daemon_e2e.py-style subprocesses.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import duckdb
import numpy as np
import polars as pl
import pytest
import torch
from daemon_helpers import Daemon, Simulator, daemon_config, worker_processes
from market_helpers import bundled_book

from daemon.config import KronosConfig
from daemon.forecaster import ForecastService, PendingForecast
from daemon.market.live import LiveIngestor
from daemon.market.rest import BinanceRestClient, RestSettings
from daemon.market.websocket import StreamSettings
from daemon.simulator.data import CandleBook, SimClock
from daemon.simulator.server import ExchangeSimulator
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


def config(batch_size: int, worker: str = "process") -> KronosConfig:
    return KronosConfig.model_validate({
        "forecast": {"lookback": LOOKBACK, "horizon": 6, "sample_paths": 8, "batch_size": batch_size, "seed": 3,
                     "worker": worker},
        "mqtt": {"enabled": False}})


async def open_service(tmp, name: str, batch_size: int, frames,
                       worker: str = "process") -> tuple[StoreWriter, ForecastService]:
    writer = StoreWriter(tmp / f"{name}.duckdb").start()
    for frame in frames.values():
        await writer.upsert(conform(frame))
    settings = config(batch_size, worker)
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
    """Batched in the model worker's child process, or one by one in a thread of the daemon: the same rows."""
    frames = market()
    origins = newest_origins(frames)

    async def scenario():
        writer_a, batched = await open_service(tmp_path, "batched", 16, frames)
        writer_b, alone = await open_service(tmp_path, "alone", 1, frames, worker="thread")
        try:
            published = await batched.forecast_pairs([PendingForecast(p, o, 0.0) for p, o in origins.items()])
            one_by_one = [await alone.forecast_pair(p, o) for p, o in origins.items()]
            return published, one_by_one, await stored_forecasts(writer_a), await stored_forecasts(writer_b)
        finally:
            batched.close()
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


def test_batch_size_and_worker_are_validated():
    with pytest.raises(ValueError, match="batch_size"):
        config(0)
    with pytest.raises(ValueError, match="worker"):
        config(4, "gpu")


def test_a_killed_model_worker_fails_its_batch_alone_and_the_next_batch_starts_a_new_one(tmp_path):
    """kill -9 of the child holding the model: the forecast then in flight fails (logged, counted), nothing else
    does, and the next forecast runs in a new child with the same model."""
    frames = {pair: frame for pair, frame in market().items() if pair[1] == "1h" and pair[0] != "SHORTUSDT"}
    pair = ("BTCUSDT", "1h")
    times = frames[pair]["open_time"].to_list()

    async def scenario():
        before = worker_processes(os.getpid())
        writer, service = await open_service(tmp_path, "killed", 4, frames)
        try:
            assert await service.forecast_pair(pair, times[-4])
            (child,) = worker_processes(os.getpid()) - before
            os.kill(child, signal.SIGKILL)
            outcomes = [await service.forecast_pair(pair, origin) for origin in times[-3:]]
            (replacement,) = worker_processes(os.getpid()) - before - {child}
            return outcomes, service.worker.child_failures, child, replacement, await stored_forecasts(writer)
        finally:
            service.close()
            writer.close()

    outcomes, failures, child, replacement, rows = asyncio.run(scenario())
    assert failures == 1 and outcomes[0] is False and outcomes[1:] == [True, True]
    assert replacement != child
    assert sorted(set(rows["origin_time"].dt.epoch("ms"))) == [times[-4], *times[-2:]]


# -- when did the candle close? (the latency measured from the close) ---------------------------------------------

async def closes_seen(tmp_path, speed: float) -> tuple[LiveIngestor, dict[tuple[str, str], list]]:
    """Live ingestion of two synthetic 1s pairs for ~3 s on a market clock `speed` times real time; every
    on_stored notification with what the ingestor says about that candle's arrival, and the wall clock then."""
    now_ms = int(time.time() * 1000) // 1000 * 1000
    book = CandleBook()
    pairs = add_synthetic_pairs(book, list(bundled_book()), 2, "1s", now_ms, history_candles=100,
                                future_candles=20_000, seed=1)
    simulator = ExchangeSimulator(book, SimClock(now_ms, speed), ws_update_s=0.05, ws_tick_s=0.01)
    await simulator.start()
    notified: dict[tuple[str, str], list] = {pair: [] for pair in pairs}
    try:
        with StoreWriter(tmp_path / f"live-{speed}.duckdb") as writer:
            async with BinanceRestClient(RestSettings(base_url=simulator.rest_url, timeout_s=2)) as rest:
                await rest.sync_time()

                def on_stored(pair, newest):
                    notified[pair].append((newest, live.close_seen[pair], time.time() * 1000, time.monotonic()))

                live = LiveIngestor(writer, rest, pairs, StreamSettings(base_url=simulator.ws_url),
                                    initial_start_ms=lambda: now_ms - 100_000, on_stored=on_stored)
                task = asyncio.create_task(live.run())
                await asyncio.sleep(4.5)
                await live.stop()
                task.cancel()
    finally:
        await simulator.stop()
    return live, notified


@pytest.mark.slow
def test_a_streamed_close_is_placed_on_our_clock_when_the_exchange_clock_runs_at_wall_speed(tmp_path):
    _, notified = asyncio.run(closes_seen(tmp_path, 1.0))
    for pair, seen in notified.items():
        streamed = [(newest, s, wall, mono) for newest, s, wall, mono in seen if s.source == "websocket"]
        assert len(streamed) >= 2, f"{pair}: closes came through the stream"
        # the stream's clock is watched for CLOCK_WATCH_S before it is trusted to run at wall speed
        placed = [item for item in streamed if item[1].close_wall_ms is not None]
        assert len(placed) >= 1 and placed[-1] == streamed[-1]
        for newest, close, wall_then, mono_then in placed:
            received_wall = wall_then - (mono_then - close.received) * 1000
            # the simulator sends the close on its 10 ms tick after the close: received within ~0.3 s of it
            assert -50 <= received_wall - close.close_wall_ms <= 300
            assert close.close_wall_ms - (newest + 1000) < 5_000  # the close itself, not the open


@pytest.mark.slow
def test_an_accelerated_exchange_clock_gives_no_wall_clock_close(tmp_path):
    _, notified = asyncio.run(closes_seen(tmp_path, 60.0))
    seen = [s for events in notified.values() for _, s, _, _ in events]
    assert sum(s.source == "websocket" for s in seen) >= 3  # a minute of 1s candles per second (fewer when loaded)
    assert all(s.close_wall_ms is None for s in seen if s.source == "websocket")


# -- through the daemon ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_daemon_stores_the_same_forecasts_with_batch_size_1_and_8(tmp_path):
    """Two `kronosd run` daemons on one simulator (6 synthetic 1s pairs, market clock at wall speed): one
    forecasts pair by pair, one in batches. Every origin both forecast has the same stored forecast, the
    batched one did batch, and since the exchange clock runs at wall speed, latency from the close is given."""
    simulator = Simulator(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), 1.0, "--pairs", "6",
                          "--pairs-interval", "1s", "--pairs-history", "300", "--pairs-future", "3600")
    daemons, snapshots = {}, {}
    try:
        for batch_size in (1, 8):
            home = tmp_path / f"batch{batch_size}"
            home.mkdir()
            config = daemon_config(home, simulator, 1883, symbols=[f"SYN{i:03d}USDT" for i in range(6)],
                                   markets={"intervals": ["1s"], "history_days": 0.002},
                                   forecast={"lookback": 48, "horizon": 6, "sample_paths": 4,
                                             "batch_size": batch_size}, mqtt={"enabled": False})
            daemons[batch_size] = Daemon(config)
            snapshots[batch_size] = home / "state" / "kronos.duckdb"
        for daemon in daemons.values():
            daemon.wait_event("forecast_published", 90, count=60)
        for daemon in daemons.values():
            assert daemon.stop() == 0
    finally:
        for daemon in daemons.values():
            daemon.finish()
        simulator.close()
    rows = {size: pl.read_database("SELECT * FROM forecasts ORDER BY symbol, origin_time, step",
                                   duckdb.connect(str(path), read_only=True)) for size, path in snapshots.items()}
    keys = ["symbol", "interval", "origin_time"]
    common = rows[1].select(keys).unique().join(rows[8].select(keys).unique(), on=keys)
    assert common.height >= 20 and common["symbol"].n_unique() == 6
    same = {size: frame.join(common, on=keys).sort(*keys, "step") for size, frame in rows.items()}
    # calibration state differs by timing; the version id carries the second each daemon built its scratch model
    # in, its weights' hash must agree
    compared = same[1].drop([c for c in same[1].columns if c.endswith("_cal")] + ["model_version"])
    versions = {size: {v.rsplit("-", 1)[1] for v in frame["model_version"]} for size, frame in same.items()}
    assert versions[1] == versions[8] and len(versions[1]) == 1
    assert_same_forecasts(same[8].select(compared.columns), compared)
    published = daemons[8].events("forecast_published")
    assert max(line["batch"] for line in published) >= 2  # pairs closing together were batched
    assert max(line["batch"] for line in daemons[1].events("forecast_published")) == 1
    live = [line for line in published if line["received_by"] == "websocket"]
    # after the first seconds (the stream's clock is watched before it is trusted), every live one has it
    assert live and all(line["since_close_ms"] is not None for line in live[len(live) // 2:])
    live = [line for line in live if line["since_close_ms"] is not None]
    # since the close = since the closing message arrived + how long after the close it arrived (the simulator
    # sends it on its next tick); measured from the open instead, it would be a whole second more
    arrived_after_close = np.median([line["since_close_ms"] - line["latency_ms"] for line in live])
    assert -250 <= arrived_after_close <= 600
