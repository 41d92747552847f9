"""The data.binance.vision importer against the simulator's archive tree."""

from __future__ import annotations

import asyncio

import polars as pl
import pytest
from market_helpers import HOUR, assert_store_matches_truth, running_simulator, truth

from daemon.market.archive import ArchiveClient, plan_archive_files
from daemon.market.backfill import backfill
from daemon.market.rest import BinanceRestClient, RestSettings
from storage.intervals import parse_time
from storage.writer import StoreWriter

# Spans the switch to microsecond timestamps in the spot archive (2025-01-01).
START = parse_time("2024-11-01")
NOW = parse_time("2025-03-20T00:30")


def test_monthly_files_where_published_then_daily_files_two_days_back():
    files = plan_archive_files("BTCUSDT", "1h", START, NOW, NOW)
    names = [f.name for f in files]
    assert names[:4] == [
        "BTCUSDT-1h-2024-11.zip",
        "BTCUSDT-1h-2024-12.zip",
        "BTCUSDT-1h-2025-01.zip",
        "BTCUSDT-1h-2025-02.zip",
    ]
    assert names[4] == "BTCUSDT-1h-2025-03-01.zip"
    assert names[-1] == "BTCUSDT-1h-2025-03-17.zip"  # the 18th ends less than two days before now
    assert all(f.path("BTCUSDT", "1h").startswith("/data/spot/") for f in files)


async def archive_backfill(tmp_path, faults=()):
    # One download at a time, so consecutive faults hit the same file.
    async with running_simulator(NOW) as sim:
        for kind, count in faults:
            sim.faults.add("archive", kind, count)
        with StoreWriter(tmp_path / "live.duckdb") as writer:
            async with (
                BinanceRestClient(RestSettings(base_url=sim.rest_url, backoff_base_s=0.02)) as rest,
                ArchiveClient(sim.archive_url, backoff_base_s=0.02, concurrency=1) as archive,
            ):
                report = await backfill(writer, rest, "BTCUSDT", "1h", START, archive=archive, source="archive")
            stored = writer.call(lambda s: s.read_candles("BTCUSDT", "1h")).result()
        return report, stored, sim.stats.requests["/api/v3/klines"]


def test_archive_import_equals_the_truth_across_the_microsecond_switch(tmp_path):
    report, stored, klines_requests = asyncio.run(archive_backfill(tmp_path))
    assert report.archive_files == 4 + 17
    assert_store_matches_truth(stored, truth("BTCUSDT", "1h", START, NOW))
    assert set(stored.filter(pl.col("open_time") < parse_time("2025-03-18"))["source"]) == {"archive"}
    assert klines_requests == 1  # only the last two days came from REST
    assert stored.filter(pl.col("open_time") >= parse_time("2025-01-01"))["open_time"][0] == parse_time("2025-01-01")


def test_a_corrupt_download_is_fetched_again(tmp_path):
    report, stored, _ = asyncio.run(archive_backfill(tmp_path, [("corrupt", 1)]))
    assert report.archive_files == 4 + 17
    assert_store_matches_truth(stored, truth("BTCUSDT", "1h", START, NOW))


@pytest.mark.parametrize("fault", [("corrupt", 2), ("404", 1), ("5xx", 4)], ids=["corrupt-twice", "missing", "5xx"])
def test_an_unusable_archive_file_is_filled_through_rest(tmp_path, fault):
    report, stored, klines_requests = asyncio.run(archive_backfill(tmp_path, [fault]))
    assert report.archive_files == 4 + 17 - 1
    assert klines_requests >= 2  # the skipped file's window, and the recent tail
    assert_store_matches_truth(stored, truth("BTCUSDT", "1h", START, NOW))
    assert stored.height == (parse_time("2025-03-20") - START) // HOUR
