"""Checkpoint directories written atomically: `<dir>/tokenizer`, `<dir>/model` (hub layout, loadable by
kronosd and by the original Kronos code), optional `trainer_state.pt` (optimizer, scheduler, position, RNG)
and `manifest.json` (provenance, metrics and the sha256 of every file).

A directory is first written under a temporary name, fsynced, then renamed into place; the previous version
is removed only after the new one is in place, and a crash between the two renames is recovered on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from kronos_model.hub import CheckpointError
from kronos_model.model import Kronos, KronosTokenizer

MANIFEST = "manifest.json"
STATE = "trainer_state.pt"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def code_version() -> dict[str, str | None]:
    try:
        version = metadata.version("kronosd")
    except metadata.PackageNotFoundError:
        version = None
    commit = None
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"kronosd": version, "git_commit": commit, "torch": torch.__version__}


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk (storage.durable is the store's twin: the two
    packages never import each other)."""
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    """Every file and directory under `root`, deepest first, then `root` itself."""
    for path in sorted(Path(root).rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(root)


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover(target: Path) -> None:
    """Finish an interrupted swap: if only the previous version exists, put it back."""
    old = _old(target)
    if old.exists() and not target.exists():
        os.rename(old, target)
    elif old.exists():
        shutil.rmtree(old)


def write_checkpoint(target: Path, tokenizer: KronosTokenizer, model: Kronos, manifest: dict[str, Any],
                     state: dict[str, Any] | None = None) -> Path:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if temporary.exists():
        shutil.rmtree(temporary)
    tokenizer.save_pretrained(temporary / "tokenizer")
    model.save_pretrained(temporary / "model")
    if state is not None:
        torch.save(state, temporary / STATE)
    files = {str(p.relative_to(temporary)): sha256_file(p) for p in sorted(temporary.rglob("*")) if p.is_file()}
    (temporary / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2, default=str))
    fsync_tree(temporary)
    if target.exists():
        os.rename(target, _old(target))
    os.rename(temporary, target)
    fsync_path(target.parent)
    if _old(target).exists():
        shutil.rmtree(_old(target))
    return target


def read_manifest(directory: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a checkpoint directory; with `verify`, every listed file must match its sha256."""
    directory = Path(directory)
    recover(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory} has no readable {MANIFEST}: {exc}") from exc
    if verify:
        for name, expected in manifest.get("files", {}).items():
            path = directory / name
            if not path.is_file() or sha256_file(path) != expected:
                raise CheckpointError(f"{path} is missing or does not match the sha256 in {directory / MANIFEST}")
    return manifest


def load_pair(directory: Path, verify: bool = True) -> tuple[KronosTokenizer, Kronos]:
    """Load `<dir>/tokenizer` and `<dir>/model`, checking the manifest hashes when there is a manifest."""
    directory = Path(directory)
    recover(directory)
    if verify and (directory / MANIFEST).exists():
        read_manifest(directory, verify=True)
    return (KronosTokenizer.from_pretrained(directory / "tokenizer"), Kronos.from_pretrained(directory / "model"))


def load_state(directory: Path) -> dict[str, Any]:
    # Optimizer/scheduler state dicts and RNG states are plain tensors and containers: no unpickling of code.
    return torch.load(Path(directory) / STATE, map_location="cpu", weights_only=True)
