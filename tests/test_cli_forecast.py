"""`kronosd` as users run it: a real subprocess on the bundled data and checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys


def kronosd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_the_commands():
    result = kronosd("--help")
    assert result.returncode == 0
    assert "forecast" in result.stdout


def test_forecast_on_bundled_btc_window_with_what_really_happened(tmp_path):
    out = tmp_path / "steps.csv"
    result = kronosd("forecast", "--end", "2025-06-01 00:00", "--horizon", "6", "--samples", "8", "--json",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["history_end"] == "2025-06-01T00:00:00Z"
    assert payload["last_close"] == 104446.49  # the real BTCUSDT close of 2025-06-01 00:00 UTC
    steps = payload["steps"]
    assert [s["timestamps"] for s in steps] == [f"2025-06-01T0{h}:00:00Z" for h in range(1, 7)]
    assert all(s["close_p10"] <= s["close_p50"] <= s["close_p90"] for s in steps)
    assert steps[0]["close_actual"] == 104126.07  # the real close of the next hour
    assert 0 <= steps[0]["prob_up"] <= 1
    header = out.read_text().splitlines()[0]
    assert "amount_p90" in header and "prob_up" in header


def test_forecast_table_says_the_bundled_weights_are_random():
    result = kronosd("forecast", "--horizon", "3", "--samples", "4")
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stdout


def test_bad_data_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("time,price\n1,2\n")
    result = kronosd("forecast", "--data", str(bad))
    assert result.returncode == 2
    assert "need an 'open_time'" in result.stderr
    assert "Traceback" not in result.stderr
    missing = kronosd("forecast", "--data", str(tmp_path / "nope.parquet"))
    assert missing.returncode == 2 and "no such data file" in missing.stderr


def test_unsorted_candles_are_rejected(tmp_path):
    data = tmp_path / "candles.csv"
    data.write_text("timestamps,open,high,low,close\n2024-01-01 01:00,1,2,0.5,1.5\n2024-01-01 00:00,1,2,0.5,1.5\n")
    result = kronosd("forecast", "--data", str(data), "--lookback", "2")
    assert result.returncode == 2
    assert "not in ascending order" in result.stderr
