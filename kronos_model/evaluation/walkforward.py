"""The walk-forward (rolling-origin) engine: pick origins, forecast with every model, run the baselines.

Strictly causal: a forecast sees the look-back candles up to and including its origin candle and is scored on
the `horizon` candles after it. Every model gets the same origins, in the same batches, with the same seeds.
Origins whose look-back or targets would span a gap in the data are skipped, and so are origins whose own
candle or targets fall into a period a checkpoint was trained or validated on.

With `Settings.calibrate`, a burn-in of `burn_in` earlier origins (before `start` when it is given, the same
spacing, the same rules) is forecast too, and every probabilistic model is calibrated strictly sequentially
over burn-in and scored origins (`calibrated.calibrate_sequentially`); only the scored origins are scored.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
from tqdm.auto import tqdm

from kronos_model.calibration import CalibrationConfig
from kronos_model.data import FEATURES, infer_interval
from kronos_model.evaluation.baselines import VOL_BAND, all_baselines
from kronos_model.evaluation.calibrated import CALIBRATED_SUFFIX, CalibrationRun, QuantileGrid, calibrate_sequentially
from kronos_model.evaluation.models import ExcludedRange, ModelSource
from kronos_model.evaluation.scoring import WalkForward, format_time
from kronos_model.predictor import KronosPredictor

CLOSE = FEATURES.index("close")
DAY = np.timedelta64(24 * 3600 * 1000, "ms")
FEW_ORIGINS = 30  # below this, significance tests have little power: say so
# --calibrate's burn-in: 4 x the calibrator's default min_history, so every step has been calibrated on a full
# history for 150 origins (ACI steps, P(up) experts) before the first scored origin
DEFAULT_BURN_IN = 200


@dataclass
class Settings:
    lookback: int
    horizon: int
    origins: int
    samples: int
    stride: int | None = None  # default: the horizon, so targets of consecutive origins do not overlap
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    start: np.datetime64 | None = None
    end: np.datetime64 | None = None
    batch_size: int = 32
    max_context: int = 512
    device: str | None = None
    # Exclude training periods only for the symbols a checkpoint trained on (default: for every symbol).
    same_symbol_exclusion: bool = False
    anchor: bool = True  # shift the paths onto the observed last candle (KronosPredictor.forecast_batch)
    calibrate: bool = False  # also report every probabilistic model calibrated (`<name>_calibrated`)
    burn_in: int = 0  # origins before the scored ones that warm the calibrator (forecast, not scored)
    calibration: dict[str, Any] = field(default_factory=dict)  # CalibrationConfig fields besides horizon/interval

    @property
    def step(self) -> int:
        return self.stride or self.horizon

    def validate(self) -> None:
        for name in ("lookback", "horizon", "origins", "samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lookback < 2:
            raise ValueError("--lookback must be at least 2 candles")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"--stride must be at least 1, got {self.stride}")
        if self.horizon > self.max_context:
            raise ValueError(f"--horizon {self.horizon} exceeds the model context {self.max_context}")
        if self.burn_in < 0:
            raise ValueError(f"--burn-in must be at least 0, got {self.burn_in}")


@dataclass
class Series:
    """One symbol's candles on a regular grid (gaps allowed)."""

    symbol: str
    times: np.ndarray  # datetime64[ms], ascending
    values: np.ndarray  # (n, 6) FEATURES
    interval: np.timedelta64
    derived_amounts: int = 0

    @property
    def season(self) -> int:
        """Candles in 24 hours (at least one): the seasonal-naive period."""
        return max(1, int(DAY // self.interval))


def series_from_frame(frame: pl.DataFrame, symbol: str | None = None) -> Series:
    """A Series from a frame as `kronos_model.data.read_candles` returns it; pick `symbol` if there are several."""
    symbols = sorted(frame["symbol"].unique().to_list())
    if symbol is None:
        if len(symbols) != 1:
            raise ValueError(f"the data holds several symbols {symbols}; choose one with --symbol")
        symbol = symbols[0]
    elif symbol not in symbols:
        raise ValueError(f"symbol {symbol!r} is not in the data; it holds {symbols}")
    rows = frame.filter(pl.col("symbol") == symbol).sort("timestamps")
    if rows.height < 3:
        raise ValueError(f"{symbol}: only {rows.height} candles; an evaluation needs a look-back and a horizon")
    derived = int(rows["amount_derived"].sum()) if "amount_derived" in rows.columns else 0
    return Series(symbol, rows["timestamps"].to_numpy().astype("datetime64[ms]"),
                  rows.select(FEATURES).to_numpy().astype(np.float64), infer_interval(rows), derived)


@dataclass
class OriginPlan:
    positions: np.ndarray  # index of each origin candle in the series, ascending
    candidates: int  # origins with a gap-free context and horizon in the requested period
    excluded_recent: int  # of the most recent strided origins, how many fell into a training period
    warnings: list[str] = field(default_factory=list)


def _strided_from_latest(times: np.ndarray, count: int, spacing: np.timedelta64) -> np.ndarray:
    """Indices into `times` (ascending): the latest, then each next one at least `spacing` earlier."""
    picked: list[int] = []
    index = len(times) - 1
    while index >= 0 and len(picked) < count:
        picked.append(index)
        index = int(np.searchsorted(times, times[index] - spacing, side="right")) - 1
    return np.asarray(picked[::-1], dtype=np.int64)


def _usable(series: Series, context: int, horizon: int) -> np.ndarray:
    """(n,) bool: the candles with `context` gap-free candles up to them and `horizon` gap-free ones after."""
    count = len(series.times)
    breaks = np.flatnonzero(np.diff(series.times) != series.interval) + 1
    run_start = np.zeros(count, dtype=np.int64)
    run_end = np.full(count, count - 1, dtype=np.int64)
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, count], strict=True):
        run_start[start:stop], run_end[start:stop] = start, stop - 1
    index = np.arange(count)
    return (index - run_start >= context - 1) & (run_end - index >= horizon)


