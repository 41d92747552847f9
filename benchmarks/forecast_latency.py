"""Closed candle → forecast on MQTT: p50/p99 latency of the running daemon, on the CPU.

For each case the exchange simulator (`kronosd simulate`, its own process) serves the bundled BTCUSDT 1h
candles on a clock running `--speed` times real time, the daemon runs against it, and an MQTT subscriber on the broker
(127.0.0.1:1883 by default) timestamps every forecast. Latency = the moment the forecast message arrives
minus the wall-clock moment the simulator's market clock passed the candle's close. Also printed: the
daemon's own share (stored candle noticed → forecast handed to MQTT).

    python benchmarks/forecast_latency.py [--forecasts 20] [--mqtt-port 1883]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
import numpy as np
import torch

from daemon.commands.market_common import BUNDLED_DATA_DIR
from daemon.config import KronosConfig
from daemon.service import Daemon
from kronos_model import Kronos, KronosTokenizer
from storage.intervals import parse_time

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "kronos-configs"
HOUR_MS = 3_600_000
START = "2025-10-01"


def kronos_small_dir(root: Path) -> Path:
    torch.manual_seed(0)
    KronosTokenizer(**json.loads((CONFIGS / "Kronos-Tokenizer-base.config.json").read_text())).save_pretrained(
        root / "tokenizer")
    Kronos(**json.loads((CONFIGS / "Kronos-small.config.json").read_text())).save_pretrained(root / "model")
    return root


async def measure(name: str, model: dict, forecast: dict, speed: float, count: int, mqtt_port: int) -> dict:
    # The exchange runs in its own process, as the real one would: it must not share our event loop.
    simulator = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon.cli", "simulate", "--data", str(BUNDLED_DATA_DIR / "BTCUSDT_1h.parquet"),
        "--start", START, "--speed", str(speed), stdout=asyncio.subprocess.PIPE)
    urls = json.loads(await simulator.stdout.readline())
    wall_start, start_ms = time.time(), parse_time(urls["market_time"])
    with tempfile.TemporaryDirectory() as state:
        config = KronosConfig.model_validate({
            "exchange": {"rest_url": urls["rest_url"], "ws_url": urls["ws_url"], "archive_url": urls["archive_url"]},
            "storage": {"state_dir": state, "snapshot_interval_s": 30},
            "markets": {"symbols": ["BTCUSDT"], "intervals": ["1h"], "history_days": 30},
            "model": {"device": "cpu", **model}, "forecast": forecast, "finetune": {"enabled": False},
            "mqtt": {"port": mqtt_port},
        })
        daemon = Daemon(config)
        latencies: list[float] = []
        async with aiomqtt.Client("127.0.0.1", port=mqtt_port) as client:
            await client.subscribe("kronos/forecast/BTCUSDT/1h", qos=1)
            task = asyncio.create_task(daemon.run())
            async for message in client.messages:
                if message.retain:
                    continue
                arrived = time.time()
                payload = json.loads(message.payload)
                origin = parse_time(payload["origin_time"])
                closed_wall = wall_start + (origin + HOUR_MS - start_ms) / 1000 / speed
                if closed_wall < wall_start + 2:  # forecasts of the initial backfill are not live latency
                    continue
                latencies.append((arrived - closed_wall) * 1000)
                if len(latencies) >= count:
                    break
            daemon.stop()
            await task
        own = daemon.forecaster.latencies_ms[-count:]
    simulator.terminate()
    await simulator.wait()
    return {"case": name, "n": len(latencies), "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)), "daemon_p50_ms": float(np.percentile(own, 50)),
            "daemon_p99_ms": float(np.percentile(own, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forecasts", type=int, default=20, help="live forecasts measured per case")
    parser.add_argument("--mqtt-port", type=int, default=1883)
    args = parser.parse_args()
    from daemon.logs import configure_service_logging

    configure_service_logging("warning", json_lines=True)
    with tempfile.TemporaryDirectory() as tmp:
        small = kronos_small_dir(Path(tmp))
        cases = [
            ("tiny (lookback 96, horizon 12, 16 paths)", {"predictor": "scratch", "tokenizer": "scratch"},
             {"lookback": 96, "horizon": 12, "sample_paths": 16}, 1800.0),
            ("Kronos-small shape (lookback 400, horizon 24, 8 paths)",
             {"predictor": str(small / "model"), "tokenizer": str(small / "tokenizer"), "threads": 2},
             {"lookback": 400, "horizon": 24, "sample_paths": 8}, 900.0),
            ("Kronos-small shape, bfloat16 (model.dtype)",
             {"predictor": str(small / "model"), "tokenizer": str(small / "tokenizer"), "threads": 2,
              "dtype": "bfloat16"},
             {"lookback": 400, "horizon": 24, "sample_paths": 8}, 900.0),
        ]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available, CPU")
        print(f"{'case':56} {'n':>3} {'p50 ms':>8} {'p99 ms':>8} {'daemon p50':>11} {'daemon p99':>11}")
        for name, model, forecast, speed in cases:
            r = asyncio.run(measure(name, model, forecast, speed, args.forecasts, args.mqtt_port))
            print(f"{r['case']:56} {r['n']:>3} {r['p50_ms']:8.0f} {r['p99_ms']:8.0f} {r['daemon_p50_ms']:11.0f} "
                  f"{r['daemon_p99_ms']:11.0f}")


if __name__ == "__main__":
    main()
