"""KronosPredictor: the original forecasting API (predict / predict_batch) plus `forecast` with sample paths.

Pre-processing is the original's: features open, high, low, close, volume, amount as float32; a missing
volume is 0, a missing amount is volume x mean(OHLC) (0 without volume); each series is z-scored over its
whole look-back (population std + 1e-5) and clipped to +-clip; outputs are de-normalised with the same
statistics. Calendar stamps are minute, hour, weekday (Mon=0), day, month of the given timestamps.

Fixed relative to the original: inference always runs in eval mode (the original could run with dropout
on), top_k and top_p combine, T=0 means greedy, a `seed` makes sampling reproducible, timestamps may be a
Series, DatetimeIndex, list or polars Series, frames may be pandas or polars, and bad input gets a clear
error (NaN, missing columns, length mismatches, pred_len > max_context).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from kronos_model.cpu_memory import reuse_freed_memory
from kronos_model.generation import generate
from kronos_model.model import Kronos, KronosTokenizer, check_pair

PRICE_COLUMNS = ("open", "high", "low", "close")
FEATURE_COLUMNS = (*PRICE_COLUMNS, "volume", "amount")
DEFAULT_QUANTILES = (0.1, 0.5, 0.9)
CLOSE = FEATURE_COLUMNS.index("close")  # the column forecasts are scored on


def auto_device() -> str:
    if torch.cuda.is_available():
        return "cuda:0"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _is_polars(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "polars"


def to_datetime_index(timestamps: Any, name: str) -> pd.DatetimeIndex:
    """Accept a pandas Series/DatetimeIndex, a polars Series, numpy datetimes or a list of timestamps."""
    if _is_polars(timestamps):
        timestamps = timestamps.to_pandas()
    try:
        index = pd.DatetimeIndex(pd.to_datetime(timestamps))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must hold timestamps: {exc}") from exc
    if index.hasnans:
        raise ValueError(f"{name} contains missing timestamps (NaT)")
    return index


def calendar_stamps(index: pd.DatetimeIndex) -> np.ndarray:
    """(T, 5) float32: minute, hour, weekday (Mon=0), day of month, month."""
    return np.stack(
        [index.minute, index.hour, index.day_of_week, index.day, index.month], axis=-1
    ).astype(np.float32)


def candle_features(df: Any) -> np.ndarray:
    """(T, 6) float64 features from a pandas or polars frame; raises on missing columns or non-finite cells."""
    columns = list(df.columns)
    missing = [c for c in PRICE_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"the candle frame lacks columns {missing}; it needs {list(PRICE_COLUMNS)} "
                         f"(volume and amount are optional), got {columns}")

    def column(name: str) -> np.ndarray:
        try:
            if _is_polars(df):
                return np.asarray(df[name].to_numpy(), dtype=np.float64)
            return df[name].to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"column {name!r} is not numeric: {exc}") from exc

    prices = np.stack([column(c) for c in PRICE_COLUMNS], axis=-1)
    volume = column("volume") if "volume" in columns else np.zeros(len(prices))
    amount = column("amount") if "amount" in columns else volume * prices.mean(axis=-1)
    features = np.column_stack([prices, volume, amount])
    bad = ~np.isfinite(features)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise ValueError(
            f"{bad.sum()} missing or non-finite values in the candle frame (first at row {rows[0]}, column "
            f"{FEATURE_COLUMNS[cols[0]]!r}); fill or drop those rows before forecasting"
        )
    return features


@dataclass
class Forecast:
    """Every de-normalised sample path of one forecast, with summaries.

    paths: (S, P, 6) in the units of the input, columns FEATURE_COLUMNS; timestamps: the P forecast times.
    """

    timestamps: pd.DatetimeIndex
    paths: np.ndarray
    last_close: float
    columns: tuple[str, ...] = FEATURE_COLUMNS
    quantile_levels: tuple[float, ...] = DEFAULT_QUANTILES
    quantiles: dict[float, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.quantiles = {q: np.quantile(self.paths, q, axis=0) for q in self.quantile_levels}

    @property
    def mean(self) -> np.ndarray:
        """(P, 6): the mean path, which is what `predict` returns."""
        return self.paths.mean(axis=0)

    @property
    def close_paths(self) -> np.ndarray:
        """(S, P): every sample path's close."""
        return self.paths[:, :, self.columns.index("close")]

    @property
    def prob_up(self) -> np.ndarray:
        """(P,): share of paths whose close at each step is above the last observed close."""
        return (self.close_paths > self.last_close).mean(axis=0)

    def close_quantile(self, level: float) -> np.ndarray:
        """(P,): the `level` quantile of the close at each step."""
        if level in self.quantiles:
            return self.quantiles[level][:, self.columns.index("close")]
        return np.quantile(self.close_paths, level, axis=0)

    def mean_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.mean, columns=list(self.columns), index=self.timestamps.rename("timestamps"))

    def to_frame(self) -> pd.DataFrame:
        """One row per step: mean and every quantile per column, and prob_up."""
        data: dict[str, np.ndarray] = {}
        for j, column in enumerate(self.columns):
            data[f"{column}_mean"] = self.mean[:, j]
            for q in self.quantile_levels:
                data[f"{column}_p{round(q * 100):02d}"] = self.quantiles[q][:, j]
        data["prob_up"] = self.prob_up
        return pd.DataFrame(data, index=self.timestamps.rename("timestamps"))


