"""Users query while the daemon writes: the writer publishes read-only snapshots; a reader in another
process holding one open never blocks ingestion and sees new data after reopening."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import duckdb
import polars as pl
from market_helpers import BUNDLED

from storage.writer import StoreWriter

READER_SCRIPT = textwrap.dedent("""
    import sys, duckdb
    path = sys.argv[1]
    con = duckdb.connect(path, read_only=True)
    count = lambda c: c.execute("SELECT count(*) FROM candles").fetchall()[0][0]
    print(count(con), flush=True)
    for command in sys.stdin:
        if command.strip() == "same":
            print(count(con), flush=True)           # the connection held all along
        elif command.strip() == "reopen":
            con.close()
            con = duckdb.connect(path, read_only=True)
            print(count(con), flush=True)
        else:
            break
""")


def btc_batches(size: int, count: int) -> list[pl.DataFrame]:
    frame = pl.read_parquet(BUNDLED / "BTCUSDT_1h.parquet").with_columns(
        symbol=pl.lit("BTCUSDT"), interval=pl.lit("1h"), is_closed=pl.lit(True), source=pl.lit("rest")
    )
    return [frame.slice(i * size, size) for i in range(count)]


def test_a_reader_holding_the_snapshot_never_blocks_ingestion_and_sees_new_data_after_reopening(tmp_path):
    live, snapshot = tmp_path / "kronos.live.duckdb", tmp_path / "kronos.duckdb"
    batches = btc_batches(500, 6)
    with StoreWriter(live, snapshot_path=snapshot, snapshot_interval_s=0) as writer:
        writer.submit(batches[0]).result()
        writer.request_snapshot().result()
        reader = subprocess.Popen(
            [sys.executable, "-c", READER_SCRIPT, str(snapshot)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert int(reader.stdout.readline()) == 500
            # The reader keeps its connection open while the writer ingests and republishes.
            for batch in batches[1:]:
                writer.submit(batch).result()
                assert writer.request_snapshot().result() == snapshot
            reader.stdin.write("same\n")
            reader.stdin.flush()
            assert int(reader.stdout.readline()) == 500  # a consistent (old) view, no error
            reader.stdin.write("reopen\n")
            reader.stdin.flush()
            assert int(reader.stdout.readline()) == 3000
        finally:
            reader.communicate("quit\n", timeout=30)
    assert reader.returncode == 0


def test_snapshots_are_rate_limited_and_always_published_on_close(tmp_path):
    live, snapshot = tmp_path / "kronos.live.duckdb", tmp_path / "kronos.duckdb"
    batches = btc_batches(100, 5)
    with StoreWriter(live, snapshot_path=snapshot, snapshot_interval_s=3600) as writer:
        for batch in batches:
            writer.submit(batch).result()
        writer.call(lambda store: None).result()  # everything before it, publishing included, is done
        published_while_running = writer.snapshots_published
    assert published_while_running == 1  # the first batch publishes; the rest wait for the interval
    con = duckdb.connect(str(snapshot), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM candles").fetchall()[0][0] == 500
        tables = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert {"candles", "gaps", "schema_version"} <= tables
    finally:
        con.close()
    assert not list(tmp_path.glob(".kronos.duckdb.publishing-*")), "no temp file left behind"
    assert not (tmp_path / "kronos.duckdb.wal").exists()


def test_the_snapshot_uses_the_v1_4_storage_format(tmp_path):
    live, snapshot = tmp_path / "kronos.live.duckdb", tmp_path / "kronos.duckdb"
    with StoreWriter(live, snapshot_path=snapshot, snapshot_interval_s=0) as writer:
        writer.submit(btc_batches(10, 1)[0]).result()
    con = duckdb.connect()
    try:
        con.execute(f"ATTACH '{snapshot}' AS snap (READ_ONLY)")
        tags = con.execute("SELECT tags FROM duckdb_databases() WHERE database_name = 'snap'").fetchall()[0][0]
    finally:
        con.close()
    # DuckDB 1.4 and later open v1.4 files (checked by hand with duckdb 1.4.5; see docs/storage.md).
    assert tags["storage_version"] == "v1.4.0+"


def test_a_held_snapshot_waits_for_the_release_and_is_published_then(tmp_path):
    """The forecaster holds snapshots while a tick's batches read and insert: a publish that comes due meanwhile
    waits, and the release publishes it at once (nothing else needs to arrive to wake the writer)."""
    live, snapshot = tmp_path / "kronos.live.duckdb", tmp_path / "kronos.duckdb"
    first, second = btc_batches(100, 2)
    with StoreWriter(live, snapshot_path=snapshot, snapshot_interval_s=0.2) as writer:
        writer.submit(first).result()
        writer.call(lambda store: None).result()
        assert writer.snapshots_published == 1
        writer.hold_snapshots()
        writer.submit(second).result()
        time.sleep(0.4)  # the next publish is due ...
        writer.call(lambda store: None).result()
        assert writer.snapshots_published == 1  # ... and held
        writer.release_snapshots()
        deadline = time.monotonic() + 10
        while writer.snapshots_published < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert writer.snapshots_published == 2
        con = duckdb.connect(str(snapshot), read_only=True)
        try:
            assert con.execute("SELECT count(*) FROM candles").fetchall()[0][0] == 200
        finally:
            con.close()
