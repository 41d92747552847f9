"""Training windows from candle files or polars frames: leak-free, gap-aware, chronological splits.

- A window is `lookback + predict + 1` consecutive candles of one symbol on the regular grid: it never spans a
  gap (a real exchange outage) or two symbols.
- Each window is normalised with the mean/std of its look-back rows only, then clipped (the original CSV
  pipeline used the whole window, leaking the future into the inputs).
- Splits are by time: train, then validation, then test, each window entirely inside its period, with an
  embargo of at least the horizon between periods so no target of one split is an input of the next.

This module reads files itself (Parquet or CSV in the Binance kline or the Kronos layout) or takes a frame;
it does not know about the daemon's store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from kronos_model.predictor import FEATURE_COLUMNS as FEATURES  # one column order for files and the model

# Epoch times above this are microseconds: milliseconds stay below it until the year 2286.
MICROSECOND_EPOCH_THRESHOLD = 10**13


def read_candles(path: str | Path, symbol: str | None = None) -> pl.DataFrame:
    """Candles from Parquet or CSV(.gz): columns symbol, timestamps (UTC, naive), open..amount.

    Binance layout: `open_time` (ms, or µs as in 2025+ archives), `quote_volume` becomes `amount`.
    Kronos layout: `timestamps, open, high, low, close[, volume, amount]`. Without a `symbol` column the
    symbol is `symbol` or the file name's first `_`-separated part (`BTCUSDT_1h.parquet` -> BTCUSDT).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such data file: {path}")
    try:
        frame = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path, infer_schema_length=None)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ValueError(f"{path}: cannot read candles: {exc}") from exc
    if "symbol" not in frame.columns:
        frame = frame.with_columns(pl.lit(symbol or path.name.split("_")[0].split(".")[0]).alias("symbol"))
    if "open_time" in frame.columns:
        return candles_to_frame(frame, str(path))
    if "timestamps" not in frame.columns:
        raise ValueError(f"{path}: need an 'open_time' (Binance layout) or 'timestamps' column, got {frame.columns}")
    if frame["timestamps"].dtype == pl.String:
        frame = frame.with_columns(pl.col("timestamps").str.to_datetime())
    return normalise_frame(frame, str(path))


def candles_to_frame(candles: pl.DataFrame, where: str = "candles") -> pl.DataFrame:
    """Candles in the exchange layout — `open_time` (epoch ms, or µs as in 2025+ archives; integers, whole
    floats or ISO text), open..volume, `quote_volume` — as the Kronos frame of `normalise_frame`.

    The one conversion from stored or downloaded candles to what the model reads: the forecaster, the
    fine-tune data, the gate and `evaluate` all go through it.
    """
    frame = candles
    if frame["open_time"].dtype.is_float():
        frame = frame.with_columns(_integral_epoch(frame["open_time"], where))
    if frame["open_time"].dtype.is_integer():
        unit = "us" if frame.height and frame["open_time"].max() > MICROSECOND_EPOCH_THRESHOLD else "ms"
        frame = frame.with_columns(pl.from_epoch("open_time", time_unit=unit).alias("timestamps"))
    else:
        frame = frame.with_columns(pl.col("open_time").str.to_datetime().alias("timestamps"))
    if "quote_volume" in frame.columns and "amount" not in frame.columns:
        frame = frame.rename({"quote_volume": "amount"})
    return normalise_frame(frame, where)


def candles_to_frames(windows: list[pl.DataFrame], where: str = "candles") -> list[pl.DataFrame]:
    """`candles_to_frame` of many windows in one pass (the forecaster's batch of pairs): each window is its own
    series (its `symbol` becomes its position), returned in order."""
    if not windows:
        return []
    tagged = pl.concat([window.with_columns(pl.lit(str(i)).alias("symbol")) for i, window in enumerate(windows)],
                       how="vertical_relaxed")
    parts = candles_to_frame(tagged, where).partition_by("symbol", as_dict=True, maintain_order=True)
    return [parts[(str(i),)] for i in range(len(windows))]


def _integral_epoch(column: pl.Series, where: str) -> pl.Series:
    """Epoch times written as floats (`1.9065e+12`, as pandas writes them after a resample) back to integers."""
    whole = column.is_finite() & (column == column.floor())
    if not whole.all():
        row = int((~whole).arg_true()[0])
        raise ValueError(f"{where}: open_time must hold whole epoch milliseconds (or microseconds); row {row + 2} "
                         f"has {column[row]!r}")
    return column.cast(pl.Int64)


