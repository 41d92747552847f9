"""The promotion gate's measurement: how a tokenizer/predictor pair does on a held-out recent window.

Returns the predictor's validation loss (teacher-forced cross entropy, deterministic) and the forecast error
of sampled forecasts from evenly spaced origins, against the random walk (last close), with fixed seeds: two
pairs evaluated on the same frame see exactly the same inputs and sampling seeds. The daemon compares a
challenger with the champion on a window the challenger did not train on.

Besides MAE it measures the CRPS of the sampled closes and keeps the per-origin losses, so `compare_with`
can run a Diebold-Mariano test of challenger against champion on the same origins (issue 6): a promotion
can then require a lower CRPS (or MAE) that is not just noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl
import torch

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

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.val_loss, self.mae))

    @property
    def crps_skill(self) -> float:
        """1 - CRPS / CRPS(random walk): > 0 beats doing nothing, probabilistically."""
        return 1 - self.crps / self.mae_random_walk if self.mae_random_walk > 0 else float("nan")

    def compare_with(self, champion: GateResult, metric: str = "crps") -> GateComparison:
        """Diebold-Mariano test of this (challenger) result against `champion`, measured on the same frame."""
        if metric not in ("crps", "mae"):
            raise ValueError(f"metric must be 'crps' or 'mae', got {metric!r}")
        mine = self.origin_crps if metric == "crps" else self.origin_abs_error
        theirs = champion.origin_crps if metric == "crps" else champion.origin_abs_error
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
        values = {k: v for k, v in asdict(self).items() if not k.startswith("origin_")}
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
                  device: str | None = None, top_p: float = 0.9, batch_size: int = 16) -> GateResult:
    """Evaluate a pair on a normalised candle frame (see kronos_model.data.read_candles / normalise_frame)."""
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
    histories, x_times, y_times, actual, last = [], [], [], [], []
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
    forecasts = []
    for start in range(0, len(picks), batch_size):
        chunk = slice(start, start + batch_size)
        forecasts += predictor.forecast_batch(histories[chunk], x_times[chunk], y_times[chunk], horizon,
                                              sample_count=sample_count, top_p=top_p, seed=seed + start)
    median = np.stack([f.close_quantile(0.5) for f in forecasts])
    actual_arr, last_arr = np.stack(actual), np.asarray(last)[:, None]
    # (origins, horizon, samples) sampled closes, samples last as the metric expects
    closes = np.stack([f.close_paths.T for f in forecasts])
    origin_abs_error = np.abs(median - actual_arr).mean(axis=1)
    origin_crps = crps_from_samples(closes, actual_arr).mean(axis=1)
    origin_random_walk = np.abs(last_arr - actual_arr).mean(axis=1)
    spacing = int(np.diff(picks).min()) if len(picks) > 1 else horizon
    lags = max(1, math.ceil(horizon / max(spacing, 1)))
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
    )
