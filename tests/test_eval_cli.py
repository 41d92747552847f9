"""`kronosd evaluate` end to end as a real subprocess on the bundled candles, and the extended gate."""

from __future__ import annotations

import json
import math
from datetime import datetime

import polars as pl
import pytest

from kronos_model.checkpoint import load_pair
from kronos_model.data import read_candles
from kronos_model.finetune.gate import GateComparison, evaluate_pair
from tests.eval_helpers import ETH, TINY, build_forecast_store, kronosd
from tests.test_eval_walkforward import BTC, checkpoint_with_manifest

REPORT_KEYS = {"mae", "rmse", "mape", "mase", "direction_accuracy", "direction_ci", "crps", "coverage_50",
               "coverage_80", "coverage_90", "dm_pvalue_vs_random_walk", "ic", "rank_ic", "backtest"}


def test_evaluate_on_bundled_eth_writes_report_json_and_plots(tmp_path):
    # A trainer-layout checkpoint whose manifest claims ETH data up to mid-2024: those origins must be skipped.
    checkpoint = checkpoint_with_manifest(tmp_path, ["2023-01-01T00:00:00", "2024-08-01T00:00:00"],
                                          "2024-09-01T00:00:00")
    out = tmp_path / "report"
    result = kronosd("evaluate", "--data", str(ETH), "--model", str(checkpoint), "--compare", f"plain={TINY}",
                     "--origins", "40", "--samples", "6", "--stride", "24", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "excluded" in result.stderr and "## Verdict" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["origins"] == 40 and report["horizon"] == 6 and report["lookback"] == 48  # from the manifest
    assert report["excluded_recent_origins"] > 0
    assert all(t < "2023-01-01" or t > "2024-09-01" for t in report["origin_times"])
    assert any(t < "2023-01-01" for t in report["origin_times"])
    assert set(report["models"]) == {"kronos", "plain", "random_walk", "drift", "seasonal_naive", "vol_band"}
    for name, scores in report["models"].items():
        assert set(scores) >= REPORT_KEYS, name
    assert {"total_return", "sharpe", "max_drawdown", "hit_rate", "turnover"} <= set(
        report["models"]["kronos"]["backtest"])
    markdown = (out / "report.md").read_text()
    assert markdown.index("## Verdict") < markdown.index("## Point and probabilistic scores")
    for name in ("fans.png", "error_by_horizon.png", "calibration.png", "equity.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_reads_the_database(tmp_path):
    store = build_forecast_store(tmp_path / "kronos.duckdb", candles=400, origins=2, pending=0)
    out = tmp_path / "report"
    result = kronosd("evaluate", "--db", str(store), "--symbol", "ETHUSDT", "--interval", "1h",
                     "--model", str(TINY), "--lookback", "48", "--horizon", "4", "--origins", "8",
                     "--samples", "4", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["symbol"] == "ETHUSDT" and report["interval"] == "1h" and report["origins"] == 8
    assert "too few" in " ".join(report["warnings"])


def test_evaluate_errors_are_one_line(tmp_path):
    missing = kronosd("evaluate", "--data", str(tmp_path / "none.csv"), "--model", str(TINY), "--out",
                      str(tmp_path))
    assert missing.returncode == 2 and "no such data file" in missing.stderr
    no_symbol = kronosd("evaluate", "--db", str(tmp_path / "x.duckdb"), "--model", str(TINY), "--out",
                        str(tmp_path))
    assert no_symbol.returncode == 2 and "--symbol and --interval" in no_symbol.stderr
    too_long = kronosd("evaluate", "--data", str(ETH), "--model", str(TINY), "--lookback", "20000", "--horizon",
                       "4", "--out", str(tmp_path))
    assert too_long.returncode == 2 and "no origin" in too_long.stderr


def test_gate_measures_crps_and_compares_with_the_champion_by_dm():
    held_out = read_candles(BTC).filter(pl.col("timestamps") >= datetime(2025, 12, 1))
    pair = load_pair(TINY)
    first = evaluate_pair(*pair, held_out, 24, 4, origins=8, sample_count=4)
    again = evaluate_pair(*pair, held_out, 24, 4, origins=8, sample_count=4)
    assert first == again and len(first.origin_crps) == 8
    assert math.isfinite(first.crps) and 0 <= first.dm_pvalue_crps <= 1 and 0 <= first.dm_pvalue_mae <= 1
    payload = first.to_dict()
    assert "crps_skill" in payload and "origin_crps" not in payload
    same = first.compare_with(again)
    assert same.ratio == pytest.approx(1.0) and same.dm_pvalue == 1.0 and not same.passes()
    assert GateComparison("crps", 90.0, 100.0, 0.9, 0.01).passes(margin=0.05)
    assert not GateComparison("crps", 90.0, 100.0, 0.9, 0.2).passes()
    assert GateComparison("crps", 90.0, 100.0, 0.9, 0.2).passes(require_significance=False)
    with pytest.raises(ValueError, match="metric"):
        first.compare_with(again, "rmse")


def test_gate_scores_the_calibrated_forecasts_and_keeps_them_to_warm_a_promoted_model():
    """tiny-random's raw 80 % band on December 2025 BTCUSDT covers ~4 % of closes; the gate's blocked
    cross-conformal calibration (the same calibrator the daemon publishes with) brings it near 80 % and lowers
    the CRPS; its raw held-out forecasts warm a calibrator; pooling two pairs concatenates their origins."""
    from kronos_model.calibration import CalibrationConfig, OnlineCalibrator
    from kronos_model.finetune.gate import pool

    held_out = read_candles(BTC).filter(pl.col("timestamps") >= datetime(2025, 11, 1))
    config = CalibrationConfig(horizon=4, interval_ms=3_600_000)
    result = evaluate_pair(*load_pair(TINY), held_out, 24, 4, origins=40, sample_count=8, calibration=config)
    assert len(result.origin_crps_calibrated) == len(result.held_out) == 40
    assert result.coverage_80 < 0.3 and 0.65 <= result.coverage_80_calibrated <= 0.95
    assert result.crps_calibrated < result.crps
    assert "held_out" not in result.to_dict() and math.isfinite(result.to_dict()["crps_calibrated"])
    assert result.compare_with(result, "crps_calibrated").ratio == pytest.approx(1.0)
    origins = [forecast.origin_ms for forecast, _ in result.held_out]
    assert origins == sorted(origins)
    calibrator = OnlineCalibrator(config)
    assert calibrator.warm(result.held_out) == 40 * 4 and calibrator.history() == 40
    pooled = pool([result, result])
    assert pooled.origins == 80 and pooled.crps_calibrated == pytest.approx(result.crps_calibrated)
    assert len(pooled.origin_crps_calibrated) == 80 and pooled.held_out == []
    plain = evaluate_pair(*load_pair(TINY), held_out, 24, 4, origins=8, sample_count=4)
    assert math.isnan(plain.crps_calibrated) and not plain.origin_crps_calibrated
    with pytest.raises(ValueError, match="origins"):
        result.compare_with(plain, "crps_calibrated")
