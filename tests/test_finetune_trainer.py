"""The fine-tuning loop as users run it: real subprocesses, signals, torchrun with gloo, real checkpoints."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REFERENCE
from safetensors.torch import load_file

from kronos_model import Kronos, KronosPredictor, KronosTokenizer
from kronos_model.checkpoint import load_pair, read_manifest

BTC = str(Path("daemon/assets/data/BTCUSDT_1h.parquet").resolve())
TINY = {
    "data_path": BTC, "base_model": "scratch", "tokenizer_id": "scratch", "lookback_window": 24,
    "predict_window": 4, "train_ratio": 0.8, "val_ratio": 0.1, "epochs": 2, "batch_size": 16,
    "max_train_windows": 96, "max_val_windows": 64, "tokenizer_learning_rate": 0.002, "learning_rate": 0.002,
    "device": "cpu", "seed": 7, "log_interval": 1, "progress": False, "patience": 5,
}


def write_config(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


def finetune(config: Path, *overrides: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "kronos_model.finetune", "--config", str(config), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def log_records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    rc, err = finish(finetune(write_config(tmp), f"output_dir={tmp / 'out'}"))
    assert rc == 0, err
    return tmp / "out"


def test_run_writes_loadable_checkpoints_log_and_report(finished_run):
    out = finished_run
    for which in ("best", "last"):
        tokenizer, model = load_pair(out / which)  # verifies the manifest hashes too
        assert not tokenizer.training and not model.training
    manifest = read_manifest(out / "best")
    assert manifest["base"] == {"tokenizer": "scratch", "tokenizer_revision": None, "predictor": "scratch",
                                "predictor_revision": None}
    assert manifest["data"]["rows"] == 26303 and manifest["data"]["symbols"] == ["BTCUSDT"]
    assert manifest["config"]["lookback_window"] == 24
    assert set(manifest["files"]) >= {"tokenizer/model.safetensors", "model/model.safetensors",
                                      "tokenizer/config.json", "model/config.json"}
    assert (out / "last" / "trainer_state.pt").exists()
    records = log_records(out)
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    assert {r["stage"] for r in steps} == {"tokenizer", "predictor"}
    assert all({"epoch", "step", "lr", "loss", "windows_per_s"} <= set(r) for r in steps)
    assert [(r["stage"], r["epoch"]) for r in vals] == [("tokenizer", 1), ("tokenizer", 2), ("predictor", 1),
                                                        ("predictor", 2)]
    predictor_vals = [r["val_loss"] for r in vals if r["stage"] == "predictor"]
    assert predictor_vals[-1] < predictor_vals[0]
    report = (out / "report.md").read_text()
    assert "| predictor |" in report and "loss_predictor.png" in report
    assert (out / "loss_tokenizer.png").stat().st_size > 1000
    assert yaml.safe_load((out / "config.resolved.yaml").read_text())["predict_window"] == 4


def test_checkpoints_have_the_key_set_the_original_code_writes(finished_run):
    """Same files, keys, shapes, dtypes and buffers as the checkpoints the original save_pretrained wrote."""
    for part in ("tokenizer", "model"):
        ours = finished_run / "best" / part
        original = REFERENCE / "tiny_fits_context" / part
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in original.iterdir())
        assert json.loads((ours / "config.json").read_text()) == json.loads((original / "config.json").read_text())
        a, b = load_file(str(ours / "model.safetensors")), load_file(str(original / "model.safetensors"))
        assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}


def test_best_pair_forecasts(finished_run):
    tokenizer = KronosTokenizer.from_pretrained(finished_run / "best" / "tokenizer")
    model = Kronos.from_pretrained(finished_run / "best" / "model")
    import pandas as pd

    frame = pd.read_parquet(BTC).tail(24)
    times = pd.to_datetime(frame.open_time, unit="ms")
    future = pd.Series(pd.date_range(times.iloc[-1] + pd.Timedelta(hours=1), periods=4, freq="h"))
    result = KronosPredictor(model, tokenizer, device="cpu").forecast(
        frame.rename(columns={"quote_volume": "amount"}), times, future, 4, sample_count=4, seed=0)
    assert result.paths.shape == (4, 4, 6)


def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_loss_curve(finished_run, tmp_path):
    config = write_config(tmp_path)
    out = tmp_path / "out"
    process = finetune(config, f"output_dir={out}")
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    # interrupt in the middle of the predictor stage
    while time.time() < deadline and process.poll() is None:
        if log.exists() and sum('"predictor"' in line for line in log.read_text().splitlines()) >= 3:
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    rc, err = finish(process)
    assert rc == 130, err
    assert "interrupted" in err
    interrupted_steps = len(log_records(out))
    rc, err = finish(finetune(config, f"output_dir={out}"))
    assert rc == 0, err
    assert '"resumed"' in err
    resumed = log_records(out)
    reference = log_records(finished_run)
    assert interrupted_steps < len(reference)
    strip = [{k: v for k, v in r.items() if k != "windows_per_s"} for r in resumed]
    expected = [{k: v for k, v in r.items() if k != "windows_per_s"} for r in reference]
    assert strip == expected
    a = load_file(str(out / "last" / "model" / "model.safetensors"))
    b = load_file(str(finished_run / "last" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_skip_tokenizer_keeps_the_base_tokenizer(tmp_path):
    base = REFERENCE / "tiny_fits_context"
    config = write_config(tmp_path, tokenizer_id=str(base / "tokenizer"), base_model=str(base / "model"), epochs=1)
    rc, err = finish(finetune(config, "--skip-tokenizer", f"output_dir={tmp_path / 'out'}"))
    assert rc == 0, err
    a = load_file(str(tmp_path / "out" / "best" / "tokenizer" / "model.safetensors"))
    b = load_file(str(base / "tokenizer" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert {r["stage"] for r in log_records(tmp_path / "out")} == {"predictor"}


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    config = write_config(tmp_path, tokenizer_learning_rate=1e30, epochs=2, checkpoint_every_steps=1,
                          tokenizer_grad_clip=1e30)
    rc, err = finish(finetune(config, f"output_dir={tmp_path / 'out'}"))
    assert rc == 3, err
    assert "diverged" in err and "last good checkpoint" in err
    tokenizer, _ = load_pair(tmp_path / "out" / "last")
    assert all(torch.isfinite(p).all() for p in tokenizer.parameters())


def test_invalid_config_is_a_clear_error(tmp_path):
    rc, err = finish(finetune(write_config(tmp_path), "batch_size=0", "colour=blue"))
    assert rc == 2
    assert "batch_size" in err and "colour" in err


def test_two_process_ddp_on_cpu_keeps_ranks_identical(tmp_path):
    config = write_config(tmp_path, epochs=1, max_train_windows=64)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "kronos_model.finetune", "--config", str(config), f"output_dir={out}"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # both ranks write to one pipe, so their lines may interleave: match the records, not whole lines
    found = re.findall(r'"rank": (\d+), "sha256": "([0-9a-f]{64})"', result.stderr)
    digests = {int(rank): digest for rank, digest in found}
    assert set(digests) == {0, 1}
    assert digests[0] == digests[1]
    # rank 0 alone wrote: one record per step, no duplicates
    steps = [(r["stage"], r["step"]) for r in log_records(out) if "loss" in r]
    assert len(steps) == len(set(steps))
    assert (out / "best" / "model" / "model.safetensors").exists()
    # each rank saw half of the 64 windows per epoch: 2 steps of 16 per stage
    assert max(step for stage, step in steps if stage == "predictor") == 2


def test_gate_measures_a_pair_reproducibly_against_the_random_walk(finished_run):
    from datetime import datetime

    import numpy as np
    import polars as pl

    from kronos_model.data import read_candles
    from kronos_model.finetune.gate import evaluate_pair

    held_out = read_candles(BTC).filter(pl.col("timestamps") >= datetime(2025, 12, 1))
    first = evaluate_pair(*load_pair(finished_run / "best"), held_out, 24, 4, origins=6, sample_count=4)
    again = evaluate_pair(*load_pair(finished_run / "best"), held_out, 24, 4, origins=6, sample_count=4)
    assert first == again and first.finite and first.origins == 6
    assert 0 <= first.direction_accuracy <= 1
    # the random-walk error is computed on the same origins: check it by hand
    closes = held_out["close"].to_numpy()
    starts = np.linspace(0, len(closes) - 29, 6).round().astype(int)  # December has no gap
    expected = np.mean([np.abs(closes[s + 24 : s + 28] - closes[s + 23]).mean() for s in starts])
    assert first.mae_random_walk == pytest.approx(expected)
    other = evaluate_pair(*load_pair(finished_run / "last"), held_out, 24, 4, origins=6, sample_count=4)
    assert other.mae_random_walk == first.mae_random_walk  # same inputs for every pair


def test_token_cache_gives_exactly_the_losses_of_encoding_every_batch(tmp_path):
    """The predictor's targets come from the frozen tokenizer: encoding each window once must not change a
    single logged loss (3 epochs over the same ~80 training windows, each epoch in other batches)."""
    base = REFERENCE / "tiny_fits_context"
    config = write_config(tmp_path, tokenizer_id=str(base / "tokenizer"), base_model=str(base / "model"),
                          epochs=3, train_ratio=0.004, max_train_windows=None)
    runs = {}
    for cached in (True, False):
        out = tmp_path / f"cache-{cached}"
        rc, err = finish(finetune(config, "--skip-tokenizer", f"output_dir={out}", f"token_cache={cached}"))
        assert rc == 0, err
        start = next(json.loads(line) for line in err.splitlines() if '"stage_start"' in line)
        assert start["token_cache"] == (["train", "val"] if cached else [])
        assert start["bf16"] is False  # bf16: auto keeps the 64-wide model in fp32 on a CPU
        runs[cached] = [{k: v for k, v in r.items() if k != "windows_per_s"} for r in log_records(out)]
    assert len(runs[True]) == len(runs[False]) > 6
    assert runs[True] == runs[False]


def test_token_cache_encodes_each_window_once():
    from kronos_model.finetune.acceleration import TokenCache

    torch.manual_seed(0)
    tokenizer = KronosTokenizer.from_pretrained(REFERENCE / "tiny_fits_context" / "tokenizer").eval()
    windows = torch.randn(10, 12, 6)
    encoded: list[int] = []

    def encode(x):
        encoded.append(len(x))
        with torch.no_grad():
            return tokenizer.encode(x, half=True)

    cache = TokenCache(len(windows), 12, tokenizer.s1_bits, limit_bytes=2**20)
    first = cache.tokens([3, 1, 4], windows[[3, 1, 4]], encode)
    again = cache.tokens([4, 3, 1], windows[[4, 3, 1]], encode)
    mixed = cache.tokens([1, 5, 9], windows[[1, 5, 9]], encode)
    assert encoded == [3, 2]  # the second draw encodes nothing, the third only windows 5 and 9
    with torch.no_grad():
        s1, s2 = tokenizer.encode(windows, half=True)
    for ids, rows in ((first, [3, 1, 4]), (again, [4, 3, 1]), (mixed, [1, 5, 9])):
        assert torch.equal(ids[0], s1[rows]) and torch.equal(ids[1], s2[rows])
    too_big = TokenCache(len(windows), 12, tokenizer.s1_bits, limit_bytes=100)
    assert not too_big.enabled
    too_big.tokens([0, 1], windows[:2], encode)
    assert encoded == [3, 2, 2]  # no cache: every batch encoded


def test_bf16_auto_picks_fp32_for_narrow_models_and_bf16_where_it_pays():
    from kronos_model.finetune.acceleration import CPU_BF16_MIN_WIDTH, cpu_has_native_bf16, use_bf16

    assert not use_bf16("auto", "cpu", 64)  # the demo model: casts cost more than bf16 matmuls save
    assert use_bf16("auto", "cpu", CPU_BF16_MIN_WIDTH) == cpu_has_native_bf16()
    assert use_bf16("auto", "cuda:0", 64)
    assert not use_bf16(False, "cuda", 512) and use_bf16(True, "cpu", 64)


def test_compile_auto_only_for_wide_modules_in_long_stages():
    from kronos_model.finetune.acceleration import COMPILE_MIN_STEPS, use_compile

    assert not use_compile("auto", 64, 10_000)  # the demo model: minutes of compiling for little gain
    assert not use_compile("auto", 512, COMPILE_MIN_STEPS - 1)  # too short to pay the compile back
    assert use_compile(True, 64, 1) and not use_compile(False, 512, 10_000)


def test_compiled_training_follows_the_eager_loss_curve(tmp_path):
    """compile=true on the dropout-free tiny model: the same losses as eager up to float rounding."""
    config = write_config(tmp_path, epochs=1, max_train_windows=48)
    runs = {}
    for compiled in (True, False):
        out = tmp_path / f"compile-{compiled}"
        rc, err = finish(finetune(config, f"output_dir={out}", f"compile={compiled}"), timeout=900)
        assert rc == 0, err
        starts = [json.loads(line) for line in err.splitlines() if '"stage_start"' in line]
        assert [s["compile"] for s in starts] == [compiled, compiled]
        runs[compiled] = [r for r in log_records(out) if "loss" in r or "val_loss" in r]
    assert [(r["stage"], r["step"]) for r in runs[True]] == [(r["stage"], r["step"]) for r in runs[False]]
    for a, b in zip(runs[True], runs[False], strict=True):
        key = "loss" if "loss" in a else "val_loss"
        assert a[key] == pytest.approx(b[key], rel=1e-3)
