"""The forecasts a model has to beat, as sample arrays of the close: (origins, samples, horizon).

Point baselines have one sample (so their CRPS is their absolute error and their intervals have zero width);
the volatility band is a full distribution represented by evenly spaced quantiles.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

RANDOM_WALK = "random_walk"
DRIFT = "drift"
SEASONAL_NAIVE = "seasonal_naive"
VOL_BAND = "vol_band"
BASELINE_NAMES = (RANDOM_WALK, DRIFT, SEASONAL_NAIVE, VOL_BAND)

EWMA_DECAY = 0.94  # RiskMetrics' decay: recent returns dominate, half-life about 11 candles
# Quantile grid that stands in for samples: fine enough for CRPS and the 5 % / 95 % bounds, and odd so the
# middle level is exactly 0.5 (median = last close, so the band makes no direction call, like the random walk).
VOL_BAND_QUANTILES = 201


def random_walk(history_close: np.ndarray, horizon: int) -> np.ndarray:
    """Every future close equals the last close: the forecast most public Kronos evaluations lose to."""
    last = history_close[:, -1]
    return np.repeat(last[:, None, None], horizon, axis=2)


def drift(history_close: np.ndarray, horizon: int) -> np.ndarray:
    """The last close grown at the look-back's mean log return per candle (Hyndman's drift, in log space)."""
    log_close = np.log(history_close)
    per_step = (log_close[:, -1] - log_close[:, 0]) / (history_close.shape[1] - 1)
    steps = np.arange(1, horizon + 1)
    return (history_close[:, -1:] * np.exp(per_step[:, None] * steps))[:, None, :]


def seasonal_naive(history_close: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """The close one season earlier (24 h for intraday data), repeated for horizons beyond one season."""
    if season < 1 or season > history_close.shape[1]:
        raise ValueError(f"seasonal naive needs a season between 1 and the history length "
                         f"({history_close.shape[1]} candles), got {season}")
    steps = np.arange(1, horizon + 1)
    seasons_back = np.ceil(steps / season).astype(int)
    index = -1 - (season * seasons_back - steps)
    return history_close[:, index][:, None, :]


def ewma_volatility(history_close: np.ndarray, decay: float = EWMA_DECAY) -> np.ndarray:
    """Per-origin EWMA standard deviation of one-candle log returns, seeded with the look-back's variance."""
    returns = np.diff(np.log(history_close), axis=1)
    variance = returns.var(axis=1)
    for column in range(returns.shape[1]):
        variance = decay * variance + (1 - decay) * returns[:, column] ** 2
    return np.sqrt(variance)


def vol_band(history_close: np.ndarray, horizon: int, quantiles: int = VOL_BAND_QUANTILES,
             decay: float = EWMA_DECAY) -> np.ndarray:
    """Log-normal band around the last close (no drift) with sigma_h = EWMA volatility * sqrt(h).

    Returned as `quantiles` evenly spaced quantiles ((i + 0.5) / n), which behave like a perfectly stratified
    sample of the distribution.
    """
    sigma = ewma_volatility(history_close, decay)
    levels = (np.arange(quantiles) + 0.5) / quantiles
    z = stats.norm.ppf(levels)
    spread = sigma[:, None, None] * np.sqrt(np.arange(1, horizon + 1))[None, None, :] * z[None, :, None]
    return history_close[:, -1, None, None] * np.exp(spread)


def all_baselines(history_close: np.ndarray, horizon: int, season: int) -> dict[str, np.ndarray]:
    """Every baseline on the same look-back closes (origins, candles)."""
    history_close = np.asarray(history_close, dtype=np.float64)
    if history_close.ndim != 2 or history_close.shape[1] < 2:
        raise ValueError("baselines need a look-back of at least two closes per origin")
    if (history_close <= 0).any():
        raise ValueError("baselines work on log prices and need strictly positive closes")
    return {
        RANDOM_WALK: random_walk(history_close, horizon),
        DRIFT: drift(history_close, horizon),
        SEASONAL_NAIVE: seasonal_naive(history_close, horizon, season),
        VOL_BAND: vol_band(history_close, horizon),
    }
