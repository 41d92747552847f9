"""config.yaml: the shipped file is valid; mistakes are clear errors."""

from __future__ import annotations

import pytest

from daemon.config import load_config


def test_shipped_config_is_valid():
    config = load_config("config.yaml")
    assert config.markets.pairs == [("BTCUSDT", "1h")]
    assert config.gate.metric == "crps_calibrated"
    assert config.mqtt.prefix == "kronos"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("markets:\n  intervals: [7h]\n", "7h"),
        ("forecast:\n  lookback: 1\n", "forecast.lookback"),
        ("forecast:\n  quantiles: [0.25, 0.75]\n", "must include 0.1, 0.5, 0.9"),
        ("mqtt:\n  port: 70000\n", "mqtt.port"),
        ("gate:\n  metric: sharpe\n", "gate.metric"),
        ("finetune:\n  every_candels: 5\n", "every_candels"),
        ("markets: [BTCUSDT]\n", "markets"),
        ("- just a list\n", "mapping"),
    ],
)
def test_config_mistakes_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path)
