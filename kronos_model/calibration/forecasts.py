"""What goes into and comes out of the calibrator: its configuration, a raw forecast, a calibrated forecast."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from kronos_model.calibration.grid import DEFAULT_LEVELS, central_intervals, validate_levels

ScoreScale = Literal["spread", "none"]
ScoreMode = Literal["central", "per-level"]


class LookAheadError(ValueError):
    """An outcome or a calibration that would use information from after the calibrator's clock."""


@dataclass(frozen=True)
class CalibrationConfig:
    """How one calibrator (one pair, one target column) works. Defaults suit hourly candles, horizon 24."""

    horizon: int  # steps per forecast
    interval_ms: int  # candle length: the target of (origin, step) opens at origin + step * interval_ms
    levels: tuple[float, ...] = DEFAULT_LEVELS  # the quantile levels every forecast carries
    min_history: int = 50  # scores a step needs before it is calibrated (below: raw, flagged)
    window: int = 720  # newest scores kept per step (and P(up) outcomes per step): 30 days of hourly origins
    half_life: float | None = 240.0  # score age (outcomes) at which its weight halves; None: equal weights
    aci_gamma: float = 0.005  # adaptive conformal step size (Gibbs & Candès 2021); 0 turns ACI off
    score_mode: ScoreMode = "central"  # "central": one CQR score per central band; "per-level": one per level
    score_scale: ScoreScale = "spread"  # "spread": scores in units of the raw 10-90 % spread; "none": raw
    min_scale: float = 1e-6  # floor of the spread (log return) so a collapsed forecast cannot divide by ~0
    prob_up_prior: float = 10.0  # pseudo-outcomes of 1/2 per isotonic block (shrinkage toward a coin flip)
    coverage_window: int = 2400  # newest outcomes (all steps pooled) behind coverage_report(): 100 x 24 steps

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", validate_levels(self.levels))
        for name in ("horizon", "interval_ms", "min_history", "window", "coverage_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.min_history > self.window:
            raise ValueError(f"min_history ({self.min_history}) cannot exceed window ({self.window})")
        if self.half_life is not None and not (math.isfinite(self.half_life) and self.half_life > 0):
            raise ValueError(f"half_life must be positive or None, got {self.half_life!r}")
        if not (math.isfinite(self.aci_gamma) and 0 <= self.aci_gamma < 1):
            raise ValueError(f"aci_gamma must lie in [0, 1), got {self.aci_gamma!r}")
        if self.score_mode not in ("central", "per-level"):
            raise ValueError(f"score_mode must be 'central' or 'per-level', got {self.score_mode!r}")
        if self.score_mode == "central" and not central_intervals(self.levels):
            raise ValueError("score_mode='central' needs levels with mirrored pairs (tau and 1 - tau)")
        if self.score_scale not in ("spread", "none"):
            raise ValueError(f"score_scale must be 'spread' or 'none', got {self.score_scale!r}")
        if self.score_scale == "spread" and len(self.levels) < 2:
            raise ValueError("score_scale='spread' needs at least two quantile levels")
        if not (math.isfinite(self.min_scale) and self.min_scale > 0):
            raise ValueError(f"min_scale must be positive, got {self.min_scale!r}")
        if not (math.isfinite(self.prob_up_prior) and self.prob_up_prior > 0):
            raise ValueError(f"prob_up_prior must be positive, got {self.prob_up_prior!r}")

    @property
    def spread_levels(self) -> tuple[int, int]:
        """Indices of the levels nearest 10 % and 90 %, whose distance is a forecast's spread."""
        levels = np.asarray(self.levels)
        return int(np.abs(levels - 0.1).argmin()), int(np.abs(levels - 0.9).argmin())

    @property
    def method(self) -> str:
        weighting = "equal weights" if self.half_life is None else f"half-life {self.half_life:g}"
        aci = f"ACI gamma {self.aci_gamma:g}" if self.aci_gamma > 0 else "no ACI"
        scale = "spread-scaled" if self.score_scale == "spread" else "unscaled"
        scores = "central-band CQR" if self.score_mode == "central" else "per-level one-sided conformal"
        return (f"{scores} on log returns ({scale} scores, window {self.window}, {weighting}, {aci}, min history "
                f"{self.min_history}); P(up): isotonic (PAV) shrunk toward 0.5 with prior {self.prob_up_prior:g}, "
                "mixed with a coin flip by their discounted Brier scores")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["levels"] = list(self.levels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a calibration config must be a dict, got {type(data).__name__}")
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown calibration config keys: {sorted(unknown)}")
        values = dict(data)
        if "levels" in values:
            values["levels"] = tuple(values["levels"])
        return cls(**values)


def level_name(level: float) -> str:
    """"p05", "p10", ... like the forecasts table and payload; "p2.5" for a level off the whole percents."""
    percent = level * 100
    return f"p{round(percent):02d}" if abs(percent - round(percent)) < 1e-9 else f"p{percent:g}"


def _as_float_array(name: str, values: Any, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric: {exc}") from exc
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite values")
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class RawForecast:
    """One forecast as the model made it: close-price quantiles per level and step, and P(up) per step.

    origin_ms: open time of the last look-back candle (the forecast is made when it has closed);
    quantiles: (L, H) prices, non-decreasing down the levels; prob_up: (H,) share of paths above last_close.
    """

    origin_ms: int
    last_close: float
    levels: tuple[float, ...]
    quantiles: np.ndarray
    prob_up: np.ndarray

    def __post_init__(self) -> None:
        if isinstance(self.origin_ms, bool) or not isinstance(self.origin_ms, int | np.integer):
            raise ValueError(f"origin_ms must be an integer (epoch milliseconds), got {self.origin_ms!r}")
        object.__setattr__(self, "origin_ms", int(self.origin_ms))
        levels = validate_levels(self.levels)
        object.__setattr__(self, "levels", levels)
        last_close = float(self.last_close)
        if not (math.isfinite(last_close) and last_close > 0):
            raise ValueError(f"last_close must be a positive finite price, got {self.last_close!r}")
        object.__setattr__(self, "last_close", last_close)
        quantiles = np.asarray(self.quantiles)
        if quantiles.ndim != 2 or quantiles.shape[0] != len(levels) or quantiles.shape[1] < 1:
            raise ValueError(f"quantiles must have shape (levels={len(levels)}, steps), got {quantiles.shape}")
        quantiles = _as_float_array("quantiles", quantiles, quantiles.shape)
        if np.any(quantiles <= 0):
            raise ValueError("quantiles must be positive prices (they are calibrated as log returns)")
        if np.any(np.diff(quantiles, axis=0) < -1e-9 * quantiles[1:]):
            raise ValueError("quantiles decrease from one level to the next; sort them (rearrange) first")
        object.__setattr__(self, "quantiles", quantiles)
        prob_up = _as_float_array("prob_up", self.prob_up, (quantiles.shape[1],))
        if np.any((prob_up < 0) | (prob_up > 1)):
            raise ValueError("prob_up must lie in [0, 1]")
        object.__setattr__(self, "prob_up", prob_up)

    @property
    def horizon(self) -> int:
        return self.quantiles.shape[1]

    @classmethod
    def from_paths(cls, origin_ms: int, last_close: float, close_paths: np.ndarray,
                   levels: tuple[float, ...] = DEFAULT_LEVELS) -> RawForecast:
        """From sample paths of the close, (S, H): the quantiles and P(up) the predictor would report."""
        paths = np.asarray(close_paths, dtype=np.float64)
        if paths.ndim != 2 or paths.shape[0] < 1 or paths.shape[1] < 1:
            raise ValueError(f"close_paths must have shape (samples, steps), got {paths.shape}")
        if not np.all(np.isfinite(paths)):
            raise ValueError("close_paths holds NaN or infinite values")
        levels = validate_levels(levels)
        return cls(origin_ms, last_close, levels, np.quantile(paths, levels, axis=0),
                   (paths > float(last_close)).mean(axis=0))

    def log_quantiles(self) -> np.ndarray:
        """(L, H) quantiles as log returns from the last close."""
        return np.log(self.quantiles / self.last_close)


@dataclass(frozen=True, eq=False)
class CalibratedForecast:
    """What to publish: calibrated quantiles (L, H) and P(up) (H,), with the raw forecast they came from.

    step_calibrated[h] is False where step h had fewer than min_history scores: its quantiles are the raw ones.
    P(up) is always the recalibrated one, which is 0.5 with no evidence (prob_up_evidence: the weight of the
    outcomes behind it per step).
    """

    origin_ms: int
    last_close: float
    levels: tuple[float, ...]
    quantiles: np.ndarray
    prob_up: np.ndarray
    step_calibrated: np.ndarray
    prob_up_evidence: np.ndarray
    raw: RawForecast
    method: str = field(default="")

    @property
    def calibrated(self) -> bool:
        """True only if every step's quantiles are calibrated (what the payload's `calibrated` flag says)."""
        return bool(np.all(self.step_calibrated))

    def quantile(self, level: float) -> np.ndarray:
        """(H,) calibrated prices at one of the grid's levels."""
        matches = [i for i, other in enumerate(self.levels) if abs(other - level) < 1e-9]
        if not matches:
            raise ValueError(f"level {level} is not on the grid {list(self.levels)}")
        return self.quantiles[matches[0]]

    def band(self, nominal: float) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) prices of the central `nominal` band, e.g. 0.8 -> the 10 % and 90 % quantiles."""
        for coverage, lower, upper in central_intervals(self.levels):
            if abs(coverage - nominal) < 1e-9:
                return self.quantiles[lower], self.quantiles[upper]
        raise ValueError(f"the grid {list(self.levels)} has no central {nominal} band")

    def to_dict(self, decimals: int = 8) -> dict[str, Any]:
        """JSON-able summary for a payload: the published and the raw quantiles per level (keys "p05", "p10",
        ...), P(up), and how calibrated they are."""

        def by_level(quantiles: np.ndarray) -> dict[str, list[float]]:
            return {level_name(level): np.round(quantiles[i], decimals).tolist() for i, level in enumerate(self.levels)}

        return {
            "calibrated": self.calibrated, "step_calibrated": self.step_calibrated.tolist(), "method": self.method,
            "quantiles": by_level(self.quantiles), "prob_up": np.round(self.prob_up, 4).tolist(),
            "prob_up_evidence": np.round(self.prob_up_evidence, 2).tolist(),
            "raw": {"quantiles": by_level(self.raw.quantiles), "prob_up": np.round(self.raw.prob_up, 4).tolist()},
        }
