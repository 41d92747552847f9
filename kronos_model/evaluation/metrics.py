"""Forecast scores: point errors, probabilistic scores from sample paths, calibration and significance.

Every function takes numpy arrays and returns numbers or arrays; nothing here knows about models or files.
Sample arrays put the samples on the last axis: `samples[..., S]` against `observed[...]`. A point forecast
is a sample array with S = 1, so the same code scores point and probabilistic forecasts (and the CRPS of a
point forecast is its absolute error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

NOMINAL_COVERAGES = (0.5, 0.8, 0.9)
QUANTILE_LEVELS = tuple(round(0.1 * k, 1) for k in range(1, 10))


# -- probabilistic scores -------------------------------------------------------------------------------------

def crps_from_samples(samples: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """CRPS of the empirical distribution of the samples: E|X - y| - E|X - X'| / 2.

    Uses the sorted-sample identity E|X - X'| = 2 / S^2 * sum_i (2i - S - 1) x_(i), so it costs
    O(S log S) instead of O(S^2). With S = 1 it is exactly the absolute error.
    """
    samples = np.asarray(samples, dtype=np.float64)
    observed = np.asarray(observed, dtype=np.float64)
    count = samples.shape[-1]
    spread_to_observation = np.abs(samples - observed[..., None]).mean(axis=-1)
    ordered = np.sort(samples, axis=-1)
    weights = 2 * np.arange(1, count + 1) - count - 1
    mean_pair_distance = 2.0 / count**2 * (ordered * weights).sum(axis=-1)
    return spread_to_observation - 0.5 * mean_pair_distance


def pinball_loss(predicted_quantile: np.ndarray, observed: np.ndarray, level: float) -> np.ndarray:
    """Quantile (pinball) loss of one predicted quantile: level * (y - q) above, (1 - level) * (q - y) below."""
    error = np.asarray(observed, dtype=np.float64) - np.asarray(predicted_quantile, dtype=np.float64)
    return np.maximum(level * error, (level - 1) * error)


def quantile_loss(samples: np.ndarray, observed: np.ndarray,
                  levels: tuple[float, ...] = QUANTILE_LEVELS) -> np.ndarray:
    """Mean pinball loss over the given quantile levels of the samples (2x this approximates the CRPS)."""
    quantiles = np.quantile(samples, levels, axis=-1)
    return np.mean([pinball_loss(q, observed, level) for q, level in zip(quantiles, levels, strict=True)], axis=0)


def central_interval(samples: np.ndarray, nominal: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bound of the central `nominal` interval of the samples (e.g. 0.9 -> 5 % and 95 %)."""
    lower, upper = np.quantile(samples, [(1 - nominal) / 2, (1 + nominal) / 2], axis=-1)
    return lower, upper


def interval_hits(samples: np.ndarray, observed: np.ndarray, nominal: float) -> tuple[np.ndarray, np.ndarray]:
    """(covered: bool array, width: float array) of the central `nominal` interval."""
    lower, upper = central_interval(samples, nominal)
    observed = np.asarray(observed, dtype=np.float64)
    return (observed >= lower) & (observed <= upper), upper - lower


def probability_integral_transform(samples: np.ndarray, observed: np.ndarray,
                                   rng: np.random.Generator | None = None) -> np.ndarray:
    """Randomised PIT of an ensemble: (#samples below y + U * (#ties + 1)) / (S + 1).

    Uniform on [0, 1] when the observation is exchangeable with the samples (a calibrated forecast); the
    randomisation spreads ties (a point forecast, or discrete values) instead of piling them on one edge.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    samples = np.asarray(samples, dtype=np.float64)
    observed = np.asarray(observed, dtype=np.float64)[..., None]
    below = (samples < observed).sum(axis=-1)
    ties = (samples == observed).sum(axis=-1)
    return (below + rng.uniform(size=below.shape) * (ties + 1)) / (samples.shape[-1] + 1)


def pit_histogram(pit: np.ndarray, bins: int = 10) -> list[float]:
    """Share of PIT values per equal-width bin (a flat 1 / bins everywhere means calibrated)."""
    counts, _ = np.histogram(np.ravel(pit), bins=bins, range=(0.0, 1.0))
    return (counts / max(counts.sum(), 1)).tolist()


def pit_ks_statistic(pit: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance of the PIT values from the uniform distribution (0 = perfectly calibrated)."""
    values = np.ravel(pit)
    if not len(values):
        return float("nan")
    return float(stats.kstest(values, "uniform").statistic)


# -- point scores ---------------------------------------------------------------------------------------------

