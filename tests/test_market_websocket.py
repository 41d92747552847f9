"""Live ingestion over websocket streams against the simulator (1 market hour per real second):
every fault ends with the store equal to the truth — nothing lost, nothing duplicated, no open candle."""

from __future__ import annotations

import asyncio

import pytest
from market_helpers import HOUR, MARCH_2024, assert_store_matches_truth, running_simulator, truth

from daemon.market.live import LiveIngestor
from daemon.market.rest import BinanceRestClient, ExchangeConfigError, RestSettings
from daemon.market.websocket import KlineConnection, StreamSettings, stream_url
from storage.writer import StoreWriter

START = MARCH_2024 + 10 * HOUR + 20 * 60_000  # 20 minutes into a candle
HISTORY_FROM = MARCH_2024  # an empty store starts here
PAIRS = [("BTCUSDT", "1h"), ("ETHUSDT", "1h")]


async def run_live(tmp_path, fault: tuple[str, float | None] | None, *, sim_options=None, settings_options=None):
    """Run live ingestion, inject `fault` once data flows, freeze the market and compare with the truth."""
    async with running_simulator(START, speed=3600, ws_update_s=0.05, **(sim_options or {})) as sim:
        with StoreWriter(tmp_path / "live.duckdb") as writer:
            rest_settings = RestSettings(base_url=sim.rest_url, backoff_base_s=0.02, timeout_s=2)
            async with BinanceRestClient(rest_settings) as rest:
                options = {"base_url": sim.ws_url, "watchdog_s": 0.6, "backoff_base_s": 0.05, "backoff_max_s": 0.2}
                options.update(settings_options or {})
                newest_notified: dict = {}
                live = LiveIngestor(
                    writer,
                    rest,
                    PAIRS,
                    StreamSettings(**options),
                    initial_start_ms=lambda: HISTORY_FROM,
                    on_stored=lambda pair, newest: newest_notified.__setitem__(pair, newest),
                )
                task = asyncio.create_task(live.run())
                await asyncio.sleep(1.2)
                if fault is not None:
                    sim.faults.add("ws", fault[0], 1, fault[1])
                await asyncio.sleep(2.0)
                # The market stops half-way through a candle; let the client catch up.
                end = sim.clock.now_ms() // HOUR * HOUR + 30 * 60_000
                sim.clock.set(end, speed=0)
                expected = {pair: truth(*pair, HISTORY_FROM, end) for pair in PAIRS}
                for _ in range(100):
                    counts = [writer.call(lambda s, p=p: s.read_candles(*p).height).result() for p in PAIRS]
                    if counts == [expected[p].height for p in PAIRS] and all(b is None for b in live.buffers.values()):
                        break
                    await asyncio.sleep(0.05)
                await live.stop()
                task.cancel()
                for pair in PAIRS:
                    stored = writer.call(lambda s, p=pair: s.read_candles(*p)).result()
                    assert_store_matches_truth(stored, expected[pair])
                    assert stored["source"].to_list().count("websocket") > 0, "live candles came from the stream"
                    # The forecaster is told about the newest candle, whichever way it arrived.
                    assert newest_notified[pair] == expected[pair]["open_time"].max()
        assert sim.stats.bans == 0
        return live


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "param"),
    [("drop", None), ("stall", 30.0), ("close1001", None), ("shutdown", 0.05)],
    ids=["drop-mid-candle", "silent-stall", "close-1001", "server-shutdown"],
)
def test_fault_matrix_websocket_ends_with_the_store_equal_to_the_truth(tmp_path, kind, param):
    live = asyncio.run(run_live(tmp_path, (kind, param)))
    connection = live.connections[0]
    assert connection.connects >= 2, "the fault must have caused a reconnect"
    expected_reason = {
        "drop": "connection closed",
        "stall": "stalled",
        "close1001": "code 1001",
        "shutdown": "serverShutdown",
    }[kind]
    assert any(expected_reason in reason for reason in connection.reconnect_reasons)
    assert live.resyncs >= 2 * len(PAIRS)  # every (re)connect backfilled every pair


@pytest.mark.slow
def test_connections_are_replaced_before_their_age_limit_and_after_the_servers_cut(tmp_path):
    live = asyncio.run(
        run_live(tmp_path, None, sim_options={"ws_lifetime_s": 1.0}, settings_options={"max_connection_age_s": 0.7})
    )
    reasons = live.connections[0].reconnect_reasons
    assert any("planned reconnect" in reason for reason in reasons)


