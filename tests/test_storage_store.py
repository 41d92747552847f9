"""The live store: schema, migrations, idempotent upserts, dedupe rules, holes and gaps."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import duckdb
import polars as pl
import pytest

from storage.candles import candles_from_rows
from storage.schema import LATEST_VERSION
from storage.store import CandleStore, StoreLockedError

HOUR = 3_600_000


def rows(times, *, source="rest", closed=True, value=100.0, symbol="BTCUSDT"):
    return [
        {
            "symbol": symbol,
            "interval": "1h",
            "open_time": t,
            "close_time": t + HOUR - 1,
            "open": value,
            "high": value + 1,
            "low": value - 1,
            "close": value,
            "volume": 5.0,
            "quote_volume": 500.0,
            "trades": 7,
            "is_closed": closed,
            "source": source,
        }
        for t in times
    ]


@pytest.fixture
def store(tmp_path):
    store = CandleStore(tmp_path / "live.duckdb", memory_limit="256MB", threads=1)
    yield store
    store.close()


def test_schema_is_created_at_the_latest_version_with_the_documented_columns(store):
    assert store.con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0] == LATEST_VERSION
    columns = dict(
        store.con.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'candles'"
        ).fetchall()
    )
    assert columns["open_time"] == "TIMESTAMP WITH TIME ZONE"
    assert columns["trades"] == "BIGINT"
    assert columns["taker_buy_quote"] == "DOUBLE"
    assert {"source", "ingested_at", "close_time"} <= columns.keys()
    gap_columns = {
        r[0]
        for r in store.con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'gaps'"
        ).fetchall()
    }
    assert {"gap_start", "gap_end", "status", "checked_at"} <= gap_columns


def test_memory_limit_and_threads_are_set_explicitly(store):
    threads = store.con.execute("SELECT current_setting('threads')").fetchall()[0][0]
    limit = store.con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
    assert int(threads) == 1
    assert limit == "244.1 MiB"  # 256 MB, as DuckDB prints it (not its default of 80 % of RAM)


def test_reopening_applies_no_migration_and_a_newer_store_is_refused(tmp_path):
    path = tmp_path / "live.duckdb"
    CandleStore(path).close()
    reopened = CandleStore(path)
    assert reopened.con.execute("SELECT count(*) FROM schema_version").fetchall()[0][0] == LATEST_VERSION
    reopened.con.execute("INSERT INTO schema_version VALUES (999, 'from the future', now())")
    reopened.close()
    with pytest.raises(ValueError, match="newer than this kronosd"):
        CandleStore(path)


def test_upsert_is_idempotent_and_repeating_it_changes_nothing(store):
    batch = candles_from_rows(rows([0, HOUR, 2 * HOUR]))
    assert store.upsert(batch).rows_changed == 3
    before = store.read_candles("BTCUSDT", "1h")
    assert store.upsert(batch).rows_changed == 0
    after = store.read_candles("BTCUSDT", "1h")
    assert before.equals(after)  # not even ingested_at moved


def test_open_candles_are_never_stored(store):
    store.upsert(candles_from_rows(rows([0], closed=False) + rows([HOUR])))
    assert store.read_candles("BTCUSDT", "1h")["open_time"].to_list() == [HOUR]


def test_in_one_batch_closed_beats_open_rest_beats_websocket_and_later_beats_earlier(store):
    batch = (
        rows([0], source="websocket", value=1)
        + rows([0], source="rest", value=2)
        + rows([0], source="websocket", value=3)
        + rows([HOUR], source="rest", value=4)
        + rows([HOUR], source="rest", value=5)
        + rows([2 * HOUR], source="websocket", value=6)
        + rows([2 * HOUR], closed=False, source="rest", value=7)
    )
    store.upsert(candles_from_rows(batch))
    stored = store.read_candles("BTCUSDT", "1h")
    assert stored["close"].to_list() == [2, 5, 6]
    assert stored["source"].to_list() == ["rest", "rest", "websocket"]


def test_a_websocket_copy_never_overwrites_the_rest_record_but_rest_replaces_websocket(store):
    store.upsert(candles_from_rows(rows([0], source="rest", value=10) + rows([HOUR], source="websocket", value=20)))
    store.upsert(candles_from_rows(rows([0], source="websocket", value=11) + rows([HOUR], source="rest", value=21)))
    stored = store.read_candles("BTCUSDT", "1h")
    assert stored["close"].to_list() == [10, 21]


def test_holes_are_found_between_neighbours_and_confirmed_empty_ranges_are_skipped(store):
    store.upsert(candles_from_rows(rows([2 * HOUR, 3 * HOUR, 6 * HOUR])))
    assert store.find_holes("BTCUSDT", "1h", 0, 8 * HOUR) == [(0, 2 * HOUR), (4 * HOUR, 6 * HOUR), (7 * HOUR, 8 * HOUR)]
    store.record_gap("BTCUSDT", "1h", 4 * HOUR, 6 * HOUR, "confirmed_empty", "outage")
    assert store.find_holes("BTCUSDT", "1h", 0, 8 * HOUR) == [(0, 2 * HOUR), (7 * HOUR, 8 * HOUR)]
    assert store.gap_records("BTCUSDT", "1h") == [(4 * HOUR, 6 * HOUR, "confirmed_empty", "outage")]


def test_binance_off_grid_rows_are_not_holes(store):
    # After its February 2018 restart Binance published hourly candles at :28:14.789.
    shift = 28 * 60_000 + 14_789
    times = [0, HOUR + shift, 2 * HOUR + shift, 3 * HOUR + shift, 4 * HOUR]
    store.upsert(candles_from_rows(rows(times)))
    holes = store.find_holes("BTCUSDT", "1h", 0, 5 * HOUR)
    assert holes == [(HOUR, HOUR + shift)]  # only the real outage before the first shifted row


def test_a_second_process_gets_a_clear_lock_error(tmp_path):
    path = tmp_path / "live.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import duckdb, sys, time
            con = duckdb.connect({str(path)!r})
            print("ready", flush=True)
            sys.stdin.readline()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match=r"in use by another process \(PID \d+\)"):
            CandleStore(path)
    finally:
        holder.communicate("\n", timeout=30)


def test_a_pure_polars_batch_with_missing_optional_columns_is_accepted(store):
    frame = pl.DataFrame(rows([0])).drop("quote_volume", "trades")
    store.upsert(frame)
    stored = store.read_candles("BTCUSDT", "1h")
    assert stored["quote_volume"].to_list() == [None]
    assert duckdb.__version__  # the store runs on the installed DuckDB
