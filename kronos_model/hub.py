"""Hub layout I/O: `config.json` + `model.safetensors` + a model card, exactly as the released checkpoints.

Loading never unpickles (safetensors only), is strict about parameters (a missing or mis-shaped weight is an
error, not silently random as with the original's `strict=False`), tolerates files without the deterministic
buffers, and always returns the model in eval mode. Hub downloads go through huggingface_hub, so its cache,
revisions, tokens and offline mode behave as users know them.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"

# How long to wait for a TCP connection to the hub before calling it unreachable: huggingface_hub itself
# retries a failed name lookup with backoff for ~28 s before giving up.
HUB_PROBE_TIMEOUT_S = 3.0

# Buffers fully determined by the config; older or foreign files may lack them.
DERIVED_BUFFER_SUFFIXES = ("rotary.inv_freq", "bsq.basis", "bsq.group_basis")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read, or does not fit the architecture."""


def _card(class_name: str, config: dict[str, Any]) -> str:
    lines = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(config.items()))
    return f"""---
tags:
- model_hub_mixin
- pytorch_model_hub_mixin
- kronos
- time-series-forecasting
---

# {class_name} checkpoint

Written by kronosd's `kronos_model` in the layout of the released NeoQuasar/Kronos checkpoints: this
directory loads with `{class_name}.from_pretrained(path)` in kronosd and in the original Kronos code.

| config key | value |
| --- | --- |
{lines}
"""


def _fetch(repo_or_dir: str | os.PathLike, filename: str, revision, cache_dir, local_files_only) -> Path:
    """Path of `filename` from a local directory or a hub repo (downloaded or from the cache)."""
    local = Path(repo_or_dir)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise CheckpointError(f"{local} is not a Kronos checkpoint directory: {filename} is missing")
        return path
    repo_id = str(repo_or_dir)
    if local.suffix or repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise CheckpointError(
            f"{repo_id!r} is neither an existing directory nor a hub id like 'NeoQuasar/Kronos-small'"
        )
    # Unreachable hub: answer from the cache at once instead of after huggingface_hub's retries.
    offline = local_files_only or not _hub_reachable()
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=offline))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise CheckpointError(
            f"{repo_id} (revision {revision or 'main'}) is not in the local Hugging Face cache and the hub "
            f"cannot be reached (offline: {exc.__class__.__name__}). Get the weights on a machine with "
            f"internet access, e.g. `hf download {repo_id} --local-dir ./{repo_id.split('/')[-1]}`, copy that "
            "directory here and pass its path instead of the hub id (or copy the whole HF cache and set "
            "HF_HOME)."
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise CheckpointError(f"cannot get {filename} of {repo_id} at revision {revision or 'main'}: {exc}") from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"downloading {filename} of {repo_id} failed: {exc}") from exc


def _hub_reachable() -> bool:
    """Whether a TCP connection to the hub endpoint opens within HUB_PROBE_TIMEOUT_S.

    Behind a proxy the endpoint is not reached directly, so the probe is skipped and huggingface_hub decides.
    """
    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "", port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def _read_config(path: Path, cls: type) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    expected = cls.config_keys
    missing = [k for k in expected if k not in config]
    if missing:
        raise CheckpointError(f"{path} is not a {cls.__name__} config: missing keys {missing}")
    unknown = sorted(set(config) - set(expected))
    if unknown:
        warnings.warn(f"{path}: ignoring keys {unknown} that {cls.__name__} does not use", stacklevel=3)
    return {k: config[k] for k in expected}


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Strictly load a safetensors file; deterministic buffers may be absent."""
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc
    own = model.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    missing = sorted(k for k in set(own) - set(tensors) if not k.endswith(DERIVED_BUFFER_SUFFIXES))
    wrong_shape = sorted(
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(tensors) & set(own) if tensors[k].shape != own[k].shape
    )
    if unexpected or missing or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if wrong_shape:
            problems.append(f"shape mismatches {wrong_shape[:3]}")
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__} with this config.json: " + "; ".join(problems)
        )
    model.load_state_dict(tensors, strict=False)


class HubMixin:
    """from_pretrained / save_pretrained for a module whose constructor takes exactly `config_keys`."""

    config_keys: tuple[str, ...] = ()
    config: dict[str, Any]

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: str | os.PathLike,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        map_location: str | torch.device = "cpu",
    ) -> Self:
        """Load a checkpoint from a local directory or a Hugging Face hub id; the result is in eval mode."""
        config_path = _fetch(repo_id_or_dir, CONFIG_NAME, revision, cache_dir, local_files_only)
        try:
            model = cls(**_read_config(config_path, cls))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{config_path}: {exc}") from exc
        load_weights(model, _fetch(repo_id_or_dir, WEIGHTS_NAME, revision, cache_dir, local_files_only))
        return model.to(map_location).eval()

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write config.json (sorted keys), model.safetensors and a model card into `save_directory`."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config, sort_keys=True, indent=2))
        # Contiguous CPU copies; our modules share no tensors, so every key is written.
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        card = directory / CARD_NAME
        if not card.exists():
            card.write_text(_card(type(self).__name__, self.config))
        return directory
