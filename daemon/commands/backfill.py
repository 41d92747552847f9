"""`kronosd backfill`: fetch every closed candle of a window into the store (archive + REST)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from tqdm import tqdm

from daemon.commands.market_common import add_common_options, add_pair_options, pairs_from_args, resolve
from daemon.market.archive import ArchiveClient
from daemon.market.backfill import SOURCES, backfill
from daemon.market.rest import BinanceRestClient, IpBannedError, RequestFailedError, RestSettings
from daemon.wiring import open_writer, rest_settings
from storage.intervals import parse_time
from storage.writer import StoreWriter

EXIT_BANNED = 3
# Pairs backfilled at the same time; more only queue behind the shared weight budget.
CONCURRENT_PAIRS = 4
EXIT_UNREACHABLE = 4


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "backfill",
        help="download closed candles into the store (resumes; a second run changes nothing)",
        description="Fill the store with every closed candle of a window: the archive for large holes, REST "
        "for the rest. Exchange outages are recorded as confirmed empty and not fetched again.",
    )
    add_pair_options(parser)
    window = parser.add_mutually_exclusive_group(required=True)
    window.add_argument("--days", type=float, help="the last N days")
    window.add_argument("--start", help="first candle, e.g. 2024-01-01 or 2024-01-01T12:00 (UTC)")
    parser.add_argument("--end", help="stop before this time (default: the last closed candle)")
    parser.add_argument("--source", choices=SOURCES, default="auto", help="auto: archive for large holes, then REST")
    parser.add_argument("--rest-url", help="override exchange.rest_url")
    parser.add_argument("--archive-url", help="override exchange.archive_url")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_common_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config, snapshot = resolve(args)
    pairs = pairs_from_args(args, config)
    exchange = config.exchange
    if args.days is not None and args.days <= 0:
        raise ValueError("--days must be positive")
    if args.end and args.days is not None:
        raise ValueError("--end goes with --start, not with --days")
    # --days counts back from the exchange's clock (read once connected), not from ours.
    start_ms = parse_time(args.start) if args.start else None
    end_ms = parse_time(args.end) if args.end else None
    if end_ms is not None and start_ms is not None and end_ms <= start_ms:
        raise ValueError("--end must be after --start")
    settings = rest_settings(config, snapshot, args.rest_url)
    archive_url = args.archive_url or exchange.archive_url
    try:
        with open_writer(config, snapshot) as writer:
            reports = asyncio.run(
                _run(writer, settings, archive_url, args, pairs, start_ms, end_ms, exchange.archive_min_candles)
            )
    except IpBannedError as exc:
        print(f"kronosd backfill: {exc}", file=sys.stderr)
        return EXIT_BANNED
    except RequestFailedError as exc:
        print(f"kronosd backfill: exchange unreachable: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        # One pair: its report, as always; several: a list of them.
        print(json.dumps(reports[0] if len(reports) == 1 else reports))
    else:
        for report in reports:
            print(report["summary"])
    return 0


async def _run(
    writer: StoreWriter,
    settings: RestSettings,
    archive_url: str,
    args: argparse.Namespace,
    pairs: list[tuple[str, str]],
    start_ms: int | None,
    end_ms: int | None,
    archive_min_candles: int,
) -> list[dict]:
    """Every pair at once, a few at a time: they share one REST client, so together they stay inside the
    weight budget, and the writer merges their pages into shared transactions."""
    async with BinanceRestClient(settings) as rest, ArchiveClient(archive_url) as archive:
        if start_ms is None:
            await rest.sync_time()
            start_ms = rest.server_now_ms() - int(args.days * 86_400_000)
        gate = asyncio.Semaphore(CONCURRENT_PAIRS)

        async def one(position: int, symbol: str, interval: str) -> dict:
            async with gate:
                bar = tqdm(total=0, unit="candle", desc=f"{symbol} {interval}", disable=None, file=sys.stderr,
                           position=position % CONCURRENT_PAIRS, leave=len(pairs) == 1)

                def planned(total: int) -> None:
                    bar.total = total
                    bar.refresh()

                try:
                    report = await backfill(writer, rest, symbol, interval, start_ms, end_ms,
                                            archive=archive if args.source != "rest" else None, source=args.source,
                                            on_rows=bar.update, on_plan=planned,
                                            archive_min_candles=archive_min_candles)
                finally:
                    bar.close()
                return {
                    "symbol": report.symbol,
                    "interval": report.interval,
                    "start": report.start_ms,
                    "end": report.end_ms,
                    "holes": len(report.holes),
                    "rows_received": report.rows_received,
                    "rows_changed": report.rows_changed,
                    "archive_files": report.archive_files,
                    "confirmed_empty": report.confirmed_empty,
                    "summary": report.summary(),
                }

        reports = await asyncio.gather(*(one(k, *pair) for k, pair in enumerate(pairs)))
        # The client's totals, shared by every pair of this run.
        for report in reports:
            report.update(requests=rest.stats.requests, rate_limited=rest.stats.rate_limited,
                          peak_weight_share=round(rest.stats.peak_share, 4))
        return list(reports)
