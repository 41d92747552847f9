"""Baselines, the backtest and the walk-forward engine on hand-made and real candles."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from kronos_model.data import read_candles
from kronos_model.evaluation import baselines
from kronos_model.evaluation.backtest import buy_and_hold, long_flat_backtest
from kronos_model.evaluation.models import ExcludedRange, default_name, load_model, split_named
from kronos_model.evaluation.report import build_report, render_markdown
from kronos_model.evaluation.scoring import to_jsonable
from kronos_model.evaluation.walkforward import Series, Settings, plan_origins, run_walk_forward, series_from_frame

ROOT = Path(__file__).resolve().parent.parent
ETH = ROOT / "daemon" / "assets" / "data" / "ETHUSDT_1h.parquet"
BTC = ROOT / "daemon" / "assets" / "data" / "BTCUSDT_1h.parquet"
TINY = ROOT / "daemon" / "assets" / "checkpoints" / "tiny-random"
HOUR = np.timedelta64(3_600_000, "ms")


# -- baselines ------------------------------------------------------------------------------------------------

def test_point_baselines_by_hand():
    history = np.array([[100.0, 101.0, 102.0, 104.0], [10.0, 20.0, 40.0, 80.0]])
    walk = baselines.random_walk(history, 3)
    assert walk.shape == (2, 1, 3) and (walk[0, 0] == 104.0).all()
    drift = baselines.drift(history, 2)
    assert drift[1, 0] == pytest.approx([160.0, 320.0])  # doubling every candle continues
    # season 2: step 1 -> the close 1 candle before the origin, step 2 -> the origin's, step 3 -> again t-1
    seasonal = baselines.seasonal_naive(history, 3, season=2)
    assert seasonal[0, 0].tolist() == [102.0, 104.0, 102.0]
    with pytest.raises(ValueError, match="season"):
        baselines.seasonal_naive(history, 3, season=5)


def test_vol_band_is_a_lognormal_around_the_last_close():
    rng = np.random.default_rng(0)
    history = 100 * np.exp(np.cumsum(0.01 * rng.normal(size=(3, 200)), axis=1))
    band = baselines.vol_band(history, 4)
    sigma = baselines.ewma_volatility(history)
    assert 0.007 < sigma.mean() < 0.013
    assert np.median(band, axis=1) == pytest.approx(np.repeat(history[:, -1:], 4, axis=1))
    upper = np.quantile(band, 0.95, axis=1)[:, 3]
    expected = history[:, -1] * np.exp(sigma * 2 * stats.norm.ppf(0.95))  # sqrt(4) = 2
    assert upper == pytest.approx(expected, rel=0.01)
    with pytest.raises(ValueError, match="positive"):
        baselines.all_baselines(-history, 4, season=24)


# -- backtest -------------------------------------------------------------------------------------------------

def test_long_flat_backtest_by_hand_with_fees():
    go_long = np.array([True, True, False, True])
    period_return = np.array([0.10, -0.05, 0.20, 0.02])
    result = long_flat_backtest(go_long, period_return, periods_per_year=4, fee=0.001)
    expected = 0.999 * 1.10 * 0.95 * 0.999 * 0.999 * 1.02 * 0.999
    assert result.total_return == pytest.approx(expected - 1)
    assert result.trades == 2 and result.long_share == 0.75
    assert result.turnover == pytest.approx(4 / 4)  # enter, leave, enter, leave at the end
    assert result.hit_rate == pytest.approx(2 / 3)
    assert result.max_drawdown == pytest.approx(1 - result.equity[2] / result.equity[0])
    hold = buy_and_hold(period_return, 4, fee=0.001)
    assert hold.total_return == pytest.approx(0.999 * 1.10 * 0.95 * 1.20 * 1.02 * 0.999 - 1)
    never = long_flat_backtest(np.zeros(4, dtype=bool), period_return, 4)
    assert never.total_return == 0 and never.trades == 0 and math.isnan(never.sharpe)


# -- origins --------------------------------------------------------------------------------------------------

def hourly_series(count: int, missing: tuple[int, ...] = ()) -> Series:
    keep = np.setdiff1d(np.arange(count), missing)
    times = np.datetime64("2024-01-01T00:00", "ms") + keep * HOUR
    values = np.tile(np.array([100.0, 101.0, 99.0, 100.0, 1.0, 100.0]), (len(keep), 1))
    return Series("TEST", times, values, HOUR)


def test_origins_are_strided_back_from_the_latest_and_skip_gaps():
    series = hourly_series(100, missing=(60,))
    plan = plan_origins(series, 10, Settings(lookback=10, horizon=5, origins=50, samples=1), [])
    times = series.times[plan.positions]
    assert times[-1] == series.times[-6]  # the last origin still has 5 candles after it
    assert (np.diff(times) >= 5 * HOUR).all()
    gap = np.datetime64("2024-01-01T00:00", "ms") + 60 * HOUR
    for position in plan.positions:  # no look-back or target spans the missing candle
        window = series.times[position - 9 : position + 6]
        assert not ((window[0] <= gap) & (window[-1] >= gap)) and len(window) == 15
        assert (np.diff(window) == HOUR).all()


def test_origins_inside_a_training_period_are_excluded_with_a_warning():
    series = hourly_series(300)
    period = ExcludedRange(series.times[150], series.times[299], "training period")
    settings = Settings(lookback=24, horizon=6, origins=10, samples=1)
    plan = plan_origins(series, 24, settings, [period])
    assert plan.excluded_recent == 10 and len(plan.positions) == 10
    last_target = series.times[plan.positions + 6]
    assert (last_target < period.start).all()
    assert any("excluded" in note for note in plan.warnings)
    with pytest.raises(ValueError, match="every possible origin"):
        plan_origins(series, 24, settings, [ExcludedRange(series.times[0], series.times[-1], "training period")])
    with pytest.raises(ValueError, match="no origin"):
        plan_origins(hourly_series(20), 24, settings, [])


def test_start_and_end_bound_the_origins():
    series = hourly_series(300)
    settings = Settings(lookback=24, horizon=6, origins=1000, samples=1, start=series.times[100],
                        end=series.times[200])
    plan = plan_origins(series, 24, settings, [])
    chosen = series.times[plan.positions]
    assert chosen.min() >= series.times[100] and chosen.max() <= series.times[200]


# -- the engine on real candles -------------------------------------------------------------------------------

def checkpoint_with_manifest(tmp_path: Path, train_range: list[str], val_end: str) -> Path:
    """The bundled tiny pair in the trainer's layout, with a manifest recording a training period."""
    directory = tmp_path / "run" / "best"
    shutil.copytree(TINY, directory)
    manifest = {"data": {"train_range": train_range, "splits": {"val_end": val_end}, "symbols": ["ETHUSDT"]},
                "config": {"lookback_window": 48, "predict_window": 6}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_walk_forward_on_real_candles_is_reproducible_and_respects_the_manifest(tmp_path):
    checkpoint = checkpoint_with_manifest(tmp_path, ["2022-09-23T07:00:00", "2024-06-01T00:00:00"],
                                          "2024-07-01T00:00:00")
    source = load_model(str(checkpoint), name="kronos")
    assert source.trained_lookback == 48 and source.excluded[0].reason == "training and validation period"
    series = series_from_frame(read_candles(ETH))
    settings = Settings(lookback=48, horizon=6, origins=12, samples=4, stride=24, batch_size=5,
                        end=np.datetime64("2024-07-14T00:00", "ms"))
    walk, plan = run_walk_forward(series, [source], settings, progress=False)
    assert len(walk.origin_times) == 12
    assert (walk.origin_times > np.datetime64("2024-07-01T00:00", "ms")).all()
    assert walk.forecasts["kronos"].shape == (12, 4, 6)
    assert walk.forecasts["vol_band"].shape[1] == baselines.VOL_BAND_QUANTILES
    # the realised closes are the real ETHUSDT closes after each origin
    frame = read_candles(ETH)
    times = frame["timestamps"].to_numpy().astype("datetime64[ms]")
    row = int(np.searchsorted(times, walk.origin_times[0] + HOUR))
    assert walk.actual[0, 0] == frame["close"][row]
    assert walk.last_close[0] == frame["close"][row - 1]
    again, _ = run_walk_forward(series, [load_model(str(checkpoint), name="kronos")], settings, progress=False)
    np.testing.assert_array_equal(walk.forecasts["kronos"], again.forecasts["kronos"])

    report = to_jsonable(build_report(walk, plan, series, [source], settings, str(ETH)))
    assert set(report["models"]) == {"kronos", "random_walk", "drift", "seasonal_naive", "vol_band"}
    random_walk = report["models"]["random_walk"]
    assert random_walk["crps"] == pytest.approx(random_walk["mae"])
    assert random_walk["direction_accuracy"] is None and random_walk["dm_pvalue_vs_random_walk"] is None
    assert report["models"]["vol_band"]["relative_mae"] == pytest.approx(1.0)
    kronos = report["models"]["kronos"]
    for key in ("mae", "rmse", "mape", "mase", "crps", "coverage_50", "coverage_80", "coverage_90",
                "dm_pvalue_vs_random_walk", "direction_ci", "backtest"):
        assert key in kronos
    assert len(kronos["per_step"]["mae"]) == 6
    assert report["data"]["derived_amounts"] == 0 and report["excluded_recent_origins"] == 0
    assert "## Verdict" in render_markdown(report)


def test_model_names_and_errors():
    assert default_name("runs/finetune-demo/best") == "finetune-demo-best"
    assert default_name("NeoQuasar/Kronos-small") == "Kronos-small"
    assert split_named("mine=runs/x") == ("mine", "runs/x")
    with pytest.raises(ValueError, match="tokenizer"):
        load_model("someone/some-model")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_model(str(ROOT / "docs"))


def test_a_file_with_several_symbols_needs_a_choice():
    import polars as pl

    frame = pl.concat([read_candles(ETH).head(50), read_candles(BTC).head(50)])
    with pytest.raises(ValueError, match="--symbol"):
        series_from_frame(frame)
    assert series_from_frame(frame, "BTCUSDT").symbol == "BTCUSDT"


def test_same_symbol_exclusion_only_spares_symbols_the_checkpoint_never_saw():
    start, end = np.datetime64("2024-01-01", "ms"), np.datetime64("2024-06-01", "ms")
    trained_on_btc = ExcludedRange(start, end, "training period", ("BTCUSDT",))
    assert trained_on_btc.applies_to("ETHUSDT", same_symbol_only=False)
    assert not trained_on_btc.applies_to("ETHUSDT", same_symbol_only=True)
    assert trained_on_btc.applies_to("BTCUSDT", same_symbol_only=True)
    assert ExcludedRange(start, end, "training period").applies_to("ETHUSDT", same_symbol_only=True)
