"""`kronosd demo`: the whole service, offline, on real data, in a few minutes.

The exchange simulator serves the bundled real BTCUSDT 1h candles on 127.0.0.1 with an accelerated
clock (default: two market hours per second, from 2025-10-01); the daemon runs against it with a fresh
state directory (--state-dir, default demo-run/; its DuckDB snapshot is demo-run/kronos.duckdb), the small
Kronos bundled with kronosd (daemon/assets/checkpoints/pretrained-1h, pretrained on the bundled BTCUSDT and
ETHUSDT 1h history up to 2025-06; the demo's market time lies in its held-out period), or with
`--base-model scratch` a tiny model trained from nothing, or any hub id / checkpoint directory,
continual fine-tuning every few hundred candles, MQTT on 127.0.0.1:1883 when a broker answers, and the
dashboard on http://127.0.0.1:8765/ (`--http-port`; the URL is printed when it listens). It stops by itself
and prints, as its last stdout line, a JSON summary. Logs go to stderr. Afterwards
`kronosd dashboard --state-dir demo-run` shows the same page from what the demo left.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from pathlib import Path

from storage.intervals import parse_time

DEMO_START = "2025-10-01"
BUNDLED = "bundled"
SCRATCH = "scratch"
BUNDLED_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "checkpoints" / "pretrained-1h"

# Fine-tuning a tiny random model: both stages, fast learning rates. Fine-tuning a pretrained pair: keep its
# tokenizer (new codes would void what the predictor learned) and nudge the predictor gently.
FROM_SCRATCH = {"tokenizer_epochs": 1, "predictor_epochs": 2, "tokenizer_learning_rate": 0.001,
                "learning_rate": 0.002}
FROM_PRETRAINED = {"skip_tokenizer": True, "predictor_epochs": 2, "learning_rate": 0.0002}


def starting_pair(base_model: str, tokenizer: str | None) -> tuple[str, str]:
    """(predictor, tokenizer) for the daemon's model config from --base-model/--tokenizer."""
    if base_model == SCRATCH:
        if tokenizer:
            raise ValueError("--tokenizer goes with a --base-model to start from, not with 'scratch'")
        return SCRATCH, SCRATCH
    directory = BUNDLED_CHECKPOINT if base_model == BUNDLED else Path(base_model)
    if (directory / "model").is_dir() and (directory / "tokenizer").is_dir():
        if tokenizer:
            raise ValueError(f"{directory} holds its own tokenizer/; drop --tokenizer")
        return str(directory / "model"), str(directory / "tokenizer")
    if base_model == BUNDLED:
        raise FileNotFoundError(f"the bundled checkpoint is missing from {directory}; reinstall kronosd or pass "
                                "--base-model scratch")
    if not tokenizer:
        raise ValueError(f"which tokenizer goes with {base_model}? pass --tokenizer (hub id or directory)")
    return base_model, tokenizer


def demo_config(workdir: Path, urls: dict[str, str], base_model: str, tokenizer: str | None,
                mqtt_port: int, every_candles: int):
    from daemon.config import KronosConfig

    predictor, tokenizer = starting_pair(base_model, tokenizer)
    stages = FROM_SCRATCH if predictor == SCRATCH else FROM_PRETRAINED
    return KronosConfig.model_validate({
        "exchange": {"rest_url": urls["rest_url"], "ws_url": urls["ws_url"], "archive_url": urls["archive_url"],
                     "backoff_base_s": 0.2, "backoff_max_s": 2.0, "watchdog_s": 10.0},
        "storage": {"state_dir": str(workdir), "snapshot_interval_s": 5.0},
        "markets": {"symbols": ["BTCUSDT"], "intervals": ["1h"], "history_days": 90},
        "model": {"predictor": predictor, "tokenizer": tokenizer, "device": "cpu",
                  "max_context": 512},
        "forecast": {"lookback": 96, "horizon": 12, "sample_paths": 16},
        "finetune": {"every_candles": every_candles, "window_candles": 1800, "holdout_candles": 150,
                     "overrides": {**stages, "batch_size": 32, "max_train_windows": 768,
                                   "max_val_windows": 256, "patience": 2, "train_ratio": 0.85, "val_ratio": 0.15,
                                   "log_interval": 8}},
        "gate": {"origins": 24, "sample_paths": 8, "margin": 0.0},
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "prefix": "kronos"},
    })