@pytest.mark.slow
def test_a_silent_stream_inside_a_busy_connection_is_filled_when_its_close_is_overdue(tmp_path):
    # BTCUSDT's stream stops while ETHUSDT's keeps the connection (and its watchdog) alive.
    live = asyncio.run(run_live(tmp_path, ("mute", None), settings_options={"close_grace_s": 30.0}))
    assert live.connections[0].connects == 1
    assert live.late_closes > 0


@pytest.mark.slow
def test_candles_closing_during_a_slow_backfill_are_buffered_then_drained(tmp_path):
    # Every REST reply takes 0.4 s (0.4 market hours): candles close on the stream mid-backfill.
    live = asyncio.run(run_live(tmp_path, ("drop", None), sim_options={"latency_s": 0.4}))
    assert live.drained > 0


def test_stream_urls_use_raw_for_one_stream_and_combined_for_many():
    assert stream_url("wss://x:9443", ["btcusdt@kline_1h"]) == "wss://x:9443/ws/btcusdt@kline_1h"
    assert (
        stream_url("wss://x:9443/", ["btcusdt@kline_1h", "ethusdt@kline_1m"])
        == "wss://x:9443/stream?streams=btcusdt@kline_1h/ethusdt@kline_1m"
    )
    with pytest.raises(ValueError, match=r"1\.\.1024 streams"):
        KlineConnection([("BTCUSDT", "1h")] * 1025, StreamSettings(), None, None)  # type: ignore[arg-type]


def test_a_raw_stream_delivers_interim_updates_then_the_closed_candle(tmp_path):
    rows = []

    async def scenario():
        async with running_simulator(START, speed=3600, ws_update_s=0.05) as sim:
            settings = StreamSettings(base_url=sim.ws_url, watchdog_s=5)
            connected = asyncio.Event()

            async def on_row(row):
                rows.append(row)

            async def on_connect(pairs):
                connected.set()

            connection = KlineConnection([("BTCUSDT", "1h")], settings, on_row, on_connect)
            task = asyncio.create_task(connection.run())
            for _ in range(100):
                if any(r["is_closed"] for r in rows):
                    break
                await asyncio.sleep(0.05)
            await connection.stop()
            await task
            assert connected.is_set()

    asyncio.run(scenario())
    closed = [r for r in rows if r["is_closed"]]
    assert closed and any(not r["is_closed"] and r["open_time"] == closed[0]["open_time"] for r in rows)
    expected = truth("BTCUSDT", "1h", closed[0]["open_time"], closed[0]["close_time"] + 1).row(0, named=True)
    assert closed[0]["close"] == expected["close"] and closed[0]["volume"] == expected["volume"]


def test_a_refused_rest_host_stops_live_ingestion_with_the_reason(tmp_path):
    async def scenario():
        async with running_simulator(START, speed=3600) as sim:
            sim.faults.add("rest", "451")
            with StoreWriter(tmp_path / "live.duckdb") as writer:
                async with BinanceRestClient(RestSettings(base_url=sim.rest_url)) as rest:
                    settings = StreamSettings(base_url=sim.ws_url, watchdog_s=5, backoff_base_s=0.05)
                    live = LiveIngestor(writer, rest, PAIRS[:1], settings, initial_start_ms=lambda: HISTORY_FROM)
                    with pytest.raises(ExchangeConfigError, match="restricted location"):
                        await asyncio.wait_for(live.run(), timeout=30)

    asyncio.run(scenario())


def test_streams_are_grouped_under_binance_s_url_and_stream_limits():
    """Binance refuses websocket URLs over ~8,004 characters and carries at most 1,024 streams a connection:
    a thousand 1m pairs need three connections, not one; every pair is streamed exactly once, in order."""
    from daemon.market.websocket import MAX_STREAMS_PER_CONNECTION, MAX_URL_CHARS, split_pairs, stream_url

    base = "wss://stream.binance.com:9443"
    pairs = [(f"SYM{i:04d}USDT", "1m") for i in range(1000)]
    groups = split_pairs(pairs, base)
    assert [pair for group in groups for pair in group] == pairs
    assert 2 <= len(groups) <= 4
    for group in groups:
        assert len(group) <= MAX_STREAMS_PER_CONNECTION
        assert len(stream_url(base, [f"{s.lower()}@kline_{i}" for s, i in group])) <= MAX_URL_CHARS
    assert split_pairs(pairs[:16], base) == [pairs[:16]]  # few pairs: one connection
    assert split_pairs([("BTCUSDT", "1h")], base) == [[("BTCUSDT", "1h")]]
