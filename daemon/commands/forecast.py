"""`kronosd forecast`: one forecast with sample paths on a window of real candles.

Defaults run offline on a fresh clone: the bundled BTCUSDT 1h candles and the bundled tiny checkpoint (random
weights, see its README). When the chosen window ends before the data does, the candles that really followed
are printed next to the forecast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from daemon.commands.output import open_output
from storage.intervals import format_ms

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_DATA = ASSETS / "data" / "BTCUSDT_1h.parquet"
BUNDLED_CHECKPOINT = ASSETS / "checkpoints" / "tiny-random"


def load_candles(path: Path) -> pd.DataFrame:
    """Candles of one file (see kronos_model.data.read_candles for the layouts), as a pandas frame."""
    from kronos_model.data import FEATURES, read_candles

    frame = read_candles(path)
    if frame["symbol"].n_unique() > 1:
        raise ValueError(f"{path} holds several symbols; forecast one series at a time")
    return frame.select("timestamps", *FEATURES).to_pandas()


def infer_step(timestamps: pd.Series) -> pd.Timedelta:
    steps = timestamps.diff().dropna()
    if steps.empty:
        raise ValueError("need at least two candles to infer the interval")
    return steps.mode().iloc[0]


def _to_ms(moment: pd.Timestamp) -> int:
    """Naive timestamps in candle files are UTC."""
    moment = pd.Timestamp(moment)
    return int((moment.tz_convert("UTC") if moment.tzinfo else moment.tz_localize("UTC")).value // 1_000_000)


def run(args: argparse.Namespace) -> int:
    # Heavy imports here so `kronosd --help` stays fast.
    from kronos_model import KronosPredictor
    from kronos_model.evaluation.models import load_model

    candles = load_candles(Path(args.data))
    if args.end:
        end = pd.Timestamp(args.end)
        end = end.tz_localize(None) if end.tzinfo else end
        position = int(candles["timestamps"].searchsorted(end, side="right"))
    else:
        position = len(candles)
    if position < args.lookback:
        raise ValueError(f"only {position} candles up to the chosen end, but --lookback is {args.lookback}")
    history = candles.iloc[position - args.lookback : position].reset_index(drop=True)
    actual = candles.iloc[position : position + args.horizon].reset_index(drop=True)
    step = infer_step(history["timestamps"])
    future_times = pd.Series(history["timestamps"].iloc[-1] + step * np.arange(1, args.horizon + 1))

    # One pairing rule with `evaluate`: a checkpoint dir brings its tokenizer; a predictor dir or hub id needs
    # --tokenizer unless it is a released model whose tokenizer is known.
    source = load_model(args.model or str(BUNDLED_CHECKPOINT), tokenizer=args.tokenizer, offline=args.offline)
    predictor = KronosPredictor(source.model, source.tokenizer, device=args.device, max_context=args.max_context)
    result = predictor.forecast(history.drop(columns="timestamps"), history["timestamps"], future_times,
                                args.horizon, T=args.temperature, top_p=args.top_p, sample_count=args.samples,
                                seed=args.seed, verbose=sys.stderr.isatty(), anchor=args.anchor)
    if args.out:
        # Written before anything is printed, so a closed stdout (`| head`) cannot lose it.
        with open_output(args.out) as stream:
            result.to_frame().to_csv(stream)

    table = result.to_frame()[["close_p10", "close_p50", "close_p90", "close_mean", "prob_up"]]
    if len(actual):
        table["close_actual"] = pd.Series(actual["close"].to_numpy(), index=table.index[: len(actual)])
    history_end = format_ms(_to_ms(history["timestamps"].iloc[-1]))
    if args.json:
        steps = [{"timestamps": format_ms(_to_ms(when)), **{k: (None if pd.isna(v) else float(v))
                                                            for k, v in row.items()}}
                 for when, row in table.iterrows()]
        payload = {
            "model": source.location, "tokenizer": source.tokenizer_location, "samples": args.samples,
            "seed": args.seed, "last_close": result.last_close, "history_end": history_end, "steps": steps,
        }
        print(json.dumps(payload, indent=2))
    else:
        print(f"model {source.location} | tokenizer {source.tokenizer_location}")
        print(f"{args.lookback} candles up to {history_end} (last close "
              f"{result.last_close:,.2f}); {args.samples} sample paths, seed {args.seed}")
        if Path(source.location).resolve().is_relative_to(BUNDLED_CHECKPOINT):
            print("note: the bundled tiny checkpoint has random weights; this shows the pipeline, not a market view")
        printable = table.set_axis([format_ms(_to_ms(t)) for t in table.index]).rename_axis("timestamps")
        with pd.option_context("display.float_format", "{:,.2f}".format, "display.width", 120):
            print(printable.to_string())
        if len(actual):
            error = np.abs(table["close_p50"].iloc[: len(actual)] - table["close_actual"].dropna()).mean()
            naive = np.abs(result.last_close - actual["close"]).mean()
            print(f"median-path close MAE {error:,.2f} vs last-close (random walk) MAE {naive:,.2f}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "forecast", help="forecast the next candles of a series with sample paths",
        description="Forecast the candles after a window of real data, with quantiles and P(up) from sample paths.",
    )
    parser.add_argument("--data", default=str(BUNDLED_DATA),
                        help="candles: Parquet or CSV(.gz), Binance kline or Kronos layout "
                        "(default: bundled BTCUSDT 1h)")
    parser.add_argument("--end", help="last candle of the look-back window (default: the last in the data)")
    parser.add_argument("--model", help="a dir with model/ and tokenizer/, a predictor dir or hub id (with "
                        "--tokenizer unless it is a released Kronos model) "
                        "(default: the bundled tiny random-weight pair)")
    parser.add_argument("--tokenizer", help="tokenizer: hub id or checkpoint dir")
    parser.add_argument("--lookback", type=int, default=400)
    parser.add_argument("--horizon", type=int, default=24)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--anchor", action=argparse.BooleanOptionalAction, default=True,
                        help="start the paths from the observed last candle, not the tokenizer's copy of it, as the "
                        "daemon does (default; docs/evaluation.md)")
    parser.add_argument("--max-context", type=int, default=512, help="512 for Kronos-small/base, 2048 for mini")
    parser.add_argument("--device", help="cuda, mps or cpu (default: auto)")
    parser.add_argument("--offline", action="store_true", help="only use checkpoints already on disk")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--out", metavar="FILE|-",
                        help="also write every step's mean, quantiles and P(up) as CSV to this file (- for stdout)")
    parser.set_defaults(handler=run)
