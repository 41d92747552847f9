"""Pretrain the small Kronos that ships with kronosd (daemon/assets/checkpoints/pretrained-1h) and evaluate it.

    python tools/pretrain_bundled.py history     # (re)write daemon/assets/data/history/ from shared/data
    python tools/pretrain_bundled.py train       # our trainer: tokenizer stage, then predictor stage
    python tools/pretrain_bundled.py bundle      # best/ -> the bundled checkpoint, manifest with the held-out period
    python tools/pretrain_bundled.py evaluate    # `kronosd evaluate` on the held-out period of BTCUSDT and ETHUSDT
    python tools/pretrain_bundled.py all         # train, bundle, evaluate

Data: the real Binance 1h candles of BTCUSDT and ETHUSDT bundled in daemon/assets/data (2020-01 to 2025-12 with
the history/ files). Every series is split on the same dates: training before TRAIN_END, validation (picks the
best epoch) from TRAIN_END + embargo to VAL_END, and the held-out period from VAL_END + embargo to the end of
the data, never trained or validated on; `kronosd evaluate` excludes [training start, VAL_END] by itself from
the checkpoint's manifest. Everything is seeded (SEED): the same command on the same torch gives the same
weights on the same machine. On a GPU machine pass `device=cuda` (any trainer key can be overridden).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "daemon" / "assets" / "data"
HISTORY = DATA / "history"
TARGET = REPO / "daemon" / "assets" / "checkpoints" / "pretrained-1h"
RUN_DIR = REPO / "runs" / "pretrain-bundled"
SHARED = Path("/work/shared/data")

SEED = 7
TRAIN_END = "2025-01-01"
VAL_END = "2025-06-01"
LOOKBACK, HORIZON = 96, 24  # the demo forecasts 12 candles from 96; the evaluation uses 24
KRONOS_COLUMNS = ["open_time", "open", "high", "low", "close", "volume", "quote_volume"]
HISTORY_BEGIN = "2020-01-01"

# (file, symbol, first open_time inclusive, last open_time exclusive): the shared files' candles that the two
# bundled files lack, so the series run 2020-01 -> 2025-12 without overlapping.
HISTORY_FILES = [
    ("BTCUSDT_1h_2020-2022.parquet", "BTCUSDT", HISTORY_BEGIN, "2023-01-01"),
    ("ETHUSDT_1h_2020-2022.parquet", "ETHUSDT", HISTORY_BEGIN, "2022-09-23T07:00"),
    ("ETHUSDT_1h_2024-2025.parquet", "ETHUSDT", "2024-09-22T06:00", "2026-01-01"),
]
TRAINING_FILES = [
    "daemon/assets/data/history/BTCUSDT_1h_2020-2022.parquet",
    "daemon/assets/data/BTCUSDT_1h.parquet",
    "daemon/assets/data/history/ETHUSDT_1h_2020-2022.parquet",
    "daemon/assets/data/ETHUSDT_1h.parquet",
    "daemon/assets/data/history/ETHUSDT_1h_2024-2025.parquet",
]
# Held-out evaluation: one file per symbol that holds the held-out period and the look-back before it.
EVALUATION_FILES = {"BTCUSDT": "daemon/assets/data/BTCUSDT_1h.parquet",
                    "ETHUSDT": "daemon/assets/data/history/ETHUSDT_1h_2024-2025.parquet"}
EVALUATION = {"origins": 300, "stride": 16, "horizon": HORIZON, "samples": 30, "seed": 0}

# Sized for a shared 2-core CPU (about 40 minutes while other jobs run): the tiny architecture, a few thousand
# windows per epoch (a fresh seeded permutation each epoch), early stopping on validation.
TRAINER = {
    "data_path": TRAINING_FILES,
    "base_model": "scratch", "tokenizer_id": "scratch",
    "lookback_window": LOOKBACK, "predict_window": HORIZON,
    "train_end": TRAIN_END, "val_end": VAL_END,
    "tokenizer_epochs": 4, "predictor_epochs": 8,
    "max_train_windows": 6144, "max_val_windows": 512,
    "batch_size": 32, "tokenizer_learning_rate": 0.002, "learning_rate": 0.002,
    "patience": 2, "seed": SEED, "device": "cpu", "log_interval": 8,
    "output_dir": str(RUN_DIR.relative_to(REPO)), "progress": True,
}


def _ms(text: str) -> int:
    return int(pl.Series([text]).str.to_datetime(time_unit="ms").dt.epoch("ms")[0])


def write_history(source: Path) -> None:
    """Copy the candles the bundled files lack from shared/data, unchanged, in the columns Kronos reads."""
    HISTORY.mkdir(parents=True, exist_ok=True)
    for name, symbol, first, end in HISTORY_FILES:
        frame = pl.read_csv(source / f"{symbol}_1h.csv.gz", infer_schema_length=None)
        part = frame.filter(pl.col("open_time").is_between(_ms(first), _ms(end), closed="left")).select(KRONOS_COLUMNS)
        part.write_parquet(HISTORY / name, compression="zstd", compression_level=22)
        print(f"{HISTORY / name}: {part.height} candles", file=sys.stderr)
    _check_no_overlap()


def _check_no_overlap() -> None:
    from kronos_model.data import read_candles

    frame = pl.concat([read_candles(REPO / path) for path in TRAINING_FILES], how="vertical_relaxed")
    duplicated = frame.select(["symbol", "timestamps"]).is_duplicated().sum()
    if duplicated:
        raise ValueError(f"the training files overlap on {duplicated} candles")


def train(overrides: list[str], threads: int) -> Path:
    import torch

    from kronos_model.finetune import Trainer
    from kronos_model.finetune.config import load_config, parse_override

    torch.set_num_threads(threads)
    values = dict(TRAINER)
    values.update(dict(parse_override(item) for item in overrides))
    config_path = RUN_DIR / "pretrain.yaml"
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    import yaml

    config_path.write_text(yaml.safe_dump(values, sort_keys=False))
    config = load_config(config_path)
    _check_no_overlap()
    started = time.perf_counter()
    metrics = Trainer(config).run()
    minutes = round((time.perf_counter() - started) / 60, 1)
    (RUN_DIR / "wall_minutes.json").write_text(json.dumps(minutes))
    print(json.dumps({"metrics": metrics, "minutes": minutes}, default=str))
    return Path(config.output_dir) / "best"


def held_out(manifest: dict[str, Any]) -> dict[str, Any]:
    splits = manifest["data"]["splits"]
    return {"begin": splits["test_begin"], "end": manifest["data"]["last"], "symbols": manifest["data"]["symbols"],
            "note": "never trained or validated on; `kronosd evaluate` excludes [training start, val_end]"}


def bundle(best: Path) -> None:
    """best/ (tokenizer/, model/, manifest.json) -> TARGET, with the periods stated plainly in the manifest."""
    from kronos_model.checkpoint import MANIFEST, read_manifest

    manifest = read_manifest(best)
    if TARGET.exists():
        shutil.rmtree(TARGET)
    TARGET.mkdir(parents=True)
    for part in ("tokenizer", "model"):
        shutil.copytree(best / part, TARGET / part)
    data = manifest["data"]
    manifest["config"]["output_dir"] = None  # a path on the training machine, meaningless in the package
    manifest["periods"] = {
        "training": {"begin": data["train_range"][0], "end": data["train_range"][1]},
        "validation": {"begin": data["splits"]["val_begin"], "end": data["splits"]["val_end"]},
        "held_out": held_out(manifest),
    }
    manifest["command"] = "python tools/pretrain_bundled.py all"
    if (RUN_DIR / "wall_minutes.json").exists():
        manifest["training_wall_minutes"] = json.loads((RUN_DIR / "wall_minutes.json").read_text())
    (TARGET / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    read_manifest(TARGET)  # the copied files still match their hashes
    copy_training_log(best.parent)


def copy_training_log(run: Path) -> None:
    """The loss curves (train_log.jsonl and the report's PNGs) travel with the checkpoint, for its model card."""
    (TARGET / "training").mkdir(exist_ok=True)
    for name in ("train_log.jsonl", "loss_tokenizer.png", "loss_predictor.png"):
        shutil.copy2(run / name, TARGET / "training" / name)


def evaluate(threads: int) -> dict[str, Any]:
    """`kronosd evaluate` of the bundled checkpoint on each symbol's held-out period; results into the manifest."""
    from kronos_model.checkpoint import MANIFEST

    manifest = json.loads((TARGET / MANIFEST).read_text())
    begin = manifest["periods"]["held_out"]["begin"]
    results = {}
    for symbol, path in EVALUATION_FILES.items():
        out = RUN_DIR / f"eval-{symbol}"
        command = [sys.executable, "-m", "daemon.cli", "evaluate", "--data", path, "--model", str(TARGET),
                   "--origins", str(EVALUATION["origins"]), "--stride", str(EVALUATION["stride"]),
                   "--horizon", str(EVALUATION["horizon"]), "--samples", str(EVALUATION["samples"]),
                   "--seed", str(EVALUATION["seed"]), "--start", begin, "--quiet", "--out", str(out)]
        print(" ".join(command[2:]), file=sys.stderr)
        subprocess.run(command, check=True, cwd=REPO, env=_env(threads))
        results[symbol] = summarise(json.loads((out / "report.json").read_text()), path)
        print(json.dumps({symbol: results[symbol]}), file=sys.stderr)
    manifest["evaluation"] = {"settings": {**EVALUATION, "lookback": LOOKBACK, "top_p": 0.9, "temperature": 1.0},
                              "command": "kronosd evaluate --data FILE --model daemon/assets/checkpoints/"
                              f"pretrained-1h --origins {EVALUATION['origins']} --stride {EVALUATION['stride']} "
                              f"--horizon {HORIZON} --samples {EVALUATION['samples']} --start {begin}",
                              "results": results}
    (TARGET / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return results


def _env(threads: int) -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def summarise(report: dict[str, Any], path: str) -> dict[str, Any]:
    """The numbers the model card quotes, from `kronosd evaluate`'s report.json."""
    models = report["models"]
    kronos, walk, band = models["kronos"], models["random_walk"], models["vol_band"]
    return {
        "data": path, "origins": report["origins"], "stride": report["stride"],
        "first_origin": report["period"]["first_origin"], "last_target": report["period"]["last_target"],
        "mae": kronos["mae"], "mae_random_walk": walk["mae"], "mae_ratio_random_walk": kronos["relative_mae"],
        "dm_pvalue_mae_vs_random_walk": kronos["dm_pvalue_vs_random_walk"],
        "crps": kronos["crps"], "crps_vol_band": band["crps"], "crps_ratio_vol_band": kronos["crps"] / band["crps"],
        "dm_pvalue_crps_vs_vol_band": kronos["dm_crps_vs_vol_band"]["pvalue"],
        "coverage_90": kronos["coverage_90"], "coverage_90_vol_band": band["coverage_90"],
        "direction_accuracy": kronos["direction_accuracy"], "verdicts": report["verdicts"]["kronos"],
    }


def write_card() -> Path:
    """README.md of the bundled checkpoint: what it is, what it saw, how it was made, how it did on held-out data."""
    from kronos_model.checkpoint import MANIFEST

    manifest = json.loads((TARGET / MANIFEST).read_text())
    config, periods, data = manifest["config"], manifest["periods"], manifest["data"]
    sizes = {part: sum(p.stat().st_size for p in (TARGET / part).rglob("*")) for part in ("tokenizer", "model")}
    stages, code = manifest["metrics"], manifest["code"]
    lines = [
        "# pretrained-1h: a small Kronos pretrained on the bundled BTCUSDT and ETHUSDT 1h candles",
        "",
        "What `kronosd demo` starts from. A from-scratch Kronos (our implementation, hub layout: `tokenizer/`, "
        "`model/`) of the tiny shape: tokenizer and predictor d_model "
        f"{config['scratch_predictor']['d_model']}, {config['scratch_predictor']['n_layers']} predictor layers, "
        f"{config['scratch_tokenizer']['s1_bits']}+{config['scratch_tokenizer']['s2_bits']} code bits; "
        f"{(sizes['tokenizer'] + sizes['model']) / 2**20:.1f} MB. Trained with look-back {config['lookback_window']} "
        f"and horizon {config['predict_window']} (windows of {config['lookback_window'] + config['predict_window'] + 1}"
        " candles, context well under 512).",
        "",
        "## Data and periods (the same dates for both series)",
        "",
        f"- candles: {data['rows']:,} real Binance spot 1h candles of {' and '.join(data['symbols'])}, "
        f"{data['first']} to {data['last']} ({data['derived_amounts']:,} `amount` cells derived as volume × mean "
        "price where the source has no quote volume); files: " + ", ".join(f"`{p}`" for p in data["paths"]),
        f"- training: {periods['training']['begin']} to {periods['training']['end']} "
        f"({data['windows']['train']:,} windows; {config['max_train_windows']:,} drawn per epoch, a seeded "
        "permutation)",
        f"- validation (chose the best epoch of each stage): {periods['validation']['begin']} to "
        f"{periods['validation']['end']}",
        f"- **held out** (never trained or validated on): {periods['held_out']['begin']} to "
        f"{periods['held_out']['end']}. `kronosd evaluate` excludes [training start, validation end] by itself.",
        "",
        "## How it was made",
        "",
        f"`{manifest['command']}` ({manifest.get('training_wall_minutes', '?')} minutes of training; "
        f"seed {config['seed']}, CPU, 1 torch thread; kronosd {code['kronosd']} at commit "
        f"{(code['git_commit'] or 'unknown')[:12]}, torch {code['torch']}). "
        "Stage 1 the tokenizer, stage 2 the predictor on the frozen tokenizer, both with kronosd's trainer "
        "(`kronos_model.finetune`); the full config is `config` in `manifest.json`.",
        "",
        "| stage | best validation loss | best epoch | epochs run | optimizer steps |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {name} | {m['best_val_loss']:.4f} | {m['best_epoch']} | {m['epochs_run']} | {m['steps']} |"
          for name, m in stages.items()],
        "",
        "Validation metric: tokenizer = MSE of the full reconstruction (z-scored units); predictor = mean of the "
        "s1 and s2 cross entropies.",
        "",
    ]
    evaluation = manifest.get("evaluation")
    if evaluation:
        settings = evaluation["settings"]
        lines += [
            "## Held-out evaluation",
            "",
            f"`{evaluation['command']}`: {settings['samples']} sample paths, look-back {settings['lookback']}, "
            f"horizon {settings['horizon']}, origins {settings['stride']} candles apart, top-p "
            f"{settings['top_p']}, seed {settings['seed']}.",
            "",
            "| series | origins (first) | MAE / random walk (DM p) | CRPS / vol band (DM p) | coverage 90 % "
            "(vol band) | direction |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for symbol, r in evaluation["results"].items():
            lines.append(
                f"| {symbol} | {r['origins']} ({r['first_origin']}) | {r['mae_ratio_random_walk']:.3f} "
                f"({r['dm_pvalue_mae_vs_random_walk']:.3g}) | {r['crps_ratio_vol_band']:.3f} "
                f"({r['dm_pvalue_crps_vs_vol_band']:.3g}) | {100 * r['coverage_90']:.1f} % "
                f"({100 * r['coverage_90_vol_band']:.1f} %) | "
                + (f"{100 * r['direction_accuracy']:.1f} % |" if r["direction_accuracy"] is not None else "– |"))
        goals = [f"{symbol}: MAE {r['mae_ratio_random_walk']:.3f}x random walk (goal <= 1.05: "
                 f"{'met' if r['mae_ratio_random_walk'] <= 1.05 else 'NOT met'}), CRPS "
                 f"{r['crps_ratio_vol_band']:.3f}x vol band (goal <= 1.05: "
                 f"{'met' if r['crps_ratio_vol_band'] <= 1.05 else 'NOT met'})"
                 for symbol, r in evaluation["results"].items()]
        lines += ["", "Goals: " + "; ".join(goals) + ".", ""]
        if any(r["mae_ratio_random_walk"] > 1.05 or r["crps_ratio_vol_band"] > 1.05
               for r in evaluation["results"].values()):
            coverage = ", ".join(f"{100 * r['coverage_90']:.0f} %" for r in evaluation["results"].values())
            band = ", ".join(f"{100 * r['coverage_90_vol_band']:.0f} %" for r in evaluation["results"].values())
            lines += [
                f"Why not: the sampled paths are too narrow (the 90 % interval covers {coverage} of outcomes, the "
                f"vol band's {band}), which costs CRPS against the vol band; the median path also carries the "
                "tokenizer's reconstruction error (validation MSE "
                f"{manifest['metrics']['tokenizer']['best_val_loss']:.3f} in z-scored units, a jump at step 1) and "
                "the noise of a 30-path median, which cost MAE against the random walk. A tiny model trained for "
                "half an hour on one CPU thread learns the volatility only roughly.",
                "",
            ]
        for label, results in evaluation.get("variants", {}).items():
            lines += [f"Same origins with {label}: " + "; ".join(
                f"{symbol} MAE {r['mae_ratio_random_walk']:.3f}x random walk, CRPS {r['crps_ratio_vol_band']:.3f}x "
                f"vol band, coverage 90 % {100 * r['coverage_90']:.1f} %" for symbol, r in results.items()) + ".", ""]
        lines += ["Verdicts of `kronosd evaluate` (a win needs p < 0.05):", ""]
        lines += [f"- {symbol}: " + "; ".join(r["verdicts"]) for symbol, r in evaluation["results"].items()]
        lines.append("")
    lines += ["Loss curves: `training/loss_tokenizer.png`, `training/loss_predictor.png`; every logged step and "
              "validation in `training/train_log.jsonl`.", ""]
    lines += ["A tiny model trained for minutes on one CPU: it shows the daemon working on real weights; it is "
              "not a trading signal. `kronosd evaluate` measures any checkpoint the same way."]
    path = TARGET / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["history", "train", "bundle", "evaluate", "all"])
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="trainer config keys (train, all)")
    parser.add_argument("--source", type=Path, default=SHARED, help="shared/data with the full 1h csv.gz files")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared, busy CPU "
                        "2 threads ran 13x slower than 1, their OpenMP workers waiting on each other)")
    args = parser.parse_args(argv)
    if args.step == "history":
        write_history(args.source)
    if args.step in ("train", "all"):
        best = train(args.overrides, args.threads)
        bundle(best)
    if args.step == "bundle":
        bundle(RUN_DIR / "best")
    if args.step in ("train", "bundle"):
        write_card()
    if args.step in ("evaluate", "all"):
        print(json.dumps(evaluate(args.threads), indent=2))
        write_card()
    return 0


if __name__ == "__main__":
    sys.exit(main())
