"""The parted snapshot: a publish writes what changed (not the store), users see the same tables, columns,
types and rows as a whole copy, the swap is atomic, old readers keep reading, and kill -9 mid-publish leaves
the previous snapshot intact and the next start publishes correctly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest
from market_helpers import BUNDLED, REPO

from storage import views
from storage.forecasts import forecasts_with_outcomes, has_calibrated_columns, insert_model_event
from storage.schema import LATEST_VERSION
from storage.snapshot import SnapshotPublisher, copy_whole_database, open_read_only, parts_dir_for
from storage.snapshot_layout import FAN_IN, SEALED_ROWS, PartFile, plan_merges
from storage.store import CandleStore, read_candles, stored_pairs
from storage.writer import StoreWriter

HOUR_MS = 3_600_000


def btc(start: int = 0, count: int | None = None, symbol: str = "BTCUSDT") -> pl.DataFrame:
    frame = pl.read_parquet(BUNDLED / "BTCUSDT_1h.parquet").with_columns(
        symbol=pl.lit(symbol), interval=pl.lit("1h"), is_closed=pl.lit(True), source=pl.lit("rest"))
    return frame.slice(start, count) if count is not None else frame.slice(start)


def part_bytes(directory: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of every part file: what a publish touched."""
    return {p.relative_to(directory).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in directory.rglob("*.parquet")}


def add_forecasts(store: CandleStore, origins: list[int], issued_ms: int) -> None:
    """Forecast rows for the given origins (two steps each), stamped `issued_ms`."""
    for origin in origins:
        for step in (1, 2):
            store.con.execute(
                "INSERT INTO forecasts (symbol, interval, origin_time, model_version, step, target_time, issued_at, "
                "sample_paths, last_close, close_p10, close_p50, close_p90, close_mean, prob_up) VALUES "
                "('BTCUSDT', '1h', make_timestamptz(?::BIGINT * 1000), 'v1', ?, make_timestamptz(?::BIGINT * 1000), "
                "make_timestamptz(?::BIGINT * 1000), 8, 100.0, 90.0, 100.0 + ?, 110.0, 100.0, 0.5)",
                [origin, step, origin + step * HOUR_MS, issued_ms, step])


def test_a_publish_writes_rows_and_bytes_in_proportion_to_the_rows_changed(tmp_path):
    live, snapshot = tmp_path / "kronos.live.duckdb", tmp_path / "kronos.duckdb"
    parts = parts_dir_for(snapshot)
    store = CandleStore(live)
    try:
        store.upsert(btc(0, 20_000))
        publisher = SnapshotPublisher(snapshot, live)
        first = publisher.publish(store.con, store.catalog)
        assert first.rows_changed["candles"] == 20_000
        store_bytes = sum(size for size in (p.stat().st_size for p in parts.rglob("*.parquet")))
        written = {}
        start = 20_000
        for count in (10, 100, 1000):
            before = part_bytes(parts)
            store.upsert(btc(start, count))
            start += count
            report = publisher.publish(store.con, store.catalog)
            after = part_bytes(parts)
            # Every part file that was there is untouched (same inode, same mtime); only new files appear.
            assert all(after.get(name) == stamp for name, stamp in before.items())
            new = sorted(set(after) - set(before))
            assert new == sorted(report.parts_written)
            candle_parts = [name for name in new if name.startswith("candles/")]
            assert len(candle_parts) == 1
            assert report.rows_changed["candles"] == count
            assert report.rows_written == count + 1  # the candles and their ingest_batches row
            written[count] = (parts / candle_parts[0]).stat().st_size
        # Bytes follow the rows: 100x the rows is far more bytes, yet every publish is a sliver of the store.
        assert written[10] < written[100] < written[1000]
        assert written[1000] - written[100] > 5 * (written[100] - written[10]) > 0
        assert written[1000] < store_bytes / 10
        # Revising 5 old rows rewrites only the file that held them, and the next publish writes nothing.
        revised = btc(100, 5).with_columns(close=pl.col("close") * 1.01)
        store.upsert(revised)
        report = publisher.publish(store.con, store.catalog)
        assert report.rows_changed["candles"] == 5
        assert report.rows_written < 20_000
        assert publisher.publish(store.con, store.catalog).rows_written == 0
        live_rows = read_candles(store.con, "BTCUSDT", "1h")
    finally:
        store.close()
    con = open_read_only(snapshot)
    try:
        assert read_candles(con, "BTCUSDT", "1h").equals(live_rows)
    finally:
        con.close()


