"""`kronosd evaluate`: walk-forward evaluation of Kronos checkpoints against baselines on the same origins.

Writes report.json, report.md and PNG plots into --out. Candles come from a file (--data) or the published
database (--db / the configured store, with --symbol and --interval). --calibrate adds every probabilistic
model calibrated by the daemon's online calibrator (configured by forecast.calibration, like the daemon).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import polars as pl

from daemon.commands.market_common import add_common_options, open_snapshot, resolve


def _timestamp(text: str | None, option: str) -> np.datetime64 | None:
    if not text:
        return None
    try:
        return np.datetime64(text.rstrip("Z").replace(" ", "T"), "ms")
    except ValueError as exc:
        raise ValueError(f"{option} {text!r} is not a date/time like 2024-06-01 or 2024-06-01T12:00") from exc


def _candles_from_store(args: argparse.Namespace) -> tuple[pl.DataFrame, str]:
    from kronos_model.data import candles_to_frame
    from storage.store import read_candles

    if not args.symbol or not args.interval:
        raise ValueError("reading the database needs --symbol and --interval (or pass --data FILE)")
    _, snapshot = resolve(args)
    con = open_snapshot(snapshot)
    try:
        stored = read_candles(con, args.symbol, args.interval)
    finally:
        con.close()
    if stored.is_empty():
        raise ValueError(f"{snapshot} holds no {args.symbol} {args.interval} candles; backfill them first")
    return candles_to_frame(stored, str(snapshot)), f"{snapshot} ({args.symbol} {args.interval})"


def _calibration_fields(args: argparse.Namespace) -> dict[str, int]:
    """The daemon's calibrator settings (forecast.calibration of --config / ./config.yaml, else the defaults),
    so `evaluate --calibrate` measures the calibrator the daemon runs."""
    from daemon.config import load_config

    settings = load_config(args.config).forecast.calibration
    return {"min_history": settings.min_history, "window": settings.window}


def run(args: argparse.Namespace) -> int:
    # Heavy imports here so `kronosd --help` stays fast.
    from kronos_model.data import read_candles
    from kronos_model.evaluation.models import load_model
    from kronos_model.evaluation.report import build_report, render_markdown, write_report
    from kronos_model.evaluation.scoring import to_jsonable
    from kronos_model.evaluation.walkforward import (
        DEFAULT_BURN_IN,
        Settings,
        resample_series,
        run_walk_forward,
        series_from_frame,
    )

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.burn_in is not None and not args.calibrate:
        raise ValueError("--burn-in only applies with --calibrate")
    if args.data:
        frame, source = read_candles(Path(args.data)), str(args.data)
    else:
        frame, source = _candles_from_store(args)
    series = series_from_frame(frame, args.symbol)
    if args.resample:
        from storage.intervals import grid_offset_ms, interval_ms

        series = resample_series(series, np.timedelta64(interval_ms(args.resample), "ms"),
                                 grid_offset_ms(args.resample))
        source += f", resampled to {args.resample}"

    sources = [load_model(args.model, tokenizer=args.tokenizer, name="kronos", offline=args.offline)]
    for argument in args.compare or []:
        sources.append(load_model(argument, offline=args.offline))
    names = [s.name for s in sources]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"several models are called {duplicated}; name them as NAME=DIR in --compare")

    trained = sources[0]
    settings = Settings(
        lookback=args.lookback or trained.trained_lookback or 400,
        horizon=args.horizon or trained.trained_horizon or 24,
        origins=args.origins, samples=args.samples, stride=args.stride, seed=args.seed,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        start=_timestamp(args.start, "--start"), end=_timestamp(args.end, "--end"),
        batch_size=args.batch_size, max_context=args.max_context, device=args.device,
        same_symbol_exclusion=args.same_symbol_exclusion, anchor=args.anchor, calibrate=args.calibrate,
        burn_in=(DEFAULT_BURN_IN if args.burn_in is None else args.burn_in) if args.calibrate else 0,
        calibration=_calibration_fields(args) if args.calibrate else {},
    )
    progress = (not args.quiet and sys.stderr.isatty()) or args.progress
    walk, plan = run_walk_forward(series, sources, settings, progress=progress)
    for note in plan.warnings:
        print(f"warning: {note}", file=sys.stderr)
    report = build_report(walk, plan, series, sources, settings, source, fee=args.fee)
    out = Path(args.out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN per-step IC of constant forecasts
        written = write_report(report, walk, out)
    if not args.quiet:
        text = render_markdown(to_jsonable(report))
        summary = text.split("## Calibration")[0]
        print(summary.rstrip())
        print(f"\nwrote {', '.join(str(p) for p in written)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="walk-forward evaluation of Kronos against baselines (report, JSON, plots)",
        description="Forecast many origins with Kronos and with baselines (random walk, drift, seasonal naive, "
        "volatility band) on the same candles, score point and probabilistic accuracy with significance tests and "
        "a fee-aware backtest, and write report.json, report.md and PNG plots. Origins never fall inside the "
        "training/validation period recorded in a checkpoint's manifest.",
    )
    parser.add_argument("--data", help="candles: Parquet or CSV(.gz), Binance kline or Kronos layout "
                        "(default: the database, see --db)")
    parser.add_argument("--symbol", type=str.upper, help="symbol to evaluate (needed with --db, or when --data "
                        "holds several)")
    parser.add_argument("--interval", help="interval in the database, e.g. 1h (with --db)")
    parser.add_argument("--model", required=True, help="a checkpoint dir with tokenizer/ and model/, a predictor dir "
                        "(with --tokenizer) or a hub id such as NeoQuasar/Kronos-small; reported as 'kronos'")
    parser.add_argument("--tokenizer", help="tokenizer for --model when it has none of its own (hub id or dir)")
    parser.add_argument("--compare", nargs="+", metavar="[NAME=]DIR|HUB_ID",
                        help="more checkpoints, reported under their directory names (or NAME)")
    parser.add_argument("--origins", type=int, default=200, help="forecast origins (default 200)")
    parser.add_argument("--horizon", type=int, help="candles ahead (default: the checkpoint's, else 24)")
    parser.add_argument("--lookback", type=int, help="look-back candles (default: the checkpoint's, else 400)")
    parser.add_argument("--stride", type=int, help="candles between origins (default: the horizon)")
    parser.add_argument("--samples", type=int, default=20, help="sample paths per forecast (default 20)")
    parser.add_argument("--start", help="earliest origin (date/time, UTC)")
    parser.add_argument("--end", help="latest origin (date/time, UTC)")
    parser.add_argument("--same-symbol-exclusion", action="store_true",
                        help="exclude a checkpoint's training/validation period only for the symbols it trained on "
                        "(default: for every symbol, since crypto markets move together)")
    parser.add_argument("--resample", metavar="INTERVAL", help="aggregate the candles to a longer interval first, "
                        "e.g. 4h from 1h data (buckets missing a candle are dropped)")
    parser.add_argument("--calibrate", action="store_true",
                        help="also report every probabilistic model calibrated by the daemon's online calibrator "
                        "(`<name>_calibrated`), each origin calibrated only on earlier origins' closed outcomes")
    parser.add_argument("--burn-in", type=int, metavar="ORIGINS",
                        help="origins before the scored ones (before --start) that warm the calibrator, forecast "
                        "but not scored (default with --calibrate: 200)")
    parser.add_argument("--anchor", action=argparse.BooleanOptionalAction, default=True,
                        help="shift each forecast's paths onto the observed last candle, removing the tokenizer's "
                        "reconstruction offset (default, like the daemon's forecast.anchor); --no-anchor: the raw "
                        "model output")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--fee", type=float, default=0.001, help="backtest fee per side (default 0.001 = 0.1 %%)")
    parser.add_argument("--batch-size", type=int, default=32, help="origins per batched generation")
    parser.add_argument("--max-context", type=int, default=512, help="512 for Kronos-small/base, 2048 for mini")
    parser.add_argument("--device", help="cuda, mps or cpu (default: auto)")
    parser.add_argument("--offline", action="store_true", help="only use hub checkpoints already in the cache")
    parser.add_argument("--out", required=True, help="directory for report.json, report.md and the plots")
    parser.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors and warnings")
    add_common_options(parser)
    parser.set_defaults(handler=run)
