"""`kronosd config init|check`: start from the documented defaults that ship with the package, and check a
config before a reload.

`init` writes the bundled, commented `config.yaml` (or a fine-tune config, or the systemd unit with this
installation's paths filled in), so an installed kronosd needs no source checkout.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# What `init` can write: kind -> (bundled file, default destination)
TEMPLATES = {
    "service": (ASSETS / "config.yaml", "config.yaml"),
    "finetune-demo": (ASSETS / "configs" / "finetune-demo.yaml", "finetune-demo.yaml"),
    "finetune-btc-1h": (ASSETS / "configs" / "finetune-btc-1h.yaml", "finetune-btc-1h.yaml"),
    "systemd": (ASSETS / "systemd" / "kronosd.service", "kronosd.service"),
}
# Paths in the bundled files that name this installation (the unit is written for /opt/kronosd).
UNIT_EXECUTABLE = "/opt/kronosd/bin/kronosd"
UNIT_DOCUMENTATION = "file:///opt/kronosd/share/kronosd/README.md"
BUNDLED_DATA_PREFIX = "daemon/assets/data/"


def render(kind: str) -> str:
    """The text `init` writes for `kind`, with paths pointing into this installation."""
    source, _ = TEMPLATES[kind]
    text = source.read_text()
    if kind == "systemd":
        executable = shutil.which("kronosd") or str(Path(sys.executable).parent / "kronosd")
        text = text.replace(UNIT_EXECUTABLE, executable)
        text = text.replace(UNIT_DOCUMENTATION, (ASSETS / "README.md").resolve().as_uri())
    elif kind.startswith("finetune"):
        # the bundled candles, wherever the package is installed
        text = text.replace(BUNDLED_DATA_PREFIX, f"{ASSETS / 'data'}/")
    return text


def run(args: argparse.Namespace) -> int:
    from daemon.config import load_config

    if args.action == "check":
        config = load_config(args.path or None)
        pairs = ", ".join(f"{symbol}/{interval}" for symbol, interval in config.markets.pairs)
        checked = args.path or ("config.yaml" if Path("config.yaml").exists() else "the defaults (no ./config.yaml)")
        print(f"{checked}: valid; pairs {pairs}; state directory {config.storage.state_dir}")
        return 0
    destination = Path(args.path or TEMPLATES[args.kind][1])
    if destination.exists() and not args.force:
        raise ValueError(f"{destination} exists; pass --force to overwrite it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(render(args.kind))
    print(f"wrote the default {args.kind} config to {destination}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config", help="write the documented default config (init) or validate one (check)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = actions.add_parser("init", help="write a bundled default file")
    init.add_argument("path", nargs="?", help="where to write (default: ./<the kind's file name>)")
    init.add_argument("--kind", choices=list(TEMPLATES), default="service",
                      help="which bundled file (default: the service's config.yaml)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    check = actions.add_parser("check", help="validate a config file as `kronosd run` would")
    check.add_argument("path", nargs="?", help="the file (default: ./config.yaml, else the defaults)")
    parser.set_defaults(handler=run)
