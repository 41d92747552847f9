"""`kronosd evaluate --calibrate`: sequential, no-look-ahead calibration of walk-forward forecasts on real
candles, the raw and calibrated rows, the burn-in, --resample and the side-by-side calibration plot."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from kronos_model.calibration import CalibrationConfig
from kronos_model.data import read_candles
from kronos_model.evaluation.calibrated import QuantileGrid, calibrate_sequentially
from kronos_model.evaluation.models import load_model
from kronos_model.evaluation.report import build_report
from kronos_model.evaluation.scoring import to_jsonable
from kronos_model.evaluation.walkforward import Settings, resample_series, run_walk_forward, series_from_frame
from tests.eval_helpers import ETH, TINY, kronosd
from tests.test_eval_walkforward import BTC, HOUR

ROW_KEYS = {"coverage_50", "coverage_80", "coverage_90", "crps", "pinball_loss", "brier_prob_up", "mae",
            "relative_mae", "crps_grid", "by_regime"}


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def real_closes(count: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """The last `count` real BTCUSDT hourly (open time ms, close)."""
    frame = read_candles(BTC).tail(count)
    times = frame["timestamps"].to_numpy().astype("datetime64[ms]").astype(np.int64)
    return times, frame["close"].to_numpy().astype(np.float64)


def gaussian_forecasts(times: np.ndarray, closes: np.ndarray, positions: np.ndarray, horizon: int,
                       seed: int = 0) -> np.ndarray:
    """(N, 30, H) random-walk sample paths around each origin's close, too narrow (half the trailing vol)."""
    rng = np.random.default_rng(seed)
    returns = np.diff(np.log(closes))
    paths = []
    for p in positions:
        volatility = returns[p - 168 : p].std()
        steps = rng.normal(0, 0.5 * volatility, (30, horizon))
        paths.append(closes[p] * np.exp(np.cumsum(steps, axis=1)))
    return np.stack(paths)


def calibrate(times: np.ndarray, closes: np.ndarray, positions: np.ndarray, samples: np.ndarray, horizon: int,
              burn_in: int) -> QuantileGrid:
    config = CalibrationConfig(horizon=horizon, interval_ms=3_600_000, min_history=20)
    return calibrate_sequentially(config, times, closes, times[positions], closes[positions], samples, burn_in).grid


@pytest.mark.parametrize("stride", [6, 1])  # non-overlapping targets, and a forecast every candle like the daemon
def test_a_calibrated_origin_never_changes_when_later_candles_change_or_are_cut_off(stride):
    horizon = 6
    times, closes = real_closes()
    positions = np.arange(200, len(times) - horizon, stride)[:160]
    samples = gaussian_forecasts(times, closes, positions, horizon)
    burn_in = 60
    grid = calibrate(times, closes, positions, samples, horizon, burn_in)
    cut = 70  # a scored origin: everything after its own candle is altered (its own targets too)
    origin = positions[burn_in + cut]
    altered = closes.copy()
    altered[origin + 1 :] *= np.linspace(1.3, 0.6, len(closes) - origin - 1)
    altered_samples = samples.copy()
    altered_samples[burn_in + cut + 1 :] *= 1.2
    again = calibrate(times, altered, positions, altered_samples, horizon, burn_in)
    keep = slice(0, cut + 1)
    np.testing.assert_array_equal(grid.quantiles[keep], again.quantiles[keep])
    np.testing.assert_array_equal(grid.prob_up[keep], again.prob_up[keep])
    # the test can see a change: the origins after the cut were calibrated on the altered outcomes
    assert not np.array_equal(grid.quantiles[cut + 1 :], again.quantiles[cut + 1 :])
    # data appended later cannot reach back either: the history cut right after the origin gives the same
    short = positions[: burn_in + cut + 1]
    truncated = calibrate(times[: origin + 1], closes[: origin + 1], short, samples[: len(short)], horizon, burn_in)
    np.testing.assert_array_equal(grid.quantiles[keep], truncated.quantiles)
    np.testing.assert_array_equal(grid.prob_up[keep], truncated.prob_up)


def test_sequential_calibration_fixes_too_narrow_bands_on_real_candles():
    horizon = 6
    times, closes = real_closes(6000)
    positions = np.arange(200, len(times) - horizon, horizon)
    samples = gaussian_forecasts(times, closes, positions, horizon)
    burn_in = 100
    grid = calibrate(times, closes, positions, samples, horizon, burn_in)
    scored = positions[burn_in:]
    actual = closes[scored[:, None] + np.arange(1, horizon + 1)]
    raw = QuantileGrid.from_samples(samples[burn_in:], closes[scored], grid.levels)
    coverage = {name: float(((low <= actual) & (actual <= high)).mean())
                for name, (low, high) in (("raw", raw.band(0.8)), ("calibrated", grid.band(0.8)))}
    assert coverage["raw"] < 0.6 and 0.74 <= coverage["calibrated"] <= 0.86, coverage
    assert grid.crps(actual).mean() < raw.crps(actual).mean()
    assert grid.step_calibrated.all()


