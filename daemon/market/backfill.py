"""Backfill: make the store hold every closed candle of a window, exactly once.

1. Validate symbol and interval (exchangeInfo) and measure the server clock.
2. The window ends at the last candle that is closed by *server* time.
3. Holes = ranges with no stored candle (by distance between neighbours), plus ranges recorded as
   `open` gaps (e.g. lost in a damaged WAL), minus ranges already `confirmed_empty`.
4. Large holes go to the archive first (when enabled); REST pages fill whatever is left.
5. What is still empty afterwards, and older than a settling margin, is an exchange outage: it is
   recorded `confirmed_empty` so it is not fetched forever. Recent empties are left unrecorded in
   case the exchange has not published them yet.

Because holes are computed from the store, a second run over the same window sends no klines
request at all and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from daemon.market.exchange import CandleArchive, ExchangeRest
from storage.intervals import floor_to_grid, format_ms, interval_ms
from storage.store import CandleStore
from storage.writer import StoreWriter

log = structlog.get_logger("daemon.market.backfill")

SOURCES = ("auto", "rest", "archive")
# In `auto` mode a hole of at least this many candles is worth the archive round trips.
ARCHIVE_MIN_CANDLES = 5_000


@dataclass
class BackfillReport:
    symbol: str
    interval: str
    start_ms: int
    end_ms: int
    holes: list[tuple[int, int]] = field(default_factory=list)
    rows_received: int = 0
    rows_changed: int = 0
    archive_files: int = 0
    confirmed_empty: list[tuple[int, int]] = field(default_factory=list)

    def summary(self) -> str:
        empties = ", ".join(f"{format_ms(a)}..{format_ms(b)}" for a, b in self.confirmed_empty[:10])
        more = f" (+{len(self.confirmed_empty) - 10} more)" if len(self.confirmed_empty) > 10 else ""
        return (
            f"{self.symbol} {self.interval} {format_ms(self.start_ms)} .. {format_ms(self.end_ms)}: "
            f"{len(self.holes)} holes, {self.rows_received} candles received, {self.rows_changed} stored or changed"
            + (f", {self.archive_files} archive files" if self.archive_files else "")
            + (f"; exchange has no data (confirmed empty): {empties}{more}" if self.confirmed_empty else "")
        )


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _targets(store: CandleStore, symbol: str, interval: str, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
    holes = store.find_holes(symbol, interval, start_ms, end_ms)
    reopened = [
        (max(a, start_ms), min(b, end_ms))
        for a, b, _, _ in store.gap_records(symbol, interval, "open")
        if a < end_ms and b > start_ms
    ]
    return merge_ranges(holes + reopened)


async def backfill(
    writer: StoreWriter,
    rest: ExchangeRest,
    symbol: str,
    interval: str,
    start_ms: int,
    end_ms: int | None = None,
    *,
    archive: CandleArchive | None = None,
    source: str = "auto",
    settle_ms: int | None = None,
    archive_min_candles: int = ARCHIVE_MIN_CANDLES,
    on_rows: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> BackfillReport:
    """Fill [start, end) (end defaults to now) with closed candles; returns what was done."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    if source == "archive" and archive is None:
        raise ValueError("--source archive needs an archive URL")
    symbol = symbol.upper()
    step = interval_ms(interval)
    await rest.sync_time()
    await rest.validate(symbol, interval)
    server_now = rest.server_now_ms()
    # A candle is closed once open + step <= now, so the window ends at the open of the current one.
    closed_end = floor_to_grid(server_now, interval)
    end = closed_end if end_ms is None else min(end_ms, closed_end)
    report = BackfillReport(symbol, interval, start_ms, end)
    if end <= start_ms:
        return report
    report.holes = await writer.run(lambda store: _targets(store, symbol, interval, start_ms, end))
    if on_plan:
        on_plan(sum((b - a) // step for a, b in report.holes))

    for hole_start, hole_end in report.holes:
        use_archive = archive is not None and (
            source == "archive" or (source == "auto" and (hole_end - hole_start) // step >= archive_min_candles)
        )
        if use_archive:
            assert archive is not None
            result = await archive.import_range(writer, symbol, interval, hole_start, hole_end, server_now, on_rows)
            report.archive_files += result.files_imported
            report.rows_received += result.rows
            report.rows_changed += result.rows_changed
        # Twice: what is still empty after one pass is asked again before it counts as an exchange outage,
        # because a misbehaving front end can answer an empty array (or only garbage) for a range that has data.
        for _ in range(2):
            remaining = await writer.run(
                lambda store, a=hole_start, b=hole_end: store.find_holes(symbol, interval, a, b))
            for rest_start, rest_end in remaining:
                async for page in rest.iter_klines(symbol, interval, rest_start, rest_end):
                    result = await writer.upsert(page)
                    report.rows_received += page.height
                    report.rows_changed += result.rows_changed
                    if on_rows:
                        on_rows(page.height)

    settle = settle_ms if settle_ms is not None else max(2 * step, 10 * 60_000)
    settled = await writer.run(
        lambda store: _settled_holes(store, symbol, interval, report.holes, server_now - settle))
    empty = [hole for hole in settled
             if await _exchange_shows_empty(rest, writer, symbol, interval, hole, end, report)]
    report.confirmed_empty = await writer.run(
        lambda store: _record_outcome(store, symbol, interval, report.holes, empty))
    if report.confirmed_empty:
        log.info(
            "confirmed_empty_ranges",
            symbol=symbol,
            interval=interval,
            ranges=[f"{format_ms(a)}..{format_ms(b)}" for a, b in report.confirmed_empty],
        )
    return report


def _settled_holes(store: CandleStore, symbol: str, interval: str, holes: list[tuple[int, int]],
                   settled_before_ms: int) -> list[tuple[int, int]]:
    """What is still empty inside `holes` and old enough that the exchange must have it by now."""
    still_empty = []
    for hole_start, hole_end in holes:
        for a, b in store.find_holes(symbol, interval, hole_start, hole_end):
            b = min(b, settled_before_ms)
            if b > a:
                still_empty.append((a, b))
    return still_empty


async def _exchange_shows_empty(rest: ExchangeRest, writer: StoreWriter, symbol: str, interval: str,
                                hole: tuple[int, int], end: int, report: BackfillReport) -> bool:
    """Whether the exchange itself shows `hole` as empty: asked for the hole and the candle after it, it answers
    that next candle and nothing inside the hole. An answer with nothing at all proves nothing (a front end
    that answers an empty array for a range with data looks the same), so such a hole stays open and is asked
    again by the next backfill instead of being written off as an outage."""
    a, b = hole
    probe_end = min(b + interval_ms(interval), end)
    if probe_end <= b:
        return False  # nothing after the hole exists yet to show the exchange has data past it
    seen_after = False
    async for page in rest.iter_klines(symbol, interval, a, probe_end):
        inside = page.filter(page["open_time"] < b)
        if inside.height:
            result = await writer.upsert(inside)  # the hole was not empty after all
            report.rows_received += inside.height
            report.rows_changed += result.rows_changed
            return False
        seen_after = seen_after or bool((page["open_time"] >= b).any())
    return seen_after


def _record_outcome(store: CandleStore, symbol: str, interval: str, holes: list[tuple[int, int]],
                    empty: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Mark the ranges the exchange showed empty as confirmed_empty; mark reopened gaps filled."""
    for a, b in empty:
        store.record_gap(symbol, interval, a, b, "confirmed_empty", "no candles on the exchange")
    for a, b, _, reason in store.gap_records(symbol, interval, "open"):
        if not store.find_holes(symbol, interval, a, b):
            store.record_gap(symbol, interval, a, b, "filled", reason)
    return empty
