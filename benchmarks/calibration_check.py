"""Online calibration on real candles: a deliberately mis-scaled forecaster, raw vs calibrated.

The raw forecaster is a Gaussian random walk whose volatility is `scale` x the trailing realised volatility
(0.5x: bands twice too narrow; 2x: twice too wide) with a naive momentum drift (the mean log return of the
last 24 candles), drawn as 30 sample paths over the horizon, like the Kronos predictor's output. Every
origin is calibrated strictly sequentially by `OnlineCalibrator.replay` (each origin only sees outcomes whose
candle had closed by then). Scores are per origin and step: coverage of the central 50/80/90 % bands, the
CRPS of the 5 %...95 % quantile grid in basis points of log return (`crps_from_quantiles`; the raw sample
paths' CRPS alongside shows the grid's approximation), and the Brier score of P(up). Origins before every step
has `min_history` outcomes are not scored (they publish raw values); the rest are grouped by year.

    python benchmarks/calibration_check.py [--stride 1] [--symbols BTCUSDT ETHUSDT] [--score-scale spread]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from kronos_model.calibration import (
    DEFAULT_LEVELS,
    CalibrationConfig,
    OnlineCalibrator,
    RawForecast,
    crps_from_quantiles,
)
from kronos_model.evaluation.metrics import crps_from_samples

DATA = Path(__file__).resolve().parent.parent / "daemon" / "assets" / "data"
HOUR_MS = 3_600_000
BANDS = (0.5, 0.8, 0.9)
BASIS_POINTS = 1e4


def hourly_closes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(open times, closes) on a gap-free hourly grid; a missing candle's close is NaN."""
    frame = pl.read_parquet(path, columns=["open_time", "close"]).sort("open_time")
    first, last = int(frame["open_time"][0]), int(frame["open_time"][-1])
    times = np.arange(first, last + HOUR_MS, HOUR_MS, dtype=np.int64)
    closes = np.full(len(times), np.nan)
    closes[(frame["open_time"].to_numpy() - first) // HOUR_MS] = frame["close"].to_numpy()
    return times, closes


@dataclass
class Origins:
    """Every origin's raw forecast, its sample paths (as log returns) and what followed."""

    forecasts: list[RawForecast]
    log_paths: np.ndarray  # (N, S, H)
    realised: np.ndarray  # (N, H) closes, NaN where the candle is missing
    trailing_volatility: np.ndarray  # (N,) the realised volatility the forecaster scaled


def mis_scaled_forecasts(times: np.ndarray, closes: np.ndarray, scale: float, horizon: int, stride: int,
                         trailing: int, paths: int, seed: int) -> Origins:
    rng = np.random.default_rng(seed)
    log_close = np.log(closes)
    returns = np.diff(log_close, prepend=np.nan)
    forecasts, log_paths, realised, volatilities = [], [], [], []
    for t in range(trailing, len(times) - horizon, stride):
        if not np.isfinite(closes[t]):
            continue
        recent = returns[t - trailing + 1:t + 1]
        volatility = np.nanstd(recent)
        drift = np.nanmean(returns[t - 23:t + 1])
        steps = rng.normal(drift, scale * volatility, (paths, horizon))
        path = np.cumsum(steps, axis=1)
        forecasts.append(RawForecast.from_paths(int(times[t]), float(closes[t]), closes[t] * np.exp(path)))
        log_paths.append(path)
        realised.append(closes[t + 1:t + 1 + horizon])
        volatilities.append(volatility)
    return Origins(forecasts, np.stack(log_paths), np.stack(realised), np.array(volatilities))


def score(origins: Origins, published: list, levels: tuple[float, ...]) -> dict[str, np.ndarray]:
    """Per origin and step: hits per band, CRPS (bp), Brier, raw and calibrated."""
    last = np.array([f.last_close for f in origins.forecasts])[:, None]
    realised_log = np.log(origins.realised / last)  # NaN where missing
    raw_log = np.stack([f.log_quantiles() for f in origins.forecasts])  # (N, L, H)
    cal_log = np.stack([np.log(p.quantiles / p.last_close) for p in published])
    went_up = (origins.realised > last).astype(float)
    index = {level: i for i, level in enumerate(levels)}
    result: dict[str, np.ndarray] = {}
    for name, quantiles in (("raw", raw_log), ("calibrated", cal_log)):
        for band in BANDS:
            lower, upper = quantiles[:, index[round((1 - band) / 2, 2)]], quantiles[:, index[round((1 + band) / 2, 2)]]
            result[f"{name}_coverage_{round(band * 100)}"] = (realised_log >= lower) & (realised_log <= upper)
        safe = np.nan_to_num(realised_log)
        result[f"{name}_crps"] = BASIS_POINTS * crps_from_quantiles(levels, np.moveaxis(quantiles, 1, -1), safe)
    result["raw_crps_samples"] = BASIS_POINTS * crps_from_samples(np.moveaxis(origins.log_paths, 1, -1),
                                                                  np.nan_to_num(realised_log))
    result["raw_brier"] = (np.stack([f.prob_up for f in origins.forecasts]) - went_up) ** 2
    result["calibrated_brier"] = (np.stack([p.prob_up for p in published]) - went_up) ** 2
    result["valid"] = np.isfinite(realised_log)
    return result


COLUMNS = (("cov50", "coverage_50"), ("cov80", "coverage_80"), ("cov90", "coverage_90"), ("crps_bp", "crps"),
           ("brier", "brier"))


def summarise(label: str, scores: dict[str, np.ndarray], rows: np.ndarray) -> str:
    valid = scores["valid"][rows]
    cells = []
    for short, key in COLUMNS:
        raw, cal = scores[f"raw_{key}"][rows][valid], scores[f"calibrated_{key}"][rows][valid]
        digits = 1 if short == "crps_bp" else 3
        cells.append(f"{short} {raw.mean():.{digits}f} -> {cal.mean():.{digits}f}")
    samples = scores["raw_crps_samples"][rows][valid].mean()
    return f"  {label:<6} n={int(rows.sum()):>5}  " + "  ".join(cells) + f"  (raw sample-path CRPS {samples:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--symbols", nargs="+", default=["BTCUSDT", "ETHUSDT"])
    parser.add_argument("--scales", nargs="+", type=float, default=[0.5, 2.0])
    parser.add_argument("--horizon", type=int, default=24)
    parser.add_argument("--stride", type=int, default=1, help="candles between origins (1: like the daemon)")
    parser.add_argument("--trailing", type=int, default=168, help="candles of realised volatility")
    parser.add_argument("--paths", type=int, default=30)
    parser.add_argument("--score-scale", choices=["spread", "none"], default=None, help="default: the config's")
    parser.add_argument("--score-mode", choices=["central", "per-level"], default=None, help="default: the config's")
    parser.add_argument("--half-life", type=float, default=None, help="default: the config's")
    parser.add_argument("--gamma", type=float, default=None, help="ACI step; default: the config's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    overrides: dict[str, object] = {}
    if args.score_scale is not None:
        overrides["score_scale"] = args.score_scale
    if args.score_mode is not None:
        overrides["score_mode"] = args.score_mode
    if args.half_life is not None:
        overrides["half_life"] = args.half_life
    if args.gamma is not None:
        overrides["aci_gamma"] = args.gamma
    # forecast steps are hourly whatever the stride: step h's target opens h hours after its origin
    config = CalibrationConfig(horizon=args.horizon, interval_ms=HOUR_MS, **overrides)
    print(f"method: {config.method}")
    print(f"raw forecaster: Gaussian random walk, vol = scale x trailing {args.trailing} h realised vol, momentum "
          f"drift (mean of last 24 h), {args.paths} paths, horizon {args.horizon}, an origin every {args.stride} h")
    print("each cell: raw -> calibrated; CRPS of the 19-level grid in bp of log return; coverage/Brier per step "
          "pooled over the 24 steps")
    for symbol in args.symbols:
        times, closes = hourly_closes(DATA / f"{symbol}_1h.parquet")
        for scale in args.scales:
            started = time.perf_counter()
            origins = mis_scaled_forecasts(times, closes, scale, args.horizon, args.stride, args.trailing,
                                           args.paths, args.seed)
            calibrator = OnlineCalibrator(config)
            published = calibrator.replay(zip(origins.forecasts, origins.realised, strict=True), flush=False)
            scores = score(origins, published, DEFAULT_LEVELS)
            scored = np.array([p.calibrated for p in published])
            years = np.array([datetime.fromtimestamp(f.origin_ms / 1000, UTC).year for f in origins.forecasts])
            elapsed = time.perf_counter() - started
            print(f"\n{symbol} scale {scale:g}x: {len(published)} origins, {int((~scored).sum())} burn-in (raw, "
                  f"not scored), {elapsed:.0f} s")
            print(summarise("all", scores, scored))
            for year in np.unique(years):
                print(summarise(str(year), scores, scored & (years == year)))
            # volatility regimes: terciles of the trailing volatility at the origin (conditional coverage)
            edges = np.quantile(origins.trailing_volatility[scored], [1 / 3, 2 / 3])
            regime = np.searchsorted(edges, origins.trailing_volatility)
            for index, name in enumerate(("lo-vol", "mid-vol", "hi-vol")):
                print(summarise(name, scores, scored & (regime == index)))
            months = np.array([datetime.fromtimestamp(f.origin_ms / 1000, UTC).strftime("%Y-%m")
                               for f in origins.forecasts])
            monthly = {}
            for month in np.unique(months[scored]):
                rows = scored & (months == month)
                for name in ("raw", "calibrated"):
                    hits = scores[f"{name}_coverage_80"][rows][scores["valid"][rows]]
                    monthly.setdefault(name, []).append(hits.mean())
            print("  calendar months, coverage_80 min..max: " + "  ".join(
                f"{name} {min(values):.3f}..{max(values):.3f}" for name, values in monthly.items()))


if __name__ == "__main__":
    main()
