"""Weighted conformal thresholds over a ring buffer of nonconformity scores.

Scores are kept per horizon step as a ring buffer `(L, W)`: one row per quantile level, one column per
observation, NaN where nothing was written yet. A score's weight halves every `half_life` observations of its
age (the newest has weight 1), which is the non-exchangeable conformal prediction of Barber, Candès, Ramdas &
Tibshirani (2023): recent scores count more, so the threshold follows a change of regime, at the price of a
smaller effective sample. `half_life=None` gives equal weights (a plain rolling window).

The finite-sample correction adds the test point itself with weight 1 at +infinity (upper levels, tau >= 0.5)
or at -infinity (lower levels), so both ends of every central interval err on the wide side: for exchangeable
scores and equal weights, the lower quantile is exceeded from below with probability <= tau and the upper one
from above with probability <= 1 - tau. When that point's mass decides (the ACI level has gone to 0 or 1, or
there are few scores) the threshold would be infinite; it is clipped to the most extreme score instead, since
an infinite band cannot be published.
"""

from __future__ import annotations

import numpy as np


def age_weights(count: np.ndarray, head: np.ndarray, window: int, half_life: float | None) -> np.ndarray:
    """(B, W) weight of every ring-buffer slot: 0.5 ** (age / half_life), 0 for empty slots.

    count: (B,) filled slots per buffer; head: (B,) the slot the next score goes to (the newest is head - 1).
    """
    slots = np.arange(window)[None, :]
    age = (head[:, None] - 1 - slots) % window
    filled = age < count[:, None]
    weights = np.ones((len(count), window)) if half_life is None else np.exp2(-age / half_life)
    return np.where(filled, weights, 0.0)


def weighted_thresholds(scores: np.ndarray, weights: np.ndarray, count: np.ndarray, target_levels: np.ndarray,
                        upper: np.ndarray) -> np.ndarray:
    """(B, L) conformal threshold per buffer and level.

    scores: (B, L, W) with NaN in empty slots; weights: (B, W), 0 in empty slots; count: (B,) filled slots,
    at least one each; target_levels: (B, L) the (ACI-adjusted) level to reach, clipped to [0, 1]; upper: (L,)
    bool, True where the test point's mass goes to +infinity.
    """
    if np.any(count < 1):
        raise ValueError("a conformal threshold needs at least one score")
    batch = np.arange(len(count))[:, None, None]
    order = np.argsort(scores, axis=-1)  # NaN (empty slots, weight 0) sort last
    cumulative = np.cumsum(weights[batch, order], axis=-1)
    total = cumulative[..., -1] + 1.0  # + the test point
    levels = np.clip(target_levels, 0.0, 1.0)
    # lower levels: the test point's mass sits below every score, so the scores need to supply one weight less
    needed = levels * total - np.where(upper[None, :], 0.0, 1.0) - 1e-12 * total
    # cumulative never decreases along a row, so the first position that reaches `needed` is the number before
    # it. Past the last score (the test point at +inf decides) clip to the largest score; a level reached before
    # the first score (the test point at -inf) gives the smallest.
    first = np.minimum((cumulative < needed[..., None]).sum(axis=-1), count[:, None] - 1)
    slots = np.take_along_axis(order, first[..., None], axis=-1)
    return np.take_along_axis(scores, slots, axis=-1)[..., 0]


def rearrange(quantiles: np.ndarray, axis: int = 0) -> np.ndarray:
    """Sort quantiles along the level axis so they never cross (Chernozhukov, Fernández-Val & Galichon 2010:
    the sorted curve is at least as close to the true quantile curve, and each level's pinball loss summed
    over the levels can only fall)."""
    return np.sort(quantiles, axis=axis)
