"""`report.md` with PNG loss curves, written at the end of a fine-tuning run from `train_log.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_stage(records: list[dict[str, Any]], stage: str, target: Path) -> bool:
    train = [r for r in records if r["stage"] == stage and "loss" in r]
    val = [r for r in records if r["stage"] == stage and "val_loss" in r]
    if not train and not val:
        return False
    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if val:
        axis.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", lw=1.5)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title(f"{stage} fine-tuning")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return True


def write_report(output: Path, metrics: dict[str, Any], manifest: dict[str, Any]) -> Path:
    records = read_log(output / "train_log.jsonl")
    data = manifest["data"]
    lines = [
        "# Kronos fine-tuning report",
        "",
        f"- data: {', '.join(data['paths'])} — {data['rows']:,} candles of {', '.join(data['symbols'])}, "
        f"{data['first']} to {data['last']} ({data['derived_amounts']} amounts derived as volume × mean price)",
        f"- windows: train {data['windows']['train']:,}, validation {data['windows']['val']:,}, "
        f"test {data['windows']['test']:,}; split boundaries {data['splits']}",
        f"- base: tokenizer `{manifest['base']['tokenizer']}`, predictor `{manifest['base']['predictor']}`",
        f"- code: {manifest['code']}",
        "",
        "| stage | best validation loss | best epoch | epochs run | optimizer steps | last train loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for stage, values in metrics.items():
        train = [r["loss"] for r in records if r["stage"] == stage and "loss" in r]
        last = f"{train[-1]:.4f}" if train else "–"
        lines.append(f"| {stage} | {values['best_val_loss']:.4f} | {values['best_epoch']} | {values['epochs_run']} "
                     f"| {values['steps']} | {last} |")
    lines += ["", "Validation metric: tokenizer = MSE of the full reconstruction (normalised units); predictor = "
              "mean of the s1 and s2 cross entropies with s2 conditioned on the true s1.", ""]
    for stage in metrics:
        image = output / f"loss_{stage}.png"
        if plot_stage(records, stage, image):
            lines += [f"![{stage} loss]({image.name})", ""]
    val_rows = [r for r in records if "val_loss" in r]
    if val_rows:
        lines += ["| stage | epoch | step | validation loss |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['stage']} | {r['epoch']} | {r['step']} | {r['val_loss']:.4f} |" for r in val_rows]
        lines.append("")
    lines.append("Checkpoints: `best/` (best validation of each stage) and `last/`, each with `tokenizer/`, "
                 "`model/` and `manifest.json`.")
    path = output / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
