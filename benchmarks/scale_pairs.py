"""How the daemon's costs grow with the number of pairs: N synthetic 1m pairs closing together.

For each model and N, the exchange simulator (`kronosd simulate --pairs N`, its own process) serves N
synthetic 1m pairs (real BTCUSDT/ETHUSDT runs, re-timed and rescaled) on a clock running `60 / tick` times
real time, so all N pairs close a candle together every `tick` seconds. The daemon (`kronosd run`, its own
process, as users run it) backfills them, then forecasts every closed candle; an MQTT subscriber timestamps
every forecast. Reported per N, over the measured ticks:

- last pair: the moment the tick's *last* forecast arrives minus the wall-clock moment the simulator's
  market clock passed the candles' close (p50/p99 over ticks); first pair likewise;
- forecasts/s: N / (last arrival - first arrival + the first pair's latency), the rate a tick is cleared;
- CPU: the daemon's user+system seconds per wall second over the measured ticks (2.0 = both cores), its model
  worker process included, and the peak RSS of the two added up;
- event-loop lag p99 over the measured ticks (the /metrics histogram scraped at their start and end,
  interpolated inside its bucket) and over the whole run, start-up backfill included ("run lag"), and the
  snapshot publish time (mean) from the daemon's /metrics;
- the daemon's own latency metric (closed candle → forecast handed to MQTT) for comparison.

Afterwards, with `--store-sizes`, the snapshot's publish time and bytes written against the stored candles
(benchmarks/snapshot_scale.py, the same numbers docs/storage.md reports).

With `--batch-sizes 1,16` each case runs once per `forecast.batch_size` (1: pair by pair), side by side; with
`--workers process,thread` once per `forecast.worker` (generations in a child process, or in a daemon thread).

    python benchmarks/scale_pairs.py [--pairs 1,8,32,100] [--models tiny,small] [--ticks 6] [--batch-sizes 16]
        [--workers process] [--store-sizes 1000000,10000000,30000000] [--mqtt-port 1883]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.forecast_latency import kronos_small_dir  # noqa: E402
from storage.intervals import parse_time  # noqa: E402

MINUTE_MS = 60_000
TINY = ROOT / "daemon" / "assets" / "checkpoints" / "tiny-random"


@dataclass
class ModelCase:
    name: str
    model: dict
    forecast: dict
    tick_s: float  # wall seconds between closes: long enough for the largest N to finish a tick


def model_cases(small_dir: Path) -> dict[str, ModelCase]:
    return {
        "tiny": ModelCase("tiny (lookback 96, horizon 12, 16 paths)",
                          {"predictor": str(TINY / "model"), "tokenizer": str(TINY / "tokenizer")},
                          {"lookback": 96, "horizon": 12, "sample_paths": 16}, 12.0),
        "small": ModelCase("Kronos-small shape (lookback 400, horizon 24, 8 paths)",
                           {"predictor": str(small_dir / "model"), "tokenizer": str(small_dir / "tokenizer")},
                           {"lookback": 400, "horizon": 24, "sample_paths": 8}, 60.0),
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (the daemon and its model worker)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += process_tree(int(child))
    return found


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric_samples(text: str, name: str) -> dict[str, float]:
    """The samples of one metric family from Prometheus text: {"<sample name>{labels}": value}."""
    samples = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def histogram_quantile(samples: dict[str, float], name: str, q: float,
                       before: dict[str, float] | None = None) -> float:
    """The q quantile of a label-free Prometheus histogram, interpolated linearly inside its bucket (as
    Prometheus' histogram_quantile does); with `before`, of the observations made since that scrape."""
    def counts(scrape: dict[str, float]) -> dict[float, float]:
        return {float(key.split('le="')[1].split('"')[0]): value for key, value in scrape.items()
                if key.startswith(f"{name}_bucket")}

    now, then = counts(samples), counts(before or {})
    buckets = sorted((bound, count - then.get(bound, 0.0)) for bound, count in now.items())
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    rank, lower, below = q * buckets[-1][1], 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def scrape_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


async def measure(case: ModelCase, pairs: int, ticks: int, mqtt_port: int, batch_size: int,
                  worker: str = "process", warmup_ticks: int = 2) -> dict:
    speed = 60.0 / case.tick_s
    history = case.forecast["lookback"] + 200
    simulator = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "simulate", "--pairs", str(pairs), "--pairs-interval", "1m",
         "--pairs-history", str(history), "--pairs-future", str(ticks * 4 + 60), "--speed", str(speed),
         "--ws-update-s", "2"],  # Binance's own rate: every stream updates its open candle every 2 s
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    urls = json.loads(simulator.stdout.readline())
    wall_start, start_ms = time.time(), parse_time(urls["market_time"])
    symbols = sorted({line.split()[0] for line in urls["series"]})
    prefix = f"kronos-bench-{uuid.uuid4().hex[:8]}"
    http_port = free_port()
    arrivals: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory() as state:
        config = {
            "exchange": {"rest_url": urls["rest_url"], "ws_url": urls["ws_url"], "archive_url": urls["archive_url"]},
            "storage": {"state_dir": state, "snapshot_interval_s": 5},
            "markets": {"symbols": symbols, "intervals": ["1m"],
                        "history_days": history / 1440},
            "model": {"device": "cpu", "threads": 2, **case.model},
            "forecast": {**case.forecast, "score_every": 10 * pairs, "batch_size": batch_size, "worker": worker},
            "finetune": {"enabled": False},
            "mqtt": {"port": mqtt_port, "prefix": prefix},
            "http": {"port": http_port},
        }
        config_path = Path(state) / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = Path(state) / "daemon.log"
        with log_path.open("w") as log_file:
            daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(config_path),
                                       "--json-logs"], stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
        first_measured = last_measured = None
        metrics_start = ""
        cpu_start = cpu_end = 0.0
        try:
            async with aiomqtt.Client("127.0.0.1", port=mqtt_port) as client:
                await client.subscribe(f"{prefix}/forecast/+/1m", qos=1)
                deadline = time.time() + 600 + ticks * case.tick_s * 3
                measured_origins: set[int] = set()
                async for message in client.messages:
                    arrived = time.time()
                    if time.time() > deadline:
                        raise TimeoutError(f"{pairs} pairs: only {len(measured_origins)} of {ticks} ticks complete")
                    origin = parse_time(json.loads(message.payload)["origin_time"])
                    closed_wall = wall_start + (origin + MINUTE_MS - start_ms) / 1000 / speed
                    if closed_wall < wall_start + 1:  # forecasts of the backfill are not live latency
                        continue
                    arrivals.setdefault(origin, []).append(arrived)
                    live = sorted(o for o, got in arrivals.items() if len(got) == pairs)
                    measured = live[warmup_ticks:]  # the first live ticks overlap start-up work
                    if measured and first_measured is None:
                        first_measured, cpu_start = arrived, tree_cpu_seconds(daemon.pid)
                        metrics_start = await asyncio.to_thread(scrape_metrics, http_port)
                    measured_origins = set(measured)
                    if len(measured) >= ticks:
                        last_measured, cpu_end = arrived, tree_cpu_seconds(daemon.pid)
                        break
            metrics = scrape_metrics(http_port)
            rss = sum(peak_rss_mib(p) for p in process_tree(daemon.pid))
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
            simulator.terminate()
            simulator.wait(timeout=30)
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    stopped = next((line for line in lines if line.get("event") == "daemon_stopped"), {})
    origins = sorted(measured_origins)
    last_pair, first_pair, rates = [], [], []
    for origin in origins:
        closed_wall = wall_start + (origin + MINUTE_MS - start_ms) / 1000 / speed
        got = sorted(arrivals[origin])
        last_pair.append(got[-1] - closed_wall)
        first_pair.append(got[0] - closed_wall)
        rates.append(pairs / (got[-1] - closed_wall))
    lag = metric_samples(metrics, "kronosd_event_loop_lag_seconds")
    lag_before = metric_samples(metrics_start, "kronosd_event_loop_lag_seconds")
    snapshot = metric_samples(metrics, "kronosd_snapshot_publish_seconds")
    snapshot_count = snapshot.get("kronosd_snapshot_publish_seconds_count", 0)
    own = metric_samples(metrics, "kronosd_forecast_latency_seconds")
    own_sum = sum(v for k, v in own.items() if k.startswith("kronosd_forecast_latency_seconds_sum"))
    own_count = sum(v for k, v in own.items() if k.startswith("kronosd_forecast_latency_seconds_count"))
    return {
        "pairs": pairs, "batch": batch_size, "worker": worker, "ticks": len(origins),
        "last_p50_s": float(np.percentile(last_pair, 50)), "last_p99_s": float(np.percentile(last_pair, 99)),
        "first_p50_s": float(np.percentile(first_pair, 50)),
        "forecasts_per_s": float(np.median(rates)),
        "cpu_cores": (cpu_end - cpu_start) / max(last_measured - first_measured, 1e-9) if last_measured else np.nan,
        "rss_mib": rss,
        "loop_lag_p99_ms": histogram_quantile(lag, "kronosd_event_loop_lag_seconds", 0.99, lag_before) * 1000,
        "run_loop_lag_p99_ms": histogram_quantile(lag, "kronosd_event_loop_lag_seconds", 0.99) * 1000,
        "daemon_loop_lag_p99_ms": stopped.get("loop_lag_ms_p99"),
        "snapshot_mean_s": snapshot.get("kronosd_snapshot_publish_seconds_sum", 0) / snapshot_count
        if snapshot_count else float("nan"),
        "daemon_latency_mean_s": own_sum / own_count if own_count else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="1,8,32,100", help="comma-separated pair counts")
    parser.add_argument("--models", default="tiny,small", help="tiny and/or small")
    parser.add_argument("--ticks", type=int, default=6, help="measured ticks per case (after 2 warm-up ticks)")
    parser.add_argument("--small-pairs", default="1,8,32", help="pair counts for the Kronos-small shape")
    parser.add_argument("--batch-sizes", default="16", help="comma-separated forecast.batch_size values")
    parser.add_argument("--workers", default="process", help="comma-separated forecast.worker values")
    parser.add_argument("--store-sizes", default="", help="also run benchmarks/snapshot_scale.py at these sizes")
    parser.add_argument("--tick-s", action="append", default=[], metavar="MODEL=SECONDS",
                        help="wall seconds between closes for a model (default tiny=12, small=60); repeatable")
    parser.add_argument("--mqtt-port", type=int, default=1883)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = model_cases(kronos_small_dir(Path(tmp)))
        for item in args.tick_s:
            key, seconds = item.split("=")
            cases[key].tick_s = float(seconds)
        print(f"{os.cpu_count()} CPU cores; 1m pairs closing together; latencies from the candle's close")
        header = (f"{'model':8} {'pairs':>5} {'batch':>5} {'worker':>7} {'ticks':>5} {'last p50 s':>10} "
                  f"{'last p99 s':>10} {'first p50 s':>11} "
                  f"{'fcst/s':>7} {'CPU cores':>9} {'RSS MiB':>8} {'lag p99 ms':>10} {'run lag ms':>10} "
                  f"{'snapshot s':>10}")
        print(header)
        print("-" * len(header))
        for key in args.models.split(","):
            counts = args.small_pairs if key == "small" else args.pairs
            for pairs, batch, worker in ((int(n), int(b), w) for n in counts.split(",")
                                         for b in args.batch_sizes.split(",") for w in args.workers.split(",")):
                r = asyncio.run(measure(cases[key], pairs, args.ticks, args.mqtt_port, batch, worker))
                print(f"{key:8} {r['pairs']:>5} {r['batch']:>5} {r['worker']:>7} {r['ticks']:>5} "
                      f"{r['last_p50_s']:>10.2f} {r['last_p99_s']:>10.2f} "
                      f"{r['first_p50_s']:>11.2f} {r['forecasts_per_s']:>7.1f} {r['cpu_cores']:>9.2f} "
                      f"{r['rss_mib']:>8.0f} {r['loop_lag_p99_ms']:>10.1f} {r['run_loop_lag_p99_ms']:>10.1f} "
                      f"{r['snapshot_mean_s']:>10.3f}", flush=True)
    if args.store_sizes:
        script = ROOT / "benchmarks" / "snapshot_scale.py"
        if not script.exists():
            print("benchmarks/snapshot_scale.py is missing: no snapshot-vs-store numbers")
            return
        subprocess.run([sys.executable, str(script), "--sizes", args.store_sizes], check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