@dataclass
class _Prepared:
    """One series ready for generation: normalised look-back, its statistics and calendar stamps."""

    normed: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    x_stamp: np.ndarray
    y_stamp: np.ndarray
    y_index: pd.DatetimeIndex
    last_close: float


@torch.inference_mode()
def reconstruction_offset(tokenizer: KronosTokenizer, normed: torch.Tensor, max_context: int,
                          pred_len: int) -> np.ndarray:
    """(B, d_in) observed minus reconstructed last look-back candle, in normalised units.

    The model forecasts tokens and the tokenizer decodes them, so a generated path continues from the
    tokenizer's reconstruction of the look-back, not from the candles themselves; the reconstruction of the
    last candle is computed over the same window `generation.decode_forecast` decodes (the decoder is causal,
    so the generated tokens after it do not change it).
    """
    lookback = normed.shape[1]
    window = min(lookback + pred_len, max_context) - pred_len
    s1, s2 = tokenizer.encode(normed, half=True)
    if window < 1:  # the decode window holds no look-back: nothing to anchor to
        return np.zeros((normed.shape[0], normed.shape[2]), dtype=np.float32)
    reconstructed = tokenizer.decode([s1[:, -window:], s2[:, -window:]], half=True)[:, -1]
    return (normed[:, -1] - reconstructed).float().cpu().numpy()


