"""REST client and backfill against the simulator on loopback: paging, the open candle, weight
accounting, and the fault matrix (429, 418, 5xx, slow replies, resets, 451/403)."""

from __future__ import annotations

import asyncio
import time

import polars as pl
import pytest
from market_helpers import HOUR, MARCH_2024, OUTAGE_2023, assert_store_matches_truth, running_simulator, truth

from daemon.market.backfill import backfill
from daemon.market.rest import (
    BinanceRestClient,
    ExchangeConfigError,
    IpBannedError,
    RequestFailedError,
    RestSettings,
)
from storage.writer import StoreWriter

# "Now" on the simulated exchange: 30 minutes into the candle that opens 2500 hours after March 2024.
NOW = MARCH_2024 + 2500 * HOUR + 30 * 60_000


def fast_settings(url: str, **overrides: object) -> RestSettings:
    options = {"base_url": url, "timeout_s": 0.5, "backoff_base_s": 0.02, "backoff_max_s": 0.1, "max_retries": 4}
    options.update(overrides)
    return RestSettings(**options)


def stored(writer: StoreWriter, symbol: str = "BTCUSDT") -> pl.DataFrame:
    return writer.call(lambda store: store.read_candles(symbol, "1h")).result()


def test_backfill_pages_to_the_last_closed_candle_and_drops_the_open_one(tmp_path):
    async def scenario():
        async with running_simulator(NOW) as sim:
            with StoreWriter(tmp_path / "live.duckdb") as writer:
                async with BinanceRestClient(fast_settings(sim.rest_url)) as rest:
                    report = await backfill(writer, rest, "BTCUSDT", "1h", MARCH_2024, source="rest")
                assert report.rows_received == 2500
                assert sim.stats.requests["/api/v3/klines"] == 3  # 1000 + 1000 + 500
                rows = stored(writer)
                # The candle open at NOW was never requested: the window ends at the last closed one.
                assert rows["open_time"].max() == MARCH_2024 + 2499 * HOUR
                assert_store_matches_truth(rows, truth("BTCUSDT", "1h", MARCH_2024, NOW))

    asyncio.run(scenario())


def test_a_still_open_candle_in_a_page_is_marked_open_and_not_stored(tmp_path):
    async def scenario():
        async with running_simulator(NOW) as sim:
            async with BinanceRestClient(fast_settings(sim.rest_url)) as rest:
                await rest.sync_time()
                pages = [p async for p in rest.iter_klines("BTCUSDT", "1h", NOW - 30 * 60_000 - 3 * HOUR, NOW + HOUR)]
            frame = pl.concat(pages)
            assert frame["is_closed"].to_list() == [True, True, True, False]
            with StoreWriter(tmp_path / "live.duckdb") as writer:
                writer.submit(frame).result()
                assert stored(writer).height == 3

    asyncio.run(scenario())


def test_running_backfill_twice_changes_nothing_and_sends_no_klines_request(tmp_path):
    async def scenario():
        async with running_simulator(NOW) as sim:
            with StoreWriter(tmp_path / "live.duckdb") as writer:
                async with BinanceRestClient(fast_settings(sim.rest_url)) as rest:
                    await backfill(writer, rest, "BTCUSDT", "1h", MARCH_2024, source="rest")
                    before = stored(writer)
                    requests = sim.stats.requests["/api/v3/klines"]
                    second = await backfill(writer, rest, "BTCUSDT", "1h", MARCH_2024, source="rest")
                assert second.holes == [] and second.rows_changed == 0
                assert sim.stats.requests["/api/v3/klines"] == requests
                assert stored(writer).equals(before)  # ingested_at included

    asyncio.run(scenario())


def test_a_real_exchange_outage_is_confirmed_empty_and_not_refetched(tmp_path):
    start, end = OUTAGE_2023 - 48 * HOUR, OUTAGE_2023 + 48 * HOUR

    async def scenario():
        async with running_simulator(end + 10 * HOUR) as sim:
            with StoreWriter(tmp_path / "live.duckdb") as writer:
                async with BinanceRestClient(fast_settings(sim.rest_url)) as rest:
                    first = await backfill(writer, rest, "BTCUSDT", "1h", start, end, source="rest")
                    assert first.confirmed_empty == [(OUTAGE_2023, OUTAGE_2023 + HOUR)]
                    requests = sim.stats.requests["/api/v3/klines"]
                    second = await backfill(writer, rest, "BTCUSDT", "1h", start, end, source="rest")
                assert second.holes == []
                assert sim.stats.requests["/api/v3/klines"] == requests
                gaps = writer.call(lambda s: s.gap_records("BTCUSDT", "1h")).result()
                assert [(a, b, status) for a, b, status, _ in gaps] == [
                    (OUTAGE_2023, OUTAGE_2023 + HOUR, "confirmed_empty")
                ]

    asyncio.run(scenario())


def test_unknown_symbol_or_interval_is_refused_before_any_download(tmp_path):
    async def scenario():
        async with running_simulator(NOW) as sim:
            with StoreWriter(tmp_path / "live.duckdb") as writer:
                async with BinanceRestClient(fast_settings(sim.rest_url)) as rest:
                    with pytest.raises(ExchangeConfigError, match=r"unknown symbol 'BTCUSDX'.*similar: BTCUSDT"):
                        await backfill(writer, rest, "BTCUSDX", "1h", MARCH_2024)
                    with pytest.raises(ValueError, match="unknown interval '7m'"):
                        await backfill(writer, rest, "BTCUSDT", "7m", MARCH_2024)
            assert sim.stats.requests["/api/v3/klines"] == 0

    asyncio.run(scenario())


