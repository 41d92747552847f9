"""`kronosd` command line: a thin dispatcher; each sub-command lives in daemon/commands/."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from daemon import __version__

# Sub-command modules, in the order `kronosd --help` lists them.
COMMAND_MODULES = (
    "daemon.commands.backfill",
    "daemon.commands.import_candles",
    "daemon.commands.export",
    "daemon.commands.stats",
    "daemon.commands.simulate",
    "daemon.commands.forecast",
    "daemon.commands.finetune",
    "daemon.commands.evaluate",
    "daemon.commands.ledger",
    "daemon.commands.run",
    "daemon.commands.demo",
    "daemon.commands.dashboard",
    "daemon.commands.models",
    "daemon.commands.configure",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kronosd",
        description="Keep a gap-free Binance candle store, forecast every closed candle with Kronos, publish "
        "forecasts over MQTT and continually fine-tune the model.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`kronosd … | head`): stop quietly, as other Unix tools do. Point stdout at
        # /dev/null so the interpreter's final flush does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, FileNotFoundError) as exc:
        # Input and configuration problems: one clear line, no traceback.
        print(f"kronosd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The machine said no (permissions, a full disk, a directory where a file should be): one line too.
        print(f"kronosd {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
