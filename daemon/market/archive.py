"""Importer for Binance's public archive (data.binance.vision layout).

`data/spot/monthly/klines/<SYMBOL>/<interval>/<SYMBOL>-<interval>-<YYYY-MM>.zip` for months long
enough ago to be published (first Monday of the next month), then `daily/…-<YYYY-MM-DD>.zip` for
days at least two days old (the lag freqtrade also assumes). Each zip is checked against its
`.zip.CHECKSUM` (sha256) before it is read. Spot files hold microsecond times from 2025 on; the file
reader converts them. Missing files (not published, symbol not listed yet) are simply skipped: the
backfill recomputes holes afterwards and fetches what is still missing through REST.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import aiohttp
import polars as pl
import structlog

from daemon.market.kline_files import BadKlineFile, read_archive_zip
from daemon.market.rejects import Rejection, RejectLog
from storage.writer import StoreWriter

log = structlog.get_logger("daemon.market.archive")

_DAY_MS = 86_400_000
MONTHLY_PUBLICATION_LAG_MS = 7 * _DAY_MS
DAILY_PUBLICATION_LAG_MS = 2 * _DAY_MS


class ArchiveChecksumError(RuntimeError):
    pass


@dataclass(frozen=True)
class ArchiveFile:
    period: str  # "monthly" or "daily"
    name: str  # BTCUSDT-1h-2024-01.zip
    begin_ms: int
    end_ms: int

    def path(self, symbol: str, interval: str) -> str:
        return f"/data/spot/{self.period}/klines/{symbol}/{interval}/{self.name}"


@dataclass
class ArchiveReport:
    files_imported: int = 0
    files_missing: int = 0
    files_failed: list[str] = field(default_factory=list)
    rows: int = 0
    rows_changed: int = 0
    requests: int = 0


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def plan_archive_files(symbol: str, interval: str, start_ms: int, end_ms: int, server_now_ms: int) -> list[ArchiveFile]:
    """The zips that cover [start, end): monthly where published, daily for the recent rest."""
    files: list[ArchiveFile] = []
    month = datetime.fromtimestamp(start_ms / 1000, tz=UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    while _ms(month) < end_ms:
        next_month = (month + timedelta(days=32)).replace(day=1)
        if _ms(next_month) + MONTHLY_PUBLICATION_LAG_MS <= server_now_ms:
            files.append(ArchiveFile("monthly", f"{symbol}-{interval}-{month:%Y-%m}.zip", _ms(month), _ms(next_month)))
        else:
            day = month
            while day < next_month and _ms(day) < end_ms:
                day_end = day + timedelta(days=1)
                if _ms(day_end) > start_ms and _ms(day_end) + DAILY_PUBLICATION_LAG_MS <= server_now_ms:
                    files.append(
                        ArchiveFile("daily", f"{symbol}-{interval}-{day:%Y-%m-%d}.zip", _ms(day), _ms(day_end))
                    )
                day = day_end
        month = next_month
    return files


class ArchiveClient:
    """Use as `async with ArchiveClient(url) as archive:`."""

    def __init__(
        self,
        base_url: str = "https://data.binance.vision",
        *,
        concurrency: int = 4,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_base_s: float = 0.5,
        rejects: RejectLog | None = None,
    ) -> None:
        self.rejects = rejects or RejectLog()
        self.base_url = base_url.rstrip("/")
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.max_retries, self.backoff_base_s = max_retries, backoff_base_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ArchiveClient:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _get(self, url: str, report: ArchiveReport) -> bytes | None:
        """Body of url, None on 404; retries transient failures, then raises."""
        assert self._session is not None
        for attempt in range(self.max_retries + 1):
            report.requests += 1
            try:
                async with self._session.get(url) as response:
                    if response.status == 404:
                        return None
                    if response.status == 200:
                        return await response.read()
                    reason = f"HTTP {response.status}"
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if attempt < self.max_retries:
                await asyncio.sleep(random.uniform(0.5, 1.0) * self.backoff_base_s * 2**attempt)
        raise RuntimeError(f"{url}: {reason} after {self.max_retries + 1} attempts")

    async def fetch_verified(
        self, file: ArchiveFile, symbol: str, interval: str, report: ArchiveReport
    ) -> bytes | None:
        url = f"{self.base_url}{file.path(symbol, interval)}"
        for _ in range(2):  # one re-download on a checksum mismatch (a torn transfer)
            checksum = await self._get(f"{url}.CHECKSUM", report)
            data = await self._get(url, report) if checksum is not None else None
            if checksum is None or data is None:
                return None
            words = checksum.decode("ascii", errors="replace").split()
            expected = words[0].lower() if words else ""
            if hashlib.sha256(data).hexdigest() == expected:
                return data
            self.rejects.reject("archive", Rejection(
                "checksum_mismatch" if len(expected) == 64 else "bad_checksum_file",
                f"{url}: sha256 {hashlib.sha256(data).hexdigest()[:16]}… vs CHECKSUM {checksum[:80]!r}"))
        raise ArchiveChecksumError(f"{url}: sha256 does not match its .CHECKSUM after a re-download")

    async def import_range(
        self,
        writer: StoreWriter,
        symbol: str,
        interval: str,
        start_ms: int,
        end_ms: int,
        server_now_ms: int,
        on_rows: Callable[[int], None] | None = None,
    ) -> ArchiveReport:
        """Download, verify and store every published archive file overlapping [start, end)."""
        report = ArchiveReport()
        files = plan_archive_files(symbol, interval, start_ms, end_ms, server_now_ms)
        gate = asyncio.Semaphore(self.concurrency)

        async def one(file: ArchiveFile) -> None:
            async with gate:
                try:
                    data = await self.fetch_verified(file, symbol, interval, report)
                    if data is None:
                        report.files_missing += 1
                        return
                    frame, _ = read_archive_zip(data, file.name, symbol, interval)
                except (ArchiveChecksumError, BadKlineFile, RuntimeError) as exc:
                    # REST fills whatever this file would have covered.
                    if isinstance(exc, BadKlineFile):
                        self.rejects.reject("archive", Rejection("bad_file", str(exc)))
                    report.files_failed.append(f"{file.name}: {exc}")
                    log.warning("archive_file_skipped", file=file.name, error=str(exc))
                    return
            frame = frame.filter((pl.col("open_time") >= start_ms) & (pl.col("open_time") < end_ms))
            result = await writer.upsert(frame)
            report.rows_changed += result.rows_changed
            report.files_imported += 1
            report.rows += frame.height
            if on_rows:
                on_rows(frame.height)

        await asyncio.gather(*(one(file) for file in files))
        return report
