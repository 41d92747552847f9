"""`kronosd export`: candles from the published database as CSV (Binance kline layout) or JSON."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from daemon.commands.market_common import add_common_options, add_pair_options, open_snapshot, resolve
from storage.candles import KLINE_FILE_COLUMNS
from storage.intervals import interval_ms, parse_time
from storage.store import read_candles


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write stored candles to CSV or JSON",
        description="CSV uses Binance's kline columns with millisecond times, so `kronosd import` reads it back. "
        "JSON is an array of objects with the same fields.",
    )
    add_pair_options(parser)
    parser.add_argument("--format", choices=("csv", "json"), default="csv")
    parser.add_argument("--start", help="first open time (UTC), inclusive")
    parser.add_argument("--end", help="last open time (UTC), exclusive")
    parser.add_argument("--out", type=Path, required=True, help="output file (written atomically)")
    add_common_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    _, snapshot, _ = resolve(args)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    if args.format == "csv":
        frame.write_csv(temp)
    else:
        temp.write_text(json.dumps(frame.to_dicts()))
    os.replace(temp, args.out)
    print(f"wrote {frame.height} candles to {args.out}")
    return 0
