"""Walk-forward calibration: every probabilistic model's forecasts run through the daemon's online calibrator.

The calibrator (`kronos_model.calibration.OnlineCalibrator`) is fed exactly as the daemon feeds it: forecasts
in origin order, and before each one the candles that had closed by its origin (`observe_candle`, oldest
first), so an origin is calibrated only on outcomes of earlier forecasts whose targets had closed before it.
A stretch of `burn_in` earlier origins is forecast and fed the same way but not scored (the daemon is warmed
from its ledger the same way), so the scored origins show the calibrated steady state.

A forecast's distribution is compared through its quantile grid (`QuantileGrid`, the calibrator's levels,
5 %...95 % by default): the raw grid is the sample paths' quantiles, the calibrated one what the calibrator
would publish. CRPS from a grid (`crps_from_quantiles`) leaves out the tails beyond the outermost cells, so
raw and calibrated CRPS are compared on the same grid formula, never grid against sample paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kronos_model.calibration import CalibrationConfig, OnlineCalibrator, RawForecast, crps_from_quantiles
from kronos_model.calibration.grid import central_intervals
from kronos_model.evaluation.metrics import pinball_loss

CALIBRATED_SUFFIX = "_calibrated"


@dataclass
class QuantileGrid:
    """Close-price quantiles per origin, level and step, with P(close > last close) per origin and step."""

    levels: tuple[float, ...]
    quantiles: np.ndarray  # (N, L, H) prices, non-decreasing along L
    prob_up: np.ndarray  # (N, H)
    step_calibrated: np.ndarray | None = None  # (N, H) bool for a calibrated grid: False where it published raw

    @classmethod
    def from_samples(cls, samples: np.ndarray, last_close: np.ndarray, levels: tuple[float, ...]) -> QuantileGrid:
        """samples (N, S, H): the quantiles and P(up) RawForecast.from_paths would give, for every origin."""
        quantiles = np.moveaxis(np.quantile(samples, levels, axis=1), 0, 1)
        return cls(tuple(levels), quantiles, (samples > last_close[:, None, None]).mean(axis=1))

    def level(self, tau: float) -> np.ndarray:
        """(N, H) prices at one level of the grid."""
        matches = [i for i, other in enumerate(self.levels) if abs(other - tau) < 1e-9]
        if not matches:
            raise ValueError(f"level {tau} is not on the grid {list(self.levels)}")
        return self.quantiles[:, matches[0]]

    @property
    def median(self) -> np.ndarray:
        return self.level(0.5)

    def band(self, nominal: float) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) (N, H) of the central `nominal` band, e.g. 0.8 -> the 10 % and 90 % quantiles."""
        for coverage, lower, upper in central_intervals(self.levels):
            if abs(coverage - nominal) < 1e-9:
                return self.quantiles[:, lower], self.quantiles[:, upper]
        raise ValueError(f"the grid {list(self.levels)} has no central {nominal} band")

    def bands(self) -> list[float]:
        return [coverage for coverage, _, _ in central_intervals(self.levels)]

    def crps(self, actual: np.ndarray) -> np.ndarray:
        """(N, H) CRPS of the grid (quantile decomposition, see kronos_model.calibration.grid)."""
        return crps_from_quantiles(self.levels, np.moveaxis(self.quantiles, 1, -1), actual)

    def pinball(self, actual: np.ndarray, levels: tuple[float, ...] | None = None) -> np.ndarray:
        """(N, H) mean pinball loss over `levels` (default: every level of the grid)."""
        chosen = self.levels if levels is None else levels
        return np.mean([pinball_loss(self.level(tau), actual, tau) for tau in chosen], axis=0)

    def brier(self, actual: np.ndarray, last_close: np.ndarray) -> np.ndarray:
        """(N, H) Brier score of P(up) against the realised close above the origin's close."""
        return (self.prob_up - (actual > last_close[:, None])) ** 2

    def share_below(self, actual: np.ndarray) -> np.ndarray:
        """(L,) share of outcomes at or below each level's quantile (ideal: the level itself)."""
        return (actual[:, None, :] <= self.quantiles).mean(axis=(0, 2))


@dataclass
class CalibrationRun:
    """One model's calibrated grid on the scored origins and how the calibrator got there."""

    grid: QuantileGrid
    burn_in_origins: int
    outcomes_before_first_scored: int  # outcomes the calibrator had registered when the first scored origin came
    counters: dict[str, int]


def calibrate_sequentially(config: CalibrationConfig, candle_times_ms: np.ndarray, candle_closes: np.ndarray,
                           origin_ms: np.ndarray, last_close: np.ndarray, samples: np.ndarray,
                           burn_in: int) -> CalibrationRun:
    """Calibrate every origin on the outcomes of the earlier ones, as the daemon would have.

    candle_times_ms / candle_closes: the series' candles (open times ascending), the outcomes' source;
    origin_ms (N,): burn-in origins first, then the scored ones, ascending; samples (N, S, H) close paths;
    burn_in: how many leading origins are burn-in. Returns the calibrated grid of the scored origins only.
    """
    if np.any(np.diff(origin_ms) <= 0):
        raise ValueError("origins must be strictly increasing")
    if not 0 <= burn_in < len(origin_ms):
        raise ValueError(f"burn_in must leave at least one scored origin, got {burn_in} of {len(origin_ms)}")
    calibrator = OnlineCalibrator(config)
    levels = config.levels
    published_quantiles, published_prob, published_calibrated = [], [], []
    fed = 0  # candles fed so far: every candle up to and including the current origin, never beyond it
    outcomes_at_first = 0
    for index, origin in enumerate(origin_ms.tolist()):
        stop = int(np.searchsorted(candle_times_ms, origin, side="right"))
        for time_ms, close in zip(candle_times_ms[fed:stop].tolist(), candle_closes[fed:stop].tolist(), strict=True):
            calibrator.observe_candle(int(time_ms), close)
        fed = max(fed, stop)
        if index == burn_in:
            outcomes_at_first = calibrator.counters["observed"]
        raw = RawForecast.from_paths(int(origin), float(last_close[index]), samples[index], levels)
        published = calibrator.calibrate(raw, track=True)
        if index >= burn_in:
            published_quantiles.append(published.quantiles)
            published_prob.append(published.prob_up)
            published_calibrated.append(published.step_calibrated)
    grid = QuantileGrid(tuple(levels), np.stack(published_quantiles), np.stack(published_prob),
                        np.stack(published_calibrated))
    return CalibrationRun(grid, burn_in, outcomes_at_first, dict(calibrator.counters))
