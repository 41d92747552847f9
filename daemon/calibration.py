"""The daemon's side of online calibration: one `OnlineCalibrator` per pair (kronos_model.calibration), warmed
from the pair's stored forecasts and the candles that followed, fed every closed candle, asked for what to
publish.

Levels: the calibrator works on the raw close quantile grid (`forecast.quantile_grid`, default 5 %...95 % in
5 % steps), which every forecast stores per step (schema 4: `grid_levels`, `close_grid`), so it is warmed on
every level. Rows stored with another grid, or before schema 4, are not replayed: after such a change a pair
starts cold (published raw, flagged, until `min_history` outcomes per step have closed).

Model versions: scores are in units of the raw forecast's own spread, but a new champion's spread still
behaves differently (that is why it was promoted), so a calibrator belongs to one model version. At a
promotion each gated pair's calibrator is warmed from the gate's held-out forecasts of the new version (the
gate forecast them anyway; `gate.origins` of them per pair, spread over the held-out candles), then fed live
candles as usual; steps are published calibrated once they hold `min_history` scores, so with
`gate.origins >= min_history` a promoted model publishes calibrated from its first forecast. Pairs the gate did
not see are warmed from the new version's stored forecasts (none yet: they start cold).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import structlog

from daemon.config import CalibrationSettings
from kronos_model.calibration import CalibratedForecast, CalibrationConfig, OnlineCalibrator, RawForecast
from storage.intervals import interval_ms

log = structlog.get_logger("daemon.calibration")
Pair = tuple[str, str]


@dataclass
class _Entry:
    version: str
    calibrator: OnlineCalibrator


def history_forecasts(frame: pl.DataFrame, horizon: int,
                      levels: tuple[float, ...]) -> list[tuple[RawForecast, np.ndarray]]:
    """(RawForecast, realised closes with NaN where unknown) per stored origin with all `horizon` steps, from
    `storage.forecasts.calibration_history` rows (their `close_grid` holds `levels`). Origins made with another
    horizon are left out."""
    if frame.is_empty():
        return []
    complete = (frame.group_by("origin_ms").agg(pl.len().alias("n"), pl.col("step").min().alias("lo"),
                                               pl.col("step").max().alias("hi"))
                .filter((pl.col("n") == horizon) & (pl.col("lo") == 1) & (pl.col("hi") == horizon)))
    rows = frame.join(complete.select("origin_ms"), on="origin_ms").sort("origin_ms", "step")
    if rows.is_empty():
        return []
    count = rows.height // horizon
    origins = rows["origin_ms"].to_numpy().reshape(count, horizon)[:, 0]
    last = rows["last_close"].to_numpy().reshape(count, horizon)[:, 0]
    grid = np.asarray(rows["close_grid"].to_list(), dtype=np.float64)  # (N * H, L)
    quantiles = grid.reshape(count, horizon, len(levels)).transpose(0, 2, 1)  # (N, L, H)
    prob_up = rows["prob_up"].to_numpy().reshape(count, horizon)
    actual = rows["actual"].fill_null(np.nan).to_numpy().astype(np.float64).reshape(count, horizon)
    return [(RawForecast(int(origins[i]), float(last[i]), levels, np.sort(quantiles[i], axis=0), prob_up[i]),
             actual[i]) for i in range(count)]


class PairCalibrators:
    """Calibrators per pair, each tied to the model version whose forecasts it has seen."""

    def __init__(self, settings: CalibrationSettings, horizon: int, levels: tuple[float, ...]):
        self.settings, self.horizon, self.levels = settings, horizon, tuple(levels)
        self._entries: dict[Pair, _Entry] = {}
        self.failures = 0  # calibration errors caught (each one: that forecast published raw)

    def config(self, interval: str) -> CalibrationConfig:
        return CalibrationConfig(horizon=self.horizon, interval_ms=interval_ms(interval), levels=self.levels,
                                 min_history=self.settings.min_history, window=self.settings.window)

    def needs_warm(self, pair: Pair, version: str) -> bool:
        entry = self._entries.get(pair)
        return self.settings.enabled and (entry is None or entry.version != version)

    def warm_since_ms(self, interval: str, origin_ms: int) -> int:
        """The oldest origin worth replaying before a forecast at `origin_ms`."""
        return origin_ms - (self.settings.warm_origins + self.horizon) * interval_ms(interval)

    def install(self, pair: Pair, version: str, history: pl.DataFrame) -> int:
        """A fresh calibrator for `pair` and `version`, warmed on `history` (calibration_history rows); returns
        the outcomes it registered. A history that cannot be replayed leaves the calibrator cold (logged)."""
        if not self.settings.enabled:
            return 0
        try:
            forecasts = history_forecasts(history, self.horizon, self.levels)
        except Exception:
            forecasts = None
        return self.install_forecasts(pair, version, forecasts)

    def install_forecasts(self, pair: Pair, version: str,
                          forecasts: list[tuple[RawForecast, np.ndarray]] | None) -> int:
        """A fresh calibrator for `pair` and `version` warmed on (raw forecast, realised closes) pairs, e.g. the
        gate's held-out forecasts of a promoted model; None (unreadable history) or a failing replay leaves it
        cold, counted and logged."""
        calibrator = OnlineCalibrator(self.config(pair[1]))
        self._entries[pair] = _Entry(version, calibrator)
        try:
            if forecasts is None:
                raise ValueError("the stored forecasts could not be read back as a calibration history")
            outcomes = calibrator.warm(forecasts)
        except Exception:
            self.failures += 1
            log.exception("calibration_warm_failed", symbol=pair[0], interval=pair[1], model_version=version)
            self._entries[pair] = _Entry(version, OnlineCalibrator(self.config(pair[1])))
            return 0
        return outcomes

    def drop(self, pair: Pair) -> None:
        """Forget a pair's calibrator (after an error): the next forecast warms a new one from the store."""
        self._entries.pop(pair, None)

    def reset(self) -> None:
        self._entries.clear()

    def get(self, pair: Pair) -> OnlineCalibrator | None:
        entry = self._entries.get(pair)
        return None if entry is None else entry.calibrator

    def observe(self, pair: Pair, open_times_ms: np.ndarray, closes: np.ndarray) -> int:
        """Closed candles of `pair`, oldest first: those after the calibrator's clock become outcomes."""
        calibrator = self.get(pair)
        if calibrator is None:
            return 0
        clock = calibrator.clock_ms
        outcomes = 0
        for open_ms, close in zip(open_times_ms.tolist(), closes.tolist(), strict=True):
            if clock is None or open_ms > clock:
                outcomes += calibrator.observe_candle(int(open_ms), float(close))
        return outcomes

    def calibrate(self, pair: Pair, raw: RawForecast) -> CalibratedForecast | None:
        calibrator = self.get(pair)
        if calibrator is None:
            return None
        # a live daemon may publish a little late (the clock can be past the origin after a warm): use what it knows
        return calibrator.calibrate(raw, allow_newer_evidence=True)

    def summary(self, pair: Pair) -> dict[str, Any]:
        """The payload's `calibration` object: the method and the recent coverage of what was published."""
        calibrator = self.get(pair)
        if calibrator is None:
            return {"method": None, "coverage_80": None, "coverage_90": None, "outcomes": 0}
        report = calibrator.coverage_report()
        coverage = report["coverage"]

        def recent(nominal: str) -> float | None:
            value = coverage.get(nominal, {}).get("calibrated")
            return None if value is None else round(float(value), 4)

        return {"method": report["method"], "coverage_80": recent("0.8"), "coverage_90": recent("0.9"),
                "outcomes": report["outcomes"]}
