"""Options and helpers shared by the data commands (backfill, import, export, stats, simulate)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import duckdb

from daemon.config import KronosConfig, load_config
from daemon.logs import configure_service_logging
from storage.intervals import interval_ms
from storage.snapshot import open_read_only

BUNDLED_DATA_DIR = Path(__file__).resolve().parent.parent / "assets" / "data"


def configure_logging(verbose: bool = False) -> None:
    """The data commands log JSON lines on stderr (stdout is their output); warnings only unless --verbose."""
    configure_service_logging("info" if verbose else "warning", json_lines=True, stream=sys.stderr)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="config file (default: ./config.yaml when present)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--state-dir", type=Path, metavar="DIR",
                       help="the daemon's state directory, as in `kronosd run --state-dir` (default: "
                       "storage.state_dir); the database is DIR/<storage.database>")
    where.add_argument(
        "--db",
        type=Path,
        metavar="FILE",
        help="the published database file itself, wherever it lies; the writer's own file sits next to it as "
        "<name>.live.duckdb",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress events (JSON on stderr)")


def _listed(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_pair_options(parser: argparse.ArgumentParser) -> None:
    """--symbol/--interval (several: repeat them or separate with commas; every symbol × every interval), or
    --all-pairs for the configured markets."""
    parser.add_argument("--symbol", action="extend", type=lambda text: [s.upper() for s in _listed(text)],
                        metavar="SYMBOL[,SYMBOL…]", help="e.g. BTCUSDT or BTCUSDT,ETHUSDT")
    parser.add_argument("--interval", action="extend", type=_listed, metavar="INTERVAL[,INTERVAL…]",
                        help="Binance interval, e.g. 1m, 1h, 1d (several: 1h,4h)")
    parser.add_argument("--all-pairs", action="store_true",
                        help="every pair of the config's markets (symbols × intervals), as the daemon ingests them")


def pairs_from_args(args: argparse.Namespace, config: KronosConfig) -> list[tuple[str, str]]:
    """The (symbol, interval) pairs a data command works on, each interval checked."""
    if args.all_pairs:
        if args.symbol or args.interval:
            raise ValueError("--all-pairs takes the pairs from the config; drop --symbol/--interval")
        return list(config.markets.pairs)
    if not args.symbol or not args.interval:
        raise ValueError("name the pairs: --symbol S[,S…] --interval I[,I…], or --all-pairs")
    pairs = list(dict.fromkeys((symbol, interval) for symbol in args.symbol for interval in args.interval))
    for _, interval in pairs:
        interval_ms(interval)
    return pairs


def resolve(args: argparse.Namespace) -> tuple[KronosConfig, Path]:
    """(config, published database path) for the command line given."""
    configure_logging(getattr(args, "verbose", False))
    config = load_config(args.config)
    if getattr(args, "state_dir", None) is not None:
        config.storage.state_dir = args.state_dir
    snapshot = args.db if args.db is not None else config.storage.snapshot_path
    return config, snapshot


def open_snapshot(snapshot: Path) -> duckdb.DuckDBPyConnection:
    """Read-only connection to the published database, for export and stats."""
    if not snapshot.exists():
        raise FileNotFoundError(
            f"no published database at {snapshot}; run `kronosd backfill` or `kronosd import` first, or pass "
            "--state-dir or --db"
        )
    return open_read_only(snapshot)