class KronosPredictor:
    def __init__(
        self,
        model: Kronos,
        tokenizer: KronosTokenizer,
        device: str | torch.device | None = None,
        max_context: int = 512,
        clip: float = 5,
    ):
        check_pair(tokenizer, model)
        if max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {max_context}")
        self.device = torch.device(device or auto_device())
        if self.device.type == "cpu":
            reuse_freed_memory()  # batched generations re-allocate large buffers every step (see cpu_memory)
        self.tokenizer = tokenizer.to(self.device).eval()
        self.model = model.to(self.device).eval()
        self.max_context = max_context
        self.clip = clip

    # -- the engine ---------------------------------------------------------------------------------------

    def _prepare(self, df, x_timestamp, y_timestamp, pred_len: int, where: str) -> _Prepared:
        if not isinstance(pred_len, int | np.integer) or not 1 <= pred_len <= self.max_context:
            raise ValueError(f"pred_len must be an integer between 1 and max_context ({self.max_context}), "
                             f"got {pred_len!r}; forecast longer horizons in several calls")
        features = candle_features(df)
        if len(features) == 0:
            raise ValueError(f"{where}the candle frame is empty")
        # float32 and column-major like the original's `df.values.astype(np.float32)`, so the statistics
        # are summed in the same order and the normalised input is bit-identical.
        x = np.asfortranarray(features, dtype=np.float32)
        x_index = to_datetime_index(x_timestamp, f"{where}x_timestamp")
        y_index = to_datetime_index(y_timestamp, f"{where}y_timestamp")
        if len(x_index) != len(features):
            raise ValueError(f"{where}x_timestamp has {len(x_index)} entries but the frame has {len(features)} rows")
        if len(y_index) != pred_len:
            raise ValueError(f"{where}y_timestamp has {len(y_index)} entries but pred_len is {pred_len}")
        mean, std = x.mean(axis=0), x.std(axis=0)
        normed = np.clip((x - mean) / (std + 1e-5), -self.clip, self.clip)
        return _Prepared(normed, mean, std, calendar_stamps(x_index), calendar_stamps(y_index), y_index,
                         float(features[-1, CLOSE]))

    def forecast_batch(
        self,
        df_list: Sequence[Any],
        x_timestamp_list: Sequence[Any],
        y_timestamp_list: Sequence[Any],
        pred_len: int,
        T: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.9,
        sample_count: int = 30,
        seed: int | Sequence[int] | None = None,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        verbose: bool = False,
        anchor: bool = False,
    ) -> list[Forecast]:
        """Forecast several series in batched generations, each exactly as `forecast` would alone.

        Every series keeps its own normalisation and look-back and, when seeded, its own random stream: `seed`
        is one seed for every series or one per series, and a series' paths are the ones `forecast` samples for
        it with that seed, whatever else is in the batch. Series of different look-back lengths are grouped by
        length, one generation per length (no padding, so nothing needs masking).

        anchor: shift every path's prices by the tokenizer's reconstruction error of the last look-back candle
        (see `reconstruction_offset`), so the paths start from the observed candle rather than from the
        tokenizer's version of it."""
        count = len(df_list)
        if not (count == len(x_timestamp_list) == len(y_timestamp_list)) or not count:
            raise ValueError("df_list, x_timestamp_list and y_timestamp_list must be non-empty and equally long")
        if sample_count < 1:
            raise ValueError(f"sample_count must be >= 1, got {sample_count}")
        if T < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need T >= 0, 0 < top_p <= 1 and top_k >= 0; got T={T}, top_p={top_p}, top_k={top_k}")
        if any(not 0 <= q <= 1 for q in quantiles):
            raise ValueError(f"quantiles must lie in [0, 1], got {list(quantiles)}")
        seeds = self._series_seeds(seed, count)
        prepared = []
        for i, (df, xt, yt) in enumerate(zip(df_list, x_timestamp_list, y_timestamp_list, strict=True)):
            prepared.append(self._prepare(df, xt, yt, pred_len, f"series {i}: " if count > 1 else ""))
        by_length: dict[int, list[int]] = {}
        for i, series in enumerate(prepared):
            by_length.setdefault(len(series.normed), []).append(i)

        self.model.eval()
        self.tokenizer.eval()
        results: list[Forecast | None] = [None] * count
        for members in by_length.values():
            group = [prepared[i] for i in members]
            generators = None if seeds is None else [
                torch.Generator(device=self.device).manual_seed(seeds[i]) for i in members]
            values = self._generate(group, pred_len, T, top_k, top_p, sample_count, generators, verbose, anchor)
            for i, series, paths in zip(members, group, values, strict=True):
                denormalised = (paths * (series.std + 1e-5) + series.mean).astype(np.float64)
                results[i] = Forecast(series.y_index, denormalised, series.last_close, quantile_levels=tuple(quantiles))
        return [r for r in results if r is not None]

    @staticmethod
    def _series_seeds(seed: int | Sequence[int] | None, count: int) -> list[int] | None:
        if seed is None:
            return None
        if isinstance(seed, int | np.integer):
            return [int(seed)] * count
        seeds = list(seed)
        if len(seeds) != count or not all(isinstance(s, int | np.integer) for s in seeds):
            raise ValueError(f"seed must be an integer or {count} integers (one per series), got {seed!r:.80}")
        return [int(s) for s in seeds]

    def _generate(self, group: list[_Prepared], pred_len: int, T: float, top_k: int, top_p: float,
                  sample_count: int, generators: list[torch.Generator] | None, verbose: bool,
                  anchor: bool = False) -> np.ndarray:
        """One batched generation of series with the same look-back length: normalised paths (B, S, P, 6),
        anchored to each series' last candle when `anchor`."""
        dtype = next(self.tokenizer.parameters()).dtype  # follow a model cast to bf16/fp16

        def batch(part: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([getattr(p, part) for p in group])).to(self.device, dtype)

        generated = generate(self.tokenizer, self.model, batch("normed"), batch("x_stamp"), batch("y_stamp"),
                             self.max_context, pred_len, sample_count, T, top_k, top_p, generator=generators,
                             verbose=verbose)
        values = generated.values.float().cpu().numpy()  # (B, S, P, 6)
        if anchor and generated.last_reconstruction is not None:
            # reconstruction_offset, from the decode generate already ran (no second encode + decode)
            offset = (batch("normed")[:, -1] - generated.last_reconstruction).float().cpu().numpy()
            values[..., : len(PRICE_COLUMNS)] += offset[:, None, None, : len(PRICE_COLUMNS)]
        return values

    def forecast(self, df, x_timestamp, y_timestamp, pred_len: int, T: float = 1.0, top_k: int = 0,
                 top_p: float = 0.9, sample_count: int = 30, seed: int | None = None,
                 quantiles: Sequence[float] = DEFAULT_QUANTILES, verbose: bool = False,
                 anchor: bool = False) -> Forecast:
        """All sample paths of one series, with quantiles and P(close > last close) per step (anchor: see
        forecast_batch)."""
        return self.forecast_batch([df], [x_timestamp], [y_timestamp], pred_len, T, top_k, top_p, sample_count,
                                   seed, quantiles, verbose, anchor)[0]

    # -- the original API ---------------------------------------------------------------------------------

    @staticmethod
    def _as_frame(forecast: Forecast, like: Any):
        frame = forecast.mean_frame()
        if _is_polars(like):
            import polars as pl

            return pl.from_pandas(frame.reset_index())
        return frame

    def predict(self, df, x_timestamp, y_timestamp, pred_len: int, T: float = 1.0, top_k: int = 0,
                top_p: float = 0.9, sample_count: int = 1, verbose: bool = False, seed: int | None = None):
        """Mean forecast path as a frame indexed by y_timestamp (pandas in, pandas out; polars in, polars out)."""
        result = self.forecast(df, x_timestamp, y_timestamp, pred_len, T, top_k, top_p, sample_count, seed,
                               verbose=verbose)
        return self._as_frame(result, df)

    def predict_batch(self, df_list, x_timestamp_list, y_timestamp_list, pred_len: int, T: float = 1.0,
                      top_k: int = 0, top_p: float = 0.9, sample_count: int = 1, verbose: bool = False,
                      seed: int | None = None) -> list:
        results = self.forecast_batch(df_list, x_timestamp_list, y_timestamp_list, pred_len, T, top_k, top_p,
                                      sample_count, seed, verbose=verbose)
        return [self._as_frame(r, df) for r, df in zip(results, df_list, strict=True)]