def build_full_store(path: Path) -> None:
    store = CandleStore(path)
    try:
        store.upsert(btc(0, 3000))
        store.upsert(btc(0, 500, symbol="ETHUSDT"))
        store.record_gap("BTCUSDT", "1h", 0, HOUR_MS, "confirmed_empty", "no candles on the exchange")
        origins = read_candles(store.con, "BTCUSDT", "1h")["open_time"].tail(20).to_list()
        add_forecasts(store, origins, int(time.time() * 1000))
        insert_model_event(store.con, "promoted", "v1", None, "run-1", {"reason": "better", "rows": 3})
        insert_model_event(store.con, "ledger_scores", "v1", None, None,
                           {"symbol": "BTCUSDT", "interval": "1h", "mae": 1.5, "last_origin": "2024-01-01T00:00:00Z"})
    finally:
        store.close()


def test_users_see_the_same_tables_columns_types_and_rows_as_a_whole_copy(tmp_path):
    live, snapshot, whole = tmp_path / "kronos.live.duckdb", tmp_path / "kronos.duckdb", tmp_path / "whole.duckdb"
    build_full_store(live)
    store = CandleStore(live)
    try:
        SnapshotPublisher(snapshot, live).publish(store.con, store.catalog)
        copy_whole_database(store.con, store.catalog, whole)
    finally:
        store.close()
    parted, copied = open_read_only(snapshot), open_read_only(whole)
    try:
        listing = ("SELECT table_name, column_name, data_type FROM information_schema.columns "
                   "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position")
        assert parted.execute(listing).fetchall() == copied.execute(listing).fetchall()
        tables = [row[0] for row in copied.execute("SHOW TABLES").fetchall()]
        assert set(tables) >= {"candles", "forecasts", "gaps", "ingest_batches", "model_events", "schema_version"}
        assert [row[0] for row in parted.execute("SHOW TABLES").fetchall()] == tables
        for table in tables:
            # Names and types; a view reports no NOT NULL or key (docs/storage.md).
            describe = f"DESCRIBE {table}"
            assert [r[:2] for r in parted.execute(describe).fetchall()] == \
                [r[:2] for r in copied.execute(describe).fetchall()]
            query = f"SELECT * FROM {table} ORDER BY ALL"
            assert parted.execute(query).fetchall() == copied.execute(query).fetchall(), table
            assert parted.execute(f"SELECT * FROM {table} LIMIT 0").description == \
                copied.execute(f"SELECT * FROM {table} LIMIT 0").description
        # What readers of the snapshot run: the dashboard's views, stats/export, the ledger, calibration.
        for con in (parted, copied):
            assert has_calibrated_columns(con)
        readers = [
            views.pairs_with_candles,
            lambda c: views.query_candles(c, "BTCUSDT", "1h", 50),
            lambda c: views.query_forecast(c, "BTCUSDT", "1h"),
            lambda c: views.query_track(c, "BTCUSDT", "1h", 1, 50),
            lambda c: views.query_ledger(c, "BTCUSDT", "1h", 10),
            lambda c: views.query_model_events(c, 10),
            lambda c: views.query_gaps(c, "BTCUSDT", "1h"),
            stored_pairs,
            lambda c: read_candles(c, "ETHUSDT", "1h").rows(),
            lambda c: forecasts_with_outcomes(c).rows(),
        ]
        for read in readers:
            assert read(parted) == read(copied)
        assert views.query_forecast(parted, "BTCUSDT", "1h") is not None
        assert views.query_model_events(parted, 10)
    finally:
        parted.close()
        copied.close()


