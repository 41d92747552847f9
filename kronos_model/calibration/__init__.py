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
    published = calibrator.calibrate(RawForecast.from_paths(open_time_ms, close, close_paths))
    published.quantiles, published.prob_up, published.calibrated, published.raw
    calibrator.coverage_report()                          # recent coverage per nominal band, raw and published

Quantiles: conformalized quantile regression, one-sided per level
--------------------------------------------------------------------
The split-conformal correction of quantile regression (CQR, Romano, Patterson & Candès 2019) is applied to
each quantile level tau on its own, as in the one-sided variant of that paper and Sesia & Candès (2020):
in log-return space relative to the origin's close, the score of an outcome y for level tau is

    s_tau = (y - r_tau) / spread,    r_tau = log(raw quantile / last close),  spread = r_90% - r_10%

and the published quantile is r_tau + spread * Q(s_tau), Q the weighted conformal quantile of the step's past
scores at level tau (upper levels add the test point at +infinity, lower ones at -infinity, so every central
band errs wide). Per-level rather than per-interval scores also remove a bias of the median (the raw median
path that jumps away from the last close), which a symmetric interval score cannot. Dividing by the raw
spread (`score_scale="spread"`, the normalised scores of Lei et al. 2018) lets a model whose spread follows
volatility keep doing so; `"none"` uses plain differences for a model whose spread carries no information.
The corrected levels are sorted (rearrangement, Chernozhukov et al. 2010) so quantiles never cross.

Regime changes: scores are weighted by age (halving every `half_life` outcomes within a `window`, the
non-exchangeable conformal prediction of Barber et al. 2023), and each level's target is moved by adaptive
conformal inference (ACI, Gibbs & Candès 2021): after each outcome, tau_t+1 = tau_t + gamma (tau - 1{y <=
published q_tau}), i.e. alpha_t+1 = alpha_t + gamma (alpha - err_t) per tail, clipped to [0, 1] (there the
threshold is the most extreme score rather than infinite). Only outcomes of forecasts that were published
calibrated move the level.

Delayed feedback (Wang & Hyndman 2024, multi-step conformal prediction): the outcome of an h-step forecast
is known only h candles later, so each horizon step keeps its own score ring, ACI levels and P(up) outcomes,
fed as its targets close. The calibrator keeps each forecast it published (`track`) until its targets close.

P(up): isotonic recalibration
-----------------------------
Per step, the outcomes (close above the origin's close) of recent forecasts are regressed on their raw P(up)
by weighted pool-adjacent-violators (isotonic regression, Zadrozny & Elkan 2002), each block shrunk toward
0.5 by `prob_up_prior` pseudo-outcomes: 0.5 with no evidence, near 0.5 with little, the base rate when the
raw P(up) carries no information or the wrong sign (isotonic can merge, never invert). This is published
from the first forecast on; the quantiles stay raw (flagged `step_calibrated` False) until a step has
`min_history` scores.

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
