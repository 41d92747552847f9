"""`kronosd import FILE…`: load Binance kline files (CSV, CSV.gz, archive zips, Parquet) into the store."""

from __future__ import annotations

import argparse
from pathlib import Path

from daemon.commands.market_common import add_common_options, resolve
from daemon.market.kline_files import read_kline_file
from daemon.wiring import open_writer


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import",
        help="load kline files (CSV/CSV.gz/zip/Parquet) into the store",
        description="Check each file strictly (NaN, unsorted, duplicate or off-grid rows, wrong columns, OHLC "
        "violations) and refuse a bad one with a report; nothing is fixed silently. Symbol and interval come from "
        "the file name (BTCUSDT_1h.parquet, BTCUSDT-1h-2024-01.zip) unless given.",
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE")
    parser.add_argument("--symbol", type=str.upper, help="symbol when the file name does not say")
    parser.add_argument("--interval", help="interval when the file name does not say")
    parser.add_argument(
        "--allow-off-grid", action="store_true", help="keep rows off the interval grid as published (Binance 2018)"
    )
    parser.add_argument("--check-only", action="store_true", help="check the files, store nothing")
    add_common_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config, snapshot = resolve(args)
    # Check every file before storing any, so one bad file does not leave a half-done import.
    checked = [
        read_kline_file(path, symbol=args.symbol, interval=args.interval, allow_off_grid=args.allow_off_grid)
        for path in args.files
    ]
    for _, check in checked:
        print(check.report())
    if args.check_only:
        return 0
    with open_writer(config, snapshot) as writer:
        for frame, check in checked:
            result = writer.submit(frame).result()
            print(f"{check.path.name}: {result.rows_changed} of {frame.height} candles new or changed")
    print(f"published {snapshot}")
    return 0
