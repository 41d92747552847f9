"""Fine-tuning configuration: a YAML file plus `key=value` overrides, validated, saved with every run.

Defaults follow the original Kronos recipe (AdamW, weight decay 0.1, OneCycleLR with 3 % warm-up from lr/10,
cosine decay to lr·1e-5 and beta1 cycled 0.95 -> 0.85 -> 0.95; grad clip 2.0 for the tokenizer and 3.0 for the
predictor; tokenizer lr 2e-4, predictor lr 4e-5) and the Kronos-BTC seed's windows (look-back 512, horizon
48). Deliberate differences: both stages use the configured Adam betas (the original ignored them for the
tokenizer), and validation of the predictor conditions s2 on the true s1 so the metric is deterministic.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCRATCH = "scratch"

# A tiny architecture for demos and tests (about 0.4 M parameters in all).
TINY_TOKENIZER = {"d_in": 6, "d_model": 64, "n_heads": 4, "ff_dim": 128, "n_enc_layers": 3, "n_dec_layers": 3,
                  "ffn_dropout_p": 0.0, "attn_dropout_p": 0.0, "resid_dropout_p": 0.0, "s1_bits": 10, "s2_bits": 10,
                  "beta": 0.05, "gamma0": 1.0, "gamma": 1.1, "zeta": 0.05, "group_size": 4}
TINY_PREDICTOR = {"s1_bits": 10, "s2_bits": 10, "n_layers": 2, "d_model": 64, "n_heads": 4, "ff_dim": 128,
                  "ffn_dropout_p": 0.0, "attn_dropout_p": 0.0, "resid_dropout_p": 0.0, "token_dropout_p": 0.0,
                  "learn_te": True}


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # data
    data_path: list[str] = Field(description="Parquet/CSV file(s); several files = several symbols")
    lookback_window: int = Field(512, ge=1)
    predict_window: int = Field(48, ge=1)
    clip: float = Field(5.0, gt=0)
    train_ratio: float = Field(0.8, gt=0, lt=1)
    val_ratio: float = Field(0.1, gt=0, lt=1)
    train_end: str | None = Field(None, description="UTC time the training period ends (with val_end, the splits "
                                  "are these dates for every symbol instead of the ratios)")
    val_end: str | None = Field(None, description="UTC time the validation period ends; later candles are the test "
                                "split, never trained or validated on")
    embargo: int | None = Field(None, ge=0, description="candles between splits; default: predict_window")
    max_train_windows: int | None = Field(None, ge=1, description="windows drawn per epoch (default: all)")
    max_val_windows: int | None = Field(None, ge=1, description="fixed validation subset (default: all)")

    # models: a hub id, a local directory, or "scratch"
    base_model: str = "NeoQuasar/Kronos-small"
    tokenizer_id: str = "NeoQuasar/Kronos-Tokenizer-base"
    revision: str | None = None
    tokenizer_revision: str | None = None
    scratch_tokenizer: dict[str, Any] = Field(default_factory=lambda: dict(TINY_TOKENIZER))
    scratch_predictor: dict[str, Any] = Field(default_factory=lambda: dict(TINY_PREDICTOR))
    skip_tokenizer: bool = False
    skip_predictor: bool = False

    # optimisation
    epochs: int = Field(10, ge=1)
    tokenizer_epochs: int | None = Field(None, ge=1)
    predictor_epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(4e-5, gt=0, description="predictor learning rate")
    tokenizer_learning_rate: float = Field(2e-4, gt=0)
    adam_beta1: float = Field(0.9, gt=0, lt=1)
    adam_beta2: float = Field(0.95, gt=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    warmup_pct: float = Field(0.03, gt=0, lt=1)
    tokenizer_grad_clip: float = Field(2.0, gt=0)
    predictor_grad_clip: float = Field(3.0, gt=0)
    teacher_forcing: bool = Field(False, description="condition the s2 loss on the true s1 (original: sampled s1)")
    patience: int = Field(3, ge=1, description="epochs without validation improvement before stopping")
    min_delta: float = Field(0.0, ge=0)
    seed: int = 42
    device: str = "auto"
    bf16: Literal["auto"] | bool = Field(
        "auto", description="bf16 autocast: auto = on CUDA, and on a CPU with native bf16 for modules at least 256 "
        "wide (kronos_model/finetune/acceleration.py); true/false force it on/off")
    compile: Literal["auto"] | bool = Field(
        "auto", description="torch.compile the training forward: auto = for modules at least 256 wide when the "
        "stage runs at least 100 optimizer steps (compiling takes minutes); true/false force it on/off")
    token_cache: bool = Field(True, description="predictor stage: encode each window with the frozen tokenizer "
                              "once and reuse its ids (identical targets)")
    token_cache_mb: int = Field(2048, ge=0, description="largest token cache per split; beyond it, encode per batch")
    num_workers: int = Field(0, ge=0)

    # output and monitoring
    output_dir: str = "runs/finetune"
    resume: bool = True
    log_interval: int = Field(10, ge=1)
    checkpoint_every_steps: int | None = Field(None, ge=1, description="also save last/ every N optimizer steps")
    tensorboard: bool = False
    progress: Literal["auto"] | bool = Field("auto", description="progress bar: auto (on a terminal), true, false")

    @field_validator("data_path", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("train_end", "val_end", mode="before")
    @classmethod
    def _a_time(cls, value: Any) -> Any:
        if isinstance(value, date):  # YAML reads 2025-01-01 as a date
            value = value.isoformat()
        if value is None:
            return None
        try:
            return str(np.datetime64(str(value).rstrip("Z").replace(" ", "T"), "ms"))
        except ValueError:
            raise ValueError(f"{value!r} is not a UTC date/time like 2025-01-01 or 2025-01-01T12:00") from None

    @property
    def split_ends(self) -> tuple[np.datetime64, np.datetime64] | None:
        if self.train_end is None:
            return None
        return np.datetime64(self.train_end, "ms"), np.datetime64(self.val_end, "ms")

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        if (self.train_end is None) != (self.val_end is None):
            raise ValueError("train_end and val_end go together (or leave both out to split by the ratios)")
        if self.train_end is not None and self.train_end >= self.val_end:
            raise ValueError(f"train_end ({self.train_end}) must be before val_end ({self.val_end})")
        if self.train_ratio + self.val_ratio > 1:
            raise ValueError("train_ratio + val_ratio must be <= 1")
        if self.embargo is not None and self.embargo < self.predict_window:
            raise ValueError(f"embargo ({self.embargo}) must be at least predict_window ({self.predict_window})")
        if self.skip_tokenizer and self.skip_predictor:
            raise ValueError("skip_tokenizer and skip_predictor together leave nothing to train")
        if self.skip_tokenizer and self.tokenizer_id == SCRATCH:
            raise ValueError("skip_tokenizer keeps the base tokenizer, so tokenizer_id cannot be 'scratch'")
        return self

    @property
    def embargo_candles(self) -> int:
        return self.predict_window if self.embargo is None else self.embargo

    def stage_epochs(self, stage: str) -> int:
        specific = self.tokenizer_epochs if stage == "tokenizer" else self.predictor_epochs
        return specific or self.epochs


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> FinetuneConfig:
    """Read YAML (relative data paths resolve against the file's directory), apply overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read fine-tuning config {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of keys to values")
        values.update(loaded)
    for item in overrides:
        key, value = parse_override(item)
        values[key] = value
    try:
        config = FinetuneConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid fine-tuning config: {problems}") from None
    return config
