"""PNG plots of a walk-forward: forecast fans vs what happened, error by horizon, calibration, equity curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np

from kronos_model.evaluation.backtest import BacktestResult
from kronos_model.evaluation.baselines import BASELINE_NAMES, VOL_BAND
from kronos_model.evaluation.calibrated import CALIBRATED_SUFFIX
from kronos_model.evaluation.metrics import NOMINAL_COVERAGES
from kronos_model.evaluation.scoring import WalkForward, format_time

FAN_ORIGINS = 4
FAN_CONTEXT = 48  # look-back candles drawn before each fan


def _style(name: str) -> dict[str, Any]:
    return {"linestyle": "--" if name in BASELINE_NAMES else "-", "linewidth": 1.2 if name in BASELINE_NAMES else 2}


def fan_chart(walk: WalkForward, models: list[str], path: Path) -> Path:
    """Fans (10-90 % and 25-75 % of the samples, median) of the first model and the vol band at a few origins."""
    picks = np.unique(np.linspace(0, len(walk.origin_times) - 1, min(FAN_ORIGINS, len(walk.origin_times))).astype(int))
    figure, axes = plt.subplots(len(picks), 1, figsize=(10, 2.8 * len(picks)), squeeze=False)
    context = min(FAN_CONTEXT, walk.history_close.shape[1])
    for axis, origin in zip(axes[:, 0], picks, strict=True):
        steps_back = np.arange(-context + 1, 1)
        axis.plot(steps_back, walk.history_close[origin, -context:], color="black", linewidth=1, label="history")
        steps = np.arange(1, walk.horizon + 1)
        axis.plot(np.r_[0, steps], np.r_[walk.last_close[origin], walk.actual[origin]], color="black",
                  linewidth=2, label="what happened")
        for name, colour in ((models[0], "tab:blue"), (VOL_BAND, "tab:orange")):
            samples = walk.forecasts[name][origin]
            low, q25, median, q75, high = np.quantile(samples, [0.1, 0.25, 0.5, 0.75, 0.9], axis=0)
            axis.fill_between(steps, low, high, color=colour, alpha=0.15, label=f"{name} 10-90 %")
            axis.fill_between(steps, q25, q75, color=colour, alpha=0.3)
            axis.plot(steps, median, color=colour, label=f"{name} median", **_style(name))
        axis.axvline(0, color="grey", linewidth=0.8)
        axis.set_title(f"{walk.symbol} origin {format_time(walk.origin_times[origin])} UTC", fontsize=9)
        axis.set_ylabel("close")
    axes[0, 0].legend(fontsize=7, ncol=3, loc="upper left")
    axes[-1, 0].set_xlabel("candles after the origin")
    return _save(figure, path)


def error_by_horizon(walk: WalkForward, scores: dict[str, dict[str, Any]], path: Path) -> Path:
    figure, (mae_axis, crps_axis) = plt.subplots(1, 2, figsize=(12, 4))
    steps = np.arange(1, walk.horizon + 1)
    for name, score in scores.items():
        mae_axis.plot(steps, score["per_step"]["mae"], label=name, **_style(name))
        crps_axis.plot(steps, score["per_step"]["crps"], label=name, **_style(name))
    mae_axis.set(title="MAE of the close (median forecast)", xlabel="horizon step", ylabel="price units")
    crps_axis.set(title="CRPS of the close (sample paths)", xlabel="horizon step", ylabel="price units")
    mae_axis.legend(fontsize=8)
    return _save(figure, path)


def calibration(walk: WalkForward, scores: dict[str, dict[str, Any]], path: Path) -> Path:
    """Empirical vs nominal coverage of every central band, raw and calibrated side by side (one panel each;
    the calibrated panel only with --calibrate), and PIT histograms of the sampled models."""
    probabilistic = [n for n, s in scores.items() if s["samples"] > 1 and n in walk.forecasts]
    calibrated = [n for n in scores if n.endswith(CALIBRATED_SUFFIX)]
    panels = [("raw", probabilistic)] + ([("calibrated", calibrated)] if calibrated else [])
    columns = len(panels) + len(probabilistic)
    figure, axes = plt.subplots(1, columns, figsize=(4.2 * columns, 3.8), squeeze=False)
    for axis, (title, names) in zip(axes[0], panels, strict=False):
        axis.plot([0, 1], [0, 1], color="grey", linewidth=0.8, label="ideal")
        for index, name in enumerate(names):
            grid = walk.grid(name)
            if grid is None:
                continue
            nominal = np.array(grid.bands())
            observed = [((low <= walk.actual) & (walk.actual <= high)).mean() for low, high in map(grid.band, nominal)]
            colour = f"C{index}"
            axis.plot(nominal, observed, marker="o", markersize=3, color=colour, label=name, **_style(name))
            for band in NOMINAL_COVERAGES:  # the headline bands, labelled
                value = scores[name][f"coverage_{round(band * 100)}"]
                axis.annotate(f"{value:.2f}", (band, value), fontsize=6, color=colour, xytext=(3, -8),
                              textcoords="offset points")
        axis.set(title=f"interval coverage, {title}", xlabel="nominal", ylabel="observed", xlim=(0, 1), ylim=(0, 1))
        axis.legend(fontsize=7)
    for axis, name in zip(axes[0, len(panels):], probabilistic, strict=True):
        shares = scores[name]["pit_histogram"]
        axis.bar((np.arange(len(shares)) + 0.5) / len(shares), shares, width=1 / len(shares), edgecolor="white")
        axis.axhline(1 / len(shares), color="grey", linewidth=0.8)
        axis.set(title=f"PIT {name} (KS {scores[name]['pit_ks']:.2f})", xlabel="PIT", xlim=(0, 1))
    return _save(figure, path)


def equity_curves(walk: WalkForward, backtests: dict[str, BacktestResult], hold: BacktestResult,
                  path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(10, 4))
    times = walk.target_times[:, walk.holding_steps - 1]  # equity is known at the end of each period
    axis.plot(times, hold.equity, color="black", linewidth=2, label="buy and hold")
    for name, result in backtests.items():
        axis.plot(times, result.equity, label=name, **_style(name))
    axis.set(title=f"long/flat equity after fees, {walk.symbol}", ylabel="equity (start = 1)")
    axis.legend(fontsize=8)
    figure.autofmt_xdate()
    return _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
