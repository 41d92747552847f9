"""The forecast ledger: the daemon's stored forecasts scored against the candles that followed them.

Each row of `forecasts` (one per step) is joined with the candle whose `open_time` is the step's
`target_time`; steps whose candle is not stored yet are pending. Scores are kept per symbol, interval and
model version, over all time or a rolling window of origins, and always next to the random walk (the last
close) on exactly the same steps: a model that does not beat "nothing changes" should be visible as such.

The table keeps quantiles, not the sample paths. Since schema 4 every step stores the close quantile grid
(default 5 %...95 %), and `crps` is the CRPS by quantile decomposition on it (kronos_model.calibration.grid:
within about 1 % of the sample-path CRPS on 19 levels), next to the random walk's (its absolute error: the
CRPS of a point forecast), on the steps that have a grid. `quantile_loss` (mean pinball loss at p10/p50/p90)
and the 80 % coverage score every step, older rows included.

Raw and calibrated side by side: the table's p10/p50/p90/prob_up are the model's raw output; since schema 3
the daemon also stores what it published calibrated (`*_cal`, NULL where it published raw). The `*_calibrated`
scores and their `*_raw_same_steps` twins are computed on exactly the steps that have calibrated values, so
the two can be compared directly; NaN (None in JSON) where no step was published calibrated.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import numpy as np
import polars as pl

from kronos_model.calibration import crps_from_quantiles
from kronos_model.evaluation import metrics
from storage.forecasts import STORED_QUANTILES, forecasts_with_outcomes
from storage.intervals import format_ms
from storage.store import newest_open_time

_DURATION = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_window(text: str) -> timedelta | None:
    """'all' -> None; '90m', '24h', '7d', '2w' -> a timedelta."""
    if text == "all":
        return None
    match = _DURATION.match(text.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"window {text!r} must be 'all' or a positive duration such as 90m, 24h, 7d or 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


@dataclass
class LedgerScore:
    symbol: str
    interval: str
    model_version: str
    window: str  # 'all' or the rolling window, e.g. '7d'
    origins: int  # forecasts with at least one realised step
    scored_steps: int
    pending_steps: int  # steps whose candle has not closed (or is not stored) yet
    first_origin: str | None
    last_origin: str | None
    mae: float  # median (p50) close vs the realised close
    mae_random_walk: float  # last close vs the realised close, same steps
    relative_mae: float  # < 1 beats the random walk
    dm_pvalue_mae: float  # Diebold-Mariano (HLN), per-origin mean absolute errors vs the random walk
    quantile_loss: float  # mean pinball loss at p10/p50/p90
    quantile_loss_random_walk: float
    dm_pvalue_quantile_loss: float
    coverage_80: float  # share of realised closes within [p10, p90]
    width_80_pct_of_price: float
    direction_accuracy: float  # p50 vs last close, where both moved
    direction_ci: tuple[float, float]
    direction_calls: int
    brier_prob_up: float  # mean (prob_up - [close > last close])^2; 0.25 is a coin flip
    mean_prob_up: float
    realised_up_rate: float
    crps_steps: int = 0  # realised steps with a stored quantile grid (schema >= 4)
    crps: float = math.nan  # CRPS on the grid (quantile decomposition)
    crps_random_walk: float = math.nan  # the last close's absolute error on the same steps
    relative_crps: float = math.nan  # < 1 beats the random walk
    calibrated_steps: int = 0  # realised steps that were published calibrated
    coverage_80_calibrated: float = math.nan  # published (calibrated) [p10, p90] on those steps
    coverage_80_raw_same_steps: float = math.nan  # the raw [p10, p90] on the same steps
    brier_prob_up_calibrated: float = math.nan
    brier_prob_up_raw_same_steps: float = math.nan
    quantile_loss_calibrated: float = math.nan
    quantile_loss_raw_same_steps: float = math.nan
    crps_calibrated: float = math.nan  # the published (calibrated) grid's CRPS on the calibrated steps
    crps_raw_same_steps: float = math.nan

    @property
    def beats_random_walk(self) -> bool:
        """Significantly lower MAE than the random walk (DM p < 0.05)."""
        return self.relative_mae < 1 and self.dm_pvalue_mae < 0.05

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN -> None), e.g. for a model event's details."""
        values = asdict(self)
        values["direction_ci"] = [float(v) for v in self.direction_ci]
        values["beats_random_walk"] = self.beats_random_walk
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def _iso(ms: int | None) -> str | None:
    return None if ms is None else format_ms(ms)