def normalise_frame(frame: pl.DataFrame, where: str = "candles") -> pl.DataFrame:
    """Validate and bring a frame to (symbol, timestamps, open..amount), sorted; derive missing amounts.

    Errors (never silent fixes) on missing price columns, non-finite prices, duplicate or unsorted timestamps.
    Empty `amount` cells are derived as volume x mean(OHLC), the original's fallback; `derived_amounts` in
    `frame_summary` says how many.
    """
    missing = [c for c in ("timestamps", "open", "high", "low", "close") if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing columns {missing}; have {frame.columns}")
    if "symbol" not in frame.columns:
        frame = frame.with_columns(pl.lit("series").alias("symbol"))
    if frame["timestamps"].dtype.time_zone if isinstance(frame["timestamps"].dtype, pl.Datetime) else False:
        frame = frame.with_columns(pl.col("timestamps").dt.convert_time_zone("UTC").dt.replace_time_zone(None))
    if "volume" not in frame.columns:
        frame = frame.with_columns(pl.lit(0.0).alias("volume"))
    if "amount" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias("amount"))
    frame = frame.select(
        pl.col("symbol").cast(pl.String),
        pl.col("timestamps").cast(pl.Datetime("ms")),
        *[pl.col(c).cast(pl.Float64) for c in FEATURES],
    )
    fallback = pl.col("volume") * (pl.col("open") + pl.col("high") + pl.col("low") + pl.col("close")) / 4
    amount_missing = pl.col("amount").is_null() | pl.col("amount").is_nan()
    frame = frame.with_columns(
        amount_missing.alias("amount_derived"),
        pl.when(amount_missing).then(fallback).otherwise(pl.col("amount")).alias("amount"),
    )
    bad = frame.filter(pl.any_horizontal([~pl.col(c).is_finite() | pl.col(c).is_null() for c in FEATURES]))
    if len(bad):
        first = bad.row(0, named=True)
        raise ValueError(f"{where}: {len(bad)} rows with missing or non-finite values (first: {first['symbol']} at "
                         f"{first['timestamps']}); fix or drop them")
    duplicated = frame.filter(frame.select(["symbol", "timestamps"]).is_duplicated())
    if len(duplicated):
        first = duplicated.row(0, named=True)
        raise ValueError(f"{where}: {len(duplicated)} rows share a timestamp (first: {first['symbol']} at "
                         f"{first['timestamps']}); de-duplicate the data")
    unsorted = frame.group_by("symbol").agg(pl.col("timestamps").is_sorted().alias("ok")).filter(~pl.col("ok"))
    if len(unsorted):
        raise ValueError(f"{where}: timestamps of {unsorted['symbol'].to_list()} are not in ascending order; sort them")
    return frame


def infer_interval(frame: pl.DataFrame) -> np.timedelta64:
    """The grid step: the most common gap between consecutive candles of a symbol."""
    steps = frame.select(pl.col("timestamps").diff().over("symbol").alias("step")).drop_nulls()["step"]
    if steps.is_empty():
        raise ValueError("need at least two candles of one symbol to infer the interval")
    return np.timedelta64(steps.mode().sort()[0], "ms")


@dataclass
class WindowSpec:
    lookback: int
    predict: int
    clip: float = 5.0

    @property
    def length(self) -> int:
        return self.lookback + self.predict + 1


def calendar_features(times: np.ndarray) -> np.ndarray:
    """(T, 5) float32 minute, hour, weekday (Mon=0), day, month from datetime64 values."""
    series = pl.Series(times)
    return np.stack([series.dt.minute().to_numpy(), series.dt.hour().to_numpy(), series.dt.weekday().to_numpy() - 1,
                     series.dt.day().to_numpy(), series.dt.month().to_numpy()], axis=-1).astype(np.float32)


def normalise_window(raw: np.ndarray, lookback: int, clip: float) -> np.ndarray:
    """z-score with the look-back's statistics only (population std + 1e-5), then clip."""
    history = raw[:lookback]
    mean, std = history.mean(axis=0), history.std(axis=0)
    return np.clip((raw - mean) / (std + 1e-5), -clip, clip).astype(np.float32)


@dataclass
class Segment:
    """A run of consecutive on-grid candles of one symbol."""

    symbol: str
    times: np.ndarray  # datetime64[ms]
    values: np.ndarray  # (n, 6) float64
    stamps: np.ndarray  # (n, 5) float32


def segments(frame: pl.DataFrame, interval: np.timedelta64 | None = None) -> list[Segment]:
    """Split each symbol's candles wherever the step differs from the interval (gaps, off-grid rows)."""
    interval = interval if interval is not None else infer_interval(frame)
    result = []
    for (symbol,), group in frame.sort("symbol", "timestamps").group_by("symbol", maintain_order=True):
        times = group["timestamps"].to_numpy().astype("datetime64[ms]")
        values = group.select(FEATURES).to_numpy().astype(np.float64)
        breaks = np.flatnonzero(np.diff(times) != interval) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(times)], strict=True):
            result.append(Segment(symbol, times[start:stop], values[start:stop], calendar_features(times[start:stop])))
    return result


