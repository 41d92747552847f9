"""Model registry: immutable versions, atomic current/previous flips, hash-checked loads, rollback, cleanup."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import polars as pl
import pytest
import torch

from daemon.config import KronosConfig
from daemon.continual import ContinualTrainer
from daemon.forecaster import ForecastService
from daemon.registry import ModelRegistry
from kronos_model import CheckpointError, Kronos, KronosTokenizer
from kronos_model.checkpoint import write_checkpoint
from kronos_model.data import read_candles
from kronos_model.finetune.config import TINY_PREDICTOR, TINY_TOKENIZER
from storage.writer import StoreWriter


def pair(seed: int):
    torch.manual_seed(seed)
    return KronosTokenizer(**TINY_TOKENIZER), Kronos(**TINY_PREDICTOR)


def test_promote_rollback_and_garbage_collection(tmp_path):
    registry = ModelRegistry(tmp_path / "models", keep_versions=2)
    versions = []
    for seed in range(5):
        version = registry.add_pair(*pair(seed), {"origin": f"seed {seed}"})
        registry.promote(version)
        versions.append(version)
    assert registry.resolve("current") == versions[-1]
    assert registry.resolve("previous") == versions[-2]
    assert (tmp_path / "models" / "current").is_symlink()
    assert len(registry.versions()) == 4  # current + previous + 2 kept
    assert versions[0] not in registry.versions()
    assert registry.rollback() == versions[-2]
    assert registry.resolve("current") == versions[-2] and registry.resolve("previous") == versions[-1]
    _tokenizer, model = registry.load(registry.resolve("current"))
    assert not model.training
    assert not list((tmp_path / "models").glob(".*tmp*"))


def test_a_tampered_version_does_not_load(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    version = registry.add_pair(*pair(0), {})
    weights = registry.path(version) / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        registry.load(version)


def test_models_command_lists_promotes_and_rolls_back(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    first = registry.add_pair(*pair(0), {"origin": "bootstrap"})
    registry.promote(first)
    second = registry.add_pair(*pair(1), {"origin": "bootstrap"})
    registry.promote(second)

    def models(*args):
        return subprocess.run([sys.executable, "-m", "daemon.cli", "models", *args, "--state-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=60)

    listed = models("list")
    assert listed.returncode == 0 and first in listed.stdout and "current" in listed.stdout
    assert models("rollback").returncode == 0
    assert os.readlink(tmp_path / "models" / "current") == first
    assert models("promote", second).returncode == 0
    assert os.readlink(tmp_path / "models" / "current") == second
    missing = models("promote", "v-nope")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_gate_rejects_a_corrupt_challenger_and_keeps_the_champion(tmp_path):
    config = KronosConfig.model_validate({"storage": {"state_dir": str(tmp_path)}, "forecast": {
        "lookback": 24, "horizon": 4, "sample_paths": 2}, "gate": {"origins": 4, "sample_paths": 2}, "mqtt": {
        "enabled": False}})
    registry = ModelRegistry(tmp_path / "models")
    champion = registry.add_pair(*pair(0), {})
    registry.promote(champion)
    candidate = tmp_path / "candidate"
    write_checkpoint(candidate, *pair(1), {"origin": "test"})
    weights = candidate / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated file from a crashed copy
    frame = read_candles("daemon/assets/data/BTCUSDT_1h.parquet").tail(200)

    async def gate():
        with StoreWriter(tmp_path / "live.duckdb") as writer:
            forecaster = ForecastService(writer, config.forecast, config.model, None)
            forecaster.set_champion(champion, *registry.load(champion))
            trainer = ContinualTrainer(writer, config, registry, forecaster, None, tmp_path)
            outcome = await trainer._gate("run-1", candidate, {("BTCUSDT", "1h"): frame})
            events = await writer.run(lambda s: s.con.execute("SELECT kind, details FROM model_events").fetchall())
            return outcome, forecaster.champion.version, events

    outcome, current, events = asyncio.run(gate())
    assert outcome == "rejected"
    assert current == champion and registry.resolve("current") == champion
    assert events[0][0] == "rejected" and "unusable" in events[0][1]
    assert isinstance(frame, pl.DataFrame)


def test_model_dtype_setting_casts_the_forecasting_pair():
    from daemon.config import ModelConfig
    from daemon.forecaster import build_predictor

    predictor = build_predictor(*pair(0), ModelConfig(device="cpu", dtype="bfloat16"))
    assert next(predictor.model.parameters()).dtype == torch.bfloat16
    assert next(predictor.tokenizer.parameters()).dtype == torch.bfloat16
