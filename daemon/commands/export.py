"""`kronosd export`: candles from the published database as CSV (Binance kline layout), JSON or Parquet."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import polars as pl

from daemon.commands.market_common import (
    add_common_options,
    add_pair_options,
    open_snapshot,
    pairs_from_args,
    resolve,
)
from daemon.commands.output import describe, open_output
from daemon.market.kline_files import KLINE_FILE_COLUMNS
from storage.intervals import parse_time
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
                        help="output file (a regular file is replaced atomically); - writes to stdout; with several "
                        "pairs a directory, one SYMBOL-INTERVAL file each")
    add_common_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config, snapshot = resolve(args)
    pairs = pairs_from_args(args, config)
    start = parse_time(args.start) if args.start else None
    end = parse_time(args.end) if args.end else None
    if len(pairs) > 1 and (args.out == "-" or Path(args.out).is_file()):
        raise ValueError(f"{len(pairs)} pairs go to one file each: --out must be a directory")
    con = open_snapshot(snapshot)
    try:
        frames = {pair: read_candles(con, *pair, start, end) for pair in pairs}
    finally:
        con.close()
    empty = [f"{symbol} {interval}" for (symbol, interval), frame in frames.items() if frame.is_empty()]
    if empty:
        raise ValueError(f"no {', '.join(empty)} candles stored in that window ({snapshot})")
    for (symbol, interval), frame in frames.items():
        # Several pairs: DIR/SYMBOL-INTERVAL.<format>, a name `kronosd import` reads the pair from.
        out = args.out if len(pairs) == 1 else str(Path(args.out) / f"{symbol}-{interval}.{args.format}")
        _write(frame.select(KLINE_FILE_COLUMNS), args.format, out)
    return 0


def _write(frame: pl.DataFrame, file_format: str, out: str) -> None:
    with open_output(out) as stream:
        if file_format == "csv":
            frame.write_csv(stream)
        elif file_format == "parquet":
            frame.write_parquet(stream)
        else:
            stream.write(json.dumps(frame.to_dicts()).encode())
    # The summary goes to stderr when the data itself goes to stdout.
    print(f"wrote {frame.height} candles to {describe(out)}", file=sys.stderr if out == "-" else sys.stdout)
