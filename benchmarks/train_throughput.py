"""Fine-tuning throughput: the trainer against a bare fp32 step of the same modules, per stage and shape.

Each case runs the real trainer (`python -m kronos_model.finetune`, its defaults) in its own process for a
fixed number of steps on the bundled BTCUSDT data and reads windows/s from its train_log.jsonl; peak memory is
the child's max RSS. Next to it: the trainer with bf16 off, and, in this process, a bare step of the same
modules on a batch of the same shape (fp32 forward, backward, AdamW step: the original Kronos training math
with no trainer around it) and the ratio trainer / bare. Last, the demo case is trained twice, with and
without bf16, and the largest relative difference of their logged losses printed (equal loss curves). The
trainer uses bf16 on CUDA only; on a CPU both of those runs are fp32.

    python benchmarks/train_throughput.py [--device cuda] [--steps 12] [--no-bf16]
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
    "demo (tiny, window 109)": {"config": ROOT / "configs" / "finetune-demo.yaml", "changes": {}},
    "Kronos-small shape (window 561)": {
        "config": ROOT / "configs" / "finetune-demo.yaml",
        "changes": {"scratch_predictor": released("Kronos-small"),
                    "scratch_tokenizer": released("Kronos-Tokenizer-base"),
                    "lookback_window": 512, "predict_window": 48, "batch_size": 8},
    },
}


def run_case(config: Path, changes: dict, stage: str, steps: int, device: str,
             bf16: bool) -> tuple[float, float, list[float]]:
    values = yaml.safe_load(config.read_text())
    batch = changes.get("batch_size", values.get("batch_size", 32))
    with tempfile.TemporaryDirectory() as tmp:
        values.update(changes)
        values.update({"data_path": str(ROOT / values["data_path"]), "output_dir": tmp, "epochs": 1,
                       "tokenizer_epochs": 1, "predictor_epochs": 1, "max_train_windows": batch * steps,
                       "max_val_windows": batch, "log_interval": 1, "device": device, "bf16": bf16,
                       "progress": False, "skip_tokenizer": stage == "predictor",
                       "skip_predictor": stage == "tokenizer", "resume": False})
        if stage == "predictor":  # skip_tokenizer needs a real base tokenizer: save a scratch one first
            from kronos_model import KronosTokenizer

            tokenizer_dir = Path(tmp) / "base-tokenizer"
            from kronos_model.finetune.config import TINY_TOKENIZER

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
        rates = [r["windows_per_s"] for r in records if "windows_per_s" in r]
        losses = [r["loss"] for r in records if r.get("loss") is not None and r.get("stage") == stage]
        # the first steps include warm-up; report the rate over the whole epoch, as logged at its end
        return rates[-1], usage.ru_maxrss / 1024, losses


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
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="the trainer in fp32 too")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per case and stage")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    print(f"device {args.device}, trainer bf16 {args.bf16}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps per stage")
    print(f"{'case':34} {'stage':10} {'trainer w/s':>11} {'trainer fp32':>12} {'bare fp32 w/s':>13} {'ratio':>6} "
          f"{'peak RSS MB':>12}")
    for name, case in CASES.items():
        for stage in ("tokenizer", "predictor"):
            rate, peak, _ = run_case(case["config"], case["changes"], stage, args.steps, args.device, args.bf16)
            fp32, _, _ = run_case(case["config"], case["changes"], stage, args.steps, args.device, False)
            bare = bare_step_rate(case["config"], case["changes"], stage, max(3, args.steps // 3), args.device)
            print(f"{name:34} {stage:10} {rate:11.1f} {fp32:12.1f} {bare:13.1f} {rate / bare:6.2f} {peak:12.0f}")
    demo = CASES["demo (tiny, window 109)"]
    for stage in ("tokenizer", "predictor"):
        *_, mixed = run_case(demo["config"], demo["changes"], stage, args.steps, args.device, True)
        *_, full = run_case(demo["config"], demo["changes"], stage, args.steps, args.device, False)
        worst = max(abs(a - b) / abs(b) for a, b in zip(mixed, full, strict=False))
        print(f"demo {stage} loss curve, bf16 vs fp32 over {len(full)} logged steps: largest relative "
              f"difference {worst:.2%} (first {full[0]:.4f} / {mixed[0]:.4f}, last {full[-1]:.4f} / {mixed[-1]:.4f})")


if __name__ == "__main__":
    main()
