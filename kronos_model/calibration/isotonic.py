"""Monotone recalibration of a probability: weighted isotonic regression by pool-adjacent-violators (PAV),
shrunk toward 0.5 where the evidence is thin.

The isotonic fit (Zadrozny & Elkan 2002; the PAV algorithm of Ayer et al. 1955, see Barlow et al. 1972) maps
the raw probability to the non-decreasing step function that best fits the outcomes in weighted least squares,
so it can only keep or merge the raw ordering, never invert it: an anti-informative raw P(up) merges into one
block at the base rate. Each block's mean is then shrunk toward 0.5 as if `prior_strength` pseudo-outcomes of
1/2 had been seen in it (a Beta(prior/2, prior/2) prior), so a block backed by a handful of outcomes stays
near a coin flip; a second PAV pass on the shrunk values keeps the map monotone. With no outcomes at all the
map is the constant 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# raw probabilities are pooled on this grid before PAV: a forecast from S sample paths only takes the values
# k / S, and pooling keeps the fit O(distinct values) instead of O(outcomes)
PROBABILITY_BINS = 1000


def pool_probabilities(probability: np.ndarray, outcome: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """(B, PROBABILITY_BINS + 1) weight and weighted outcome per rounded probability, for each of the B rows of
    (B, N) probabilities, outcomes (0/1) and weights."""
    rows, bins = probability.shape[0], PROBABILITY_BINS + 1
    binned = np.rint(np.clip(probability, 0.0, 1.0) * PROBABILITY_BINS).astype(np.int64)
    index = binned + bins * np.arange(rows)[:, None]
    mass = np.bincount(index.ravel(), weights=weights.ravel(), minlength=rows * bins).reshape(rows, bins)
    ups = np.bincount(index.ravel(), weights=(weights * outcome).ravel(), minlength=rows * bins).reshape(rows, bins)
    return mass, ups


def pool_adjacent_violators(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted non-decreasing least-squares fit of `values` (already in the order of their x).

    Returns (block_start, block_value, block_weight): block b covers positions block_start[b] up to the next
    start, with the weighted mean block_value[b] of the values there; the block values never decrease.
    """
    starts: list[int] = []
    means: list[float] = []
    masses: list[float] = []
    for position, (value, weight) in enumerate(zip(values.tolist(), weights.tolist(), strict=True)):
        starts.append(position)
        means.append(value)
        masses.append(weight)
        # merge backwards while the newest block undercuts the one before it
        while len(means) > 1 and means[-2] > means[-1]:
            mass = masses[-2] + masses[-1]
            means[-2] = (means[-2] * masses[-2] + means[-1] * masses[-1]) / mass if mass > 0 else means[-1]
            masses[-2] = mass
            starts.pop()
            means.pop()
            masses.pop()
    return np.asarray(starts, dtype=np.int64), np.asarray(means), np.asarray(masses)


@dataclass(frozen=True)
class MonotoneMap:
    """A fitted recalibration: piecewise-linear through (knots_x, knots_y), flat beyond the ends."""

    knots_x: np.ndarray
    knots_y: np.ndarray
    evidence: float  # total weight of the outcomes behind the fit

    def __call__(self, probability: np.ndarray | float) -> np.ndarray:
        if len(self.knots_x) == 0:
            return np.full(np.shape(probability), 0.5)
        return np.interp(probability, self.knots_x, self.knots_y)


def fit_shrunk_isotonic(mass: np.ndarray, ups: np.ndarray, prior_strength: float) -> MonotoneMap:
    """Fit the shrunk isotonic map from one row of `pool_probabilities`: weight and weighted ups per bin."""
    occupied = np.flatnonzero(mass > 0)
    if len(occupied) == 0:
        return MonotoneMap(np.empty(0), np.empty(0), 0.0)
    mass, ups = mass[occupied], ups[occupied]
    x = occupied / PROBABILITY_BINS
    starts, means, masses = pool_adjacent_violators(ups / mass, mass)
    shrunk = (means * masses + 0.5 * prior_strength) / (masses + prior_strength)
    # shrinking blocks of unequal weight can reorder them; pool again with the prior counted as weight
    restarts, values, _ = pool_adjacent_violators(shrunk, masses + prior_strength)
    block_of_first = np.repeat(np.arange(len(restarts)), np.diff(np.append(restarts, len(starts))))
    final_value = values[block_of_first]  # per first-pass block
    ends = np.append(starts[1:], len(x)) - 1
    # each block is flat from its smallest to its largest x; np.interp joins neighbouring blocks linearly
    knots_x = np.column_stack((x[starts], x[ends])).ravel()
    knots_y = np.repeat(final_value, 2)
    return MonotoneMap(knots_x, knots_y, float(mass.sum()))
