"""Backfill speed: BTCUSDT 1h, 2017-08 → 2025-12 (73k real candles from shared/data), served by
`kronosd simulate` in its own process with 50 ms added to every reply, fetched once through REST
pages and once through the archive (monthly/daily zips, REST for the rest). Prints wall time,
requests, and the peak share of the weight budget for both, side by side, and checks that both
stores hold the same candles.

    python benchmarks/backfill_speed.py [--data PATH] [--latency-ms 50]

Goal (issue 3): under 30 s at no more than 50 % of the weight budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import structlog

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.market.archive import ArchiveClient  # noqa: E402
from daemon.market.backfill import backfill  # noqa: E402
from daemon.market.rest import BinanceRestClient, RestSettings  # noqa: E402
from storage.intervals import parse_time  # noqa: E402
from storage.writer import StoreWriter  # noqa: E402

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "BTCUSDT_1h.csv.gz"


def start_simulator(data: Path, latency_ms: float) -> tuple[subprocess.Popen, dict]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "simulate",
            "--data",
            str(data),
            "--start",
            "2026-01-01T00:30",
            "--speed",
            "0",
            "--latency-ms",
            str(latency_ms),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    return process, json.loads(process.stdout.readline())


def sim_stats(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/_sim/stats", timeout=10) as response:
        return json.loads(response.read())


async def one_run(urls: dict, source: str, db: Path) -> dict:
    before = sim_stats(urls["rest_url"])
    started = time.perf_counter()
    with StoreWriter(db, snapshot_path=db.with_name(f"{source}.published.duckdb")) as writer:
        async with (
            BinanceRestClient(RestSettings(base_url=urls["rest_url"])) as rest,
            ArchiveClient(urls["archive_url"], concurrency=8) as archive,
        ):
            report = await backfill(
                writer,
                rest,
                "BTCUSDT",
                "1h",
                parse_time("2017-08-01"),
                parse_time("2026-01-01"),
                archive=archive if source == "archive" else None,
                source=source,
            )
        rows = writer.call(lambda s: s.con.execute("SELECT count(*) FROM candles").fetchall()[0][0]).result()
    elapsed = time.perf_counter() - started  # includes publishing the snapshot at close
    after = sim_stats(urls["rest_url"])
    requests = {k: after["requests"].get(k, 0) - before["requests"].get(k, 0) for k in after["requests"]}
    return {
        "wall_s": elapsed,
        "rows": rows,
        "klines_requests": requests.get("/api/v3/klines", 0),
        "other_api_requests": sum(v for k, v in requests.items() if k.startswith("/api/") and k != "/api/v3/klines"),
        "archive_requests": requests.get("archive", 0),
        "archive_files": report.archive_files,
        "peak_weight": rest.stats.peak_used_weight,
        "weight_limit": rest.stats.weight_limit,
        "peak_share_of_limit": rest.stats.peak_share,
        "peak_share_of_budget": rest.stats.peak_share / 0.5,
        "rate_limited": rest.stats.rate_limited,
        "confirmed_empty_ranges": len(report.confirmed_empty),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"no data file at {args.data}; pass --data")
    process, urls = start_simulator(args.data, args.latency_ms)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = {
                source: asyncio.run(one_run(urls, source, Path(tmp) / f"{source}.duckdb"))
                for source in ("rest", "archive")
            }
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    rows = [
        ("wall time (s)", "{:.2f}", "wall_s"),
        ("candles stored", "{}", "rows"),
        ("klines requests", "{}", "klines_requests"),
        ("other API requests", "{}", "other_api_requests"),
        ("archive requests (zip + CHECKSUM)", "{}", "archive_requests"),
        ("peak used weight / limit", "{}", "peak_weight"),
        ("peak share of the weight limit", "{:.1%}", "peak_share_of_limit"),
        ("peak share of our 50 % budget", "{:.1%}", "peak_share_of_budget"),
        ("429 answers", "{}", "rate_limited"),
        ("ranges confirmed empty (outages)", "{}", "confirmed_empty_ranges"),
    ]
    print(f"BTCUSDT 1h 2017-08 → 2025-12 from {args.data.name}, {args.latency_ms:g} ms per reply")
    print(f"{'':36} {'REST':>12} {'archive':>12}")
    for label, fmt, key in rows:
        values = [fmt.format(results[s][key]) for s in ("rest", "archive")]
        if key == "peak_weight":
            values = [f"{results[s]['peak_weight']}/{results[s]['weight_limit']}" for s in ("rest", "archive")]
        print(f"{label:36} {values[0]:>12} {values[1]:>12}")
    same = results["rest"]["rows"] == results["archive"]["rows"]
    print(f"both stores hold the same number of candles: {same}; goal < 30 s at <= 50 % of the budget")


if __name__ == "__main__":
    main()
