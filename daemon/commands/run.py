"""`kronosd run --config config.yaml`: the service (what systemd starts)."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

# Exit codes systemd can tell apart (RestartPreventExitStatus=2 in the unit: a bad config will not heal).
EXIT_CONFIG = 2


def run(args: argparse.Namespace) -> int:
    import structlog

    from daemon.config import load_config
    from daemon.logs import configure_service_logging
    from daemon.market.rest import IpBannedError, RequestFailedError
    from daemon.service import Daemon

    configure_service_logging(args.log_level, json_lines=True if args.json_logs else None)
    config = load_config(args.config)
    if args.state_dir:
        config.storage.state_dir = Path(args.state_dir)
    elif os.environ.get("STATE_DIRECTORY") and args.config is None:
        config.storage.state_dir = Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    daemon = Daemon(config, Path(args.config) if args.config else None)
    try:
        asyncio.run(daemon.run())
    except (IpBannedError, RequestFailedError) as exc:
        # not a configuration error: systemd restarts the service after RestartSec
        structlog.get_logger("daemon").error("exchange_unavailable", error=str(exc))
        return 1
    return daemon.exit_code


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="run the service: ingest, forecast every closed candle, publish, fine-tune, hot-swap",
        description="Run kronosd as a service (systemd: Type=notify). SIGHUP reloads the config, SIGTERM stops.",
    )
    parser.add_argument("--config", help="config.yaml (default: ./config.yaml when present)")
    parser.add_argument("--state-dir", help="override storage.state_dir")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--json-logs", action="store_true", help="JSON log lines even on a terminal")
    parser.set_defaults(handler=run)