def _per_origin_mean(origin: np.ndarray, values: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(origin, return_inverse=True)
    return np.bincount(inverse, weights=values) / np.bincount(inverse)


def grid_crps(rows: pl.DataFrame, column: str) -> np.ndarray:
    """CRPS per row from the quantile grid in `column` (a list per row, its levels in `grid_levels`); rows may
    mix grids (forecast.quantile_grid changed), each is scored on its own levels."""
    values = np.full(rows.height, np.nan)
    keyed = rows.with_row_index("row").with_columns(pl.col("grid_levels").list.eval(pl.element().cast(pl.Utf8))
                                                    .list.join(",").alias("grid_key"))
    for _, group in keyed.group_by("grid_key"):
        levels = tuple(group["grid_levels"][0].to_list())
        quantiles = np.asarray(group[column].to_list(), dtype=np.float64)
        values[group["row"].to_numpy()] = crps_from_quantiles(levels, quantiles, group["actual"].to_numpy())
    return values


def _crps_scores(realised: pl.DataFrame) -> dict[str, Any]:
    """CRPS on the grid against the random walk, on the realised steps that have a grid (schema >= 4)."""
    if "close_grid" not in realised.columns:
        return {}
    rows = realised.filter(pl.col("close_grid").is_not_null() & pl.col("grid_levels").is_not_null())
    if rows.is_empty():
        return {}
    crps = float(grid_crps(rows, "close_grid").mean())
    reference = float(np.abs(rows["last_close"].to_numpy() - rows["actual"].to_numpy()).mean())
    return {"crps_steps": rows.height, "crps": crps, "crps_random_walk": reference,
            "relative_crps": crps / reference if reference > 0 else math.nan}


def _calibrated_scores(realised: pl.DataFrame) -> dict[str, Any]:
    """Raw and calibrated scores on the realised steps that were published calibrated (see the module doc)."""
    if "close_p10_cal" not in realised.columns:
        return {}
    rows = realised.filter(pl.all_horizontal(pl.col(c).is_not_null() for c in
                                             ("close_p10_cal", "close_p50_cal", "close_p90_cal", "prob_up_cal")))
    if rows.is_empty():
        return {}
    actual = rows["actual"].to_numpy()
    up = (actual > rows["last_close"].to_numpy()).astype(np.float64)
    scores: dict[str, Any] = {"calibrated_steps": rows.height}
    for side, suffix in (("calibrated", "_cal"), ("raw_same_steps", "")):
        quantiles = {level: rows[f"close_{name}{suffix}"].to_numpy() for level, name in STORED_QUANTILES.items()}
        inside = (actual >= quantiles[0.1]) & (actual <= quantiles[0.9])
        pinball = np.mean([metrics.pinball_loss(quantiles[q], actual, q) for q in STORED_QUANTILES], axis=0)
        scores[f"coverage_80_{side}"] = float(inside.mean())
        scores[f"brier_prob_up_{side}"] = float(((rows[f"prob_up{suffix}"].to_numpy() - up) ** 2).mean())
        scores[f"quantile_loss_{side}"] = float(pinball.mean())
    if "close_grid_cal" in rows.columns:
        graded = rows.filter(pl.col("close_grid_cal").is_not_null() & pl.col("close_grid").is_not_null())
        if not graded.is_empty():
            scores["crps_calibrated"] = float(grid_crps(graded, "close_grid_cal").mean())
            scores["crps_raw_same_steps"] = float(grid_crps(graded, "close_grid").mean())
    return scores


def _score_group(key: tuple[str, str, str], rows: pl.DataFrame, window: str) -> LedgerScore | None:
    pending = int(rows["actual"].null_count())
    realised = rows.filter(pl.col("actual").is_not_null())
    if realised.is_empty():
        return None
    origin = realised["origin_ms"].to_numpy()
    actual, last = realised["actual"].to_numpy(), realised["last_close"].to_numpy()
    median = realised["close_p50"].to_numpy()
    quantiles = {level: realised[f"close_{name}"].to_numpy() for level, name in STORED_QUANTILES.items()}
    absolute, absolute_reference = np.abs(median - actual), np.abs(last - actual)
    pinball = np.mean([metrics.pinball_loss(quantiles[q], actual, q) for q in STORED_QUANTILES], axis=0)
    pinball_reference = np.mean([metrics.pinball_loss(last, actual, q) for q in STORED_QUANTILES], axis=0)
    # Forecasts issued every candle overlap by up to horizon - 1 steps: that many DM lags.
    horizon = int(realised["step"].max())
    dm_mae = metrics.diebold_mariano(_per_origin_mean(origin, absolute),
                                     _per_origin_mean(origin, absolute_reference), horizon)
    dm_pinball = metrics.diebold_mariano(_per_origin_mean(origin, pinball),
                                         _per_origin_mean(origin, pinball_reference), horizon)
    called, correct = metrics.direction_hits(median, actual, last)
    calls = int(called.sum())
    share = correct.sum() / calls if calls else math.nan
    # Overlapping forecasts share their outcomes: about one independent call per horizon of calling origins.
    independent = len(np.unique(origin[called])) / horizon
    interval_ci = metrics.wilson_interval(share * independent, independent) if calls else (math.nan, math.nan)
    up = (actual > last).astype(np.float64)
    probability = realised["prob_up"].to_numpy()
    mae, mae_reference = float(absolute.mean()), float(absolute_reference.mean())
    return LedgerScore(
        symbol=key[0], interval=key[1], model_version=key[2], window=window,
        origins=len(np.unique(origin)), scored_steps=realised.height, pending_steps=pending,
        first_origin=_iso(int(origin.min())), last_origin=_iso(int(origin.max())),
        mae=mae, mae_random_walk=mae_reference,
        relative_mae=mae / mae_reference if mae_reference > 0 else math.nan,
        dm_pvalue_mae=dm_mae.pvalue,
        quantile_loss=float(pinball.mean()), quantile_loss_random_walk=float(pinball_reference.mean()),
        dm_pvalue_quantile_loss=dm_pinball.pvalue,
        coverage_80=float(((actual >= quantiles[0.1]) & (actual <= quantiles[0.9])).mean()),
        width_80_pct_of_price=float(((quantiles[0.9] - quantiles[0.1]) / last).mean() * 100),
        direction_accuracy=float(share), direction_ci=interval_ci, direction_calls=calls,
        brier_prob_up=float(((probability - up) ** 2).mean()), mean_prob_up=float(probability.mean()),
        realised_up_rate=float(up.mean()), **_crps_scores(realised), **_calibrated_scores(realised),
    )


def score_ledger(con: duckdb.DuckDBPyConnection, *, window: timedelta | None = None, now: datetime | None = None,
                 symbol: str | None = None, interval: str | None = None,
                 model_version: str | None = None, window_label: str | None = None) -> list[LedgerScore]:
    """Scores per (symbol, interval, model version) of forecasts whose origin lies within `window` of `now`.

    `window=None` scores everything. `now` defaults to the latest stored candle's open time of the scored
    pairs (so a replayed or stale store still has a meaningful "last 7 days"); the daemon passes its clock.
    """
    since = None
    if window is not None:
        if now is None:
            latest = newest_open_time(con, symbol, interval)
            now = datetime.fromtimestamp(latest / 1000, UTC) if latest is not None else datetime.now(UTC)
        if now.tzinfo is None:  # naive times in this project are UTC
            now = now.replace(tzinfo=UTC)
        since = now - window
    rows = forecasts_with_outcomes(con, symbol=symbol, interval=interval, model_version=model_version,
                                   since_ms=None if since is None else int(since.timestamp() * 1000))
    label = window_label or ("all" if window is None else _label(window))
    scores = []
    for key, group in rows.group_by(["symbol", "interval", "model_version"], maintain_order=True):
        score = _score_group(tuple(str(k) for k in key), group, label)
        if score is not None:
            scores.append(score)
    return scores


def overall_errors(con: duckdb.DuckDBPyConnection) -> dict[str, float | int | None]:
    """Every realised step of every stored forecast: median-close MAE against the random walk (last close),
    the share of right direction calls, and what subscribers got: the 80 % band's coverage and P(up)'s Brier
    score as published (calibrated where the forecast went out calibrated, raw elsewhere) and raw, as the
    daemon's summary reports them."""
    realised = forecasts_with_outcomes(con).filter(pl.col("actual").is_not_null())
    if realised.is_empty():
        return {"scored_steps": 0, "mae": None, "mae_random_walk": None, "direction_accuracy": None,
                "coverage_80": None, "coverage_80_raw": None, "brier_prob_up": None, "brier_prob_up_raw": None,
                "calibrated_share": None}
    actual, last = realised["actual"].to_numpy(), realised["last_close"].to_numpy()
    median = realised["close_p50"].to_numpy()
    called, correct = metrics.direction_hits(median, actual, last)
    published = realised
    if "close_p10_cal" in realised.columns:  # schema >= 3: what went out calibrated replaces the raw value
        published = realised.with_columns(
            pl.coalesce(f"{name}_cal", name).alias(name) for name in ("close_p10", "close_p90", "prob_up"))
    up = (actual > last).astype(np.float64)

    def coverage(rows: pl.DataFrame) -> float:
        return float(((actual >= rows["close_p10"].to_numpy()) & (actual <= rows["close_p90"].to_numpy())).mean())

    def brier(rows: pl.DataFrame) -> float:
        return float(((rows["prob_up"].to_numpy() - up) ** 2).mean())

    calibrated = realised["close_p10_cal"].is_not_null().mean() if "close_p10_cal" in realised.columns else 0.0
    return {"scored_steps": realised.height, "mae": float(np.abs(median - actual).mean()),
            "mae_random_walk": float(np.abs(last - actual).mean()),
            "direction_accuracy": float(correct.sum() / called.sum()) if called.any() else None,
            "coverage_80": coverage(published), "coverage_80_raw": coverage(realised),
            "brier_prob_up": brier(published), "brier_prob_up_raw": brier(realised),
            "calibrated_share": float(calibrated)}


def rolling_scores(con: duckdb.DuckDBPyConnection, window: timedelta = timedelta(days=7),
                   now: datetime | None = None, **filters: str | None) -> list[LedgerScore]:
    """What the daemon publishes in its events: the last `window` of origins per model version."""
    return score_ledger(con, window=window, now=now, **filters)


def _label(window: timedelta) -> str:
    seconds = int(window.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_table(scores: list[LedgerScore]) -> str:
    """A fixed-width table for the terminal; version ids are printed whole so they paste into `models promote`."""
    width = max([len("model_version"), *(len(s.model_version) for s in scores)])
    header = (f"{'symbol':<10} {'int':<4} {'model_version':<{width}} {'window':<6} {'origins':>7} {'pending':>7} "
              f"{'MAE':>10} {'MAE/RW':>7} {'DM p':>7} {'QL/RW':>6} {'CRPS/RW':>7} {'cov80':>6} {'dir':>6} {'brier':>6}")
    lines = [header, "-" * len(header)]
    for s in scores:
        ql_ratio = s.quantile_loss / s.quantile_loss_random_walk if s.quantile_loss_random_walk > 0 else math.nan
        lines.append(
            f"{s.symbol:<10} {s.interval:<4} {s.model_version:<{width}} {s.window:<6} {s.origins:>7} "
            f"{s.pending_steps:>7} {s.mae:>10.4g} {s.relative_mae:>7.3f} {s.dm_pvalue_mae:>7.3f} {ql_ratio:>6.3f} "
            f"{s.relative_crps:>7.3f} "
            f"{s.coverage_80:>6.1%} {s.direction_accuracy:>6.1%} {s.brier_prob_up:>6.3f}"
        )
        if s.calibrated_steps:
            # the steps published calibrated, raw on the left of each pair: "cov80 raw -> calibrated"
            lines.append(
                f"{'':<10} {'':<4} {'  calibrated':<{width}} {'':<6} {s.calibrated_steps:>7} {'steps':>7} "
                f"cov80 {s.coverage_80_raw_same_steps:.1%} -> {s.coverage_80_calibrated:.1%}, "
                f"brier {s.brier_prob_up_raw_same_steps:.3f} -> {s.brier_prob_up_calibrated:.3f}, "
                f"QL {s.quantile_loss_raw_same_steps:.4g} -> {s.quantile_loss_calibrated:.4g}, "
                f"CRPS {s.crps_raw_same_steps:.4g} -> {s.crps_calibrated:.4g}"
            )
    return "\n".join(lines)
