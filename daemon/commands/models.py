"""`kronosd models list|promote VERSION|rollback`: the model registry in the state directory.

A running daemon picks up a changed `current` on its next reload: `systemctl reload kronosd` (SIGHUP).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from daemon.config import load_config
    from daemon.registry import ModelRegistry
    from kronos_model.checkpoint import read_manifest

    state_dir = Path(args.state_dir) if args.state_dir else Path(load_config(args.config).storage.state_dir)
    root = state_dir / "models"
    if not root.is_dir():
        raise FileNotFoundError(f"no model registry at {root}; has the daemon run with this state directory?")
    registry = ModelRegistry(root)
    if args.action == "promote":
        if not args.version:
            raise ValueError("models promote needs a VERSION (see `kronosd models list`)")
        registry.load(args.version)  # refuse a version whose files do not match its manifest
        registry.promote(args.version)
        print(f"current -> {args.version}; send SIGHUP (systemctl reload kronosd) to a running daemon")
    elif args.action == "rollback":
        version = registry.rollback()
        print(f"current -> {version}; send SIGHUP (systemctl reload kronosd) to a running daemon")
    rows = []
    current, previous = registry.resolve("current"), registry.resolve("previous")
    for version in registry.versions():
        manifest = read_manifest(registry.path(version), verify=False)
        tag = "current" if version == current else "previous" if version == previous else ""
        rows.append({"version": version, "alias": tag, "origin": manifest.get("origin", "fine-tune"),
                     "data": manifest.get("data", {}).get("last"), "metrics": manifest.get("metrics", {})})
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    elif args.action == "list":
        for row in rows:
            print(f"{row['version']:30} {row['alias']:9} {row['origin']:10} data until {row['data']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list model versions, promote one, or roll back to previous",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["list", "promote", "rollback"])
    parser.add_argument("version", nargs="?", help="for promote: the version directory name")
    parser.add_argument("--config", help="config.yaml (for storage.state_dir)")
    parser.add_argument("--state-dir", help="the daemon's state directory")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run)
