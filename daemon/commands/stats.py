"""`kronosd stats`: coverage and quality of the stored candles of one symbol/interval."""

from __future__ import annotations

import argparse
import json

from daemon.commands.market_common import (
    add_common_options,
    add_pair_options,
    open_snapshot,
    pairs_from_args,
    resolve,
)
from storage.stats import candle_report, format_report
from storage.store import count_confirmed_empty, read_candles


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="rows, first/last, gaps, duplicates, OHLC violations, returns of stored candles (one or many pairs)",
        description="Reads the published database, so it never disturbs a running daemon.",
    )
    add_pair_options(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    add_common_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config, snapshot = resolve(args)
    pairs = pairs_from_args(args, config)
    con = open_snapshot(snapshot)
    try:
        reports = []
        for symbol, interval in pairs:
            report = candle_report(read_candles(con, symbol, interval), symbol, interval)
            report["confirmed_empty_ranges"] = count_confirmed_empty(con, symbol, interval)
            reports.append(report)
    finally:
        con.close()
    if args.json:
        # One pair: its report, as always; several: a list of them.
        print(json.dumps(reports[0] if len(reports) == 1 else reports))
        return 0
    for report in reports:
        print(format_report(report))
        print(f"  ranges confirmed empty on the exchange: {report['confirmed_empty_ranges']}")
    return 0
