"""Snapshot publish cost at scale: the whole-database copy (how kronosd published before) next to the
parted snapshot (storage/snapshot.py), for stores of 1 M, 10 M and 30 M candles with 100 changed rows.

    python benchmarks/snapshot_scale.py [--sizes 1M,10M,30M] [--pairs 50] [--changed 100] [--dir DIR]

The stores hold synthetic candles derived from the bundled real ones (daemon/assets/data, BTCUSDT and
ETHUSDT 1h): pair k is a run of real candles starting at its own place in one of the two series (wrapping
around at its end), re-timed onto a 1m grid that ends now and moved to its own price level (prices x s_k,
base volumes / s_k). Nothing is invented; the copies are re-timed and rescaled. Each store is built through the
real schema (CandleStore: primary key and all), then the 100 changed rows arrive through CandleStore.upsert:
half are the next 1m candle of a pair, half revise a pair's newest stored candle (a REST record replacing
a websocket copy), which is what a minute of a 50-pair daemon looks like.

Per size it prints the old publish (COPY FROM DATABASE into a new file) and the new one after the change:
seconds, bytes written, and their ratio, plus the one-off cost of building the parts the first time and
the time of two reader queries on each snapshot. Publishes run with the daemon's DuckDB limits (1 GB, 2
threads). Goal (issue 13): <= 1 s and <= 5 % of the store's size written per publish at 30 M candles.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import structlog

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from storage.snapshot import SnapshotPublisher, copy_whole_database, open_read_only, parts_dir_for  # noqa: E402
from storage.store import CandleStore  # noqa: E402

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

DATA = REPO / "daemon" / "assets" / "data"
MINUTE_MS = 60_000
# Real candles of one series each, numbered j = 0.. in time order.
SOURCE_SQL = """
CREATE OR REPLACE TEMP TABLE bench_source AS
SELECT series, (row_number() OVER (PARTITION BY series ORDER BY open_time) - 1)::BIGINT AS j,
       open, high, low, close, volume, quote_volume, taker_buy_base, taker_buy_quote, trades
FROM (SELECT 0 AS series, * FROM read_parquet('{btc}') UNION ALL SELECT 1 AS series, * FROM read_parquet('{eth}'))
"""
INSERT_SQL = f"""
INSERT INTO candles
SELECT printf('SYN%03dUSDT', k), '1m', make_timestamptz((?::BIGINT - (?::BIGINT - slot) * {MINUTE_MS}) * 1000),
       make_timestamptz((?::BIGINT - (?::BIGINT - slot) * {MINUTE_MS} + {MINUTE_MS} - 1) * 1000),
       s.open * scale, s.high * scale, s.low * scale, s.close * scale, s.volume / scale, s.quote_volume,
       s.taker_buy_base / scale, s.taker_buy_quote, s.trades, 'rest', now()
FROM (SELECT k, slot, k % 2 AS series, (k * 7919 + slot) % (CASE k % 2 WHEN 0 THEN ? ELSE ? END) AS j,
             1 + k * 0.37 AS scale
      FROM range(?, ?) pairs(k), range(?) slots(slot)) AS wanted
