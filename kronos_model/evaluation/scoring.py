"""Score every model's walk-forward forecasts on the same origins, against the random walk and the vol band.

The point forecast of a sample forecast is the per-step median of its sample closes (the median minimises
absolute error, and it is what the daemon publishes as p50). Losses are compared per origin (the mean over
the horizon), so the Diebold-Mariano test sees one differential per origin; origins that overlap (stride <
horizon) are handled with ceil(horizon / stride) lags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kronos_model.calibration import DEFAULT_LEVELS
from kronos_model.evaluation import metrics
from kronos_model.evaluation.backtest import BacktestResult, buy_and_hold, long_flat_backtest
from kronos_model.evaluation.baselines import RANDOM_WALK, VOL_BAND, ewma_volatility
from kronos_model.evaluation.calibrated import CALIBRATED_SUFFIX, QuantileGrid

SIGNIFICANCE = 0.05
YEAR = np.timedelta64(365 * 24 * 3600 + 6 * 3600, "s")  # crypto trades every day; 365.25 days


@dataclass
class WalkForward:
    """Everything the scores and plots need: the origins, what happened after them, and every forecast."""

    symbol: str
    interval: np.timedelta64
    origin_times: np.ndarray  # (N,) datetime64[ms]: open time of the last look-back candle
    target_times: np.ndarray  # (N, H)
    history_close: np.ndarray  # (N, C) closes up to and including the origin candle
    actual: np.ndarray  # (N, H) realised closes
    stride: int
    forecasts: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N, S, H) sample closes
    # name -> quantile grid: the raw grid of a probabilistic model and `<name>_calibrated` (grid only), see calibrated
    grids: dict[str, QuantileGrid] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None  # config, burn-in and per-model runs of a --calibrate walk-forward

    @property
    def last_close(self) -> np.ndarray:
        return self.history_close[:, -1]

    @property
    def horizon(self) -> int:
        return self.actual.shape[1]

    @property
    def holding_steps(self) -> int:
        """Candles each backtest position is held: until the next origin, at most the horizon."""
        return min(self.stride, self.horizon)

    def point(self, name: str) -> np.ndarray:
        if name not in self.forecasts:
            return self.grids[name].median
        return np.median(self.forecasts[name], axis=1)

    def grid(self, name: str) -> QuantileGrid | None:
        """The quantile grid of a probabilistic model (made from its samples on the calibrator's levels and
        kept), or None for a point forecast."""
        if name not in self.grids:
            if self.forecasts[name].shape[1] < 2:
                return None
            self.grids[name] = QuantileGrid.from_samples(self.forecasts[name], self.last_close, DEFAULT_LEVELS)
        return self.grids[name]

    @property
    def names(self) -> list[str]:
        """Every forecast: sampled ones, then grid-only (calibrated) ones."""
        return [*self.forecasts, *(name for name in self.grids if name not in self.forecasts)]


def format_time(value: np.datetime64) -> str:
    """Minutes precision, ISO 8601 (times are UTC)."""
    return str(np.datetime64(value, "m"))


def format_interval(interval: np.timedelta64) -> str:
    """Binance-style interval names: 1m, 15m, 1h, 4h, 1d, 1w."""
    minutes = int(interval / np.timedelta64(1, "m"))
    for unit, size in (("w", 7 * 24 * 60), ("d", 24 * 60), ("h", 60)):
        if minutes % size == 0:
            return f"{minutes // size}{unit}"
    return f"{minutes}m"


def _lags(steps: int, stride: int) -> int:
    return max(1, math.ceil(steps / stride))


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _direction(walk: WalkForward, point: np.ndarray) -> dict[str, Any]:
    called, correct = metrics.direction_hits(point, walk.actual, walk.last_close[:, None])
    calls = int(called.sum())
    share = correct.sum() / calls if calls else float("nan")
    # Steps of one origin move together, so the pooled interval uses one observation per calling origin.
    independent = int(called.any(axis=1).sum())
    low, high = metrics.wilson_interval(share * independent, independent) if calls else (math.nan, math.nan)
    per_step_calls = called.sum(axis=0)
    per_step_correct = correct.sum(axis=0)
    per_step = np.where(per_step_calls > 0, per_step_correct / np.maximum(per_step_calls, 1), np.nan)
    return {
        "direction_accuracy": share,
        "direction_ci": [low, high],
        "direction_calls": calls,
        "direction_pvalue_last_step": metrics.binomial_pvalue(int(per_step_correct[-1]), int(per_step_calls[-1])),
        "per_step_direction": per_step,
    }


def _information(walk: WalkForward, point: np.ndarray) -> tuple[list[float], list[float]]:
    predicted = point / walk.last_close[:, None] - 1
    realised = walk.actual / walk.last_close[:, None] - 1
    pairs = [metrics.information_coefficients(predicted[:, h], realised[:, h]) for h in range(walk.horizon)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _dm(loss: np.ndarray, reference: np.ndarray, lags: int) -> metrics.DieboldMarianoResult:
    return metrics.diebold_mariano(loss.mean(axis=1), reference.mean(axis=1), horizon=lags)


def backtest(walk: WalkForward, name: str, fee: float) -> BacktestResult:
    hold = walk.holding_steps
    period_return = walk.actual[:, hold - 1] / walk.last_close - 1
    go_long = walk.point(name)[:, hold - 1] > walk.last_close
    return long_flat_backtest(go_long, period_return, _periods_per_year(walk), fee)


def buy_and_hold_backtest(walk: WalkForward, fee: float) -> BacktestResult:
    period_return = walk.actual[:, walk.holding_steps - 1] / walk.last_close - 1
    return buy_and_hold(period_return, _periods_per_year(walk), fee)


def _periods_per_year(walk: WalkForward) -> float:
    return float(YEAR / (walk.interval * walk.holding_steps))


def _distribution(walk: WalkForward, name: str) -> dict[str, Any]:
    """CRPS (with the random walk's and the vol band's on the same footing), interval hits and widths, PIT and
    quantile loss: from the sample paths, or from the quantile grid for a grid-only (calibrated) forecast."""
    actual = walk.actual
    if name in walk.forecasts:
        samples = np.swapaxes(walk.forecasts[name], 1, 2)  # (N, H, S): samples last, as metrics expects
        intervals = {n: metrics.interval_hits(samples, actual, n) for n in metrics.NOMINAL_COVERAGES}
        return {
            "samples": samples.shape[-1], "crps": metrics.crps_from_samples(samples, actual),
            # the random walk's CRPS is its absolute error
            "random_walk_crps": np.abs(walk.point(RANDOM_WALK) - actual),
            "band_crps": metrics.crps_from_samples(np.swapaxes(walk.forecasts[VOL_BAND], 1, 2), actual),
            "coverage": {n: hits for n, (hits, _) in intervals.items()},
            "width": {n: spread for n, (_, spread) in intervals.items()},
            "pit": metrics.probability_integral_transform(samples, actual) if samples.shape[-1] > 1 else None,
            "quantile_loss": metrics.quantile_loss(samples, actual),
        }
    grid = walk.grids[name]
    bands = {n: grid.band(n) for n in metrics.NOMINAL_COVERAGES}
    reference = walk.grid(RANDOM_WALK) or QuantileGrid.from_samples(walk.forecasts[RANDOM_WALK].repeat(2, axis=1),
                                                                    walk.last_close, grid.levels)
    raw_name = name.removesuffix(CALIBRATED_SUFFIX)
    return {
        "samples": walk.forecasts[raw_name].shape[1] if raw_name in walk.forecasts else len(grid.levels),
        # every CRPS on the same grid formula: grid against grid, never grid against sample paths
        "crps": grid.crps(actual), "random_walk_crps": reference.crps(actual),
        "band_crps": walk.grid(VOL_BAND).crps(actual),
        "coverage": {n: (low <= actual) & (actual <= high) for n, (low, high) in bands.items()},
        "width": {n: high - low for n, (low, high) in bands.items()},
        "pit": None, "quantile_loss": grid.pinball(actual, metrics.QUANTILE_LEVELS),
    }


def _grid_scores(walk: WalkForward, name: str) -> dict[str, Any]:
    """CRPS of the quantile grid, mean pinball loss over its levels and the Brier score of P(up), overall and
    per step; empty for a point forecast."""
    grid = walk.grid(name)
    if grid is None:
        return {"crps_grid": None, "pinball_loss": None, "brier_prob_up": None}
    crps, pinball = grid.crps(walk.actual), grid.pinball(walk.actual)
    brier = grid.brier(walk.actual, walk.last_close)
    return {"crps_grid": float(crps.mean()), "pinball_loss": float(pinball.mean()),
            "brier_prob_up": float(brier.mean()),
            "per_step": {"crps_grid": crps.mean(axis=0), "pinball_loss": pinball.mean(axis=0),
                         "brier_prob_up": brier.mean(axis=0)}}


def score_model(walk: WalkForward, name: str, fee: float) -> dict[str, Any]:
    """Headline scores, per-step scores and the backtest of one model's forecasts."""
    actual, last = walk.actual, walk.last_close
    point = walk.point(name)
    error = point - actual
    absolute = np.abs(error)
    scale = metrics.naive_scale(walk.history_close)[:, None]
    distribution = _distribution(walk, name)
    crps, band_crps = distribution["crps"], distribution["band_crps"]
    coverage, width, pit = distribution["coverage"], distribution["width"], distribution["pit"]
    reference_absolute = np.abs(walk.point(RANDOM_WALK) - actual)
    lags = _lags(walk.horizon, walk.stride)

    ic, rank_ic = _information(walk, point)
    direction = _direction(walk, point)
    trading = backtest(walk, name, fee)
    is_reference = name == RANDOM_WALK

    dm_abs = _dm(absolute, reference_absolute, lags)
    dm_squared = _dm(error**2, (walk.point(RANDOM_WALK) - actual) ** 2, lags)
    dm_crps = _dm(crps, distribution["random_walk_crps"], lags)
    dm_band = _dm(crps, band_crps, lags)
    step_dm = [metrics.diebold_mariano(absolute[:, h], reference_absolute[:, h], _lags(h + 1, walk.stride)).pvalue
               for h in range(walk.horizon)]
    mae, mae_reference = float(absolute.mean()), float(reference_absolute.mean())
    crps_mean = float(crps.mean())
    scores: dict[str, Any] = {
        "samples": int(distribution["samples"]),
        "mae": mae,
        "rmse": float(np.sqrt((error**2).mean())),
        "mape": float(np.nanmean(metrics.absolute_percentage_error(point, actual))),
        "mase": float(np.nanmean(absolute / np.where(scale > 0, scale, np.nan))),
        "relative_mae": mae / mae_reference if mae_reference > 0 else math.nan,
        "direction_accuracy": direction["direction_accuracy"],
        "direction_ci": direction["direction_ci"],
        "direction_calls": direction["direction_calls"],
        "direction_pvalue_last_step": direction["direction_pvalue_last_step"],
        "crps": crps_mean,
        "crps_skill_vs_random_walk": 1 - crps_mean / float(distribution["random_walk_crps"].mean())
        if mae_reference > 0 else math.nan,
        "crps_skill_vs_vol_band": 1 - crps_mean / float(band_crps.mean()),
        "quantile_loss": float(distribution["quantile_loss"].mean()),
        **{f"coverage_{round(n * 100)}": float(coverage[n].mean()) for n in metrics.NOMINAL_COVERAGES},
        **{f"width_{round(n * 100)}": float(width[n].mean()) for n in metrics.NOMINAL_COVERAGES},
        "width_90_pct_of_price": float((width[0.9] / last[:, None]).mean() * 100),
        # A point forecast has no distribution to calibrate: its PIT would only say on which side y fell.
        "pit_histogram": metrics.pit_histogram(pit) if pit is not None else None,
        "pit_ks": metrics.pit_ks_statistic(pit) if pit is not None else math.nan,
        "ic": ic[-1],
        "rank_ic": rank_ic[-1],
        "dm_pvalue_vs_random_walk": None if is_reference else dm_abs.pvalue,
        "dm_vs_random_walk": None if is_reference else {
            "abs_error": dm_abs.to_dict(), "squared_error": dm_squared.to_dict(), "crps": dm_crps.to_dict()},
        "dm_crps_vs_vol_band": None if name == VOL_BAND else dm_band.to_dict(),
        "backtest": trading.to_dict(),
        "per_step": {
            "mae": absolute.mean(axis=0),
            "rmse": np.sqrt((error**2).mean(axis=0)),
            "crps": crps.mean(axis=0),
            "mase": np.nanmean(absolute / np.where(scale > 0, scale, np.nan), axis=0),
            **{f"coverage_{round(n * 100)}": coverage[n].mean(axis=0) for n in metrics.NOMINAL_COVERAGES},
            "direction_accuracy": direction["per_step_direction"],
            "ic": ic,
            "rank_ic": rank_ic,
            "dm_pvalue_vs_random_walk": None if is_reference else step_dm,
        },
    }
    extra = _grid_scores(walk, name)
    scores["per_step"].update(extra.pop("per_step", {}))
    scores.update(extra)
    if walk.calibration is not None and name in walk.grids:
        scores["by_regime"] = regimes(walk, name)
    return scores


