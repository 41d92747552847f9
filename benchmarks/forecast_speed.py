"""Forecast speed: the original full-recompute algorithm vs kronos_model's KV-cached generator.

A Kronos-small-shaped predictor with a Tokenizer-base-shaped tokenizer (random weights), look-back 400,
horizon 48, 8 sample paths, on the CPU by default. Both forecasters run greedy (top_k=1) so their token ids
must be identical; then both run sampled (top_p 0.9) for the timing users see. Prints both times and the
ratio.

    python benchmarks/forecast_speed.py [--device cuda] [--bf16] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kronos_model import Kronos, KronosTokenizer
from kronos_model.generation import generate, sample_tokens

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "kronos-configs"


@torch.inference_mode()
def full_recompute_generate(tokenizer, model, x, x_stamp, y_stamp, max_context, pred_len, sample_count=1,
                            temperature=1.0, top_k=0, top_p=0.9, generator=None):
    """The original algorithm: every step re-runs the whole window for every path, and the s2 head over every
    position. Returns (s1, s2) of shape (B, S, P) and the decoded normalised paths (B, S, P, d_in)."""
    batch, lookback, _ = x.shape
    x = x.repeat_interleave(sample_count, dim=0)
    stamps = torch.cat([x_stamp, y_stamp], dim=1).repeat_interleave(sample_count, dim=0)
    s1, s2 = tokenizer.encode(x, half=True)
    for i in range(pred_len):
        known = lookback + i
        window = min(known, max_context)
        s1_logits, context = model.decode_s1(s1[:, -window:], s2[:, -window:], stamps[:, known - window : known])
        next_s1 = sample_tokens(s1_logits[:, -1], temperature, top_k, top_p, generator)
        s2_logits = model.decode_s2(context, next_s1[:, None])
        next_s2 = sample_tokens(s2_logits[:, -1], temperature, top_k, top_p, generator)
        s1 = torch.cat([s1, next_s1[:, None]], dim=1)
        s2 = torch.cat([s2, next_s2[:, None]], dim=1)
    window = min(lookback + pred_len, max_context)
    values = tokenizer.decode([s1[:, -window:], s2[:, -window:]], half=True)[:, -pred_len:]
    shape = (batch, sample_count, pred_len)
    return s1[:, lookback:].reshape(shape), s2[:, lookback:].reshape(shape), values.reshape(*shape, -1)


def build_models(device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    tokenizer = KronosTokenizer(**json.loads((CONFIGS / "Kronos-Tokenizer-base.config.json").read_text()))
    model = Kronos(**json.loads((CONFIGS / "Kronos-small.config.json").read_text()))
    # Random heads give near-uniform logits; scale them so greedy choices are not decided by rounding noise.
    with torch.no_grad():
        model.head.proj_s1.weight.mul_(8)
        model.head.proj_s2.weight.mul_(8)
    return tokenizer.to(device, dtype).eval(), model.to(device, dtype).eval()


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def run(device: str, dtype: torch.dtype, lookback: int, horizon: int, paths: int, repeats: int) -> dict:
    tokenizer, model = build_models(device, dtype)
    torch.manual_seed(1)
    x = torch.randn(1, lookback, 6, device=device, dtype=dtype).clamp(-5, 5)
    minutes = torch.arange(lookback + horizon, device=device)
    stamp = torch.stack([minutes * 0, minutes % 24, (minutes // 24) % 7, (minutes // 24) % 28 + 1,
                         minutes * 0 + 6], dim=-1)[None].to(dtype)
    args = (tokenizer, model, x, stamp[:, :lookback], stamp[:, lookback:], 512, horizon)

    t_full_greedy, full = timed(lambda: full_recompute_generate(*args, paths, top_k=1), device, 1)
    t_ours_greedy, ours = timed(lambda: generate(*args, paths, top_k=1), device, 1)
    identical = torch.equal(full[0], ours.s1) and torch.equal(full[1], ours.s2)

    def sampled_full():
        return full_recompute_generate(*args, paths, top_p=0.9, generator=torch.Generator(device).manual_seed(0))

    def sampled_ours():
        return generate(*args, paths, top_p=0.9, generator=torch.Generator(device).manual_seed(0))

    t_full, _ = timed(sampled_full, device, repeats)
    t_ours, _ = timed(sampled_ours, device, repeats)
    return {"identical_greedy_ids": identical, "greedy_full_s": t_full_greedy, "greedy_ours_s": t_ours_greedy,
            "full_s": t_full, "ours_s": t_ours, "ratio": t_full / t_ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="also run in bfloat16 and compare with fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--lookback", type=int, default=400)
    parser.add_argument("--horizon", type=int, default=48)
    parser.add_argument("--paths", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"Kronos-small shape + Tokenizer-base shape (random weights), look-back {args.lookback}, horizon "
          f"{args.horizon}, {args.paths} paths, device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if args.bf16 else [])
    print(f"{'dtype':6} {'full recompute':>15} {'kv cache':>10} {'ratio':>7}  identical greedy ids")
    for name, dtype in dtypes:
        r = run(args.device, dtype, args.lookback, args.horizon, args.paths, args.repeats)
        print(f"{name:6} {r['full_s']:14.3f}s {r['ours_s']:9.3f}s {r['ratio']:6.1f}x  {r['identical_greedy_ids']}"
              f"  (greedy: {r['greedy_full_s']:.3f}s vs {r['greedy_ours_s']:.3f}s)")


if __name__ == "__main__":
    main()