def _inside_excluded(series: Series, positions: np.ndarray, horizon: int,
                     excluded: list[ExcludedRange]) -> np.ndarray:
    """(len(positions),) bool: the origin candle or any of its targets inside an excluded period."""
    hit = np.zeros(len(positions), dtype=bool)
    last_target = series.times[np.minimum(positions + horizon, len(series.times) - 1)]
    for period in excluded:
        # targets are contiguous, so checking the span is enough
        hit |= (series.times[positions] <= period.end) & (last_target >= period.start)
    return hit


def plan_origins(series: Series, context: int, settings: Settings, excluded: list[ExcludedRange]) -> OriginPlan:
    """The most recent `settings.origins` origins, `settings.step` candles apart, outside excluded periods."""
    count = len(series.times)
    usable = _usable(series, context, settings.horizon)
    if settings.start is not None:
        usable &= series.times >= settings.start
    if settings.end is not None:
        usable &= series.times <= settings.end
    candidates = np.flatnonzero(usable)
    if not len(candidates):
        raise ValueError(
            f"{series.symbol}: no origin has {context} gap-free candles of look-back and {settings.horizon} after it "
            f"in the requested period (data {format_time(series.times[0])} to {format_time(series.times[-1])}, {count} "
            "candles); "
            "shorten --lookback/--horizon, widen --start/--end or add data"
        )
    spacing = series.interval * settings.step

    def inside_excluded(positions: np.ndarray) -> np.ndarray:
        return _inside_excluded(series, positions, settings.horizon, excluded)

    recent = candidates[_strided_from_latest(series.times[candidates], settings.origins, spacing)]
    excluded_recent = int(inside_excluded(recent).sum())
    notes = []
    eligible = candidates[~inside_excluded(candidates)]
    if not len(eligible):
        raise ValueError(f"{series.symbol}: every possible origin falls inside a checkpoint's training/validation "
                         "period; evaluate on data from outside it (other dates) or a checkpoint trained on less")
    positions = eligible[_strided_from_latest(series.times[eligible], settings.origins, spacing)]
    if excluded_recent:
        periods = "; ".join(f"{format_time(p.start)} to {format_time(p.end)} ({p.reason})" for p in excluded)
        scope = ("" if settings.same_symbol_exclusion else
                 " (for every symbol, because correlated markets share their moves; --same-symbol-exclusion "
                 "limits this to the symbols a checkpoint trained on)")
        replaced = min(excluded_recent, max(0, len(positions) - (len(recent) - excluded_recent)))
        notes.append(f"{excluded_recent} of the {len(recent)} most recent origins fall inside a checkpoint's "
                     f"{periods} and were excluded{scope}; {replaced} older origins took their place")
    if len(positions) < settings.origins:
        notes.append(f"only {len(positions)} origins are available (asked for {settings.origins})")
    if len(positions) < FEW_ORIGINS:
        notes.append(f"{len(positions)} origins are too few for the significance tests to detect anything but "
                     f"large differences; use {FEW_ORIGINS}+")
    return OriginPlan(positions, len(candidates), excluded_recent, notes)