JOIN bench_source AS s USING (series, j)
ORDER BY k, slot
"""


def parse_size(text: str) -> int:
    text = text.strip().upper()
    factor = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * factor)


def build_store(path: Path, candles: int, pairs: int) -> tuple[CandleStore, int]:
    """A store of `candles` synthetic 1m candles over `pairs` pairs ending at the current minute."""
    store = CandleStore(path, memory_limit="4GB", threads=2)
    per_pair = candles // pairs
    end_ms = int(time.time() * 1000) // MINUTE_MS * MINUTE_MS - MINUTE_MS  # the newest slot's open time + 1 min
    store.con.execute(SOURCE_SQL.format(btc=DATA / "BTCUSDT_1h.parquet", eth=DATA / "ETHUSDT_1h.parquet"))
    lengths = dict(store.con.execute("SELECT series, count(*) FROM bench_source GROUP BY series").fetchall())
    step = max(1, 2_000_000 // per_pair)  # pairs per INSERT, so each statement stays near 2 M rows
    for first in range(0, pairs, step):
        last = min(pairs, first + step)
        store.con.execute(INSERT_SQL, [end_ms, per_pair, end_ms, per_pair, lengths[0], lengths[1], first, last,
                                       per_pair])
    store.con.execute("DROP TABLE bench_source")
    store.checkpoint()
    # Publishes run under the daemon's limits.
    store.con.execute("SET memory_limit = '1GB'")
    return store, end_ms


def changed_rows(store: CandleStore, pairs: int, changed: int) -> pl.DataFrame:
    """`changed` rows: for changed/2 pairs, the next candle and a revision of the newest stored one."""
    count = changed // 2
    if pairs < count or changed % 2:
        raise SystemExit(f"--changed must be even and at most twice --pairs ({pairs})")
    newest = store.con.sql(
        "SELECT symbol, interval, epoch_ms(open_time) AS open_time, epoch_ms(close_time) AS close_time, open, high, "
        "low, close, volume, quote_volume, taker_buy_base, taker_buy_quote, trades FROM candles "
        f"QUALIFY row_number() OVER (PARTITION BY symbol ORDER BY open_time DESC) = 1 ORDER BY symbol LIMIT {count}"
    ).pl()
    following = newest.with_columns(open_time=pl.col("open_time") + MINUTE_MS,
                                    close_time=pl.col("close_time") + MINUTE_MS, open=pl.col("close"))
    revised = newest.with_columns(close=pl.col("close") * 1.0001,
                                  high=pl.max_horizontal("high", pl.col("close") * 1.0001))
    return pl.concat([following, revised]).with_columns(is_closed=pl.lit(True), source=pl.lit("rest"))


def timed_queries(path: Path) -> tuple[float, float]:
    """Seconds for a chart query (last 24 candles of a pair) and for a scan (rows per pair)."""
    con = open_read_only(path)
    try:
        began = time.perf_counter()
        con.execute("SELECT open_time, close FROM candles WHERE symbol = 'SYN007USDT' AND interval = '1m' "
                    "ORDER BY open_time DESC LIMIT 24").fetchall()
        chart = time.perf_counter() - began
        began = time.perf_counter()
        con.execute("SELECT symbol, count(*), max(open_time) FROM candles GROUP BY symbol").fetchall()
        return chart, time.perf_counter() - began
    finally:
        con.close()


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def run_size(root: Path, candles: int, pairs: int, changed: int, old_memory: str) -> dict:
    folder = root / f"store-{candles}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    live, old_copy, snapshot = folder / "kronos.live.duckdb", folder / "whole.duckdb", folder / "kronos.duckdb"
    began = time.perf_counter()
    store, _ = build_store(live, candles, pairs)
    stored = store.count_candles()
    print(f"  {stored:,} candles stored in {time.perf_counter() - began:.0f} s; live file "
          f"{live.stat().st_size / 2**20:.0f} MiB", flush=True)
    try:
        publisher = SnapshotPublisher(snapshot, live)
        first = publisher.publish(store.con, store.catalog)
        store.upsert(changed_rows(store, pairs, changed))
        # The whole copy rebuilds the primary key index in the new file: under the daemon's 1 GB it fails
        # ("could not allocate block") from about 10 M candles, so it gets the memory it needs here.
        store.con.execute(f"SET memory_limit = '{old_memory}'")
        began = time.perf_counter()
        copy_whole_database(store.con, store.catalog, old_copy)
        old_seconds = time.perf_counter() - began
        store.con.execute("SET memory_limit = '1GB'")
        old_bytes = old_copy.stat().st_size
        new = publisher.publish(store.con, store.catalog)
        parted_bytes = directory_bytes(parts_dir_for(snapshot)) + snapshot.stat().st_size
        fingerprint = ("SELECT count(*), bit_xor(hash(symbol, interval, open_time, close, high, ingested_at)) "
                       "FROM candles")
        same = store.con.execute(fingerprint).fetchall() == open_read_only(snapshot).execute(fingerprint).fetchall()
    finally:
        store.close()
    old_chart, old_scan = timed_queries(old_copy)
    new_chart, new_scan = timed_queries(snapshot)
    result = {"candles": stored, "old_s": old_seconds, "old_bytes": old_bytes, "new_s": new.seconds,
              "new_bytes": new.bytes_written, "new_parts": len(new.parts_written), "new_rows": new.rows_written,
              "changed": new.rows_changed.get("candles", 0), "first_s": first.seconds,
              "first_bytes": first.bytes_written, "parted_bytes": parted_bytes, "same": same,
              "old_chart": old_chart, "new_chart": new_chart, "old_scan": old_scan, "new_scan": new_scan}
    shutil.rmtree(folder, ignore_errors=True)
    return result


def mib(value: int) -> str:
    return f"{value / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,10M,30M", help="store sizes in candles, e.g. 1M,10M,30M")
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--changed", type=int, default=100, help="rows changed between the two publishes")
    parser.add_argument("--old-memory", default="6GB", help="DuckDB memory limit for the whole-copy publish")
    parser.add_argument("--dir", type=Path, help="where to build the stores (default: a temp directory)")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="snapshot-scale-"))
    results = []
    for size in [parse_size(text) for text in args.sizes.split(",")]:
        print(f"building {size:,} candles over {args.pairs} pairs in {root} …", flush=True)
        results.append(run_size(root, size, args.pairs, args.changed, args.old_memory))
    print()
    print(f"{'candles':>12} | {'old publish':>22} | {'new publish':>22} | {'new/old time':>12} | "
          f"{'new/old bytes':>13} | {'new bytes / store':>17} | {'parts (rows) written':>20} | {'first build':>20}")
    for r in results:
        print(f"{r['candles']:>12,} | {r['old_s']:7.2f} s {mib(r['old_bytes']):>12} | "
              f"{r['new_s']:7.2f} s {mib(r['new_bytes']):>12} | {r['new_s'] / r['old_s']:>12.3f} | "
              f"{r['new_bytes'] / r['old_bytes']:>13.4f} | {r['new_bytes'] / r['parted_bytes']:>16.2%} | "
              f"{r['new_parts']:>9} ({r['new_rows']:>7,}) | {r['first_s']:6.1f} s {mib(r['first_bytes']):>11}")
    print()
    print(f"{'candles':>12} | {'chart query old / new':>24} | {'scan query old / new':>24} | same data")
    for r in results:
        print(f"{r['candles']:>12,} | {r['old_chart'] * 1000:9.1f} / {r['new_chart'] * 1000:6.1f} ms | "
              f"{r['old_scan'] * 1000:9.1f} / {r['new_scan'] * 1000:6.1f} ms | {r['same']}")
    print(f"\n{args.changed} changed rows per publish ({args.changed // 2} new candles, {args.changed // 2} "
          "revised); 'new bytes / store' divides by the parted snapshot's size.")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