class WindowDataset(torch.utils.data.Dataset):
    """Windows (segment, start) whose every row lies in [begin, end); items are (x (W, 6), stamp (W, 5))."""

    def __init__(self, parts: list[Segment], spec: WindowSpec, begin: np.datetime64 | None = None,
                 end: np.datetime64 | None = None):
        self.parts, self.spec = parts, spec
        index = []
        for k, part in enumerate(parts):
            inside = np.ones(len(part.times), dtype=bool)
            if begin is not None:
                inside &= part.times >= begin
            if end is not None:
                inside &= part.times < end
            rows = np.flatnonzero(inside)
            if len(rows) >= spec.length:
                # rows inside the period are contiguous within a segment
                starts = np.arange(rows[0], rows[-1] - spec.length + 2)
                index.append(np.stack([np.full(len(starts), k), starts], axis=-1))
        self.index = np.concatenate(index) if index else np.zeros((0, 2), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, start = self.index[i]
        part, stop = self.parts[k], start + self.spec.length
        x = normalise_window(part.values[start:stop], self.spec.lookback, self.spec.clip)
        return torch.from_numpy(x), torch.from_numpy(part.stamps[start:stop])

    def time_range(self) -> tuple[np.datetime64, np.datetime64] | None:
        if not len(self):
            return None
        firsts = [self.parts[k].times[s] for k, s in self.index]
        lasts = [self.parts[k].times[s + self.spec.length - 1] for k, s in self.index]
        return min(firsts), max(lasts)


@dataclass
class Splits:
    train: WindowDataset
    val: WindowDataset
    test: WindowDataset
    boundaries: dict[str, str]


def split_by_time(frame: pl.DataFrame, spec: WindowSpec, train_ratio: float = 0.8, val_ratio: float = 0.1,
                  embargo: int | None = None, require_test: bool = False,
                  ends: tuple[np.datetime64, np.datetime64] | None = None) -> Splits:
    """Chronological train/val/test windows; `embargo` candles (default: the horizon) separate the periods.

    The ratios split the time axis of all candles; `ends` = (train end, validation end) gives the boundaries as
    times instead (the same dates for every symbol, e.g. to hold out a stated final period of several series
    that start at different times). An empty train or validation split (or test, when `require_test`) is an
    error that says how much more data is needed.
    """
    if not 0 < train_ratio < 1 or not 0 < val_ratio < 1 or train_ratio + val_ratio > 1:
        raise ValueError(f"need 0 < train_ratio, val_ratio and train_ratio + val_ratio <= 1; got {train_ratio}, "
                         f"{val_ratio}")
    interval = infer_interval(frame)
    embargo = spec.predict if embargo is None else embargo
    if embargo < spec.predict:
        raise ValueError(f"embargo ({embargo}) must be at least the horizon predict_window ({spec.predict})")
    parts = segments(frame, interval)
    first, last = frame["timestamps"].min(), frame["timestamps"].max()
    if ends is not None:
        train_end, val_end = (np.datetime64(end, "ms") for end in ends)
        if not train_end < val_end:
            raise ValueError(f"the training period must end before the validation period: {train_end} >= {val_end}")
    else:
        t0 = np.datetime64(first, "ms")
        span = np.datetime64(last, "ms") + interval - t0
        steps = span // interval  # boundaries on the candle grid
        train_end = t0 + interval * int(steps * train_ratio)
        val_end = t0 + interval * int(steps * (train_ratio + val_ratio))
    gap = interval * embargo
    splits = Splits(
        WindowDataset(parts, spec, None, train_end),
        WindowDataset(parts, spec, train_end + gap, val_end),
        WindowDataset(parts, spec, val_end + gap, None),
        {"train_end": str(train_end), "val_begin": str(train_end + gap), "val_end": str(val_end),
         "test_begin": str(val_end + gap), "interval": str(interval.astype("timedelta64[m]"))},
    )
    needed = {"train": splits.train, "val": splits.val} | ({"test": splits.test} if require_test else {})
    for name, dataset in needed.items():
        if not len(dataset) and ends is not None:
            period = {"train": f"before {train_end}", "val": f"from {train_end + gap} to {val_end}",
                      "test": f"from {val_end + gap}"}[name]
            raise ValueError(
                f"the {name} split has no complete window: a window needs {spec.length} consecutive candles "
                f"(lookback {spec.lookback} + predict {spec.predict} + 1) {period}; the data has {frame.height} "
                f"candles ({first} to {last}). Move the split dates or add history."
            )
        if not len(dataset):
            ratio = {"train": train_ratio, "val": val_ratio, "test": 1 - train_ratio - val_ratio}[name]
            rows = spec.length + (embargo if name != "train" else 0)
            total = int(np.ceil(rows / max(ratio, 1e-9)))
            after = f" after an embargo of {embargo}" if name != "train" else ""
            raise ValueError(
                f"the {name} split has no complete window: a window needs {spec.length} consecutive candles "
                f"(lookback {spec.lookback} + predict {spec.predict} + 1){after}; "
                f"with {name}_ratio {ratio:.2f} that takes about {total} gap-free candles in all, the data has "
                f"{frame.height} ({first} to {last}). Add more history or shorten the windows."
            )
    return splits