READER = textwrap.dedent("""
    import sys, duckdb
    path = sys.argv[1]
    con = duckdb.connect(path, read_only=True)
    state = lambda c: c.execute("SELECT count(*), sum(close) FROM candles").fetchall()[0]
    print(*state(con), flush=True)
    for command in sys.stdin:
        if command.strip() == "same":
            print(*state(con), flush=True)
        elif command.strip() == "reopen":
            con.close()
            con = duckdb.connect(path, read_only=True)
            print(*state(con), flush=True)
        else:
            break
""")


def test_a_reader_holding_an_old_snapshot_keeps_reading_it_through_publishes_merges_and_rewrites(tmp_path):
    live, snapshot = tmp_path / "kronos.live.duckdb", tmp_path / "kronos.duckdb"
    with StoreWriter(live, snapshot_path=snapshot, snapshot_interval_s=0) as writer:
        writer.submit(btc(0, 2000)).result()
        writer.request_snapshot().result()
        reader = subprocess.Popen([sys.executable, "-c", READER, str(snapshot)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            held = reader.stdout.readline().split()
            assert int(held[0]) == 2000
            retired = set()
            # Enough small publishes to merge parts, and revisions that rewrite the file the reader reads.
            for batch in range(FAN_IN + 3):
                writer.submit(btc(2000 + batch * 10, 10)).result()
                writer.submit(btc(1990, 10).with_columns(close=pl.col("close") + batch + 1)).result()
                writer.request_snapshot().result()
                report = writer.last_publish
                retired |= set(report.parts_written)
            assert writer.last_publish is not None
            reader.stdin.write("same\n")
            reader.stdin.flush()
            assert reader.stdout.readline().split() == held  # the old snapshot, whole, while newer ones exist
            reader.stdin.write("reopen\n")
            reader.stdin.flush()
            assert int(reader.stdout.readline().split()[0]) == 2000 + (FAN_IN + 3) * 10
        finally:
            reader.communicate("quit\n", timeout=30)
    assert reader.returncode == 0
    # Merges happened, and the parts the old snapshot listed are still on disk (retention: one hour).
    con = open_read_only(snapshot)
    try:
        listed = {row[0] for row in con.execute("SELECT file FROM kronos_snapshot.part_files").fetchall()}
        kept = {row[0] for row in con.execute("SELECT file FROM kronos_snapshot.retired_files").fetchall()}
    finally:
        con.close()
    assert kept and all((parts_dir_for(snapshot) / name).exists() for name in kept | listed)
    assert len([name for name in listed if name.startswith("candles/")]) < FAN_IN


def test_retired_and_orphaned_parts_are_deleted_after_the_retention(tmp_path):
    live, snapshot = tmp_path / "kronos.live.duckdb", tmp_path / "kronos.duckdb"
    parts = parts_dir_for(snapshot)
    orphan = parts / "candles" / "00000099-deadbeef-000.parquet"  # what a publish killed before its rename leaves
    with StoreWriter(live, snapshot_path=snapshot, snapshot_interval_s=0, snapshot_retention_s=0) as writer:
        writer.submit(btc(0, 3000)).result()
        writer.request_snapshot().result()
        orphan.write_bytes(b"PAR1")
        for batch in range(4):
            writer.submit(btc(1990, 10).with_columns(close=pl.col("close") + batch + 1)).result()
            writer.request_snapshot().result()
    con = open_read_only(snapshot)
    try:
        listed = {row[0] for row in con.execute("SELECT file FROM kronos_snapshot.part_files").fetchall()}
        retired = con.execute("SELECT count(*) FROM kronos_snapshot.retired_files").fetchall()[0][0]
    finally:
        con.close()
    on_disk = {p.relative_to(parts).as_posix() for p in parts.rglob("*.parquet")}
    assert on_disk == listed and retired == 0
    assert not orphan.exists()


SWAP_READER = textwrap.dedent("""
    import sys, time, duckdb
    path, seconds = sys.argv[1], float(sys.argv[2])
    seen, end = set(), time.monotonic() + seconds
    while time.monotonic() < end:
        con = duckdb.connect(path, read_only=True)
        # Candles and their ingest batches are published together: a half-published state breaks the sum.
        candles, batches = con.execute(
            "SELECT (SELECT count(*) FROM candles), (SELECT sum(rows_changed) FROM ingest_batches)").fetchall()[0]
        con.close()
        if candles != batches:
            print("torn", candles, batches, flush=True)
            sys.exit(1)
        seen.add(candles)
    print(len(seen), flush=True)
""")


def test_the_swap_is_atomic_for_a_reader_opening_the_snapshot_in_a_loop(tmp_path):
    live, snapshot = tmp_path / "kronos.live.duckdb", tmp_path / "kronos.duckdb"
    with StoreWriter(live, snapshot_path=snapshot, snapshot_interval_s=0) as writer:
        writer.submit(btc(0, 1000)).result()
        writer.request_snapshot().result()
        reader = subprocess.Popen([sys.executable, "-c", SWAP_READER, str(snapshot), "6"], stdout=subprocess.PIPE,
                                  text=True)
        published = 0
        while reader.poll() is None and published < 200:
            writer.submit(btc(1000 + published * 50, 50)).result()
            writer.request_snapshot().result()
            published += 1
        output, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0, output
    assert int(output.split()[-1]) >= 2  # it saw several snapshots, every one whole


PUBLISHER = textwrap.dedent("""
    import sys, polars as pl
    sys.path.insert(0, {repo!r})
    from storage.writer import StoreWriter
    frame = pl.read_parquet({data!r}).with_columns(symbol=pl.lit("BTCUSDT"), interval=pl.lit("1h"),
                                                   is_closed=pl.lit(True), source=pl.lit("rest"))
    writer = StoreWriter({live!r}, snapshot_path={snapshot!r}, snapshot_interval_s=3600).start()
    batch = 0
    while True:
        writer.submit(frame.slice(({first} + batch) * 500 % 26000, 500)).result()
        print("publishing", flush=True)
        writer.request_snapshot().result()
        batch += 1
""")


def snapshot_state(snapshot: Path) -> tuple[int, int]:
    con = open_read_only(snapshot)
    try:
        return con.execute("SELECT (SELECT count(*) FROM candles), (SELECT count(*) FROM ingest_batches)").fetchall()[0]
    finally:
        con.close()


def test_kill_9_mid_publish_keeps_the_previous_snapshot_and_the_next_start_publishes_correctly(tmp_path):
    live, snapshot = tmp_path / "kronos.live.duckdb", tmp_path / "kronos.duckdb"
    for attempt, delay in enumerate((0.0, 0.02, 0.05, 0.1)):
        script = PUBLISHER.format(repo=str(REPO), data=str(BUNDLED / "BTCUSDT_1h.parquet"), live=str(live),
                                  snapshot=str(snapshot), first=attempt * 7)
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            started = 0
            for line in child.stdout:  # (its log lines come on stdout too)
                started += line.strip() == "publishing"
                if started == 3:  # let a couple of publishes through, then kill inside the next one
                    break
            assert started == 3
            time.sleep(delay)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        # The snapshot there is a whole one (whichever publish last completed): every part it lists is readable.
        candles, batches = snapshot_state(snapshot)
        assert candles > 0 and batches > 0
    leftovers = list(tmp_path.glob(".kronos.duckdb.publishing-*"))
    with StoreWriter(live, snapshot_path=snapshot, snapshot_interval_s=3600, snapshot_retention_s=0) as writer:
        writer.submit(btc(25_000, 10)).result()
        writer.request_snapshot().result()
        expected = writer.call(lambda s: s.con.execute(
            "SELECT (SELECT count(*) FROM candles), (SELECT count(*) FROM ingest_batches)").fetchall()[0]).result()
        live_rows = writer.call(lambda s: read_candles(s.con, "BTCUSDT", "1h")).result()
    assert snapshot_state(snapshot) == expected
    con = open_read_only(snapshot)
    try:
        assert read_candles(con, "BTCUSDT", "1h").equals(live_rows)
        listed = {row[0] for row in con.execute("SELECT file FROM kronos_snapshot.part_files").fetchall()}
    finally:
        con.close()
    # No leftovers: temp files of killed publishes are gone, and so are parts no snapshot lists.
    assert all(not path.exists() for path in leftovers)
    assert not list(tmp_path.glob(".kronos.duckdb.publishing-*"))
    assert {p.relative_to(parts_dir_for(snapshot)).as_posix()
            for p in parts_dir_for(snapshot).rglob("*.parquet")} == listed


def test_a_restart_continues_from_the_published_parts_and_another_store_rebuilds_them(tmp_path):
    live, snapshot = tmp_path / "kronos.live.duckdb", tmp_path / "kronos.duckdb"
    with StoreWriter(live, snapshot_path=snapshot, snapshot_interval_s=0) as writer:
        writer.submit(btc(0, 5000)).result()
    with StoreWriter(live, snapshot_path=snapshot, snapshot_interval_s=3600) as writer:
        writer.submit(btc(5000, 20)).result()
        writer.call(lambda store: None).result()  # the first change after a start publishes at once
        assert writer.snapshots_published == 1
        assert writer.last_publish.rebuilt == {}
        assert writer.last_publish.rows_changed["candles"] == 20
    other = tmp_path / "other.live.duckdb"
    with StoreWriter(other, snapshot_path=snapshot, snapshot_interval_s=3600) as writer:
        writer.submit(btc(0, 10)).result()
        writer.call(lambda store: None).result()
        assert writer.last_publish.rebuilt["candles"] == "no parts published before"
    assert snapshot_state(snapshot) == (10, 1)
    # Parts deleted by hand (a full disk cleaned up): the next publish rebuilds them instead of failing.
    for path in parts_dir_for(snapshot).rglob("*.parquet"):
        path.unlink()
    with StoreWriter(other, snapshot_path=snapshot, snapshot_interval_s=3600) as writer:
        writer.submit(btc(10, 5)).result()
        writer.call(lambda store: None).result()
        assert writer.last_publish.rebuilt["candles"] == "no parts published before"
    assert snapshot_state(snapshot) == (15, 2)


def test_rows_stamped_before_the_last_publish_are_still_published(tmp_path):
    """A forecast stamped long before it was stored slips past the time stamps; the row count catches it."""
    live, snapshot = tmp_path / "kronos.live.duckdb", tmp_path / "kronos.duckdb"
    store = CandleStore(live)
    try:
        store.upsert(btc(0, 100))
        origins = read_candles(store.con, "BTCUSDT", "1h")["open_time"].to_list()
        add_forecasts(store, origins[:10], int(time.time() * 1000))
        publisher = SnapshotPublisher(snapshot, live)
        publisher.publish(store.con, store.catalog)
        now_ms = int(time.time() * 1000)
        add_forecasts(store, origins[10:12], now_ms - 1_800_000)  # stamped half an hour before it was stored
        report = publisher.publish(store.con, store.catalog)
        assert report.rebuilt == {} and report.rows_changed["forecasts"] == 4  # found by looking further back
        add_forecasts(store, origins[12:14], now_ms - 3 * 86_400_000)  # stamped three days before
        report = publisher.publish(store.con, store.catalog)
        assert report.rebuilt == {"forecasts": "its parts hold 24 rows, the store 28"}
        # A new column (a migration) rebuilds that table's parts with it.
        store.con.execute("ALTER TABLE forecasts ADD COLUMN spread DOUBLE")
        report = publisher.publish(store.con, store.catalog)
        assert report.rebuilt == {"forecasts": "its columns changed"}
    finally:
        store.close()
    con = open_read_only(snapshot)
    try:
        assert con.execute("SELECT count(*) FROM forecasts").fetchall()[0][0] == 28
        assert "spread" in [row[0] for row in con.execute("DESCRIBE forecasts").fetchall()]
    finally:
        con.close()


def part(rows: int, index: int) -> PartFile:
    return PartFile("candles", f"candles/{index:08d}.parquet", rows, rows * 40, 0, 0, 0, 0)


def test_small_parts_merge_by_size_class_and_sealed_parts_never_merge():
    assert plan_merges([part(100, i) for i in range(FAN_IN - 1)]) == []
    tiny = [part(100, i) for i in range(FAN_IN)]
    assert plan_merges(tiny) == [tiny]
    sealed = [part(SEALED_ROWS, i) for i in range(3 * FAN_IN)]
    assert plan_merges(sealed) == []
    # Large unsealed parts merge once they add up to a sealed one, so no merge writes much more than that.
    big = [part(SEALED_ROWS // 2 + 1, i) for i in range(5)]
    merges = plan_merges(big)
    assert [len(group) for group in merges] == [2, 2]
    assert all(sum(p.rows for p in group) < 2 * SEALED_ROWS for group in merges)


DUCKDB_1_4_PYTHON = os.environ.get("KRONOSD_DUCKDB14_PYTHON") or str(REPO / ".venv-duckdb14" / "bin" / "python")


def duckdb_1_4_available() -> bool:
    try:
        version = subprocess.run([DUCKDB_1_4_PYTHON, "-c", "import duckdb; print(duckdb.__version__)"],
                                 capture_output=True, text=True, timeout=60)
    except OSError:
        return False
    return version.returncode == 0 and version.stdout.startswith("1.4.")


@pytest.mark.skipif(not duckdb_1_4_available(),
                    reason="no Python with duckdb 1.4 (python3 -m venv .venv-duckdb14 && "
                           ".venv-duckdb14/bin/pip install 'duckdb==1.4.*', or set KRONOSD_DUCKDB14_PYTHON)")
def test_duckdb_1_4_reads_the_parted_snapshot(tmp_path):
    live, snapshot = tmp_path / "kronos.live.duckdb", tmp_path / "kronos.duckdb"
    build_full_store(live)
    store = CandleStore(live)
    try:
        SnapshotPublisher(snapshot, live).publish(store.con, store.catalog)
    finally:
        store.close()
    script = textwrap.dedent("""
        import sys, duckdb
        con = duckdb.connect(sys.argv[1], read_only=True)
        for table in ("candles", "forecasts", "gaps", "ingest_batches", "model_events", "schema_version"):
            print(table, con.execute(f"SELECT count(*) FROM (SELECT * FROM {table})").fetchall()[0][0])
        print(duckdb.__version__)
    """)
    result = subprocess.run([DUCKDB_1_4_PYTHON, "-c", script, str(snapshot)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    counts = dict(line.split() for line in result.stdout.splitlines()[:-1])
    assert result.stdout.splitlines()[-1].startswith("1.4.")
    assert counts == {"candles": "3500", "forecasts": "40", "gaps": "1", "ingest_batches": "2",
                      "model_events": "2", "schema_version": str(LATEST_VERSION)}


def test_a_whole_copy_snapshot_of_an_older_kronosd_is_replaced_by_a_parted_one(tmp_path):
    live, snapshot = tmp_path / "kronos.live.duckdb", tmp_path / "kronos.duckdb"
    store = CandleStore(live)
    try:
        store.upsert(btc(0, 300))
        copy_whole_database(store.con, store.catalog, snapshot)  # what the previous version published
        store.upsert(btc(300, 10))
        report = SnapshotPublisher(snapshot, live).publish(store.con, store.catalog)
    finally:
        store.close()
    assert report.rebuilt["candles"] == "no parts published before"
    assert snapshot_state(snapshot) == (310, 2)
