"""The small pretrained Kronos shipped in daemon/assets/checkpoints/pretrained-1h: intact, honest about its
data, a working forecaster through `kronosd forecast`, and what `kronosd demo` starts from."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from daemon.commands.demo import BUNDLED_CHECKPOINT, demo_config, starting_pair
from kronos_model.checkpoint import load_pair, read_manifest
from kronos_model.data import read_candles

REPO = Path(__file__).resolve().parent.parent
URLS = {"rest_url": "http://127.0.0.1:9", "ws_url": "ws://127.0.0.1:9", "archive_url": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return read_manifest(BUNDLED_CHECKPOINT, verify=True)  # every file matches its sha256


def test_the_checkpoint_is_small_and_loads_as_its_manifest_says(manifest):
    size = sum(p.stat().st_size for p in BUNDLED_CHECKPOINT.rglob("*") if p.is_file())
    assert size <= 30 * 2**20, f"{size / 2**20:.1f} MB"
    tokenizer, model = load_pair(BUNDLED_CHECKPOINT)
    config = manifest["config"]
    assert model.d_model == config["scratch_predictor"]["d_model"]
    assert tokenizer.d_model == config["scratch_tokenizer"]["d_model"]
    assert not model.training and not tokenizer.training
    for tensor in [*model.state_dict().values(), *tokenizer.state_dict().values()]:
        assert bool(tensor.isfinite().all())
    assert config["lookback_window"] + config["predict_window"] <= 512


def test_the_manifest_states_training_validation_and_held_out_periods_that_match_the_data(manifest):
    periods = manifest["periods"]
    as_time = np.datetime64
    train, val, held = periods["training"], periods["validation"], periods["held_out"]
    assert as_time(train["begin"]) < as_time(train["end"]) < as_time(val["begin"]) < as_time(val["end"])
    assert as_time(val["end"]) < as_time(held["begin"]) < as_time(held["end"])
    assert held["symbols"] == ["BTCUSDT", "ETHUSDT"]
    # the data it names exists in the repo and spans exactly the stated range
    frames = [read_candles(REPO / path) for path in manifest["data"]["paths"]]
    data = pl.concat(frames, how="vertical_relaxed")
    assert data.height == manifest["data"]["rows"]
    assert str(data["timestamps"].min()) == manifest["data"]["first"]
    assert str(data["timestamps"].max()) == manifest["data"]["last"] == held["end"]
    for symbol in ("BTCUSDT", "ETHUSDT"):  # every series has candles in the held-out period
        last = data.filter(pl.col("symbol") == symbol)["timestamps"].max()
        assert as_time(last) > as_time(held["begin"])
    # `kronosd evaluate` excludes [training start, validation end] from this manifest
    from kronos_model.evaluation.models import training_ranges

    (excluded,) = training_ranges(manifest)
    assert excluded.start == as_time(train["begin"], "ms") and excluded.end == as_time(val["end"], "ms")


def test_the_manifest_reports_the_held_out_evaluation(manifest):
    evaluation = manifest["evaluation"]
    assert evaluation["settings"]["horizon"] == 24 and evaluation["settings"]["samples"] == 30
    held_begin = np.datetime64(manifest["periods"]["held_out"]["begin"])
    for symbol in ("BTCUSDT", "ETHUSDT"):
        result = evaluation["results"][symbol]
        assert np.datetime64(result["first_origin"].rstrip("Z")) >= held_begin
        assert result["origins"] >= 300
        assert math.isclose(result["mae_ratio_random_walk"], result["mae"] / result["mae_random_walk"])
        assert result["crps_ratio_vol_band"] > 0


def test_kronosd_forecast_with_the_bundled_checkpoint_gives_finite_ordered_quantiles():
    result = subprocess.run([sys.executable, "-m", "daemon.cli", "forecast", "--model", str(BUNDLED_CHECKPOINT),
                             "--end", "2025-11-01 00:00", "--lookback", "96", "--horizon", "12", "--samples", "16",
                             "--json"], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["model"] == str(BUNDLED_CHECKPOINT)
    steps = payload["steps"]
    assert len(steps) == 12
    for step in steps:
        values = [step[k] for k in ("close_p10", "close_p50", "close_p90", "close_mean", "prob_up")]
        assert all(v is not None and math.isfinite(v) for v in values)
        assert step["close_p10"] <= step["close_p50"] <= step["close_p90"]
        # a trained model stays near the market: within 10 % of the last close over 12 hours
        assert abs(step["close_p50"] / payload["last_close"] - 1) < 0.10
    assert steps[-1]["close_p90"] > steps[-1]["close_p10"]  # it forecasts a spread, not one path


def test_the_demo_starts_from_the_bundled_checkpoint_and_scratch_keeps_the_old_behaviour(tmp_path):
    bundled = demo_config(tmp_path, URLS, "bundled", None, 1883, 150)
    assert Path(bundled.model.predictor) == BUNDLED_CHECKPOINT / "model"
    assert Path(bundled.model.tokenizer) == BUNDLED_CHECKPOINT / "tokenizer"
    assert bundled.finetune.overrides["skip_tokenizer"] is True  # fine-tuning keeps the pretrained tokenizer
    scratch = demo_config(tmp_path, URLS, "scratch", None, 1883, 150)
    assert (scratch.model.predictor, scratch.model.tokenizer) == ("scratch", "scratch")
    assert "skip_tokenizer" not in scratch.finetune.overrides
    with pytest.raises(ValueError, match="drop --tokenizer"):
        starting_pair(str(BUNDLED_CHECKPOINT), "NeoQuasar/Kronos-Tokenizer-base")
    with pytest.raises(ValueError, match="which tokenizer"):
        starting_pair(str(tmp_path), None)
