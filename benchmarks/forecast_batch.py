"""Forecasting many pairs: one batched generation vs one forecast per series, same seeds, same outputs.

What the daemon does when many pairs close together (forecast.batch_size). 32 windows of real bundled candles
(BTCUSDT and ETHUSDT 1h at 16 origins each, so 32 different look-backs and price levels), each with its own
seed; forecast one by one with `KronosPredictor.forecast`, then all together with `forecast_batch` (and in
batches of `--batch` too). Outputs are checked identical (every sampled path of every series), and
throughput (series per second) is printed side by side with the ratio. Models: a Kronos-small-shaped
predictor with a Tokenizer-base-shaped tokenizer (random weights: the shape is what costs), and the tiny
model the daemon starts from.

    python benchmarks/forecast_batch.py [--series 32] [--lookback 400] [--horizon 24] [--paths 8] [--threads 2]
        [--device cuda] [--models small,tiny]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from kronos_model import Kronos, KronosPredictor, KronosTokenizer
from kronos_model.data import FEATURES, read_candles
from kronos_model.finetune.config import TINY_PREDICTOR, TINY_TOKENIZER

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "fixtures" / "kronos-configs"
DATA = ROOT / "daemon" / "assets" / "data"
HOUR_MS = 3_600_000


def build(name: str) -> tuple[KronosTokenizer, Kronos]:
    torch.manual_seed(0)
    if name == "tiny":
        return KronosTokenizer(**TINY_TOKENIZER), Kronos(**TINY_PREDICTOR)
    tokenizer = KronosTokenizer(**json.loads((CONFIGS / "Kronos-Tokenizer-base.config.json").read_text()))
    model = Kronos(**json.loads((CONFIGS / "Kronos-small.config.json").read_text()))
    return tokenizer, model


def windows(series: int, lookback: int, horizon: int) -> list[tuple[pl.DataFrame, pl.Series, pl.Series, int]]:
    """`series` look-backs of real candles: (features, their times, the forecast times, a seed) each."""
    sources = [read_candles(DATA / f"{symbol}_1h.parquet") for symbol in ("BTCUSDT", "ETHUSDT")]
    out = []
    for k in range(series):
        frame = sources[k % 2]
        end = frame.height - 1 - (k // 2) * 97  # origins spread over the last months
        window = frame.slice(end - lookback, lookback)
        last = int(window["timestamps"].dt.epoch("ms")[-1])
        future = pl.from_epoch(pl.Series([last + HOUR_MS * j for j in range(1, horizon + 1)]), time_unit="ms")
        out.append((window.select(FEATURES), window["timestamps"], future, 1000 + k))
    return out


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(name: str, args: argparse.Namespace) -> dict:
    tokenizer, model = build(name)
    predictor = KronosPredictor(model, tokenizer, device=args.device, max_context=512)
    inputs = windows(args.series, args.lookback, args.horizon)
    common = {"T": 1.0, "top_p": 0.9, "sample_count": args.paths}
    predictor.forecast(*inputs[0][:3], args.horizon, seed=0, **common)  # warm-up (allocator, kernels)

    synchronize(args.device)
    start = time.perf_counter()
    alone = [predictor.forecast(frame, times, future, args.horizon, seed=seed, **common)
             for frame, times, future, seed in inputs]
    synchronize(args.device)
    t_alone = time.perf_counter() - start

    def batch(part: list) -> list:
        return predictor.forecast_batch([p[0] for p in part], [p[1] for p in part], [p[2] for p in part],
                                        args.horizon, seed=[p[3] for p in part], **common)

    def batched(size: int) -> tuple[float, list]:
        batch(inputs[:size])  # warm-up at this size, as the one-by-one run had (a daemon's worker stays warm)
        synchronize(args.device)
        begin = time.perf_counter()
        results = []
        for first in range(0, len(inputs), size):
            results += batch(inputs[first:first + size])
        synchronize(args.device)
        return time.perf_counter() - begin, results

    row = {"model": name, "alone_s": t_alone}
    for size in sorted({args.batch, args.series}):
        seconds, results = batched(size)
        identical = all(np.array_equal(a.paths, b.paths) for a, b in zip(alone, results, strict=True))
        close = all(np.allclose(a.paths, b.paths, rtol=1e-5, atol=1e-6) for a, b in zip(alone, results, strict=True))
        row[size] = (seconds, identical, close)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="also forecast in batches of this many")
    parser.add_argument("--lookback", type=int, default=400)
    parser.add_argument("--horizon", type=int, default=24)
    parser.add_argument("--paths", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="small,tiny", help="comma-separated: small (Kronos-small shape), tiny")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.series} series (real BTCUSDT/ETHUSDT 1h windows), look-back {args.lookback}, horizon "
          f"{args.horizon}, {args.paths} paths, top_p 0.9, own seed per series; device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':6} {'how':>14} {'seconds':>9} {'series/s':>9} {'ratio':>7}  identical paths (bitwise / 1e-5)")
    for name in args.models.split(","):
        row = measure(name, args)
        alone = row["alone_s"]
        print(f"{name:6} {'one by one':>14} {alone:9.2f} {args.series / alone:9.2f} {1.0:6.2f}x")
        for size in sorted(k for k in row if isinstance(k, int)):
            seconds, identical, close = row[size]
            print(f"{name:6} {f'batches of {size}':>14} {seconds:9.2f} {args.series / seconds:9.2f} "
                  f"{alone / seconds:6.2f}x  {identical} / {close}")


if __name__ == "__main__":
    main()
