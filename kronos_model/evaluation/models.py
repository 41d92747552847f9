"""Loading the models to evaluate: a trainer checkpoint directory, a predictor directory or a hub id.

A trainer checkpoint (`tokenizer/` + `model/` + `manifest.json`) also tells which period it was trained and
validated on; the walk-forward keeps its origins out of that period.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kronos_model.checkpoint import MANIFEST, load_pair, read_manifest
from kronos_model.model import Kronos, KronosTokenizer

# The tokenizer each released predictor was trained with.
HUB_TOKENIZERS = {
    "NeoQuasar/Kronos-mini": "NeoQuasar/Kronos-Tokenizer-2k",
    "NeoQuasar/Kronos-small": "NeoQuasar/Kronos-Tokenizer-base",
    "NeoQuasar/Kronos-base": "NeoQuasar/Kronos-Tokenizer-base",
}
GENERIC_DIRECTORY_NAMES = {"best", "last", "model", "checkpoint"}


@dataclass
class ExcludedRange:
    start: np.datetime64
    end: np.datetime64
    reason: str
    symbols: tuple[str, ...] = ()  # what the checkpoint trained on (empty: unknown)

    def applies_to(self, symbol: str, same_symbol_only: bool) -> bool:
        """Every symbol by default (correlated markets share their moves); with `same_symbol_only`, the trained
        symbols, or every symbol when they are unknown."""
        return not same_symbol_only or not self.symbols or symbol in self.symbols

    def contains(self, times: np.ndarray) -> np.ndarray:
        return (times >= self.start) & (times <= self.end)

    def to_dict(self) -> dict[str, str]:
        return {"start": str(np.datetime64(self.start, "m")), "end": str(np.datetime64(self.end, "m")),
                "reason": self.reason, "symbols": list(self.symbols)}


@dataclass
class ModelSource:
    name: str
    location: str
    tokenizer: KronosTokenizer
    model: Kronos
    tokenizer_location: str
    manifest: dict[str, Any] | None = None
    excluded: list[ExcludedRange] = field(default_factory=list)

    @property
    def trained_lookback(self) -> int | None:
        return (self.manifest or {}).get("config", {}).get("lookback_window")

    @property
    def trained_horizon(self) -> int | None:
        return (self.manifest or {}).get("config", {}).get("predict_window")

    def describe(self) -> dict[str, Any]:
        return {"location": self.location, "tokenizer": self.tokenizer_location,
                "excluded_ranges": [r.to_dict() for r in self.excluded],
                "trained_symbols": (self.manifest or {}).get("data", {}).get("symbols")}


def default_name(location: str) -> str:
    """The directory name (with its parent for generic names like `best`), or the hub repo's name."""
    path = Path(location)
    if path.name in GENERIC_DIRECTORY_NAMES and path.parent.name:
        return f"{path.parent.name}-{path.name}"
    return path.name or location


def split_named(argument: str) -> tuple[str | None, str]:
    """`NAME=LOCATION` or just `LOCATION`."""
    if "=" in argument:
        name, location = argument.split("=", 1)
        if name and location:
            return name, location
    return None, argument


def training_ranges(manifest: dict[str, Any]) -> list[ExcludedRange]:
    """The training windows' time span and the validation period (which chose the best epoch)."""
    data = manifest.get("data", {})
    train = data.get("train_range") or []
    splits = data.get("splits") or {}
    if len(train) != 2:
        return []
    end = splits.get("val_end") or train[1]
    reason = "training and validation period" if "val_end" in splits else "training period"
    symbols = tuple(data.get("symbols") or ())
    return [ExcludedRange(np.datetime64(train[0], "ms"), np.datetime64(end, "ms"), reason, symbols)]


def load_model(argument: str, tokenizer: str | None = None, name: str | None = None,
               offline: bool = False) -> ModelSource:
    """Load `DIR` (trainer checkpoint or predictor dir), or a hub id; `NAME=...` sets the report name."""
    given_name, location = split_named(argument)
    name = name or given_name or default_name(location)
    path = Path(location)
    manifest = None
    if path.is_dir() and (path / "tokenizer").is_dir() and (path / "model").is_dir():
        if tokenizer:
            raise ValueError(f"{path} holds its own tokenizer/; drop --tokenizer or point --model at {path / 'model'}")
        tokenizer_model, model = load_pair(path)
        manifest = read_manifest(path, verify=False) if (path / MANIFEST).exists() else None
        tokenizer_location = str(path / "tokenizer")
    else:
        if path.is_dir() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is neither a checkpoint with tokenizer/ and model/ subdirectories nor a "
                                    "predictor directory with config.json")
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} is a file; --model takes a directory or a hub id")
        tokenizer_location = tokenizer or HUB_TOKENIZERS.get(location)
        if tokenizer_location is None:
            raise ValueError(f"which tokenizer goes with {location}? pass --tokenizer (a hub id such as "
                             "NeoQuasar/Kronos-Tokenizer-base or a directory) with --model, or put the pair in one "
                             "directory as tokenizer/ and model/")
        model = Kronos.from_pretrained(location, local_files_only=offline)
        tokenizer_model = KronosTokenizer.from_pretrained(tokenizer_location, local_files_only=offline)
    return ModelSource(name=name, location=location, tokenizer=tokenizer_model, model=model,
                       tokenizer_location=str(tokenizer_location), manifest=manifest,
                       excluded=training_ranges(manifest) if manifest else [])
