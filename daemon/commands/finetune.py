"""`kronosd finetune --config FILE [key=value ...]`: two-stage Kronos fine-tuning (see kronos_model.finetune).

Runs the trainer in this process; the daemon runs the same trainer as a `python -m kronos_model.finetune`
subprocess. For several GPUs: `torchrun --nproc_per_node=N -m kronos_model.finetune --config FILE`.
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from kronos_model.finetune.__main__ import main

    flags = [f"--skip-{stage}" for stage in ("tokenizer", "predictor") if getattr(args, f"skip_{stage}")]
    return main((["--config", args.config] if args.config else []) + flags + args.overrides)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune the Kronos tokenizer, then the predictor, on candle files",
        description="Fine-tune Kronos in two stages (tokenizer, then predictor) with a chronological "
        "train/val/test split, validation every epoch, early stopping, resumable checkpoints (best/ and last/), "
        "train_log.jsonl and report.md. Example: kronosd finetune --config configs/finetune-demo.yaml "
        "output_dir=runs/demo epochs=2",
    )
    parser.add_argument("--config", help="YAML config (see configs/); keys may be overridden as key=value")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--skip-tokenizer", action="store_true", help="keep the base tokenizer (skip stage 1)")
    parser.add_argument("--skip-predictor", action="store_true", help="train the tokenizer only (skip stage 2)")
    parser.set_defaults(handler=run)