def absolute_percentage_error(point: np.ndarray, observed: np.ndarray) -> np.ndarray:
    observed = np.asarray(observed, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 100.0 * np.abs(np.asarray(point) - observed) / np.abs(observed)


def naive_scale(history_close: np.ndarray) -> np.ndarray:
    """MASE denominator per origin: the in-sample mean absolute one-step change of the look-back closes."""
    history_close = np.asarray(history_close, dtype=np.float64)
    return np.abs(np.diff(history_close, axis=-1)).mean(axis=-1)


# -- direction ------------------------------------------------------------------------------------------------

def direction_hits(point: np.ndarray, observed: np.ndarray, last_close: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(called, correct): whether the forecast calls a direction (moves away from the last close) and, where it
    does and the market moved, whether the sign matches. A forecast of "no change" makes no call."""
    predicted = np.sign(np.asarray(point) - last_close)
    realised = np.sign(np.asarray(observed) - last_close)
    called = (predicted != 0) & (realised != 0)
    return called, called & (predicted == realised)


def wilson_interval(successes: float, trials: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; `trials` may be an effective (non-integer) count."""
    if trials <= 0:
        return float("nan"), float("nan")
    z = stats.norm.ppf(0.5 + confidence / 2)
    share = successes / trials
    denominator = 1 + z**2 / trials
    centre = (share + z**2 / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(share * (1 - share) / trials + z**2 / (4 * trials**2))
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_pvalue(successes: int, trials: int) -> float:
    """Two-sided exact binomial test of the hit rate against a coin flip."""
    if trials <= 0:
        return float("nan")
    return float(stats.binomtest(int(successes), int(trials), 0.5).pvalue)


# -- information coefficient ------------------------------------------------------------------------------------

def information_coefficients(predicted_return: np.ndarray, realised_return: np.ndarray) -> tuple[float, float]:
    """(Pearson IC, Spearman rank IC) across origins; NaN when either side is constant (e.g. the random walk)."""
    predicted_return = np.asarray(predicted_return, dtype=np.float64)
    realised_return = np.asarray(realised_return, dtype=np.float64)
    if len(predicted_return) < 3 or np.ptp(predicted_return) == 0 or np.ptp(realised_return) == 0:
        return float("nan"), float("nan")
    pearson = float(np.corrcoef(predicted_return, realised_return)[0, 1])
    spearman = float(stats.spearmanr(predicted_return, realised_return).statistic)
    return pearson, spearman


# -- significance ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DieboldMarianoResult:
    statistic: float  # < 0: the first forecast has the smaller loss
    pvalue: float  # two-sided, Student t with n - 1 degrees of freedom (Harvey-Leybourne-Newbold)
    mean_difference: float  # mean of loss_a - loss_b
    observations: int

    def to_dict(self) -> dict[str, float | int]:
        return {"statistic": self.statistic, "pvalue": self.pvalue, "mean_difference": self.mean_difference,
                "observations": self.observations}


def diebold_mariano(loss_a: np.ndarray, loss_b: np.ndarray, horizon: int = 1) -> DieboldMarianoResult:
    """Diebold-Mariano test of equal expected loss with the Harvey-Leybourne-Newbold small-sample correction.

    `horizon` is how many consecutive loss differentials may be correlated (h-step forecasts issued every step
    overlap by h - 1): the long-run variance uses autocovariances up to lag horizon - 1 (rectangular kernel,
    falling back to lag 0 if that is not positive). Scoring non-overlapping origins needs horizon = 1.
    """
    difference = np.asarray(loss_a, dtype=np.float64) - np.asarray(loss_b, dtype=np.float64)
    difference = difference[np.isfinite(difference)]
    count = len(difference)
    if count < 3:
        return DieboldMarianoResult(float("nan"), float("nan"), float("nan"), count)
    mean = float(difference.mean())
    centred = difference - mean
    lags = max(0, min(horizon - 1, count - 1))
    autocovariances = [float(centred[k:] @ centred[: count - k]) / count for k in range(lags + 1)]
    long_run = autocovariances[0] + 2 * sum(autocovariances[1:])
    if long_run <= 0:
        long_run = autocovariances[0]
    if long_run <= 0:  # identical losses everywhere: no evidence either way
        return DieboldMarianoResult(0.0, 1.0, mean, count)
    h = lags + 1
    correction = math.sqrt(max(count + 1 - 2 * h + h * (h - 1) / count, 1e-12) / count)
    statistic = correction * mean / math.sqrt(long_run / count)
    pvalue = float(2 * stats.t.sf(abs(statistic), df=count - 1))
    return DieboldMarianoResult(float(statistic), pvalue, mean, count)
