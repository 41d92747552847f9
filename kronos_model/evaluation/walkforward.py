"""The walk-forward (rolling-origin) engine: pick origins, forecast with every model, run the baselines.

Strictly causal: a forecast sees the look-back candles up to and including its origin candle and is scored on
the `horizon` candles after it. Every model gets the same origins, in the same batches, with the same seeds.
Origins whose look-back or targets would span a gap in the data are skipped, and so are origins whose own
candle or targets fall into a period a checkpoint was trained or validated on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import polars as pl
from tqdm.auto import tqdm

from kronos_model.data import FEATURES, infer_interval
from kronos_model.evaluation.baselines import all_baselines
from kronos_model.evaluation.models import ExcludedRange, ModelSource
from kronos_model.evaluation.scoring import WalkForward, format_time
from kronos_model.predictor import KronosPredictor

CLOSE = FEATURES.index("close")
DAY = np.timedelta64(24 * 3600 * 1000, "ms")
FEW_ORIGINS = 30  # below this, significance tests have little power: say so


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


def plan_origins(series: Series, context: int, settings: Settings, excluded: list[ExcludedRange]) -> OriginPlan:
    """The most recent `settings.origins` origins, `settings.step` candles apart, outside excluded periods."""
    count = len(series.times)
    breaks = np.flatnonzero(np.diff(series.times) != series.interval) + 1
    run_start = np.zeros(count, dtype=np.int64)
    run_end = np.full(count, count - 1, dtype=np.int64)
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, count], strict=True):
        run_start[start:stop], run_end[start:stop] = start, stop - 1
    index = np.arange(count)
    usable = (index - run_start >= context - 1) & (run_end - index >= settings.horizon)
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
        hit = np.zeros(len(positions), dtype=bool)
        last_target = series.times[np.minimum(positions + settings.horizon, count - 1)]
        for period in excluded:
            # the origin candle or any target inside the period (targets are contiguous, so check the span)
            hit |= (series.times[positions] <= period.end) & (last_target >= period.start)
        return hit

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


def forecast_closes(source: ModelSource, series: Series, positions: np.ndarray, settings: Settings,
                    progress: bool = True) -> np.ndarray:
    """(N, samples, horizon) sampled closes of one model; batch k always uses seed + k for every model."""
    predictor = KronosPredictor(source.model, source.tokenizer, device=settings.device,
                                max_context=settings.max_context)
    lookback, horizon = settings.lookback, settings.horizon
    result = np.empty((len(positions), settings.samples, horizon))
    batches = range(0, len(positions), settings.batch_size)
    for number, first in enumerate(tqdm(batches, desc=f"forecasting with {source.name}", unit="batch",
                                        disable=not progress)):
        chunk = positions[first : first + settings.batch_size]
        frames = [pd.DataFrame(series.values[p - lookback + 1 : p + 1], columns=list(FEATURES)) for p in chunk]
        x_times = [series.times[p - lookback + 1 : p + 1] for p in chunk]
        y_times = [series.times[p + 1 : p + horizon + 1] for p in chunk]
        forecasts = predictor.forecast_batch(frames, x_times, y_times, horizon, T=settings.temperature,
                                             top_k=settings.top_k, top_p=settings.top_p,
                                             sample_count=settings.samples, seed=settings.seed + number)
        for offset, forecast in enumerate(forecasts):
            result[first + offset] = forecast.paths[:, :, CLOSE]
    if not np.isfinite(result).all():
        warnings.warn(f"{source.name} produced non-finite closes; its scores will be NaN", stacklevel=2)
    return result


def run_walk_forward(series: Series, sources: list[ModelSource], settings: Settings,
                     progress: bool = True) -> tuple[WalkForward, OriginPlan]:
    """Forecast every origin with every model and every baseline."""
    settings.validate()
    context = max(settings.lookback, series.season)
    excluded = [period for source in sources for period in source.excluded
                if period.applies_to(series.symbol, settings.same_symbol_exclusion)]
    plan = plan_origins(series, context, settings, excluded)
    positions = plan.positions
    history_index = positions[:, None] + np.arange(-context + 1, 1)[None, :]
    target_index = positions[:, None] + np.arange(1, settings.horizon + 1)[None, :]
    history_close = series.values[history_index, CLOSE]
    walk = WalkForward(
        symbol=series.symbol, interval=series.interval, origin_times=series.times[positions],
        target_times=series.times[target_index], history_close=history_close,
        actual=series.values[target_index, CLOSE], stride=settings.step,
    )
    # Baselines see the same look-back as the models (a full season for the seasonal naive if that is longer).
    walk.forecasts.update(all_baselines(history_close, settings.horizon, series.season))
    for source in sources:
        if source.name in walk.forecasts:
            raise ValueError(f"two models are called {source.name!r}; name them with NAME=DIR")
        walk.forecasts[source.name] = forecast_closes(source, series, positions, settings, progress)
    return walk, plan