REGIMES = ("low", "mid", "high")


def regimes(walk: WalkForward, name: str) -> dict[str, dict[str, Any]]:
    """Coverage, CRPS (grid) and Brier of a gridded forecast per volatility regime at the origin (terciles of
    the look-back's EWMA volatility over the scored origins) and per calendar year: conditional calibration,
    which a calibrator that only matches the average could miss."""
    grid = walk.grids[name]
    volatility = ewma_volatility(walk.history_close)
    tercile = np.searchsorted(np.quantile(volatility, [1 / 3, 2 / 3]), volatility)
    years = walk.origin_times.astype("datetime64[Y]").astype(int) + 1970
    groups = {f"{label} volatility": tercile == k for k, label in enumerate(REGIMES)}
    groups.update({str(year): years == year for year in np.unique(years)})
    result = {}
    crps = grid.crps(walk.actual)
    brier = grid.brier(walk.actual, walk.last_close)
    for label, rows in groups.items():
        if not rows.any():
            continue
        actual = walk.actual[rows]
        entry: dict[str, Any] = {"origins": int(rows.sum())}
        for nominal in metrics.NOMINAL_COVERAGES:
            low, high = grid.band(nominal)
            entry[f"coverage_{round(nominal * 100)}"] = float(((low[rows] <= actual) & (actual <= high[rows])).mean())
        entry["crps"] = float(crps[rows].mean())
        entry["brier_prob_up"] = float(brier[rows].mean())
        result[label] = entry
    return result


