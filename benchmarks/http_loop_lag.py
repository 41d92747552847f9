"""Does the HTTP server cost the daemon's event loop anything with several dashboards open?

Two runs of `kronosd run` (a subprocess) against the exchange simulator (its own process, BTCUSDT and
ETHUSDT at `--speed`, a closed candle per pair every 3600/speed s, each forecast): first with the server on and
no client, then with `--browsers` simulated dashboards, each holding the live event stream (/api/stream) and
loading everything a page loads (pairs, status, 500 candles, forecast, 500 track points, ledger, ingest, models
and fine-tune runs for every pair) every `--reload-s` seconds. The clients run in this process, not the
daemon's. The daemon's own loop-lag histogram (kronosd_event_loop_lag_seconds: how late a 50 ms ticker wakes)
is scraped at the start and the end of a steady window after the backfill, and the difference gives the mean
lag and the share of samples above 5 and 25 ms over exactly that window.

    python benchmarks/http_loop_lag.py [--browsers 5] [--seconds 40] [--speed 1800]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "daemon" / "assets" / "data"
PAIRS = ("BTCUSDT", "ETHUSDT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lag_histogram(text: str) -> dict[str, float]:
    """{"count", "sum", "le=<bound>": cumulative count} of the loop-lag histogram."""
    family = next(f for f in text_string_to_metric_families(text) if f.name == "kronosd_event_loop_lag_seconds")
    values = {}
    for sample in family.samples:
        if sample.name.endswith("_count"):
            values["count"] = sample.value
        elif sample.name.endswith("_sum"):
            values["sum"] = sample.value
        elif sample.name.endswith("_bucket"):
            values[f"le={sample.labels['le']}"] = sample.value
    return values


async def browser(session: aiohttp.ClientSession, base: str, stop: asyncio.Event, reload_s: float,
                  counts: dict[str, int]) -> None:
    async def follow() -> None:
        async with session.get(f"{base}/api/stream") as response:
            async for line in response.content:
                if line.startswith(b"event: "):
                    counts["events"] += 1

    async def load() -> None:
        paths = ["/api/pairs", "/api/status", "/api/models", "/api/finetune"]
        for symbol in PAIRS:
            q = f"symbol={symbol}&interval=1h"
            paths += [f"/api/candles?{q}&limit=500", f"/api/forecast?{q}", f"/api/track?{q}&step=1&limit=500",
                      f"/api/ledger?{q}", f"/api/ingest?{q}"]
        for path in paths:
            async with session.get(f"{base}{path}") as response:
                await response.read()
                counts["requests"] += 1
                counts["errors"] += response.status != 200

    stream = asyncio.create_task(follow())
    try:
        while not stop.is_set():
            await load()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=reload_s)
    finally:
        stream.cancel()


async def one_run(urls: dict, browsers: int, seconds: float, reload_s: float, warmup_s: float) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump({
            "exchange": {"rest_url": urls["rest_url"], "ws_url": urls["ws_url"], "archive_url": urls["archive_url"]},
            "storage": {"state_dir": str(Path(tmp) / "state"), "snapshot_interval_s": 10},
            "markets": {"symbols": list(PAIRS), "intervals": ["1h"], "history_days": 30},
            "model": {"predictor": "scratch", "tokenizer": "scratch", "device": "cpu"},
            "forecast": {"lookback": 96, "horizon": 12, "sample_paths": 8, "score_every": 12},
            "finetune": {"enabled": False}, "mqtt": {"enabled": False}, "http": {"port": port},
        }))
        daemon = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon.cli", "run", "--config", str(config), "--json-logs",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=ROOT)
        counts = {"events": 0, "requests": 0, "errors": 0}
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(600):
                    try:
                        async with session.get(f"{base}/readyz") as response:
                            if response.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
                await asyncio.sleep(warmup_s)  # past the backfill and the first forecasts
                stop = asyncio.Event()
                clients = [asyncio.create_task(browser(session, base, stop, reload_s, counts))
                           for _ in range(browsers)]
                async with session.get(f"{base}/metrics") as response:
                    before = lag_histogram(await response.text())
                await asyncio.sleep(seconds)
                async with session.get(f"{base}/metrics") as response:
                    after = lag_histogram(await response.text())
                stop.set()
                await asyncio.gather(*clients, return_exceptions=True)
        finally:
            daemon.terminate()
            await daemon.wait()
    samples = after["count"] - before["count"]

    def above(bound: str) -> float:
        return 1 - (after[f"le={bound}"] - before[f"le={bound}"]) / samples

    return {"browsers": browsers, "samples": int(samples),
            "mean_lag_ms": round((after["sum"] - before["sum"]) / samples * 1000, 3),
            "share_above_5ms": round(above("0.005"), 4), "share_above_25ms": round(above("0.025"), 4),
            **counts}


async def main(args: argparse.Namespace) -> None:
    data = [arg for symbol in PAIRS for arg in ("--data", str(DATA / f"{symbol}_1h.parquet"))]
    simulator = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon.cli", "simulate", *data, "--start", "2025-09-01", "--speed", str(args.speed),
        stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    urls = json.loads(await simulator.stdout.readline())
    try:
        results = []
        for browsers in (0, args.browsers):
            result = await one_run(urls, browsers, args.seconds, args.reload_s, args.warmup_s)
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        simulator.terminate()
        await simulator.wait()
    quiet, busy = results
    print(json.dumps({"mean_lag_ratio": round(busy["mean_lag_ms"] / quiet["mean_lag_ms"], 3)
                      if quiet["mean_lag_ms"] else None,
                      "share_above_5ms": [quiet["share_above_5ms"], busy["share_above_5ms"]],
                      "seconds_each": args.seconds, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--browsers", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=40.0, help="the measured window of each run")
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--reload-s", type=float, default=5.0, help="each browser reloads all its data this often")
    parser.add_argument("--speed", type=float, default=1800.0, help="market seconds per real second")
    asyncio.run(main(parser.parse_args()))
