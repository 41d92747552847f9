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
from daemon.simulator.synthetic import add_synthetic_pairs
from storage.intervals import format_ms, parse_time

# Market time the synthetic pairs' live part starts at (any grid time works; a fixed one keeps runs alike).
SYNTHETIC_START = "2026-01-01T00:00"


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
    parser.add_argument("--ws-update-s", type=float, default=0.25,
                        help="wall seconds between a stream's updates of its open candle (Binance: 2; default 0.25 "
                        "so a fast clock still shows candles growing); closes are always sent at once")
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
    parser.add_argument("--pairs", type=int, metavar="N",
                        help="serve N synthetic pairs SYN000USDT… instead: runs of the bundled real candles re-timed "
                        "onto --pairs-interval, each at its own price level (for scale tests)")
    parser.add_argument("--pairs-interval", default="1m", help="interval of the synthetic pairs (default 1m)")
    parser.add_argument("--pairs-history", type=int, default=2000, metavar="CANDLES",
                        help="synthetic candles before --start, for backfills (default 2000)")
    parser.add_argument("--pairs-future", type=int, default=1440, metavar="CANDLES",
                        help="synthetic candles from --start on, streamed live (default 1440)")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(handler=run)


def build_book(args: argparse.Namespace) -> CandleBook:
    book = CandleBook()
    if args.pairs is not None:
        bundled = CandleBook()
        for path in sorted(BUNDLED_DATA_DIR.glob("*.parquet")):
            bundled.add_file(path)
        start = parse_time(args.start) if args.start else parse_time(SYNTHETIC_START)
        add_synthetic_pairs(book, list(bundled), args.pairs, args.pairs_interval, start, args.pairs_history,
                            args.pairs_future, seed=args.seed)
    paths = args.data or ([] if args.store or args.pairs is not None else sorted(BUNDLED_DATA_DIR.glob("*.parquet")))
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
    if args.ws_update_s <= 0:
        raise ValueError("--ws-update-s must be > 0")
    if not 0 <= args.hostile_rate <= 1:
        raise ValueError("--hostile-rate must be between 0 and 1")
    book = build_book(args)
    last_candle = max(int(series.open_times[-1]) for series in book)
    if args.start:
        start = parse_time(args.start)
    elif args.pairs is not None:
        start = parse_time(SYNTHETIC_START)
    else:
        start = last_candle - 30 * 86_400_000
    simulator = ExchangeSimulator(
        book,
        SimClock(start, args.speed),
        host=args.host,
        weight_limit=args.weight_limit,
        latency_s=args.latency_ms / 1000,
        ws_lifetime_s=args.ws_lifetime_s,
        ws_update_s=args.ws_update_s,
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