def verdicts(scores: dict[str, dict[str, Any]], name: str) -> list[str]:
    """Plain-language comparisons of one model with the baselines; a win is claimed only at p < 0.05."""
    own = scores[name]
    lines = []
    dm = own["dm_vs_random_walk"]
    if dm is not None:
        for label, metric, test in (("point error (MAE)", "relative_mae", dm["abs_error"]),
                                    ("probabilistic error (CRPS)", None, dm["crps"])):
            ratio = own[metric] if metric else own["crps"] / scores[RANDOM_WALK]["crps"]
            lines.append(_verdict(name, "the random walk", label, ratio, test["pvalue"]))
    band = own["dm_crps_vs_vol_band"]
    if band is not None:
        lines.append(_verdict(name, "the volatility band", "probabilistic error (CRPS)",
                              own["crps"] / scores[VOL_BAND]["crps"], band["pvalue"]))
    return lines


def _verdict(name: str, other: str, label: str, ratio: float, pvalue: float) -> str:
    if not math.isfinite(ratio) or pvalue is None or not math.isfinite(pvalue):
        return f"{name} vs {other} on {label}: not enough data for a test"
    relation = f"{ratio:.3f}x the error of {other}, DM p = {pvalue:.3g}"
    if ratio < 1 and pvalue < SIGNIFICANCE:
        return f"**{name} beats {other}** on {label}: {relation}"
    if ratio > 1 and pvalue < SIGNIFICANCE:
        return f"**{name} loses to {other}** on {label}: {relation}"
    return f"{name} is not significantly different from {other} on {label}: {relation}"


def to_jsonable(value: Any) -> Any:
    """numpy values and arrays to plain JSON types, NaN and infinities to null."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return _finite_or_none(value)
    return value
