"""The promotion gate's measurement: how a tokenizer/predictor pair does on a held-out recent window.

Returns the predictor's validation loss (teacher-forced cross entropy, deterministic) and the forecast error
of sampled forecasts from evenly spaced origins, against the random walk (last close), with fixed seeds: two
pairs evaluated on the same frame see exactly the same inputs and sampling seeds. The daemon compares a
challenger with the champion on a window the challenger did not train on.

Besides MAE it measures the CRPS of the sampled closes and keeps the per-origin losses, so `compare_with`
can run a Diebold-Mariano test of challenger against champion on the same origins (issue 6): a promotion
can then require a lower CRPS (or MAE) that is not just noise.

What is published is calibrated (kronos_model.calibration), so with a `CalibrationConfig` the gate also
scores the calibrated forecasts (`crps_calibrated`): each held-out origin is calibrated by a calibrator
warmed on the gate's other origins whose targets do not overlap its own (blocked cross-conformal: a model's
steady-state calibrated quality from a few dozen origins, the same procedure for challenger and champion).
Its raw forecasts are kept (`held_out`) so the daemon can warm a promoted model's calibrator from them.
`pool` merges the results of several pairs into one (the daemon gates every pair it trains on).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import polars as pl
import torch

from kronos_model.calibration import CalibrationConfig, OnlineCalibrator, RawForecast, crps_from_quantiles
from kronos_model.calibration.grid import central_intervals
from kronos_model.data import WindowDataset, WindowSpec, segments
from kronos_model.evaluation.metrics import crps_from_samples, diebold_mariano
from kronos_model.model import Kronos, KronosTokenizer
from kronos_model.predictor import CLOSE, FEATURE_COLUMNS, KronosPredictor


@dataclass
class GateResult:
    origins: int
    val_loss: float
    mae: float  # mean absolute error of the median-path close over all origins and steps
    mae_random_walk: float  # the same for "the close stays at the last close"
    direction_accuracy: float  # share of (origin, step) where the median path gets the sign of the move right
    crps: float = math.nan  # CRPS of the sampled closes (the random walk's CRPS is mae_random_walk)
    dm_pvalue_mae: float = field(default=math.nan, compare=False)  # vs the random walk, Diebold-Mariano (HLN)
    dm_pvalue_crps: float = field(default=math.nan, compare=False)
    dm_lags: int = 1  # ceil(horizon / spacing of origins): overlapping origins have correlated losses
    origin_abs_error: tuple[float, ...] = field(default=(), repr=False)  # per origin, mean over the horizon
    origin_crps: tuple[float, ...] = field(default=(), repr=False)
    origin_random_walk: tuple[float, ...] = field(default=(), repr=False)
    # with a CalibrationConfig: the calibrated grid's CRPS, and 80 % band coverage raw and calibrated
    crps_calibrated: float = math.nan
    coverage_80: float = math.nan
    coverage_80_calibrated: float = math.nan
    origin_crps_calibrated: tuple[float, ...] = field(default=(), repr=False)
    origin_hits_80: tuple[tuple[float, float], ...] = field(default=(), repr=False)  # (raw, calibrated) per origin
    # the raw forecasts and realised closes, origin order: what warms a promoted model's calibrator
    held_out: list[tuple[RawForecast, np.ndarray]] = field(default_factory=list, repr=False, compare=False)

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.val_loss, self.mae))

    @property
    def crps_skill(self) -> float:
        """1 - CRPS / CRPS(random walk): > 0 beats doing nothing, probabilistically."""
        return 1 - self.crps / self.mae_random_walk if self.mae_random_walk > 0 else float("nan")

    def compare_with(self, champion: GateResult, metric: str = "crps") -> GateComparison:
        """Diebold-Mariano test of this (challenger) result against `champion`, measured on the same frame."""
        per_origin = {"crps": "origin_crps", "mae": "origin_abs_error", "crps_calibrated": "origin_crps_calibrated"}
        if metric not in per_origin:
            raise ValueError(f"metric must be one of {', '.join(per_origin)}, got {metric!r}")
        mine, theirs = getattr(self, per_origin[metric]), getattr(champion, per_origin[metric])
        if len(mine) != len(theirs) or not mine:
            raise ValueError("both results need per-origin losses from the same frame and settings "
                             f"({len(mine)} vs {len(theirs)} origins)")
        test = diebold_mariano(np.asarray(mine), np.asarray(theirs), horizon=max(self.dm_lags, champion.dm_lags))
        own, other = getattr(self, metric), getattr(champion, metric)
        return GateComparison(metric, own, other, own / other if other > 0 else float("nan"), test.pvalue)

    @property
    def skill(self) -> float:
        """1 - MAE / MAE(random walk): > 0 beats doing nothing."""
        return 1 - self.mae / self.mae_random_walk if self.mae_random_walk > 0 else float("nan")

    def to_dict(self) -> dict[str, float]:
        values = {k: getattr(self, k) for k in self.__dataclass_fields__
                  if not k.startswith("origin_") and k != "held_out"}
        return {**values, "skill": self.skill, "crps_skill": self.crps_skill, "finite": self.finite}


@dataclass(frozen=True)
class GateComparison:
    """Challenger vs champion on one metric: lower is better."""

    metric: str
    challenger: float
    champion: float
    ratio: float  # challenger / champion
    dm_pvalue: float  # two-sided

    def passes(self, margin: float = 0.0, alpha: float = 0.05, require_significance: bool = True) -> bool:
        """Lower by more than `margin` (a fraction) and, if required, significantly so (DM p < alpha)."""
        if not math.isfinite(self.ratio) or self.ratio >= 1 - margin:
            return False
        return not require_significance or (math.isfinite(self.dm_pvalue) and self.dm_pvalue < alpha)

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def evaluate_pair(tokenizer: KronosTokenizer, model: Kronos, frame: pl.DataFrame, lookback: int, horizon: int,
                  origins: int = 16, sample_count: int = 8, seed: int = 0, max_context: int = 512,
                  device: str | None = None, top_p: float = 0.9, batch_size: int = 16,
                  calibration: CalibrationConfig | None = None, anchor: bool = False) -> GateResult:
    """Evaluate a pair on a normalised candle frame (see kronos_model.data.read_candles / normalise_frame).

    With `calibration` (its horizon and candle length those of the frame), the calibrated forecasts are scored
    too (see the module docstring). `anchor`: forecast as the daemon publishes (KronosPredictor.forecast_batch)."""
    spec = WindowSpec(lookback, horizon)
    windows = WindowDataset(segments(frame), spec)
    if not len(windows):
        raise ValueError(f"the evaluation frame has no gap-free window of {spec.length} candles")
    picks = np.linspace(0, len(windows) - 1, min(origins, len(windows))).round().astype(int)

    model.eval()
    losses = []
    with torch.no_grad():
        param = next(model.parameters())
        for start in range(0, len(picks), batch_size):
            batch = [windows[i] for i in picks[start : start + batch_size]]
            x = torch.stack([b[0] for b in batch]).to(param.device)
            stamp = torch.stack([b[1] for b in batch]).to(param.device)
            s1, s2 = tokenizer.to(param.device).eval().encode(x, half=True)
            s1_logits, s2_logits = model(s1[:, :-1], s2[:, :-1], stamp[:, :-1], use_teacher_forcing=True,
                                         s1_targets=s1[:, 1:])
            loss, _, _ = model.head.compute_loss(s1_logits.float(), s2_logits.float(), s1[:, 1:], s2[:, 1:])
            losses.append(loss.item() * len(batch))
    val_loss = sum(losses) / len(picks)

    predictor = KronosPredictor(model, tokenizer, device=device, max_context=max_context)
    histories, x_times, y_times, actual, last, origin_ms = [], [], [], [], [], []
    for i in picks:
        k, start = windows.index[i]
        part = windows.parts[k]
        rows = slice(start, start + lookback)
        future = slice(start + lookback, start + lookback + horizon)
        histories.append(pl.DataFrame(part.values[rows], schema=list(FEATURE_COLUMNS), orient="row"))
        x_times.append(part.times[rows])
        y_times.append(part.times[future])
        actual.append(part.values[future, CLOSE])
        last.append(part.values[start + lookback - 1, CLOSE])
        origin_ms.append(int(part.times[start + lookback - 1].astype("datetime64[ms]").astype(np.int64)))
    forecasts = []
    for start in range(0, len(picks), batch_size):
        chunk = slice(start, start + batch_size)
        forecasts += predictor.forecast_batch(histories[chunk], x_times[chunk], y_times[chunk], horizon,
                                              sample_count=sample_count, top_p=top_p, seed=seed + start,
                                              anchor=anchor)
    median = np.stack([f.close_quantile(0.5) for f in forecasts])
    actual_arr, last_arr = np.stack(actual), np.asarray(last)[:, None]
    # (origins, horizon, samples) sampled closes, samples last as the metric expects
    closes = np.stack([f.close_paths.T for f in forecasts])
    origin_abs_error = np.abs(median - actual_arr).mean(axis=1)
    origin_crps = crps_from_samples(closes, actual_arr).mean(axis=1)
    origin_random_walk = np.abs(last_arr - actual_arr).mean(axis=1)
    spacing = int(np.diff(picks).min()) if len(picks) > 1 else horizon
    lags = max(1, math.ceil(horizon / max(spacing, 1)))
    calibrated: dict[str, object] = {}
    if calibration is not None:
        held_out = [(RawForecast.from_paths(origin, float(close), f.close_paths, calibration.levels), outcome)
                    for origin, close, f, outcome in zip(origin_ms, last, forecasts, actual_arr, strict=True)]
        calibrated = held_out_calibration(held_out, calibration)
    return GateResult(
        origins=len(picks),
        val_loss=val_loss,
        mae=float(origin_abs_error.mean()),
        mae_random_walk=float(origin_random_walk.mean()),
        direction_accuracy=float((np.sign(median - last_arr) == np.sign(actual_arr - last_arr)).mean()),
        crps=float(origin_crps.mean()),
        dm_pvalue_mae=diebold_mariano(origin_abs_error, origin_random_walk, lags).pvalue,
        dm_pvalue_crps=diebold_mariano(origin_crps, origin_random_walk, lags).pvalue,
        dm_lags=lags,
        origin_abs_error=tuple(float(v) for v in origin_abs_error),
        origin_crps=tuple(float(v) for v in origin_crps),
        origin_random_walk=tuple(float(v) for v in origin_random_walk),
        **calibrated,
    )


def held_out_calibration(held_out: list[tuple[RawForecast, np.ndarray]],
                         config: CalibrationConfig) -> dict[str, object]:
    """Blocked cross-conformal scores of the gate's forecasts (GateResult's calibrated fields).

    Origin i is calibrated by a fresh calibrator warmed, in time order, on every other origin whose targets do
    not overlap its own (an overlapping neighbour would share its outcomes). The warm-up may lie after origin i:
    this measures how well a model calibrates, it never publishes. Steps keep their raw quantiles until they
    have `config.min_history` scores, so give the gate at least that many origins (it is capped at half of
    them here, so that a few dozen origins calibrate at all)."""
    count = len(held_out)
    if count < 3:
        raise ValueError(f"calibrated gate scores need at least 3 origins, got {count}")
    config = replace(config, min_history=max(1, min(config.min_history, count // 2)))
    band_80 = [(lo, hi) for nominal, lo, hi in central_intervals(config.levels) if abs(nominal - 0.8) < 1e-9]
    span = config.horizon * config.interval_ms
    crps, hits = [], []
    for i, (forecast, realised) in enumerate(held_out):
        others = [item for j, item in enumerate(held_out)
                  if j != i and abs(item[0].origin_ms - forecast.origin_ms) >= span]
        calibrator = OnlineCalibrator(config)
        calibrator.warm(others)
        published = calibrator.calibrate(forecast, track=False, allow_newer_evidence=True)
        crps.append(float(crps_from_quantiles(config.levels, published.quantiles.T, realised).mean()))
        if band_80:
            lo, hi = band_80[0]
            inside = [float(((realised >= q[lo]) & (realised <= q[hi])).mean())
                      for q in (forecast.quantiles, published.quantiles)]
            hits.append((inside[0], inside[1]))
    pairs = np.asarray(hits) if hits else np.full((1, 2), np.nan)
    return {"crps_calibrated": float(np.mean(crps)), "coverage_80": float(pairs[:, 0].mean()),
            "coverage_80_calibrated": float(pairs[:, 1].mean()), "origin_crps_calibrated": tuple(crps),
            "origin_hits_80": tuple(tuple(h) for h in hits), "held_out": held_out}


def pool(results: list[GateResult]) -> GateResult:
    """One GateResult from several measured on different frames (pairs): per-origin losses are concatenated,
    means weighted by origins, Diebold-Mariano p-values recomputed; `held_out` is left empty (per pair)."""
    if len(results) == 1:
        return results[0]
    if not results:
        raise ValueError("nothing to pool")
    weights = np.asarray([r.origins for r in results], dtype=np.float64)

    def mean(name: str) -> float:
        return float(np.average([getattr(r, name) for r in results], weights=weights))

    def joined(name: str) -> tuple:
        return tuple(value for r in results for value in getattr(r, name))

    abs_error, crps, random_walk = (np.asarray(joined(n)) for n in ("origin_abs_error", "origin_crps",
                                                                    "origin_random_walk"))
    lags = max(r.dm_lags for r in results)
    calibrated = all(r.origin_crps_calibrated for r in results)
    hits = np.asarray(joined("origin_hits_80")) if calibrated else np.full((1, 2), np.nan)
    return GateResult(
        origins=int(weights.sum()), val_loss=mean("val_loss"), mae=float(abs_error.mean()),
        mae_random_walk=float(random_walk.mean()), direction_accuracy=mean("direction_accuracy"),
        crps=float(crps.mean()), dm_pvalue_mae=diebold_mariano(abs_error, random_walk, lags).pvalue,
        dm_pvalue_crps=diebold_mariano(crps, random_walk, lags).pvalue, dm_lags=lags,
        origin_abs_error=tuple(abs_error), origin_crps=tuple(crps), origin_random_walk=tuple(random_walk),
        crps_calibrated=float(np.mean(joined("origin_crps_calibrated"))) if calibrated else math.nan,
        coverage_80=float(hits[:, 0].mean()), coverage_80_calibrated=float(hits[:, 1].mean()),
        origin_crps_calibrated=joined("origin_crps_calibrated") if calibrated else (),
        origin_hits_80=joined("origin_hits_80") if calibrated else (),
    )