def plan_burn_in(series: Series, context: int, settings: Settings, excluded: list[ExcludedRange],
                 first_scored: int) -> np.ndarray:
    """Positions of `settings.burn_in` origins before the first scored one and before --start when it is given
    (the scored period is then left to the scored origins), the same spacing apart, gap-free and outside
    excluded periods; ValueError if the data does not hold them."""
    if settings.burn_in == 0:
        return np.zeros(0, dtype=np.int64)
    spacing = series.interval * settings.step
    usable = _usable(series, context, settings.horizon) & (series.times <= series.times[first_scored] - spacing)
    if settings.start is not None:
        usable &= series.times < settings.start
    candidates = np.flatnonzero(usable)
    candidates = candidates[~_inside_excluded(series, candidates, settings.horizon, excluded)]
    picked = candidates[_strided_from_latest(series.times[candidates], settings.burn_in, spacing)]
    if len(picked) < settings.burn_in:
        raise ValueError(
            f"{series.symbol}: the calibration burn-in needs {settings.burn_in} origins before the first scored one "
            f"({format_time(series.times[first_scored])})" + (" and --start" if settings.start is not None else "")
            + f", {settings.step} candles apart, but the data holds only "
            f"{len(picked)} (data from {format_time(series.times[0])}); lower --burn-in or --origins, move --start "
            "later or add earlier data")
    return picked


def resample_series(series: Series, interval: np.timedelta64, offset_ms: int = 0) -> Series:
    """Candles aggregated to a longer `interval` (a whole multiple of the series'): open of the first, highest
    high, lowest low, close of the last, summed volume and amount. Buckets start `offset_ms` after multiples
    of the interval since the epoch (as Binance's: 4h candles open at 00:00, 04:00, ... UTC; weeks on Monday);
    a bucket missing any candle (an outage) is dropped rather than made from part of its span."""
    interval = np.timedelta64(interval, "ms")
    factor, remainder = divmod(int(interval / np.timedelta64(1, "ms")), int(series.interval / np.timedelta64(1, "ms")))
    if remainder or factor < 1:
        raise ValueError(f"--resample {interval} is not a whole multiple of the data's interval {series.interval}")
    if factor == 1:
        return series
    length = int(interval / np.timedelta64(1, "ms"))
    bucket = (series.times.astype("datetime64[ms]").astype(np.int64) - offset_ms) // length
    starts = np.r_[0, np.flatnonzero(np.diff(bucket)) + 1]
    sizes = np.diff(np.r_[starts, len(bucket)])
    full = starts[sizes == factor]  # the times are unique and on the grid, so `factor` candles fill a bucket
    if not len(full):
        raise ValueError(f"no complete {interval} bucket in the data; resample to a shorter interval")
    rows = full[:, None] + np.arange(factor)[None, :]
    values = series.values[rows]  # (buckets, factor, 6) FEATURES
    columns = {name: i for i, name in enumerate(FEATURES)}
    out = np.empty((len(full), len(FEATURES)))
    out[:, columns["open"]] = values[:, 0, columns["open"]]
    out[:, columns["high"]] = values[:, :, columns["high"]].max(axis=1)
    out[:, columns["low"]] = values[:, :, columns["low"]].min(axis=1)
    out[:, columns["close"]] = values[:, -1, columns["close"]]
    for name in ("volume", "amount"):
        out[:, columns[name]] = values[:, :, columns[name]].sum(axis=1)
    times = (bucket[full] * length + offset_ms).astype("datetime64[ms]")
    return Series(series.symbol, times, out, interval, series.derived_amounts)


def forecast_closes(source: ModelSource, series: Series, positions: np.ndarray, settings: Settings,
                    progress: bool = True, seed_offset: int = 0, label: str = "") -> np.ndarray:
    """(N, samples, horizon) sampled closes of one model; batch k always uses seed + seed_offset + k for every
    model."""
    predictor = KronosPredictor(source.model, source.tokenizer, device=settings.device,
                                max_context=settings.max_context)
    lookback, horizon = settings.lookback, settings.horizon
    result = np.empty((len(positions), settings.samples, horizon))
    batches = range(0, len(positions), settings.batch_size)
    for number, first in enumerate(tqdm(batches, desc=f"forecasting{label} with {source.name}", unit="batch",
                                        disable=not progress)):
        chunk = positions[first : first + settings.batch_size]
        frames = [pd.DataFrame(series.values[p - lookback + 1 : p + 1], columns=list(FEATURES)) for p in chunk]
        x_times = [series.times[p - lookback + 1 : p + 1] for p in chunk]
        y_times = [series.times[p + 1 : p + horizon + 1] for p in chunk]
        forecasts = predictor.forecast_batch(frames, x_times, y_times, horizon, T=settings.temperature,
                                             top_k=settings.top_k, top_p=settings.top_p,
                                             sample_count=settings.samples, seed=settings.seed + seed_offset + number,
                                             anchor=settings.anchor)
        for offset, forecast in enumerate(forecasts):
            result[first + offset] = forecast.paths[:, :, CLOSE]
    if not np.isfinite(result).all():
        warnings.warn(f"{source.name} produced non-finite closes; its scores will be NaN", stacklevel=2)
    return result


