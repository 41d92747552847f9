"""`kronosd ledger`: how the daemon's forecasts did against the candles that followed, per model version."""

from __future__ import annotations

import argparse
import json

from daemon.commands.market_common import add_common_options, open_snapshot, resolve

DEFAULT_WINDOWS = ("all", "7d")


def run(args: argparse.Namespace) -> int:
    from daemon.ledger import format_table, parse_window, score_ledger

    windows = [(label, parse_window(label)) for label in (args.window or DEFAULT_WINDOWS)]
    _, snapshot = resolve(args)
    con = open_snapshot(snapshot)
    try:
        scores = [score for label, window in windows
                  for score in score_ledger(con, window=window, symbol=args.symbol, interval=args.interval,
                                            model_version=args.model_version, window_label=label)]
    finally:
        con.close()
    if args.json:
        print(json.dumps([s.to_dict() for s in scores], indent=2))
        return 0
    if not scores:
        print("no scored forecasts yet: the ledger needs forecasts whose target candles have closed")
        return 0
    print(format_table(scores))
    print("\nMAE/RW and QL/RW < 1 beat the random walk (last close); DM p is the Diebold-Mariano p-value of the "
          "MAE difference; cov80 should be near 80 %; brier 0.25 is a coin flip.")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ledger", help="score stored forecasts against what happened, per model version",
        description="Joins the daemon's forecasts with the candles that followed and scores them per symbol, "
        "interval and model version against the random walk: MAE with a Diebold-Mariano test, pinball loss of "
        "p10/p50/p90, 80 % interval coverage, direction and the Brier score of P(up). Reads the published "
        "database, so it never disturbs a running daemon.",
    )
    parser.add_argument("--symbol", type=str.upper, help="only this symbol")
    parser.add_argument("--interval", help="only this interval, e.g. 1h")
    parser.add_argument("--model-version", help="only this model version")
    parser.add_argument("--window", action="append", metavar="all|DURATION",
                        help="rolling window of origins up to the latest candle, e.g. 24h, 7d, 30d; repeatable "
                        "(default: all and 7d)")
    parser.add_argument("--json", action="store_true", help="machine-readable scores")
    add_common_options(parser)
    parser.set_defaults(handler=run)
