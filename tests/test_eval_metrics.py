"""Scores against hand-computed cases and known statistical properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from kronos_model.evaluation import metrics


def normal_crps(mu: float, sigma: float, y: np.ndarray) -> np.ndarray:
    """Closed form CRPS of N(mu, sigma^2) (Gneiting & Raftery 2007)."""
    z = (y - mu) / sigma
    return sigma * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / math.sqrt(math.pi))


# -- CRPS -----------------------------------------------------------------------------------------------------

def test_crps_of_a_point_forecast_is_its_absolute_error():
    rng = np.random.default_rng(1)
    point, observed = rng.normal(size=(50, 1)) * 100, rng.normal(size=50) * 100
    assert metrics.crps_from_samples(point, observed) == pytest.approx(np.abs(point[:, 0] - observed))


def test_crps_by_hand_two_samples():
    # samples {0, 2}, y = 1: E|X - y| = 1, E|X - X'| = (0 + 2 + 2 + 0) / 4 = 1, CRPS = 1 - 0.5 = 0.5
    assert metrics.crps_from_samples(np.array([0.0, 2.0]), np.array(1.0)) == pytest.approx(0.5)
    # y = 3 outside: E|X - y| = (3 + 1) / 2 = 2, CRPS = 2 - 0.5 = 1.5
    assert metrics.crps_from_samples(np.array([2.0, 0.0]), np.array(3.0)) == pytest.approx(1.5)


def test_crps_sorted_formula_equals_the_pairwise_definition():
    rng = np.random.default_rng(2)
    samples, observed = rng.normal(size=(7, 9)), rng.normal(size=7)
    pairwise = np.abs(samples - observed[:, None]).mean(-1) - 0.5 * np.abs(
        samples[:, :, None] - samples[:, None, :]).mean((-1, -2))
    assert metrics.crps_from_samples(samples, observed) == pytest.approx(pairwise)


def test_crps_of_many_normal_samples_matches_the_closed_form():
    levels = (np.arange(4000) + 0.5) / 4000
    samples = 2.0 + 3.0 * stats.norm.ppf(levels)
    observed = np.array([-4.0, 0.0, 2.0, 5.0, 11.0])
    expected = normal_crps(2.0, 3.0, observed)
    got = metrics.crps_from_samples(np.broadcast_to(samples, (5, 4000)), observed)
    assert got == pytest.approx(expected, rel=2e-3)


def test_crps_rewards_the_true_distribution_over_a_too_narrow_one():
    rng = np.random.default_rng(3)
    observed = rng.normal(size=4000)
    true = metrics.crps_from_samples(rng.normal(size=(4000, 50)), observed).mean()
    narrow = metrics.crps_from_samples(0.3 * rng.normal(size=(4000, 50)), observed).mean()
    assert true < narrow


# -- quantiles, intervals, PIT --------------------------------------------------------------------------------

def test_pinball_loss_by_hand():
    assert metrics.pinball_loss(np.array(10.0), np.array(12.0), 0.9) == pytest.approx(0.9 * 2)
    assert metrics.pinball_loss(np.array(10.0), np.array(7.0), 0.9) == pytest.approx(0.1 * 3)
    assert metrics.pinball_loss(np.array(10.0), np.array(7.0), 0.5) == pytest.approx(1.5)


def test_quantile_loss_of_a_point_forecast_is_half_its_absolute_error():
    # mean over symmetric levels of max(t e, (t - 1) e) = |e| * mean(levels) = |e| / 2
    point, observed = np.array([[5.0]]), np.array([8.0])
    assert metrics.quantile_loss(point, observed) == pytest.approx([1.5])


def test_calibrated_forecasts_cover_about_nominal_and_have_a_flat_pit():
    rng = np.random.default_rng(4)
    count = 4000
    scale = rng.uniform(0.5, 3, size=count)  # every forecast knows its own spread
    observed = rng.normal(size=count) * scale
    samples = rng.normal(size=(count, 200)) * scale[:, None]
    for nominal in metrics.NOMINAL_COVERAGES:
        covered, width = metrics.interval_hits(samples, observed, nominal)
        assert covered.mean() == pytest.approx(nominal, abs=0.025)
        expected_width = 2 * stats.norm.ppf(0.5 + nominal / 2) * scale
        assert width.mean() == pytest.approx(expected_width.mean(), rel=0.05)
    pit = metrics.probability_integral_transform(samples, observed)
    assert max(abs(share - 0.1) for share in metrics.pit_histogram(pit)) < 0.02
    assert metrics.pit_ks_statistic(pit) < 0.03


def test_overconfident_forecasts_undercover_and_pile_pit_at_the_edges():
    rng = np.random.default_rng(5)
    observed = rng.normal(size=3000)
    samples = 0.4 * rng.normal(size=(3000, 100))
    covered, _ = metrics.interval_hits(samples, observed, 0.9)
    assert covered.mean() < 0.6
    histogram = metrics.pit_histogram(metrics.probability_integral_transform(samples, observed))
    assert histogram[0] > 0.2 and histogram[-1] > 0.2
    assert metrics.pit_ks_statistic(metrics.probability_integral_transform(samples, observed)) > 0.15


def test_pit_of_a_point_forecast_spreads_over_its_half():
    pit = metrics.probability_integral_transform(np.zeros((1000, 1)), np.ones(1000))
    assert ((pit >= 0.5) & (pit <= 1)).all()


# -- point scores and direction -------------------------------------------------------------------------------

def test_mape_and_mase_scale_by_hand():
    assert metrics.absolute_percentage_error(np.array([110.0]), np.array([100.0])) == pytest.approx([10.0])
    assert metrics.naive_scale(np.array([[1.0, 3.0, 2.0, 6.0]])) == pytest.approx([7 / 3])


def test_direction_hits_ignore_no_call_and_no_move():
    last = np.array([10.0, 10.0, 10.0, 10.0])
    point = np.array([11.0, 9.0, 10.0, 12.0])
    observed = np.array([12.0, 11.0, 15.0, 10.0])
    called, correct = metrics.direction_hits(point, observed, last)
    assert called.tolist() == [True, True, False, False]
    assert correct.tolist() == [True, False, False, False]


def test_wilson_interval_known_values():
    low, high = metrics.wilson_interval(50, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    low, high = metrics.wilson_interval(0, 10)
    assert low == 0 and high == pytest.approx(0.2775, abs=1e-4)


def test_information_coefficients():
    predicted = np.array([0.01, 0.02, -0.01, 0.03, 0.0])
    ic, rank_ic = metrics.information_coefficients(predicted, predicted * 2 + 0.001)
    assert ic == pytest.approx(1.0) and rank_ic == pytest.approx(1.0)
    ic, rank_ic = metrics.information_coefficients(np.zeros(5), predicted)
    assert math.isnan(ic) and math.isnan(rank_ic)
    _, rank_ic = metrics.information_coefficients(predicted, -(predicted**3))
    assert rank_ic == pytest.approx(-1.0)


# -- Diebold-Mariano ------------------------------------------------------------------------------------------

def test_dm_pvalues_are_uniform_for_equally_good_forecasters():
    rng = np.random.default_rng(6)
    pvalues = []
    for _ in range(600):
        observed = rng.normal(size=80)
        first = observed + rng.normal(size=80)
        second = observed + rng.normal(size=80)
        pvalues.append(metrics.diebold_mariano(np.abs(first - observed), np.abs(second - observed)).pvalue)
    pvalues = np.array(pvalues)
    assert stats.kstest(pvalues, "uniform").pvalue > 0.01
    assert 0.02 < (pvalues < 0.05).mean() < 0.09


def test_dm_pvalues_stay_near_uniform_for_overlapping_forecasts_with_lags():
    # 4-step forecasts issued every step: the loss differential is an MA(3) process.
    rng = np.random.default_rng(7)
    rejections = 0
    trials = 400
    for _ in range(trials):
        shocks = rng.normal(size=(2, 303))
        loss_a = np.convolve(shocks[0], np.ones(4), "valid") ** 2
        loss_b = np.convolve(shocks[1], np.ones(4), "valid") ** 2
        rejections += metrics.diebold_mariano(loss_a, loss_b, horizon=4).pvalue < 0.05
    assert rejections / trials < 0.1


def test_dm_detects_a_better_forecaster_and_signs_the_statistic():
    rng = np.random.default_rng(8)
    observed = rng.normal(size=200)
    good = observed + 0.5 * rng.normal(size=200)
    bad = observed + 1.5 * rng.normal(size=200)
    result = metrics.diebold_mariano(np.abs(good - observed), np.abs(bad - observed))
    assert result.pvalue < 1e-6 and result.statistic < 0 and result.mean_difference < 0
    assert result.observations == 200


def test_dm_hln_statistic_by_hand():
    difference = np.array([1.0, -0.5, 2.0, 0.5, 1.0, -1.0])
    n, mean = len(difference), difference.mean()
    variance = ((difference - mean) ** 2).mean()
    expected = mean / math.sqrt(variance / n) * math.sqrt((n + 1 - 2 + 0) / n)
    result = metrics.diebold_mariano(difference, np.zeros(n))
    assert result.statistic == pytest.approx(expected)
    assert result.pvalue == pytest.approx(2 * stats.t.sf(abs(expected), n - 1))


def test_dm_of_identical_forecasts_gives_no_evidence_and_short_series_give_nan():
    losses = np.arange(10.0)
    assert metrics.diebold_mariano(losses, losses).pvalue == 1.0
    assert math.isnan(metrics.diebold_mariano(losses[:2], losses[:2] + 1).pvalue)
