"""Online calibration of published forecasts: quantile bands that cover what they claim, and a P(up) that is
never worse than a coin flip.

Pure: numpy, scipy and kronos_model only (never `daemon` or `storage`), so the daemon, `kronosd evaluate` and
the promotion gate share one implementation. One `OnlineCalibrator` serves one pair (one target series, the
close); its `CalibrationConfig` fixes the horizon, the candle length and the quantile grid (default 5 %...95 %
in 5 % steps, which holds the published 10/50/90 levels).

Usage (the daemon; `replay`/`warm` do the same over history)::

    calibrator = OnlineCalibrator(CalibrationConfig(horizon=24, interval_ms=3_600_000))
    calibrator.warm((RawForecast(...), realised_closes) for each stored forecast)    # at start
    ...on every closed candle:
    calibrator.observe_candle(open_time_ms, close)        # outcomes of earlier forecasts, clock -> open_time
    close_paths = forecast.paths[:, :, forecast.columns.index("close")]        # a predictor.Forecast
    raw = RawForecast.from_paths(open_time_ms, forecast.last_close, close_paths)
    published = calibrator.calibrate(raw)
    published.quantiles, published.prob_up, published.calibrated, published.raw
    calibrator.coverage_report()                          # recent coverage per nominal band, raw and published

Quantiles: conformalized quantile regression on the central bands
-----------------------------------------------------------------
Scores live in log-return space relative to the origin's close: r_tau = log(raw quantile / last close), y the
realised log return. The default `score_mode="central"` is split-conformal CQR (Romano, Patterson & Candès
2019) applied to every central band the grid holds (5-95 %, 10-90 %, ..., 45-55 %):

    E = max(r_lo - y, y - r_hi) / spread,    spread = r_90% - r_10% of the same forecast

how far the outcome fell outside the raw band (negative inside). The published band is [r_lo - spread Q,
r_hi + spread Q], Q the weighted conformal quantile of the step's past E at the band's coverage (the test
point counted at +infinity, so bands err wide). The median (and any level without a mirror) stays raw, so
the calibrator never chases a trend. `score_mode="per-level"` instead corrects every level on its own, one
sided (s = (y - r_tau) / spread, published r_tau + spread Q_tau(s); upper levels put the test point at
+infinity, lower ones at -infinity): it also removes a biased median, but on hourly crypto with overlapping
horizons it measured noisier (CRPS 1-2 % worse than "central", benchmarks/calibration_check.py). Dividing by
the raw spread (`score_scale="spread"`, the normalised scores of Lei et al. 2018) lets a model whose spread
follows volatility keep doing so; `"none"` uses plain log-return differences. Corrected levels are sorted
(rearrangement, Chernozhukov et al. 2010), so quantiles never cross.

Regime changes: scores are weighted by age (halving every `half_life` outcomes within a `window`, the
non-exchangeable conformal prediction of Barber et al. 2023), and each band's (or level's) target is moved by
adaptive conformal inference (ACI, Gibbs & Candès 2021): alpha_t+1 = alpha_t + gamma (alpha - err_t), i.e.
target_t+1 = target_t + gamma (target - hit_t), clipped to [0, 1] (there the threshold is the most extreme
score rather than infinite). Only forecasts that were published calibrated move it.

Delayed feedback (Wang & Hyndman 2024, multi-step conformal prediction): the outcome of an h-step forecast
is known only h candles later, so each horizon step keeps its own score ring, ACI targets and P(up) state,
fed as its targets close; the calibrator keeps each forecast it published (`track`) until they do. Forecasts
made every candle share h - 1 of the h candles behind consecutive step-h outcomes, so misses arrive in runs of
about h: each outcome gets gamma * spacing / h of the ACI step (spacing: candles since the previous forecast),
which keeps the long-run correction while stopping the runs from swinging the band (measured: without it the
calibrated CRPS of a too-wide forecaster came out worse than raw on hourly ETHUSDT).

P(up): isotonic recalibration mixed with a coin flip
-----------------------------------------------------
Per step, the outcomes (close above the origin's close) of recent forecasts are regressed on their raw P(up)
by weighted pool-adjacent-violators (isotonic regression, Zadrozny & Elkan 2002), each block shrunk toward
0.5 by `prob_up_prior` pseudo-outcomes, so a block backed by a handful of outcomes stays near a coin flip and
an anti-informative raw P(up) merges into the base rate (isotonic can merge, never invert). That expert is
then mixed with the constant 0.5 by exponentially weighted aggregation on their discounted Brier losses
(learning rate 1/2, for which the square loss is exp-concave: the mix's cumulative loss is within ln 2 / 0.5
of the better expert's; Kivinen & Warmuth 1999, Cesa-Bianchi & Lugosi 2006), so where overlapping, correlated
outcomes make the isotonic fit overfit, the published P(up) falls back to a coin flip. With no evidence it is
exactly 0.5. It is published from the first forecast on; the quantiles stay raw (flagged `step_calibrated`
False) until a step has `min_history` scores.

No look-ahead, by construction
------------------------------
The clock is the open time of the newest closed candle. `observe` refuses (LookAheadError) an outcome whose
target candle opens after the clock; `calibrate` refuses a forecast whose origin is before the clock (unless
`allow_newer_evidence`, for a daemon publishing late); `replay` registers an outcome only once the forecast
being calibrated is at or after its target. Bad closes (NaN, inf, <= 0) are skipped and counted, repeated
outcomes ignored and counted (`counters`); malformed forecasts and states raise ValueError.

State: `to_state()` is a JSON-able dict (arrays as exact base64 float64), `from_state` checks and restores
it. `crps_from_quantiles` scores the stored quantile grid (see `grid`).

References: Romano, Patterson & Candès, Conformalized quantile regression, NeurIPS 2019. Sesia & Candès, A
comparison of some conformal quantile regression methods, Stat 2020. Lei, G'Sell, Rinaldo, Tibshirani &
Wasserman, Distribution-free predictive inference for regression, JASA 2018. Gibbs & Candès, Adaptive conformal
inference under distribution shift, NeurIPS 2021. Barber, Candès, Ramdas & Tibshirani, Conformal prediction
beyond exchangeability, Ann. Statist. 2023. Wang & Hyndman, Online conformal inference for multi-step time
series forecasting, arXiv:2410.13115, 2024. Zadrozny & Elkan, Transforming classifier scores into accurate
multiclass probability estimates, KDD 2002. Chernozhukov, Fernández-Val & Galichon, Quantile and probability
curves without crossing, Econometrica 2010. Gneiting & Raftery, Strictly proper scoring rules, JASA 2007.
Kivinen & Warmuth, Averaging expert predictions, EuroCOLT 1999. Cesa-Bianchi & Lugosi, Prediction, Learning,
and Games, 2006.
"""

from kronos_model.calibration.forecasts import CalibratedForecast, CalibrationConfig, LookAheadError, RawForecast
from kronos_model.calibration.grid import DEFAULT_LEVELS, central_intervals, crps_from_quantiles, level_weights
from kronos_model.calibration.online import OnlineCalibrator

__all__ = [
    "DEFAULT_LEVELS",
    "CalibratedForecast",
    "CalibrationConfig",
    "LookAheadError",
    "OnlineCalibrator",
    "RawForecast",
    "central_intervals",
    "crps_from_quantiles",
    "level_weights",
]
