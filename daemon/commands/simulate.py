"""`kronosd simulate`: a Binance-compatible exchange on 127.0.0.1, replaying real candles.

Prints one JSON line with the URLs (`rest_url`, `ws_url`, `archive_url`) once it listens, then serves
until SIGINT/SIGTERM. Point `--rest-url/--ws-url/--archive-url` (or config `exchange.*`) at it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

from daemon.commands.market_common import BUNDLED_DATA_DIR, configure_logging
from daemon.simulator.data import CandleBook, SimClock
from daemon.simulator.hostile import HostileProfile
from daemon.simulator.server import ExchangeSimulator
from storage.intervals import format_ms, parse_time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="run a Binance-compatible exchange simulator on 127.0.0.1",
        description="Serves REST (/api/v3/ping, time, exchangeInfo, klines with weight headers), websocket kline "
        "streams and a data.binance.vision archive tree from real candles, on a clock that can run faster than "
        "real time, with optional injected faults. Default data: the bundled BTCUSDT and ETHUSDT 1h candles.",
    )
    parser.add_argument("--data", type=Path, action="append", help="candle file (CSV/CSV.gz/zip/Parquet); repeatable")
    parser.add_argument("--store", type=Path, help="serve every series of this DuckDB store")
    parser.add_argument("--start", help="market time at startup (default: 30 days before the data ends)")
    parser.add_argument("--speed", type=float, default=1.0, help="market seconds per real second (3600: 1h per s)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--rest-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--ws-port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every REST/archive reply")
    parser.add_argument("--weight-limit", type=int, default=6000, help="request weight per minute per IP")
    parser.add_argument("--ws-lifetime-s", type=float, help="close websocket connections after this long (24 h cut)")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="TARGET:KIND[:COUNT[:PARAM]]",
        help="queue a fault, e.g. rest:429:2:1, rest:5xx, ws:drop, ws:stall:1:30, ws:mute, archive:corrupt; more "
        "can be added while running: POST /_sim/fault?spec=…",
    )
    parser.add_argument(
        "--profile", choices=["clean", "hostile"], default="clean",
        help="hostile: mix garbage frames (not JSON, binary, bad fields, NaN, off-grid, unsubscribed, huge), "
        "duplicate, re-sent and reordered closes, clock jumps and bad REST bodies into the live stream; the "
        "truth served stays the same (GET /_sim/stats lists what was injected)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the hostile profile")
    parser.add_argument("--hostile-rate", type=float, default=0.5,
                        help="share of closing events followed by garbage (REST: half of it) in the hostile profile")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(handler=run)


def build_book(args: argparse.Namespace) -> CandleBook:
    book = CandleBook()
    paths = args.data or ([] if args.store else sorted(BUNDLED_DATA_DIR.glob("*.parquet")))
    for path in paths:
        book.add_file(path)
    if args.store:
        if not args.store.exists():
            raise FileNotFoundError(f"no such store: {args.store}")
        book.add_store(args.store)
    if not book.series:
        raise ValueError("no candles to serve; pass --data FILE or --store DB")
    return book


def run(args: argparse.Namespace) -> int:
    configure_logging(args.verbose)
    if args.speed < 0:
        raise ValueError("--speed must be >= 0")
    if not 0 <= args.hostile_rate <= 1:
        raise ValueError("--hostile-rate must be between 0 and 1")
    book = build_book(args)
    last_candle = max(int(series.open_times[-1]) for series in book)
    start = parse_time(args.start) if args.start else last_candle - 30 * 86_400_000
    simulator = ExchangeSimulator(
        book,
        SimClock(start, args.speed),
        host=args.host,
        weight_limit=args.weight_limit,
        latency_s=args.latency_ms / 1000,
        ws_lifetime_s=args.ws_lifetime_s,
        hostile=HostileProfile(seed=args.seed, ws_rate=args.hostile_rate, rest_rate=args.hostile_rate / 2)
        if args.profile == "hostile" else None,
    )
    for spec in args.fault:
        simulator.faults.add_spec(spec)
    asyncio.run(_serve(simulator, args))
    return 0


async def _serve(simulator: ExchangeSimulator, args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await simulator.start(args.rest_port, args.ws_port)
    series = [f"{s.symbol} {s.interval} ({s.frame.height} candles)" for s in simulator.book]
    print(
        json.dumps({**simulator.urls(), "market_time": format_ms(simulator.clock.now_ms()), "series": series}),
        flush=True,
    )
    await stop.wait()
    await simulator.stop()
