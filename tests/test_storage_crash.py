"""Crash safety: kill -9 during writes loses nothing committed; a damaged write-ahead log is moved
aside (or its loss detected through the journal), logged as an error, and re-fetched by backfill."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest
from market_helpers import HOUR, MARCH_2024, REPO, assert_store_matches_truth, running_simulator, truth

from daemon.market.backfill import backfill
from daemon.market.rest import BinanceRestClient, RestSettings
from storage.store import CandleStore
from storage.writer import StoreWriter

# Writes 24-candle batches of real BTCUSDT candles from March 2024 onwards; after each commit it
# prints the batch number. With `hold_wal`, DuckDB's automatic checkpoint is pushed out of reach so
# the batches live only in the write-ahead log when the process dies.
WRITER_SCRIPT = textwrap.dedent("""
    import sys, polars as pl
    sys.path.insert(0, {repo!r})
    from storage.store import CandleStore
    frame = pl.read_parquet({data!r}).filter(pl.col("open_time") >= {start})
    frame = frame.with_columns(symbol=pl.lit("BTCUSDT"), interval=pl.lit("1h"), is_closed=pl.lit(True),
                               source=pl.lit("rest"))
    store = CandleStore({db!r})
    if {hold_wal}:
        store.con.execute("SET wal_autocheckpoint = '10GB'")
    for batch in range({batches}):
        store.upsert(frame.slice(batch * 24, 24))
        print(batch, flush=True)
    print("done", flush=True)
    sys.stdin.readline()
""")


def run_writer(db: Path, *, batches: int, hold_wal: bool, kill_after: int) -> list[int]:
    """Start the writer, SIGKILL it after `kill_after` acknowledged commits; returns the acknowledged batches."""
    script = WRITER_SCRIPT.format(
        repo=str(REPO),
        data=str(REPO / "daemon/assets/data/BTCUSDT_1h.parquet"),
        start=MARCH_2024,
        db=str(db),
        hold_wal=hold_wal,
        batches=batches,
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    acknowledged = []
    try:
        for line in child.stdout:
            if line.strip() == "done":
                break
            acknowledged.append(int(line))
            if len(acknowledged) >= kill_after:
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return acknowledged


@pytest.mark.slow
def test_kill_9_during_writes_loses_no_committed_batch(tmp_path):
    db = tmp_path / "live.duckdb"
    acknowledged = run_writer(db, batches=400, hold_wal=False, kill_after=60)
    store = CandleStore(db)
    try:
        count = store.con.execute("SELECT count(*) FROM candles").fetchall()[0][0]
        # Every acknowledged batch is there; a batch in flight at the kill is all there or not at all.
        assert count >= len(acknowledged) * 24
        assert count % 24 == 0
        stored = store.read_candles("BTCUSDT", "1h")
        assert stored["open_time"].to_list() == [MARCH_2024 + i * HOUR for i in range(count)]
        assert store.recovery.lost_batches == []
    finally:
        store.close()


def test_a_truncated_wal_is_detected_logged_kept_and_refetched(tmp_path, capsys):
    db = tmp_path / "live.duckdb"
    acknowledged = run_writer(db, batches=10, hold_wal=True, kill_after=10)
    wal = Path(f"{db}.wal")
    assert wal.exists()
    os.truncate(wal, wal.stat().st_size // 2)  # what a full disk leaves behind

    writer = StoreWriter(db)
    writer.start()
    try:
        recovery = writer.recovery
        assert recovery.lost_batches, "the journal must reveal committed batches missing after replay"
        lost_start = min(w.start_ms for w in recovery.lost_windows)
        assert list(tmp_path.glob("live.duckdb.wal.truncated-*")), "the damaged log is kept for inspection"
        open_gaps = writer.call(lambda s: s.gap_records("BTCUSDT", "1h", "open")).result()
        assert open_gaps and open_gaps[0][0] == lost_start

        # The exchange is the source of truth: a backfill restores exactly what was acknowledged.
        end = MARCH_2024 + len(acknowledged) * 24 * HOUR

        async def refetch():
            async with (
                running_simulator(end + 30 * 60_000) as sim,
                BinanceRestClient(RestSettings(base_url=sim.rest_url)) as rest,
            ):
                return await backfill(writer, rest, "BTCUSDT", "1h", MARCH_2024, end, source="rest")

        report = asyncio.run(refetch())
        assert report.rows_changed > 0
        stored = writer.call(lambda s: s.read_candles("BTCUSDT", "1h")).result()
        assert_store_matches_truth(
            stored, truth("BTCUSDT", "1h", MARCH_2024, end + 1).filter(pl.col("open_time") < end)
        )
        assert writer.call(lambda s: s.gap_records("BTCUSDT", "1h", "open")).result() == []
    finally:
        writer.close()
    logged = capsys.readouterr()
    assert "wal_lost_committed_batches" in logged.out + logged.err


def test_a_corrupted_wal_is_detected_kept_aside_and_the_store_opens(tmp_path, capsys):
    # DuckDB 2.0.1 stops replaying at a checksum failure without raising; the journal reveals the
    # loss. (A replay that raises takes the quarantine path in CandleStore._open.)
    db = tmp_path / "live.duckdb"
    run_writer(db, batches=10, hold_wal=True, kill_after=10)
    wal = Path(f"{db}.wal")
    data = bytearray(wal.read_bytes())
    # Overwrite the middle of the log with garbage: a checksum failure on replay.
    middle = len(data) // 2
    data[middle : middle + 4096] = os.urandom(4096)
    wal.write_bytes(bytes(data))

    store = CandleStore(db)
    try:
        quarantined = list(tmp_path.glob("live.duckdb.wal.corrupt-*")) + list(
            tmp_path.glob("live.duckdb.wal.truncated-*")
        )
        assert quarantined, "the damaged log must be moved aside, never deleted"
        assert store.recovery.lost_batches
        assert json.loads(Path(f"{db}.journal").read_text().splitlines()[-1])["checkpointed_batch"] >= 0
    finally:
        store.close()
    logged = capsys.readouterr()
    assert "wal_" in logged.out + logged.err


def test_a_wal_that_makes_the_open_fail_is_quarantined_and_its_windows_refetched(tmp_path, capsys):
    db = tmp_path / "live.duckdb"
    run_writer(db, batches=10, hold_wal=True, kill_after=10)
    wal = Path(f"{db}.wal")
    data = bytearray(wal.read_bytes())
    data[8:40] = b"\xff" * 32  # damaged entry header: DuckDB refuses to replay ("data may be corrupt")
    wal.write_bytes(bytes(data))

    store = CandleStore(db)
    try:
        assert store.recovery.quarantined_wal is not None
        assert store.recovery.quarantined_wal.name.startswith("live.duckdb.wal.corrupt-")
        assert store.recovery.quarantined_wal.exists() and not wal.exists()
        assert store.recovery.lost_batches == list(range(1, 11))
        assert store.con.execute("SELECT count(*) FROM candles").fetchall()[0][0] == 0
        open_gaps = store.gap_records("BTCUSDT", "1h", "open")
        assert open_gaps[0][0] == MARCH_2024 and len(open_gaps) == 10
    finally:
        store.close()
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("live.duckdb.wal*")) == ["live.duckdb.wal.corrupt"]
    logged = capsys.readouterr()
    assert "wal_quarantined" in logged.out + logged.err
