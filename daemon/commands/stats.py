"""`kronosd stats`: coverage and quality of the stored candles of one symbol/interval."""

from __future__ import annotations

import argparse
import json

from daemon.commands.market_common import add_common_options, add_pair_options, open_snapshot, resolve
from storage.intervals import interval_ms
from storage.stats import candle_report, format_report
from storage.store import count_confirmed_empty, read_candles


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="rows, first/last, gaps, duplicates, OHLC violations, returns of stored candles",
        description="Reads the published database, so it never disturbs a running daemon.",
    )
    add_pair_options(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    add_common_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    _, snapshot = resolve(args)
    interval_ms(args.interval)
    con = open_snapshot(snapshot)
    try:
        frame = read_candles(con, args.symbol, args.interval)
        confirmed = count_confirmed_empty(con, args.symbol, args.interval)
    finally:
        con.close()
    report = candle_report(frame, args.symbol, args.interval)
    report["confirmed_empty_ranges"] = confirmed
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
        print(f"  ranges confirmed empty on the exchange: {confirmed}")
    return 0
