"""The streaming calibrator: one per pair (and target column), fed forecasts and the candles that follow."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kronos_model.calibration import state as packing
from kronos_model.calibration.conformal import age_weights, rearrange, weighted_thresholds
from kronos_model.calibration.forecasts import CalibratedForecast, CalibrationConfig, LookAheadError, RawForecast
from kronos_model.calibration.grid import central_intervals, level_weights
from kronos_model.calibration.isotonic import MonotoneMap, fit_shrunk_isotonic, pool_probabilities

STATE_FORMAT = 1
COUNTERS = ("observed", "duplicate", "rejected", "expired")
# exponentially weighted aggregation of P(up) experts: the square loss on [0, 1] is exp-concave for a
# learning rate up to 1/2, which bounds the mix's cumulative Brier loss by the best expert's + ln(2) / 0.5
# (Kivinen & Warmuth 1999; Cesa-Bianchi & Lugosi 2006, ch. 3)
EXPERT_LEARNING_RATE = 0.5
# coverage ring columns besides the hit masks
_STEP, _BRIER_RAW, _BRIER_CAL, _CRPS_RAW, _CRPS_CAL, _WAS_CALIBRATED = range(6)


@dataclass
class _Tracked:
    """A forecast waiting for its targets to close: what the model said and what was published."""

    origin_ms: int
    last_close: float
    raw_log: np.ndarray  # (L, H) raw quantiles as log returns
    scale: np.ndarray  # (H,) score unit per step
    raw_prob: np.ndarray  # (H,)
    issued_log: np.ndarray  # (L, H) published quantiles as log returns
    issued_calibrated: np.ndarray  # (H,) bool
    issued_prob: np.ndarray  # (H,)
    isotonic_prob: np.ndarray  # (H,) the isotonic expert's P(up), mixed with 0.5 into issued_prob
    aci_scale: np.ndarray  # (H,) share of the ACI step each outcome gets (1 / how many outcomes it overlaps)
    observed: np.ndarray  # (H,) bool

    _ARRAYS = (("raw_log", "float64", "LH"), ("scale", "float64", "H"), ("raw_prob", "float64", "H"),
               ("issued_log", "float64", "LH"), ("issued_calibrated", "bool", "H"),
               ("issued_prob", "float64", "H"), ("isotonic_prob", "float64", "H"), ("aci_scale", "float64", "H"),
               ("observed", "bool", "H"))

    def to_dict(self) -> dict[str, Any]:
        return {"origin_ms": self.origin_ms, "last_close": self.last_close,
                **{name: packing.pack(getattr(self, name)) for name, _, _ in self._ARRAYS}}

    @classmethod
    def from_dict(cls, data: Any, levels: int, horizon: int) -> _Tracked:
        if not isinstance(data, dict) or not isinstance(data.get("origin_ms"), int):
            raise ValueError("calibration state: a tracked forecast lacks its integer origin_ms")
        last_close = data.get("last_close")
        if not isinstance(last_close, float | int) or not (math.isfinite(last_close) and last_close > 0):
            raise ValueError("calibration state: a tracked forecast has no positive last_close")
        shapes = {"LH": (levels, horizon), "H": (horizon,)}
        arrays = {name: packing.unpack(data.get(name), f"tracked {name}", dtype, shapes[shape])
                  for name, dtype, shape in cls._ARRAYS}
        for name in ("raw_log", "scale", "raw_prob", "issued_log", "issued_prob", "isotonic_prob", "aci_scale"):
            if not np.all(np.isfinite(arrays[name])):
                raise ValueError(f"calibration state: tracked {name} holds NaN or infinite values")
        return cls(int(data["origin_ms"]), float(last_close), **arrays)


class OnlineCalibrator:
    """Calibrates one series' forecasts from the outcomes of its earlier forecasts, per horizon step.

    The clock is the open time of the newest candle known to have closed. Only outcomes whose target candle
    opens at or before the clock are accepted, and a forecast is calibrated only at or after the clock, so a
    calibration can never see an outcome that closed after its origin (see `replay` for history).
    """

    def __init__(self, config: CalibrationConfig):
        self.config = config
        horizon, window = config.horizon, config.window
        self.clock_ms: int | None = None
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._levels = np.asarray(config.levels)
        self._intervals = central_intervals(config.levels)
        self._band_lower = np.array([lower for _, lower, _ in self._intervals], dtype=np.int64)
        self._band_upper = np.array([upper for _, _, upper in self._intervals], dtype=np.int64)
        self._level_weights = level_weights(config.levels)
        # score columns: one per central band (target: its coverage; a score above the threshold is a miss) or
        # one per level (target: the level; the test point at +inf for upper levels, -inf for lower ones)
        if config.score_mode == "central":
            self._targets = np.array([nominal for nominal, _, _ in self._intervals])
            self._upper = np.ones(len(self._targets), dtype=bool)
        else:
            self._targets = self._levels.copy()
            self._upper = self._levels >= 0.5
        columns = len(self._targets)
        # per step: a ring of the newest `window` outcomes (scores per level, raw P(up), went up)
        self._scores = np.full((horizon, columns, window), np.nan)
        self._raw_prob = np.zeros((horizon, window))
        self._went_up = np.zeros((horizon, window))
        self._count = np.zeros(horizon, dtype=np.int64)
        self._head = np.zeros(horizon, dtype=np.int64)
        self._aci_levels = np.tile(self._targets, (horizon, 1))  # the level each score column aims at now
        self._expert_log_weights = np.zeros((horizon, 2))  # P(up) experts per step: coin flip, isotonic
        self._observations = np.zeros(horizon, dtype=np.int64)  # all-time outcomes per step
        # pooled over steps: the newest `coverage_window` outcomes, for coverage_report
        size = config.coverage_window
        self._hits_raw = np.zeros((size, len(self._intervals)), dtype=bool)
        self._hits_cal = np.zeros((size, len(self._intervals)), dtype=bool)
        self._outcome_scores = np.zeros((size, 6))
        self._coverage_count = 0
        self._coverage_head = 0
        self._tracked: dict[int, _Tracked] = {}
        self._prob_maps: dict[int, MonotoneMap] = {}  # cache, refitted after a step's outcomes change

    # -- time -----------------------------------------------------------------------------------------------

    def advance(self, closed_open_ms: int) -> None:
        """The candle that opened at `closed_open_ms` has closed. The clock never moves back, so it must come
        from a validated candle: a bogus far-future time would make every later forecast look stale."""
        closed_open_ms = _as_ms("closed_open_ms", closed_open_ms)
        if self.clock_ms is None or closed_open_ms > self.clock_ms:
            self.clock_ms = closed_open_ms
            self._expire()

    def _expire(self) -> None:
        """Forget tracked forecasts whose last target is a whole horizon behind the clock (a candle missed)."""
        assert self.clock_ms is not None
        span = self.config.horizon * self.config.interval_ms
        for origin in [o for o in self._tracked if o + 2 * span < self.clock_ms]:
            self.counters["expired"] += int((~self._tracked.pop(origin).observed).sum())

    # -- calibrating ------------------------------------------------------------------------------------------

    def calibrate(self, forecast: RawForecast, *, track: bool = True,
                  allow_newer_evidence: bool = False) -> CalibratedForecast:
        """The forecast to publish, from the outcomes registered so far.

        track: remember it, so the candles after it become outcomes (what the daemon and `replay` do). A forecast
        already tracked comes back as it was first published. The forecast's origin candle has closed, so the
        clock moves up to it. A forecast older than the clock raises LookAheadError unless
        allow_newer_evidence (a live daemon publishing late may use what it knows; an evaluation never may).
        """
        config = self.config
        if not isinstance(forecast, RawForecast):
            raise ValueError(f"calibrate takes a RawForecast, got {type(forecast).__name__}")
        if len(forecast.levels) != len(config.levels) or not np.allclose(forecast.levels, config.levels,
                                                                          rtol=0, atol=1e-9):
            raise ValueError(f"the forecast's levels {list(forecast.levels)} are not the calibrator's "
                             f"{list(config.levels)}")
        if forecast.horizon != config.horizon:
            raise ValueError(f"the forecast has {forecast.horizon} steps, the calibrator {config.horizon}")
        if self.clock_ms is not None and forecast.origin_ms < self.clock_ms and not allow_newer_evidence:
            raise LookAheadError(f"forecast origin {forecast.origin_ms} is before the calibrator's clock "
                                 f"{self.clock_ms}: outcomes after its origin are already registered")
        existing = self._tracked.get(forecast.origin_ms)
        if track and existing is not None:
            self.counters["duplicate"] += 1
            first = RawForecast(existing.origin_ms, existing.last_close, config.levels,
                                existing.last_close * np.exp(existing.raw_log), existing.raw_prob)
            return self._published(first, existing.issued_log, existing.issued_calibrated, existing.issued_prob)
        raw_log = forecast.log_quantiles()
        scale = self._scale(raw_log)
        issued_log = raw_log.copy()
        ready = self._count >= config.min_history
        if ready.any():
            weights = age_weights(self._count[ready], self._head[ready], config.window, config.half_life)
            thresholds = weighted_thresholds(self._scores[ready], weights, self._count[ready],
                                             self._aci_levels[ready], self._upper)
            issued_log[:, ready] = rearrange(self._corrected(raw_log[:, ready], scale[ready], thresholds), axis=0)
        isotonic_prob = np.array([self._prob_map(step)(forecast.prob_up[step]) for step in range(config.horizon)])
        coin_weight = self._coin_weight()
        issued_prob = coin_weight * 0.5 + (1 - coin_weight) * isotonic_prob
        aci_scale = self._aci_scale(forecast.origin_ms)
        self.advance(forecast.origin_ms)
        if track:
            self._tracked[forecast.origin_ms] = _Tracked(
                forecast.origin_ms, forecast.last_close, raw_log, scale, forecast.prob_up.copy(), issued_log,
                ready.copy(), issued_prob, isotonic_prob, aci_scale, np.zeros(config.horizon, dtype=bool))
        return self._published(forecast, issued_log, ready, issued_prob)

    def _corrected(self, raw_log: np.ndarray, scale: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
        """(L, B) raw log quantiles moved by the conformal thresholds (B, K) in units of `scale` (B,)."""
        moves = scale * thresholds.T  # (K, B)
        if self.config.score_mode == "per-level":
            return raw_log + moves
        corrected = raw_log.copy()  # levels outside every central band (the median) keep their raw value
        corrected[self._band_lower] -= moves
        corrected[self._band_upper] += moves
        return corrected

    def _coin_weight(self) -> np.ndarray:
        """(H,) weight of the coin flip in the published P(up) (the isotonic expert gets the rest)."""
        weights = np.exp(self._expert_log_weights - self._expert_log_weights.max(axis=1, keepdims=True))
        return weights[:, 0] / weights.sum(axis=1)

    def _aci_scale(self, origin_ms: int) -> np.ndarray:
        """(H,) share of the ACI step for this forecast's outcomes. Forecasts `spacing` candles apart share
        h - spacing of the h candles behind their step-h outcomes, so those misses come in runs of about
        h / spacing; each outcome then moves the level by gamma * spacing / h, not gamma (no spacing known yet:
        every candle, as the daemon forecasts)."""
        tracked = [origin for origin in self._tracked if origin < origin_ms]
        spacing = 1.0 if not tracked else max(1.0, (origin_ms - max(tracked)) / self.config.interval_ms)
        return np.minimum(1.0, spacing / np.arange(1, self.config.horizon + 1))

    def _published(self, forecast: RawForecast, issued_log: np.ndarray, calibrated: np.ndarray,
                   prob: np.ndarray) -> CalibratedForecast:
        evidence = np.array([self._prob_map(step).evidence for step in range(self.config.horizon)])
        quantiles = forecast.last_close * np.exp(issued_log)
        for array in (quantiles, prob, calibrated):
            array.setflags(write=False)
        return CalibratedForecast(forecast.origin_ms, forecast.last_close, self.config.levels, quantiles, prob,
                                  calibrated.copy(), evidence, forecast, self.config.method)

    def _scale(self, raw_log: np.ndarray) -> np.ndarray:
        """(H,) the unit scores are measured in: the raw 10-90 % spread (floored), or 1."""
        if self.config.score_scale == "none":
            return np.ones(raw_log.shape[1])
        low, high = self.config.spread_levels
        return np.maximum(raw_log[high] - raw_log[low], self.config.min_scale)

    def _prob_map(self, step: int) -> MonotoneMap:
        fitted = self._prob_maps.get(step)
        if fitted is None:
            self._refit_prob_maps()
            fitted = self._prob_maps[step]
        return fitted

    def _refit_prob_maps(self) -> None:
        """Refit the P(up) map of every step whose outcomes changed since its last fit (one pooling pass)."""
        stale = np.array([step for step in range(self.config.horizon) if step not in self._prob_maps])
        weights = age_weights(self._count[stale], self._head[stale], self.config.window, self.config.half_life)
        mass, ups = pool_probabilities(self._raw_prob[stale], self._went_up[stale], weights)
        for row, step in enumerate(stale.tolist()):
            self._prob_maps[step] = fit_shrunk_isotonic(mass[row], ups[row], self.config.prob_up_prior)

    # -- outcomes -------------------------------------------------------------------------------------------

    def observe(self, origin_ms: int, step: int, realised_close: float) -> bool:
        """Register the close of the target of a tracked forecast (step 1 = the candle after the origin).

        LookAheadError if that candle has not closed by the clock; ValueError for an unknown forecast or step.
        A repeated outcome is ignored and a non-finite or non-positive close is skipped; both are counted
        (`counters`) and return False. True: the outcome was registered.
        """
        origin_ms = _as_ms("origin_ms", origin_ms)
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or not 1 <= step <= self.config.horizon:
            raise ValueError(f"step must be an integer in 1..{self.config.horizon}, got {step!r}")
        target = origin_ms + int(step) * self.config.interval_ms
        if self.clock_ms is None or target > self.clock_ms:
            raise LookAheadError(f"the target of origin {origin_ms} step {step} opens at {target}, after the "
                                 f"calibrator's clock {self.clock_ms}: it has not closed yet")
        tracked = self._tracked.get(origin_ms)
        if tracked is None:
            raise ValueError(f"no tracked forecast at origin {origin_ms} (never calibrated with track=True, "
                             "or expired)")
        index = int(step) - 1
        if tracked.observed[index]:
            self.counters["duplicate"] += 1
            return False
        try:
            close = float(realised_close)
        except (TypeError, ValueError):
            close = math.nan
        if not (math.isfinite(close) and close > 0):
            self.counters["rejected"] += 1
            return False
        self._register(tracked, index, close)
        return True

    def observe_candle(self, open_time_ms: int, close: float) -> int:
        """A candle closed: move the clock to it and register it as the outcome of every tracked forecast it
        is a target of. Returns how many outcomes it gave (a bad close is counted once and gives none)."""
        open_time_ms = _as_ms("open_time_ms", open_time_ms)
        self.advance(open_time_ms)
        targets = []
        for origin, tracked in self._tracked.items():
            steps, offset = divmod(open_time_ms - origin, self.config.interval_ms)
            if offset == 0 and 1 <= steps <= self.config.horizon and not tracked.observed[steps - 1]:
                targets.append((origin, int(steps)))
        try:
            value = float(close)
        except (TypeError, ValueError):
            value = math.nan
        if targets and not (math.isfinite(value) and value > 0):
            self.counters["rejected"] += 1
            return 0
        return sum(self.observe(origin, steps, value) for origin, steps in targets)

    def _register(self, tracked: _Tracked, index: int, close: float) -> None:
        config = self.config
        realised = math.log(close / tracked.last_close)
        raw, issued = tracked.raw_log[:, index], tracked.issued_log[:, index]
        if config.score_mode == "central":
            # CQR: how far outside the raw band the outcome fell (negative inside); "hit" = inside the published
            scores = np.maximum(raw[self._band_lower] - realised, realised - raw[self._band_upper])
            hits = (issued[self._band_lower] <= realised) & (realised <= issued[self._band_upper])
        else:
            # one-sided per level: where the outcome fell relative to the raw quantile; "hit" = at or below it
            scores = realised - raw
            hits = realised <= issued
        if tracked.issued_calibrated[index] and config.aci_gamma > 0:
            # Gibbs & Candès: alpha_t+1 = alpha_t + gamma (alpha - err_t), written for the target 1 - alpha
            step_size = config.aci_gamma * tracked.aci_scale[index]
            self._aci_levels[index] = np.clip(self._aci_levels[index] + step_size * (self._targets - hits), 0.0, 1.0)
        slot = self._head[index]
        self._scores[index, :, slot] = scores / tracked.scale[index]
        self._raw_prob[index, slot] = tracked.raw_prob[index]
        went_up = float(close > tracked.last_close)
        self._went_up[index, slot] = went_up
        self._head[index] = (slot + 1) % config.window
        self._count[index] = min(self._count[index] + 1, config.window)
        self._observations[index] += 1
        self._prob_maps.pop(index, None)
        # P(up) experts: discount their past losses like the scores, add this outcome's Brier loss
        discount = 1.0 if config.half_life is None else 2.0 ** (-1.0 / config.half_life)
        losses = np.array([0.25, (tracked.isotonic_prob[index] - went_up) ** 2])
        self._expert_log_weights[index] = discount * self._expert_log_weights[index] - EXPERT_LEARNING_RATE * losses
        tracked.observed[index] = True
        self.counters["observed"] += 1
        # coverage ring
        row = self._coverage_head
        self._hits_raw[row] = (raw[self._band_lower] <= realised) & (realised <= raw[self._band_upper])
        self._hits_cal[row] = (issued[self._band_lower] <= realised) & (realised <= issued[self._band_upper])
        crps = self._crps(np.stack((raw, issued)), realised)
        self._outcome_scores[row] = (index + 1, (tracked.raw_prob[index] - went_up) ** 2,
                                     (tracked.issued_prob[index] - went_up) ** 2, crps[0], crps[1],
                                     float(tracked.issued_calibrated[index]))
        self._coverage_head = (row + 1) % config.coverage_window
        self._coverage_count = min(self._coverage_count + 1, config.coverage_window)

    def _crps(self, quantiles: np.ndarray, realised: float) -> np.ndarray:
        """crps_from_quantiles for (K, L) sorted quantiles of one outcome, without re-validating the grid."""
        error = realised - quantiles
        pinball = np.maximum(self._levels * error, (self._levels - 1) * error)
        return 2.0 * pinball @ self._level_weights

    # -- history --------------------------------------------------------------------------------------------

    def replay(self, history: Iterable[tuple[RawForecast, Sequence[float] | np.ndarray]],
               *, flush: bool = True) -> list[CalibratedForecast]:
        """Run past forecasts and their outcomes through the calibrator in time order; returns what it would
        have published for each forecast, in origin order.

        history: (forecast, realised closes of its H targets, NaN where unknown). Before each forecast is
        calibrated, exactly the outcomes whose target candle opened at or before its origin are registered, so
        an outcome after the origin can never reach it, whatever else the history holds. flush: register the
        outcomes left after the last forecast too (warming); without it the clock stays at the last origin.
        """
        items = []
        for forecast, realised in history:
            if not isinstance(forecast, RawForecast):
                raise ValueError(f"history must hold (RawForecast, realised) pairs, got {type(forecast).__name__}")
            closes = np.asarray(realised, dtype=np.float64)
            if closes.shape != (self.config.horizon,):
                raise ValueError(f"the realised closes of origin {forecast.origin_ms} have shape {closes.shape}, "
                                 f"expected ({self.config.horizon},)")
            items.append((forecast, closes))
        items.sort(key=lambda item: item[0].origin_ms)
        origins = [forecast.origin_ms for forecast, _ in items]
        if len(set(origins)) != len(origins):
            raise ValueError("history holds two forecasts with the same origin")
        if origins and self.clock_ms is not None and origins[0] < self.clock_ms:
            # checked before anything is registered, so a refused history leaves the calibrator as it was
            raise LookAheadError(f"history starts at origin {origins[0]}, before the calibrator's clock "
                                 f"{self.clock_ms}: replay it into a fresh calibrator")
        outcomes: list[tuple[int, int, int, float]] = []  # (target open, origin, step, close), a heap
        published = []

        def register_until(time_ms: float) -> None:
            while outcomes and outcomes[0][0] <= time_ms:
                target, origin, step, close = heapq.heappop(outcomes)
                self.advance(target)
                if origin in self._tracked:
                    self.observe(origin, step, close)

        for forecast, closes in items:
            register_until(forecast.origin_ms)
            published.append(self.calibrate(forecast, track=True))
            for step in np.flatnonzero(~np.isnan(closes)):
                target = forecast.origin_ms + int(step + 1) * self.config.interval_ms
                heapq.heappush(outcomes, (target, forecast.origin_ms, int(step + 1), float(closes[step])))
        if flush:
            register_until(math.inf)
        return published

    def warm(self, history: Iterable[tuple[RawForecast, Sequence[float] | np.ndarray]]) -> int:
        """Replay stored forecasts and their outcomes (see `replay`); returns how many outcomes it registered."""
        before = self.counters["observed"]
        self.replay(history, flush=True)
        return self.counters["observed"] - before

    # -- reporting ------------------------------------------------------------------------------------------

    def history(self, step: int | None = None) -> int:
        """Scores held for a step (1-based), or the smallest over all steps."""
        if step is None:
            return int(self._count.min())
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or not 1 <= step <= self.config.horizon:
            raise ValueError(f"step must be an integer in 1..{self.config.horizon}, got {step!r}")
        return int(self._count[step - 1])

    def coverage_report(self, step: int | None = None) -> dict[str, Any]:
        """Empirical coverage of the newest outcomes (all steps pooled, or one step) per nominal central band,
        raw and as published ("calibrated": raw where the step was not calibrated yet), with the Brier score
        of P(up) and the CRPS of the quantile grid in log-return units. None where there are no outcomes."""
        count = self._coverage_count
        rows = np.arange(count)
        if step is not None:
            rows = rows[self._outcome_scores[:count, _STEP] == step]

        def mean(values: np.ndarray) -> float | None:
            return float(values.mean()) if len(values) else None

        scores = self._outcome_scores[rows]
        return {
            "method": self.config.method,
            "outcomes": len(rows),
            "calibrated_share": mean(scores[:, _WAS_CALIBRATED]),
            "coverage": {f"{nominal:g}": {"raw": mean(self._hits_raw[rows, k]),
                                          "calibrated": mean(self._hits_cal[rows, k])}
                         for k, (nominal, _, _) in enumerate(self._intervals)},
            "brier_prob_up": {"raw": mean(scores[:, _BRIER_RAW]), "calibrated": mean(scores[:, _BRIER_CAL])},
            "crps_log_return": {"raw": mean(scores[:, _CRPS_RAW]), "calibrated": mean(scores[:, _CRPS_CAL])},
            "counters": dict(self.counters),
        }

    # -- state ----------------------------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Everything the calibrator knows, as a JSON-able dict (exact: from_state gives identical outputs)."""
        return {
            "format": STATE_FORMAT, "config": self.config.to_dict(), "clock_ms": self.clock_ms,
            "counters": dict(self.counters),
            **{name: packing.pack(getattr(self, f"_{name}")) for name, _, _ in self._state_arrays()},
            "coverage_count": self._coverage_count, "coverage_head": self._coverage_head,
            "tracked": [tracked.to_dict() for tracked in self._tracked.values()],
        }

    def _state_arrays(self) -> list[tuple[str, str, tuple[int, ...]]]:
        horizon, window, columns = self.config.horizon, self.config.window, len(self._targets)
        size, intervals = self.config.coverage_window, len(self._intervals)
        return [("scores", "float64", (horizon, columns, window)), ("raw_prob", "float64", (horizon, window)),
                ("went_up", "float64", (horizon, window)), ("count", "int64", (horizon,)),
                ("head", "int64", (horizon,)), ("aci_levels", "float64", (horizon, columns)),
                ("expert_log_weights", "float64", (horizon, 2)),
                ("observations", "int64", (horizon,)), ("hits_raw", "bool", (size, intervals)),
                ("hits_cal", "bool", (size, intervals)), ("outcome_scores", "float64", (size, 6))]

    @classmethod
    def from_state(cls, state: Any) -> OnlineCalibrator:
        """Rebuild a calibrator from `to_state`'s dict; ValueError if anything in it is inconsistent."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a calibration state of format {STATE_FORMAT}")
        calibrator = cls(CalibrationConfig.from_dict(state.get("config")))
        config = calibrator.config
        clock = state.get("clock_ms")
        calibrator.clock_ms = None if clock is None else _as_ms("calibration state: clock_ms", clock)
        counters = state.get("counters")
        if not isinstance(counters, dict) or set(counters) != set(COUNTERS) or not all(
                isinstance(v, int) and v >= 0 for v in counters.values()):
            raise ValueError("calibration state: counters are malformed")
        calibrator.counters = dict(counters)
        for name, dtype, shape in calibrator._state_arrays():
            setattr(calibrator, f"_{name}", packing.unpack(state.get(name), name, dtype, shape))
        count, head = calibrator._count, calibrator._head
        if np.any((count < 0) | (count > config.window) | (head < 0) | (head >= config.window)):
            raise ValueError("calibration state: ring counts or heads out of range")
        filled = np.isfinite(calibrator._scores).sum(axis=-1)
        if np.any(filled != count[:, None]) or np.any(~np.isfinite(calibrator._scores) &
                                                       ~np.isnan(calibrator._scores)):
            raise ValueError("calibration state: the scores do not match their counts")
        levels = calibrator._aci_levels
        if not np.all(np.isfinite(levels) & (levels >= 0) & (levels <= 1)):
            raise ValueError("calibration state: ACI levels must lie in [0, 1]")
        if not np.all(np.isfinite(calibrator._expert_log_weights) & (calibrator._expert_log_weights <= 0)):
            raise ValueError("calibration state: P(up) expert log-weights must be finite and <= 0")
        for name in ("raw_prob", "went_up"):
            values = getattr(calibrator, f"_{name}")
            if not np.all(np.isfinite(values) & (values >= 0) & (values <= 1)):
                raise ValueError(f"calibration state: {name} must lie in [0, 1]")
        coverage_count, coverage_head = state.get("coverage_count"), state.get("coverage_head")
        if not (isinstance(coverage_count, int) and isinstance(coverage_head, int)
                and 0 <= coverage_count <= config.coverage_window and 0 <= coverage_head < config.coverage_window):
            raise ValueError("calibration state: coverage ring position out of range")
        calibrator._coverage_count, calibrator._coverage_head = coverage_count, coverage_head
        tracked = state.get("tracked")
        if not isinstance(tracked, list):
            raise ValueError("calibration state: tracked must be a list")
        for item in tracked:
            entry = _Tracked.from_dict(item, len(config.levels), config.horizon)
            calibrator._tracked[entry.origin_ms] = entry
        return calibrator


def _as_ms(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be integer epoch milliseconds, got {value!r}")
    return int(value)
