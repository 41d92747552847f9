"""Versioned model directories with `current` and `previous` symlinks flipped atomically.

    <state>/models/v20261129T120000-1a2b3c4d/{tokenizer,model,manifest.json}
    <state>/models/current -> v...     <state>/models/previous -> v...

A version is copied in under a temporary name, fsynced and renamed, and never modified afterwards. A flip
writes a new symlink next to the old one and `os.replace`s it (atomic on POSIX; `ln -sfn` is not). Loading
resolves `current` once, so a concurrent flip cannot mix files of two versions, and verifies the manifest's
sha256 of every file. Tokenizer and predictor always travel together.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

from kronos_model import Kronos, KronosTokenizer
from kronos_model.checkpoint import fsync_path, fsync_tree, load_pair, write_checkpoint


def _copy_tree_synced(source: Path, target: Path) -> None:
    shutil.copytree(source, target)
    fsync_tree(target)


# The names `add` gives versions: v<UTC time>-<first 8 hex digits of the manifest's sha256>.
VERSION_PATTERN = re.compile(r"^v\d{8}T\d{6}-[0-9a-f]{8}$")


def check_version_name(version: str) -> str:
    """`version` if it has the registry's own form; never a path, so nothing outside the registry is reached."""
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise ValueError(f"{str(version)[:80]!r} is not a model version name (expected e.g. v20250101T120000-1a2b3c4d; "
                         "`kronosd models list` shows them)")
    return version


class ModelRegistry:
    def __init__(self, root: Path, keep_versions: int = 5):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_versions = keep_versions

    # -- reading ---------------------------------------------------------------------------------

    def resolve(self, alias: str = "current") -> str | None:
        link = self.root / alias
        if not link.is_symlink():
            return None
        target = os.readlink(link)
        try:
            return check_version_name(target)
        except ValueError:
            raise ValueError(f"{link} points at {target!r}, not at a version of this registry; "
                             "repair it with `kronosd models promote VERSION`") from None

    def path(self, version: str) -> Path:
        return self.root / check_version_name(version)

    def versions(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()
                      and VERSION_PATTERN.fullmatch(p.name))

    def load(self, version: str) -> tuple[KronosTokenizer, Kronos]:
        """The pair of `version`, with every file checked against its manifest hash."""
        path = self.path(version)
        if path.is_symlink() or not path.is_dir():
            raise FileNotFoundError(f"no model version {version} in {self.root}")
        return load_pair(path, verify=True)

    # -- writing ---------------------------------------------------------------------------------

    def add(self, checkpoint_dir: Path) -> str:
        """Copy a checkpoint directory (tokenizer/, model/, manifest.json) in as a new immutable version."""
        checkpoint_dir = Path(checkpoint_dir)
        digest = hashlib.sha256((checkpoint_dir / "manifest.json").read_bytes()).hexdigest()[:8]
        version = f"v{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{digest}"
        temporary = self.root / f".tmp-{version}"
        if temporary.exists():
            shutil.rmtree(temporary)
        _copy_tree_synced(checkpoint_dir, temporary)
        os.rename(temporary, self.root / version)
        fsync_path(self.root)
        return version

    def add_pair(self, tokenizer: KronosTokenizer, model: Kronos, manifest: dict) -> str:
        """Register an in-memory pair (e.g. the from-scratch starting model)."""
        staging = self.root / f".staging-{os.getpid()}"
        write_checkpoint(staging, tokenizer, model, manifest)
        try:
            return self.add(staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _point(self, alias: str, version: str) -> None:
        temporary = self.root / f".{alias}.tmp"
        if temporary.is_symlink() or temporary.exists():
            temporary.unlink()
        os.symlink(version, temporary)
        os.replace(temporary, self.root / alias)
        fsync_path(self.root)

    def promote(self, version: str) -> None:
        """current -> version, previous -> what current was."""
        path = self.path(version)
        if path.is_symlink() or not path.is_dir():
            raise FileNotFoundError(f"no model version {version} in {self.root}")
        old = self.resolve("current")
        if old and old != version:
            self._point("previous", old)
        self._point("current", version)
        self.collect_garbage()

    def rollback(self) -> str:
        """Swap current and previous; returns the version now current."""
        previous, current = self.resolve("previous"), self.resolve("current")
        if previous is None:
            raise ValueError("no previous model version to roll back to")
        self._point("current", previous)
        if current:
            self._point("previous", current)
        return previous

    def collect_garbage(self) -> list[str]:
        protected = {self.resolve("current"), self.resolve("previous")}
        removable = [v for v in self.versions() if v not in protected]
        doomed = removable[: max(0, len(removable) - self.keep_versions)]
        for version in doomed:
            shutil.rmtree(self.path(version), ignore_errors=True)
        return doomed
