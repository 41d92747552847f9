"""Fine-tuning throughput: windows/s and peak memory per stage, for the demo config and Kronos-small shape.

Each case runs the real trainer (`python -m kronos_model.finetune`) in its own process for a fixed number of
steps on the bundled BTCUSDT data and reads windows/s from its train_log.jsonl; peak memory is the child's
max RSS (CPU) or torch's peak allocation (CUDA). Prints one table.

    python benchmarks/train_throughput.py [--device cuda] [--bf16] [--steps 12]
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


def run_case(config: Path, changes: dict, stage: str, steps: int, device: str, bf16: bool) -> tuple[float, float]:
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
        # the first steps include warm-up; report the rate over the whole epoch, as logged at its end
        return rates[-1], usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per case and stage")
    args = parser.parse_args()
    import torch

    print(f"device {args.device}, bf16 {args.bf16}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps per stage")
    print(f"{'case':34} {'stage':10} {'windows/s':>10} {'peak RSS MB':>12}")
    for name, case in CASES.items():
        for stage in ("tokenizer", "predictor"):
            rate, peak = run_case(case["config"], case["changes"], stage, args.steps, args.device, args.bf16)
            print(f"{name:34} {stage:10} {rate:10.1f} {peak:12.0f}")


if __name__ == "__main__":
    main()
