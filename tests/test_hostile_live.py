"""Live ingestion against a hostile exchange (the simulator's `hostile` profile) and against symbols that stop
trading mid-run: ingestion never stops, every garbage kind is counted, the store equals the truth, and the
newest-candle notifications (what triggers forecasts) only move forward."""

from __future__ import annotations

import asyncio

import pytest
from market_helpers import HOUR, MARCH_2024, assert_store_matches_truth, bundled_book, truth

from daemon.market.live import LiveIngestor
from daemon.market.rejects import RejectLog
from daemon.market.rest import BinanceRestClient, RestSettings
from daemon.market.websocket import StreamSettings
from daemon.simulator.data import SimClock
from daemon.simulator.hostile import EXPECTED_REJECTIONS, WS_KINDS, HostileProfile
from daemon.simulator.server import ExchangeSimulator
from storage.writer import StoreWriter

START = MARCH_2024 + 10 * HOUR + 20 * 60_000
HISTORY_FROM = MARCH_2024
PAIRS = [("BTCUSDT", "1h"), ("ETHUSDT", "1h")]


async def ingest(tmp_path, *, hostile: HostileProfile | None, seconds: float, during=None, listing_check_s=60.0):
    """Run live ingestion for `seconds` of real time (1 market hour per 0.25 s), call `during(sim)` half-way,
    freeze the market mid-candle, wait for the store to catch up; returns (store rows per pair, live, sim,
    notifications, rejects)."""
    sim = ExchangeSimulator(bundled_book(), SimClock(START, 4 * 3600), ws_update_s=0.05, hostile=hostile)
    await sim.start()
    notifications: list[tuple[tuple[str, str], int]] = []
    rejects = RejectLog()
    try:
        with StoreWriter(tmp_path / "live.duckdb") as writer:
            settings = RestSettings(base_url=sim.rest_url, backoff_base_s=0.02, timeout_s=2)
            async with BinanceRestClient(settings, rejects=rejects) as rest:
                stream = StreamSettings(base_url=sim.ws_url, watchdog_s=2, backoff_base_s=0.05, backoff_max_s=0.2,
                                        close_grace_s=0.0, close_check_s=0.2)
                live = LiveIngestor(writer, rest, PAIRS, stream, initial_start_ms=lambda: HISTORY_FROM,
                                    resync_retry_s=0.05, listing_check_s=listing_check_s, rejects=rejects,
                                    on_stored=lambda pair, newest: notifications.append((pair, newest)))
                task = asyncio.create_task(live.run())
                await asyncio.sleep(seconds / 2)
                if during is not None:
                    await during(sim)
                await asyncio.sleep(seconds / 2)
                end = sim.clock.now_ms() // HOUR * HOUR + 30 * 60_000
                sim.clock.set(end, speed=0)
                expected = {pair: truth(*pair, HISTORY_FROM, end) for pair in PAIRS}
                for _ in range(200):
                    trading = [p for p in PAIRS if p not in live.paused]
                    counts = [writer.call(lambda s, p=p: s.read_candles(*p).height).result() for p in trading]
                    if counts == [expected[p].height for p in trading] and all(
                            live.buffers[p] is None for p in trading):
                        break
                    await asyncio.sleep(0.05)
                assert not task.done(), f"ingestion stopped: {task.exception() if task.done() else ''}"
                await live.stop()
                task.cancel()
                stored = {pair: writer.call(lambda s, p=pair: s.read_candles(*p)).result() for pair in PAIRS}
    finally:
        await sim.stop()
    return stored, expected, live, sim, notifications, rejects


def assert_forward_only(notifications):
    newest: dict = {}
    for pair, open_time in notifications:
        assert open_time > newest.get(pair, -1), f"{pair}: notified {open_time} after {newest.get(pair)}"
        newest[pair] = open_time


@pytest.mark.slow
def test_a_hostile_stream_never_stops_ingestion_and_every_garbage_kind_is_counted(tmp_path):
    stored, expected, _live, sim, notifications, rejects = asyncio.run(
        ingest(tmp_path, hostile=HostileProfile(seed=7, ws_rate=0.8, rest_rate=0.3), seconds=12))
    for pair in PAIRS:
        assert_store_matches_truth(stored[pair], expected[pair])
    assert_forward_only(notifications)
    injected = sim.hostile.injected
    counted = rejects.summary()
    ws_injected = [kind for kind in WS_KINDS if injected[kind] and kind != "reorder"]
    assert len(ws_injected) >= len(WS_KINDS) - 3, f"too few kinds injected: {dict(injected)}"
    expected_keys = {EXPECTED_REJECTIONS[k] for k, n in injected.items() if n > 0 and k in EXPECTED_REJECTIONS}
    missing = sorted(expected_keys - set(counted))
    # An empty lie or a backwards /time may not have been dealt; everything that was must be counted.
    assert not missing, f"injected but never counted: {missing}; counted {counted}"
    assert sum(injected.values()) > 40


@pytest.mark.slow
def test_a_symbol_in_break_pauses_alone_and_resumes_with_a_resync(tmp_path):
    async def halt_eth(sim):
        sim.statuses["ETHUSDT"] = "BREAK"
        await asyncio.sleep(2.0)  # eight market hours of BREAK while BTC keeps flowing
        sim.statuses.pop("ETHUSDT")

    stored, expected, live, _sim, notifications, rejects = asyncio.run(
        ingest(tmp_path, hostile=None, seconds=8, during=halt_eth, listing_check_s=0.3))
    for pair in PAIRS:
        assert_store_matches_truth(stored[pair], expected[pair])
    assert rejects.summary().get("exchange_info:pair_not_trading", 0) >= 1
    assert not live.paused, "ETHUSDT resumed once it traded again"
    assert_forward_only(notifications)


@pytest.mark.slow
def test_a_delisted_symbol_is_paused_while_the_other_pair_keeps_ingesting(tmp_path):
    async def delist_eth(sim):
        sim.statuses["ETHUSDT"] = "DELISTED"

    stored, expected, live, _sim, notifications, _rejects = asyncio.run(
        ingest(tmp_path, hostile=None, seconds=6, during=delist_eth, listing_check_s=0.3))
    btc, eth = PAIRS
    assert_store_matches_truth(stored[btc], expected[btc])
    assert eth in live.paused and "not listed" in live.paused[eth]
    # What ETH stored before it went away is the truth up to there, with nothing after.
    assert 0 < stored[eth].height < expected[eth].height
    assert_store_matches_truth(stored[eth], expected[eth].head(stored[eth].height))
    assert_forward_only(notifications)