def test_burn_in_precedes_the_scored_origins_and_raw_forecasts_do_not_depend_on_it():
    series = series_from_frame(read_candles(ETH))
    source = load_model(str(TINY), name="kronos")
    start = np.datetime64("2024-06-01T00:00", "ms")
    plain = Settings(lookback=48, horizon=4, origins=6, samples=4, stride=4, start=start)
    calibrated = Settings(lookback=48, horizon=4, origins=6, samples=4, stride=4, start=start, calibrate=True,
                          burn_in=55)
    walk, _ = run_walk_forward(series, [source], plain, progress=False)
    walk_cal, plan = run_walk_forward(series, [source], calibrated, progress=False)
    np.testing.assert_array_equal(walk.forecasts["kronos"], walk_cal.forecasts["kronos"])
    burn_first, burn_last = walk_cal.calibration["burn_in_period"]
    assert burn_last < start <= walk_cal.origin_times[0]
    assert burn_last >= start - 4 * HOUR and burn_last - burn_first == 54 * 4 * HOUR  # 55 origins, 4 candles apart
    assert walk_cal.calibration["burn_in"] == 55
    report = to_jsonable(build_report(walk_cal, plan, series, [source], calibrated, str(ETH)))
    assert list(report["models"])[:2] == ["kronos", "kronos_calibrated"] and "vol_band_calibrated" in report["models"]
    summary = report["calibration"]
    assert summary["burn_in_origins"] == 55 and summary["default_burn_in_origins"] == 200
    assert summary["models"]["kronos"]["scored_steps_calibrated"] == 1.0  # 55 outcomes per step >= min_history 50


def test_resample_aggregates_whole_buckets_and_drops_ones_with_an_outage():
    series = series_from_frame(read_candles(BTC))
    four = resample_series(series, np.timedelta64(4 * 3_600_000, "ms"))
    assert four.interval == 4 * HOUR
    assert (four.times.astype(np.int64) % (4 * 3_600_000) == 0).all()
    first = series.values[:4]
    np.testing.assert_array_equal(four.values[0], [first[0, 0], first[:, 1].max(), first[:, 2].min(), first[-1, 3],
                                                   first[:, 4].sum(), first[:, 5].sum()])
    # BTCUSDT misses 2023-03-24 13:00, so the 12:00 bucket is incomplete and left out
    assert np.datetime64("2023-03-24T12:00", "ms") not in four.times
    assert np.datetime64("2023-03-24T08:00", "ms") in four.times
    assert len(four.times) == (len(series.times) + 1) // 4 - 1
    with pytest.raises(ValueError, match="whole multiple"):
        resample_series(series, np.timedelta64(90 * 60_000, "ms"))


def test_evaluate_calibrate_writes_raw_and_calibrated_rows_and_the_side_by_side_plot(tmp_path):
    out = tmp_path / "report"
    result = kronosd("evaluate", "--data", str(ETH), "--model", str(TINY), "--lookback", "48", "--horizon", "6",
                     "--origins", "12", "--samples", "6", "--calibrate", "--burn-in", "55", "--start", "2024-08-01",
                     "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    models = report["models"]
    for name in ("kronos", "kronos_calibrated", "vol_band", "vol_band_calibrated"):
        assert set(models[name]) >= ROW_KEYS, name
    for name in ("random_walk", "drift", "seasonal_naive"):
        assert f"{name}_calibrated" not in models and models[name]["brier_prob_up"] is None
    # central-band calibration leaves the median alone: the point scores are the raw ones
    assert models["kronos_calibrated"]["mae"] == pytest.approx(models["kronos"]["mae"])
    assert models["kronos_calibrated"]["crps_grid"] == pytest.approx(models["kronos_calibrated"]["crps"])
    assert models["kronos_calibrated"]["coverage_90"] != models["kronos"]["coverage_90"]
    assert report["calibration"]["burn_in_origins"] == 55
    assert report["calibration"]["burn_in_period"][1] < "2024-08-01" <= report["origin_times"][0]
    markdown = (out / "report.md").read_text()
    assert "## Raw vs calibrated" in markdown and "| kronos_calibrated |" in markdown
    assert "kronos_calibrated" in result.stdout  # the verdicts printed cover the calibrated rows
    # calibration.png: raw coverage, calibrated coverage, then PIT of kronos and the vol band (4 panels)
    width, _ = png_size(out / "calibration.png")
    assert width == round(4.2 * 4 * 110)
    plain = tmp_path / "plain"
    assert kronosd("evaluate", "--data", str(ETH), "--model", str(TINY), "--lookback", "48", "--horizon", "6",
                   "--origins", "12", "--samples", "6", "--quiet", "--out", str(plain)).returncode == 0
    assert png_size(plain / "calibration.png")[0] == round(4.2 * 3 * 110)
    assert "kronos_calibrated" not in json.loads((plain / "report.json").read_text())["models"]


def test_a_burn_in_that_does_not_fit_is_a_clear_error(tmp_path):
    result = kronosd("evaluate", "--data", str(ETH), "--model", str(TINY), "--lookback", "48", "--horizon", "6",
                     "--origins", "12", "--samples", "4", "--calibrate", "--burn-in", "5000", "--out", str(tmp_path))
    assert result.returncode == 2 and "burn-in needs 5000 origins" in result.stderr
    assert "add earlier data" in result.stderr
    stray = kronosd("evaluate", "--data", str(ETH), "--model", str(TINY), "--burn-in", "10", "--out", str(tmp_path))
    assert stray.returncode == 2 and "--burn-in only applies with --calibrate" in stray.stderr