def clean_workdir(workdir: Path) -> None:
    """A fresh state directory: remove what an earlier demo left (only the files the daemon writes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("kronos.duckdb", "kronos.live.duckdb", "kronos.live.duckdb.wal", "kronos.live.duckdb.journal",
                 "binance-ban.json"):
        (workdir / name).unlink(missing_ok=True)
    for name in ("models", "finetune"):
        shutil.rmtree(workdir / name, ignore_errors=True)


async def run_demo(args: argparse.Namespace) -> dict:
    from daemon.commands.market_common import BUNDLED_DATA_DIR
    from daemon.service import Daemon
    from daemon.simulator.data import CandleBook, SimClock
    from daemon.simulator.server import ExchangeSimulator

    book = CandleBook()
    book.add_file(BUNDLED_DATA_DIR / "BTCUSDT_1h.parquet")
    simulator = await ExchangeSimulator(book, SimClock(parse_time(args.start), args.speed)).start()
    try:
        workdir = Path(args.state_dir)
        clean_workdir(workdir)
        config = demo_config(workdir, simulator.urls(), args.base_model, args.tokenizer, args.mqtt_port,
                             args.finetune_every)
        if args.no_mqtt:
            config.mqtt.enabled = False
        config.http.port = args.http_port
        daemon = Daemon(config)
        task = asyncio.create_task(daemon.run())
        announce = asyncio.create_task(_announce(daemon))
        done, _ = await asyncio.wait([task], timeout=args.minutes * 60)
        if not done:
            daemon.stop()
        summary = await task
        announce.cancel()
        summary["database"] = str(config.storage.snapshot_path)
        return summary
    finally:
        await simulator.stop()


async def _announce(daemon) -> None:
    """Print the dashboard's URL once it listens (the daemon starts it after loading the model)."""
    while daemon.http is None:
        await asyncio.sleep(0.1)
    await daemon.http.listening.wait()
    print(f"dashboard: {daemon.http.url}", flush=True)


def run(args: argparse.Namespace) -> int:
    from daemon.logs import configure_service_logging

    starting_pair(args.base_model, args.tokenizer)  # a bad choice fails before anything starts
    configure_service_logging("info", stream=sys.stderr)
    summary = asyncio.run(run_demo(args))
    print(json.dumps(summary), flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the daemon offline against the exchange simulator on bundled real BTC data",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to run (wall time)")
    # --workdir: the name of this option before every command said --state-dir
    parser.add_argument("--state-dir", "--workdir", dest="state_dir", default="demo-run",
                        help="state directory (cleaned first)")
    parser.add_argument("--speed", type=float, default=7200.0, help="market seconds per real second")
    parser.add_argument("--start", default=DEMO_START, help="market time when the demo starts")
    parser.add_argument("--finetune-every", type=int, default=150, help="closed candles between fine-tunes")
    parser.add_argument("--base-model", default=BUNDLED,
                        help="the starting model: 'bundled' (default: the small Kronos pretrained on the bundled "
                        "history), 'scratch' (a tiny random model), a checkpoint dir with tokenizer/ and model/, "
                        "or a predictor hub id/dir with --tokenizer")
    parser.add_argument("--tokenizer", help="tokenizer for a --base-model predictor without its own")
    parser.add_argument("--mqtt-port", type=int, default=1883)
    parser.add_argument("--no-mqtt", action="store_true")
    parser.add_argument("--http-port", type=int, default=8765, help="the dashboard's port (0 picks a free one)")
    parser.set_defaults(handler=run)
