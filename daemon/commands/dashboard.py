"""`kronosd dashboard --state-dir DIR [--port N]`: the dashboard without a running daemon.

Serves the same page as `kronosd run` from a state directory: the published DuckDB snapshot (opened read-only
per request) and the model registry and fine-tune logs on disk. Use it after `kronosd demo` (its state
directory is demo-run/), or on a copy of a server's /var/lib/kronosd. When a daemon still publishes snapshots
into DIR, open pages reload when a new snapshot appears. Nothing in DIR is written.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

SNAPSHOT_POLL_S = 2.0


async def serve(state_dir: Path, database: str, host: str, port: int, token: str | None) -> None:
    from daemon.http.events import EventHub
    from daemon.http.server import HttpServer, build_app
    from daemon.http.source import SnapshotSource

    source = SnapshotSource(state_dir, database)
    hub = EventHub()
    server = HttpServer(build_app(source, hub, token=token), host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    task = asyncio.create_task(server.run())
    waiter = asyncio.create_task(server.listening.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()  # raises why it could not listen (port in use, ...)
    print(f"dashboard: {server.url} (from {source.snapshot}; Ctrl-C stops)", flush=True)
    seen = source.version()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=SNAPSHOT_POLL_S)
        except TimeoutError:
            version = source.version()
            if version != seen:  # a daemon published a new snapshot: pages reload their data
                seen = version
                hub.publish("refresh", {})
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def run(args: argparse.Namespace) -> int:
    from daemon.config import HttpConfig
    from daemon.logs import configure_service_logging

    configure_service_logging("warning", stream=sys.stderr)
    state_dir = Path(args.state_dir)
    if not (state_dir / args.database).exists():
        raise FileNotFoundError(f"no published snapshot {state_dir / args.database}; run `kronosd demo` (state in "
                                "demo-run/) or point --state-dir at a daemon's state directory")
    HttpConfig(host=args.host, port=args.port, token=args.token)  # the same loopback-or-token rule as the daemon
    asyncio.run(serve(state_dir, args.database, args.host, args.port, args.token))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dashboard", help="serve the dashboard from a state directory, without a daemon",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", required=True, help="a daemon's state directory (e.g. demo-run)")
    parser.add_argument("--database", default="kronos.duckdb", help="the snapshot's name in it")
    parser.add_argument("--host", default="127.0.0.1", help="anything but loopback needs --token")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (16+ characters)")
    parser.set_defaults(handler=run)
