"""`kronosd export`: candles from the published database as CSV (Binance kline layout), JSON or Parquet."""

from __future__ import annotations

import argparse
import json
import sys

from daemon.commands.market_common import add_common_options, add_pair_options, open_snapshot, resolve
from daemon.commands.output import describe, open_output
from daemon.market.kline_files import KLINE_FILE_COLUMNS
from storage.intervals import interval_ms, parse_time
from storage.store import read_candles


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write stored candles to CSV, JSON or Parquet",
        description="CSV uses Binance's kline columns with millisecond times, so `kronosd import` reads it back. "
        "JSON is an array of objects with the same fields; Parquet keeps the same columns and types.",
    )
    add_pair_options(parser)
    parser.add_argument("--format", choices=("csv", "json", "parquet"), default="csv")
    parser.add_argument("--start", help="first open time (UTC), inclusive")
    parser.add_argument("--end", help="last open time (UTC), exclusive")
    parser.add_argument("--out", required=True, metavar="FILE|-",
                        help="output file (a regular file is replaced atomically); - writes to stdout")
    add_common_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    _, snapshot = resolve(args)
    interval_ms(args.interval)
    start = parse_time(args.start) if args.start else None
    end = parse_time(args.end) if args.end else None
    con = open_snapshot(snapshot)
    try:
        frame = read_candles(con, args.symbol, args.interval, start, end)
    finally:
        con.close()
    if frame.is_empty():
        raise ValueError(f"no {args.symbol} {args.interval} candles stored in that window ({snapshot})")
    frame = frame.select(KLINE_FILE_COLUMNS)
    with open_output(args.out) as stream:
        if args.format == "csv":
            frame.write_csv(stream)
        elif args.format == "parquet":
            frame.write_parquet(stream)
        else:
            stream.write(json.dumps(frame.to_dicts()).encode())
    # The summary goes to stderr when the data itself goes to stdout.
    print(f"wrote {frame.height} candles to {describe(args.out)}", file=sys.stderr if args.out == "-" else sys.stdout)
    return 0
