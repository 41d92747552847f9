"""Options and helpers shared by the data commands (backfill, import, export, stats, simulate)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import duckdb
import structlog

from daemon.config import KronosConfig, live_path_for, load_config
from daemon.market.rest import RestSettings
from daemon.market.websocket import StreamSettings
from storage.writer import StoreWriter

BUNDLED_DATA_DIR = Path(__file__).resolve().parent.parent / "assets" / "data"


def configure_logging(verbose: bool = False) -> None:
    """JSON log lines on stderr; warnings and errors only unless --verbose."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO if verbose else logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


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


def add_pair_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--symbol", required=required, type=str.upper, help="e.g. BTCUSDT")
    parser.add_argument("--interval", required=required, help="Binance interval, e.g. 1m, 1h, 1d")


def resolve(args: argparse.Namespace) -> tuple[KronosConfig, Path, Path]:
    """(config, published snapshot path, live store path) for the command line given."""
    configure_logging(getattr(args, "verbose", False))
    config = load_config(args.config)
    if getattr(args, "state_dir", None) is not None:
        config.storage.state_dir = args.state_dir
    snapshot = args.db if args.db is not None else config.storage.snapshot_path
    return config, snapshot, live_path_for(snapshot)


def open_writer(config: KronosConfig, snapshot: Path, live: Path) -> StoreWriter:
    """The store's writer; it publishes the snapshot when it closes (and during long jobs)."""
    return StoreWriter(
        live,
        snapshot_path=snapshot,
        snapshot_interval_s=config.storage.snapshot_interval_s,
        memory_limit=config.storage.memory_limit,
        threads=config.storage.threads,
        snapshot_storage_version=config.storage.snapshot_storage_version,
    )


def open_snapshot(snapshot: Path) -> duckdb.DuckDBPyConnection:
    """Read-only connection to the published database, for export and stats."""
    if not snapshot.exists():
        raise FileNotFoundError(
            f"no published database at {snapshot}; run `kronosd backfill` or `kronosd import` first, or pass "
            "--state-dir or --db"
        )
    con = duckdb.connect(str(snapshot), read_only=True)
    con.execute("SET TimeZone = 'UTC'")
    return con


def rest_settings(config: KronosConfig, snapshot: Path, rest_url: str | None = None) -> RestSettings:
    """REST client settings from `exchange.*`; a 418 ban is remembered next to the database."""
    exchange = config.exchange
    return RestSettings(
        base_url=rest_url or exchange.rest_url,
        weight_share=exchange.weight_share,
        timeout_s=exchange.request_timeout_s,
        max_retries=exchange.max_retries,
        backoff_base_s=exchange.backoff_base_s,
        backoff_max_s=exchange.backoff_max_s,
        ban_file=snapshot.parent / "binance-ban.json",
    )


def stream_settings(config: KronosConfig, ws_url: str | None = None) -> StreamSettings:
    exchange = config.exchange
    return StreamSettings(
        base_url=ws_url or exchange.ws_url,
        watchdog_s=exchange.watchdog_s,
        max_connection_age_s=exchange.max_connection_age_s,
        backoff_max_s=exchange.backoff_max_s,
    )