def test_weight_stays_within_the_configured_share_of_the_limit(tmp_path):
    # A tiny budget (60 weight per second, 30 usable) while the job needs more than 30 in all:
    # the client must spread it over windows instead of overrunning the share.
    async def scenario():
        async with running_simulator(NOW, weight_limit=60, weight_interval="SECOND") as sim:
            with StoreWriter(tmp_path / "live.duckdb") as writer:
                settings = fast_settings(sim.rest_url, weight_share=0.5)
                async with BinanceRestClient(settings) as rest:
                    await backfill(writer, rest, "BTCUSDT", "1h", NOW - 24_000 * HOUR, source="rest")
                    total_weight = 1 + 20 + 2 * sim.stats.requests["/api/v3/klines"]
                    assert total_weight > 30
                    assert rest.stats.peak_share <= 0.5
                assert sim.stats.peak_used_weight <= 30
                assert sim.stats.statuses[429] == 0 and sim.stats.bans == 0

    asyncio.run(scenario())


FAULTS = [
    ("429", 2, 1.0),  # Retry-After 1 s, twice
    ("5xx", 3, 503),
    ("5xx", 1, 500),
    ("slow", 2, 2.0),  # slower than the 0.5 s timeout
    ("reset", 3, None),
]


@pytest.mark.parametrize(("kind", "count", "param"), FAULTS, ids=[f"{k}x{c}" for k, c, _ in FAULTS])
def test_fault_matrix_rest_ends_with_the_store_equal_to_the_truth(tmp_path, kind, count, param):
    async def scenario():
        async with running_simulator(NOW) as sim:
            sim.faults.add("rest", kind, count, param)
            with StoreWriter(tmp_path / "live.duckdb") as writer:
                async with BinanceRestClient(fast_settings(sim.rest_url)) as rest:
                    await backfill(writer, rest, "BTCUSDT", "1h", MARCH_2024, source="rest")
                    if kind == "429":
                        assert rest.stats.rate_limited == count
                    elif kind == "reset":
                        # aiohttp itself retries once when a kept-alive connection turns out dead.
                        assert rest.stats.retries >= 1
                    else:
                        assert rest.stats.retries >= count
                assert_store_matches_truth(stored(writer), truth("BTCUSDT", "1h", MARCH_2024, NOW))
            assert sim.faults.pending("rest") == 0
            assert sim.stats.bans == 0  # Retry-After was respected

    asyncio.run(scenario())


def test_ignoring_retry_after_gets_banned_and_a_418_stops_with_the_time_it_ends(tmp_path):
    async def scenario():
        async with running_simulator(NOW) as sim:
            sim.faults.add("rest", "418", 1, 300)
            ban_file = tmp_path / "ban.json"
            with StoreWriter(tmp_path / "live.duckdb") as writer:
                async with BinanceRestClient(fast_settings(sim.rest_url, ban_file=ban_file)) as rest:
                    with pytest.raises(IpBannedError, match=r"banned this IP .* until") as caught:
                        await backfill(writer, rest, "BTCUSDT", "1h", MARCH_2024, source="rest")
                    assert 250 < caught.value.until_s - time.time() <= 301
                    requests = sim.stats.requests["/api/v3/klines"]
                assert stored(writer).height == 0
            # A restarted process remembers the ban and does not knock again.
            with pytest.raises(IpBannedError):
                async with BinanceRestClient(fast_settings(sim.rest_url, ban_file=ban_file)):
                    pass
            assert sim.stats.requests["/api/v3/klines"] == requests

    asyncio.run(scenario())


@pytest.mark.parametrize("status", ["451", "403"])
def test_restricted_location_or_firewall_is_a_configuration_error_naming_other_hosts(tmp_path, status):
    async def scenario():
        async with running_simulator(NOW) as sim:
            sim.faults.add("rest", status)
            with StoreWriter(tmp_path / "live.duckdb") as writer:
                async with BinanceRestClient(fast_settings(sim.rest_url)) as rest:
                    with pytest.raises(ExchangeConfigError, match=r"api-gcp\.binance\.com.*data-api\.binance\.vision"):
                        await backfill(writer, rest, "BTCUSDT", "1h", MARCH_2024, source="rest")
            assert sim.stats.requests["/api/v3/klines"] == 1  # no retry

    asyncio.run(scenario())


def test_retries_are_bounded(tmp_path):
    async def scenario():
        async with running_simulator(NOW) as sim:
            sim.faults.add("rest", "5xx", 50, 502)
            with StoreWriter(tmp_path / "live.duckdb") as writer:
                async with BinanceRestClient(fast_settings(sim.rest_url, max_retries=3)) as rest:
                    with pytest.raises(RequestFailedError, match="giving up after 4 attempts; last error: HTTP 502"):
                        await backfill(writer, rest, "BTCUSDT", "1h", MARCH_2024, source="rest")
            assert sim.stats.requests["/api/v3/klines"] == 4

    asyncio.run(scenario())
