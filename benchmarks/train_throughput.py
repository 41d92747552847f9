"""Fine-tuning throughput: the trainer against a bare fp32 step of the same modules, per stage and shape.

Each case runs the real trainer (`python -m kronos_model.finetune`) in its own process for a fixed number of
steps on the bundled BTCUSDT data, twice: with its defaults (bf16: auto, token_cache, compile as the case
says) and as the plain fp32 eager loop (bf16, compile and token_cache off). Its steady rate is the windows/s
after the first step (which carries the compiling, printed as "1st step s"), read from train_log.jsonl; peak
memory is the child's max RSS. Next to it, in this process, a bare step of the same modules on a batch of the
same shape (fp32 forward, backward, AdamW step: the original Kronos training math with no trainer around it,
the predictor re-encoding its targets every step as the original does; measured before and after the trainer
runs, averaged), the ratios trainer / bare and trainer / plain, and the
largest relative difference between the two trainer runs' logged losses (equal loss curves: same data, same
seed; bf16 rounding and compiled dropout's other random numbers are the only differences).

The Kronos-small case forces compile=true: a real run of that shape has far more than the 100 steps from which
`compile: auto` compiles, but this benchmark runs only a few.

    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py [--device cuda] [--steps 12] [--cases demo,small]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "fixtures" / "kronos-configs"


def released(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.config.json").read_text())


CASES = {
    "demo": {"name": "demo (tiny, window 109)", "config": ROOT / "configs" / "finetune-demo.yaml", "changes": {}},
    "small": {
        "name": "Kronos-small shape (window 561)",
        "config": ROOT / "configs" / "finetune-demo.yaml",
        "changes": {"scratch_predictor": released("Kronos-small"),
                    "scratch_tokenizer": released("Kronos-Tokenizer-base"),
                    "lookback_window": 512, "predict_window": 48, "batch_size": 8, "compile": True},
    },
}
PLAIN = {"bf16": False, "compile": False, "token_cache": False}  # the trainer's loop as it was: fp32, eager


def run_case(config: Path, changes: dict, stage: str, steps: int, device: str
             ) -> tuple[float, float, float, list[float]]:
    """(steady windows/s after the first step, first step seconds, peak RSS MB, logged losses)"""
    values = yaml.safe_load(config.read_text())
    batch = changes.get("batch_size", values.get("batch_size", 32))
    with tempfile.TemporaryDirectory() as tmp:
        values.update(changes)
        values.update({"data_path": str(ROOT / values["data_path"]), "output_dir": tmp, "epochs": 1,
                       "tokenizer_epochs": 1, "predictor_epochs": 1, "max_train_windows": batch * steps,
                       "max_val_windows": batch, "log_interval": 1, "device": device,
                       "progress": False, "skip_tokenizer": stage == "predictor",
                       "skip_predictor": stage == "tokenizer", "resume": False})
        if stage == "predictor":  # skip_tokenizer needs a real base tokenizer: save a scratch one first
            import torch

            from kronos_model import KronosTokenizer
            from kronos_model.finetune.config import TINY_TOKENIZER

            tokenizer_dir = Path(tmp) / "base-tokenizer"
            torch.manual_seed(0)  # the same base tokenizer, so the same targets, for every run of a case
            KronosTokenizer(**values.get("scratch_tokenizer", TINY_TOKENIZER)).save_pretrained(tokenizer_dir)
            values["tokenizer_id"] = str(tokenizer_dir)
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(values))
        child = subprocess.Popen([sys.executable, "-m", "kronos_model.finetune", "--config", str(path)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise RuntimeError(f"{stage} run failed: {child.stderr.read()[-2000:]}")
        records = [json.loads(line) for line in (Path(tmp) / "train_log.jsonl").read_text().splitlines()]
        steps_logged = [r for r in records if "windows_per_s" in r]
        losses = [r["loss"] for r in steps_logged]
        # windows_per_s is the epoch's rate so far: seen / elapsed, so elapsed = seen / rate at every step
        elapsed = [batch * (i + 1) / r["windows_per_s"] for i, r in enumerate(steps_logged)]
        steady = batch * (len(elapsed) - 1) / (elapsed[-1] - elapsed[0])
        return steady, elapsed[0], usage.ru_maxrss / 1024, losses


def bare_step_rate(config: Path, changes: dict, stage: str, steps: int, device: str) -> float:
    """Windows/s of a bare fp32 training step of the case's modules on a batch of its shape."""
    import time

    import torch
    import torch.nn.functional as F

    from kronos_model import Kronos, KronosTokenizer
    from kronos_model.finetune.config import TINY_PREDICTOR, TINY_TOKENIZER

    values = {**yaml.safe_load(config.read_text()), **changes}
    batch = values.get("batch_size", 32)
    window = values["lookback_window"] + values["predict_window"] + 1
    torch.manual_seed(0)
    tokenizer = KronosTokenizer(**values.get("scratch_tokenizer", TINY_TOKENIZER)).to(device)
    model = Kronos(**values.get("scratch_predictor", TINY_PREDICTOR)).to(device)
    x = torch.randn(batch, window, 6, device=device).clamp(-5, 5)
    stamp = torch.stack([torch.randint(0, n, (batch, window)) for n in (60, 24, 7, 32, 13)], -1).float().to(device)
    module = tokenizer if stage == "tokenizer" else model
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    def step() -> None:
        if stage == "tokenizer":
            (z_pre, z_full), bsq_loss, _, _ = tokenizer(x)
            loss = (F.mse_loss(z_pre, x) + F.mse_loss(z_full, x) + bsq_loss) / 2
        else:
            with torch.no_grad():  # the targets: the frozen tokenizer's codes of this batch, as every step
                s1, s2 = tokenizer.encode(x, half=True)
            s1_logits, s2_logits = model(s1[:, :-1], s2[:, :-1], stamp[:, :-1], use_teacher_forcing=False,
                                         s1_targets=s1[:, 1:])
            loss, _, _ = model.head.compute_loss(s1_logits, s2_logits, s1[:, 1:], s2[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    began = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per case and stage (>= 2)")
    parser.add_argument("--cases", default="demo,small", help=f"comma-separated, of {','.join(CASES)}")
    parser.add_argument("--stages", default="tokenizer,predictor")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps per stage; w/s = windows/s after the first step")
    print(f"{'case':32} {'stage':10} {'trainer w/s':>11} {'1st step s':>10} {'plain fp32':>10} {'bare fp32':>9} "
          f"{'ratio':>6} {'vs plain':>8} {'loss diff':>9} {'peak RSS MB':>11}", flush=True)
    for key in args.cases.split(","):
        case = CASES[key]
        for stage in args.stages.split(","):
            # the bare step before and after the trainer runs: other load on the machine drifts during a case
            bare_steps = max(3, args.steps // 3)
            bare_before = bare_step_rate(case["config"], case["changes"], stage, bare_steps, args.device)
            rate, first, peak, losses = run_case(case["config"], case["changes"], stage, args.steps, args.device)
            plain, _, _, reference = run_case(case["config"], {**case["changes"], **PLAIN}, stage, args.steps,
                                              args.device)
            bare = (bare_before + bare_step_rate(case["config"], case["changes"], stage, bare_steps,
                                                 args.device)) / 2
            worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
            print(f"{case['name']:32} {stage:10} {rate:11.2f} {first:10.1f} {plain:10.2f} {bare:9.2f} "
                  f"{rate / bare:6.2f} {rate / plain:8.2f} {worst:9.2%} "
                  f"{peak:11.0f}", flush=True)


if __name__ == "__main__":
    main()