# burn-in batches draw from other seeds than the scored ones, so the scored raw forecasts are the same with and
# without --calibrate
BURN_IN_SEED_OFFSET = 1_000_000


def run_walk_forward(series: Series, sources: list[ModelSource], settings: Settings,
                     progress: bool = True) -> tuple[WalkForward, OriginPlan]:
    """Forecast every origin with every model and every baseline (and calibrate them with settings.calibrate)."""
    settings.validate()
    context = max(settings.lookback, series.season)
    excluded = [period for source in sources for period in source.excluded
                if period.applies_to(series.symbol, settings.same_symbol_exclusion)]
    plan = plan_origins(series, context, settings, excluded)
    positions = plan.positions
    burn_positions = (plan_burn_in(series, context, settings, excluded, int(positions[0])) if settings.calibrate
                      else np.zeros(0, dtype=np.int64))
    history_close, actual = _history_and_targets(series, positions, context, settings.horizon)
    walk = WalkForward(
        symbol=series.symbol, interval=series.interval, origin_times=series.times[positions],
        target_times=series.times[positions[:, None] + np.arange(1, settings.horizon + 1)[None, :]],
        history_close=history_close, actual=actual, stride=settings.step,
    )
    # Baselines see the same look-back as the models (a full season for the seasonal naive if that is longer).
    walk.forecasts.update(all_baselines(history_close, settings.horizon, series.season))
    for source in sources:
        if source.name in walk.forecasts:
            raise ValueError(f"two models are called {source.name!r}; name them with NAME=DIR")
        walk.forecasts[source.name] = forecast_closes(source, series, positions, settings, progress)
    if settings.calibrate:
        _calibrate(walk, series, sources, settings, context, positions, burn_positions, progress)
    return walk, plan


def _history_and_targets(series: Series, positions: np.ndarray, context: int,
                         horizon: int) -> tuple[np.ndarray, np.ndarray]:
    history_index = positions[:, None] + np.arange(-context + 1, 1)[None, :]
    target_index = positions[:, None] + np.arange(1, horizon + 1)[None, :]
    return series.values[history_index, CLOSE], series.values[target_index, CLOSE]


def _calibrate(walk: WalkForward, series: Series, sources: list[ModelSource], settings: Settings, context: int,
               positions: np.ndarray, burn_positions: np.ndarray, progress: bool) -> None:
    """Forecast the burn-in origins and add `<name>_calibrated` grids for every probabilistic model."""
    config = CalibrationConfig(horizon=settings.horizon, interval_ms=int(series.interval / np.timedelta64(1, "ms")),
                               **settings.calibration)
    burn_history, _ = _history_and_targets(series, burn_positions, context, settings.horizon)
    burn_forecasts = {VOL_BAND: all_baselines(burn_history, settings.horizon, series.season)[VOL_BAND]}
    for source in sources:
        if settings.samples > 1:
            burn_forecasts[source.name] = forecast_closes(source, series, burn_positions, settings, progress,
                                                          seed_offset=BURN_IN_SEED_OFFSET, label=" the burn-in")
    times_ms = series.times.astype("datetime64[ms]").astype(np.int64)
    all_positions = np.r_[burn_positions, positions]
    origin_ms = times_ms[all_positions]
    last_close = series.values[all_positions, CLOSE]
    closes = series.values[:, CLOSE]
    walk.calibration = {"config": config, "burn_in": len(burn_positions),
                        "burn_in_period": [series.times[burn_positions[0]], series.times[burn_positions[-1]]]
                        if len(burn_positions) else None, "runs": {}}
    for name, burn in burn_forecasts.items():
        samples = np.concatenate([burn, walk.forecasts[name]])
        run: CalibrationRun = calibrate_sequentially(config, times_ms, closes, origin_ms, last_close, samples,
                                                     len(burn_positions))
        walk.grids[name] = QuantileGrid.from_samples(walk.forecasts[name], walk.last_close, config.levels)
        walk.grids[name + CALIBRATED_SUFFIX] = run.grid
        walk.calibration["runs"][name] = run

