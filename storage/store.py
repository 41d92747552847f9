"""The live candle store: one read-write DuckDB connection, idempotent upserts, gap bookkeeping and
crash recovery.

Only the writer thread (storage/writer.py) holds a CandleStore while the daemon runs; users read the
published snapshot instead (storage/snapshot.py), because DuckDB lets no other process open a file
that one process holds read-write.

Crash recovery: DuckDB replays its write-ahead log on open. A WAL that fails to replay is moved aside
and the store opens from its last checkpoint. A WAL truncated by a full disk replays *silently* up to
the cut, so the store also keeps a journal (`<db>.journal`, one fsynced line per committed batch,
written after the commit) and compares it with the `ingest_batches` table on open: batches the
journal knows but the database lost are logged at error level and their windows recorded as `open`
gaps, which the next backfill fetches again from the exchange.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import polars as pl
import structlog

from storage.candles import PROVISIONAL_SOURCES, dedupe_batch
from storage.durable import append_line_synced, fsync_path
from storage.intervals import ceil_to_grid, format_ms, interval_ms
from storage.schema import CANDLE_VALUE_COLUMNS, migrate

log = structlog.get_logger("storage.store")

_CHANGED_ANY = " OR ".join(
    f"candles.{name} IS DISTINCT FROM excluded.{name}"
    for name in ("close_time", *CANDLE_VALUE_COLUMNS, "trades")
)

_PROVISIONAL = ", ".join(f"'{source}'" for source in sorted(PROVISIONAL_SOURCES))

# The upsert touches a stored candle only when a value changed, so repeating a backfill changes
# nothing (not even ingested_at), and a websocket copy never overwrites the exchange's REST record.
_UPSERT_SQL = f"""
INSERT INTO candles
SELECT symbol, interval, make_timestamptz(open_time * 1000), make_timestamptz(close_time * 1000),
       open, high, low, close, volume, quote_volume, taker_buy_base, taker_buy_quote, trades,
       source, now()
FROM staged_candles
ON CONFLICT (symbol, interval, open_time) DO UPDATE SET
    close_time = excluded.close_time, open = excluded.open, high = excluded.high, low = excluded.low,
    close = excluded.close, volume = excluded.volume, quote_volume = excluded.quote_volume,
    taker_buy_base = excluded.taker_buy_base, taker_buy_quote = excluded.taker_buy_quote,
    trades = excluded.trades, source = excluded.source, ingested_at = excluded.ingested_at
WHERE ({_CHANGED_ANY})
  AND NOT (excluded.source IN ({_PROVISIONAL}) AND candles.source NOT IN ({_PROVISIONAL}))
RETURNING symbol, interval
"""


class StoreLockedError(ValueError):
    """Another process holds the database file."""


@dataclass(frozen=True)
class UpsertResult:
    batch_id: int
    rows_in: int
    rows_changed: int
    # (symbol, interval) -> rows of that pair the transaction stored or changed
    changed_by_pair: dict[tuple[str, str], int] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class LostWindow:
    symbol: str
    interval: str
    start_ms: int
    end_ms: int  # inclusive open time of the last candle in the lost batch


@dataclass
class RecoveryReport:
    quarantined_wal: Path | None = None
    lost_batches: list[int] = field(default_factory=list)
    lost_windows: list[LostWindow] = field(default_factory=list)


class CandleStore:
    """The private read-write store. Not thread-safe: one thread owns it."""

    def __init__(self, path: str | Path, *, memory_limit: str = "1GB", threads: int = 2) -> None:
        self.path = Path(path)
        self.wal_path = Path(f"{self.path}.wal")
        self.journal_path = Path(f"{self.path}.journal")
        self.memory_limit = memory_limit
        self.threads = threads
        self.recovery = RecoveryReport()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = self._open()
        self.catalog = self.con.execute("SELECT current_database()").fetchall()[0][0]
        migrate(self.con)
        self._next_batch_id = self._max_batch_id() + 1
        self._check_journal()

    # -- opening and recovery -------------------------------------------------------------------
    def _connect(self) -> duckdb.DuckDBPyConnection:
        # Explicit limits: this process also runs torch, and DuckDB's defaults take 80 % of RAM
        # and every core.
        con = duckdb.connect(str(self.path), config={"memory_limit": self.memory_limit, "threads": self.threads})
        con.execute("SET TimeZone = 'UTC'")
        return con

    def _open(self) -> duckdb.DuckDBPyConnection:
        evidence = None
        if self.wal_path.exists():
            # Keep a copy of what is about to be replayed: if the journal later shows a loss, this
            # is the evidence an operator (or a DuckDB bug report) needs.
            evidence = Path(f"{self.wal_path}.replayed-{time.strftime('%Y%m%dT%H%M%S')}")
            shutil.copy2(self.wal_path, evidence)
        try:
            con = self._connect()
        except duckdb.Error as exc:
            message = str(exc)
            if "lock" in message.lower():
                pid = re.search(r"PID (\d+)", message)
                holder = f" (PID {pid.group(1)})" if pid else ""
                raise StoreLockedError(
                    f"{self.path} is in use by another process{holder}; stop that process "
                    "(is the daemon running?) or query the published snapshot instead"
                ) from None
            if not self.wal_path.exists():
                raise
            quarantine = Path(f"{self.wal_path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(self.wal_path, quarantine)
            self.recovery.quarantined_wal = quarantine
            if evidence is not None:
                evidence.unlink()  # the quarantined log is the same file
                evidence = None
            log.error(
                "wal_quarantined",
                database=str(self.path),
                moved_to=str(quarantine),
                error=message.splitlines()[0],
                action="opened from the last checkpoint; lost batches will be re-fetched",
            )
            con = self._connect()
        self._replay_evidence = evidence
        return con

    def _max_batch_id(self) -> int:
        row = self.con.execute("SELECT max(batch_id) FROM ingest_batches").fetchall()[0]
        return int(row[0]) if row and row[0] is not None else 0

    def _read_journal(self) -> list[dict]:
        if not self.journal_path.exists():
            return []
        entries = []
        for line in self.journal_path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                # A torn last line means the crash hit between commit and journal fsync: the batch
                # is in the database or in no promise at all, so it can be ignored.
                continue
        return entries

    def _check_journal(self) -> None:
        stored = self._max_batch_id()
        lost = [entry for entry in self._read_journal() if entry.get("batch", 0) > stored]
        evidence = self._replay_evidence
        if lost:
            windows = [LostWindow(*window) for entry in lost for window in entry.get("windows", [])]
            self.recovery.lost_batches = [entry["batch"] for entry in lost]
            self.recovery.lost_windows = windows
            kept = self.recovery.quarantined_wal
            if kept is None and evidence is not None:
                # DuckDB stopped replaying at the damage without an error: keep the log it replayed.
                kept = Path(str(evidence).replace(".replayed-", ".truncated-"))
                os.replace(evidence, kept)
            log.error(
                "wal_lost_committed_batches",
                database=str(self.path),
                batches=self.recovery.lost_batches,
                windows=[f"{w.symbol} {w.interval} {format_ms(w.start_ms)}..{format_ms(w.end_ms)}" for w in windows],
                wal_kept_at=str(kept) if kept else None,
                action="windows recorded as open gaps; the next backfill re-fetches them",
            )
            self._next_batch_id = max(entry["batch"] for entry in lost) + 1
            now_ms = int(time.time() * 1000)
            for window in windows:
                self.record_gap(
                    window.symbol,
                    window.interval,
                    window.start_ms,
                    window.end_ms + interval_ms(window.interval),
                    "open",
                    "lost in a damaged write-ahead log",
                    checked_at_ms=now_ms,
                )
        elif evidence is not None:
            evidence.unlink(missing_ok=True)
        self._replay_evidence = None
        self.checkpoint()

    # -- writes ---------------------------------------------------------------------------------
    def upsert(self, frame: pl.DataFrame) -> UpsertResult:
        """Store the closed candles of `frame` (deduplicated first) in one transaction."""
        rows_in = frame.height
        staged = dedupe_batch(frame)
        batch_id = self._next_batch_id
        windows = []
        if staged.height:
            windows = (
                staged.group_by("symbol", "interval")
                .agg(pl.col("open_time").min().alias("start"), pl.col("open_time").max().alias("end"))
                .sort("symbol", "interval")
                .rows()
            )
        # Registered by name: the SQL must not depend on what a Python local happens to be called.
        self.con.register("staged_candles", staged)
        self.con.execute("BEGIN TRANSACTION")
        try:
            changed_rows = self.con.execute(_UPSERT_SQL).fetchall() if staged.height else []
            by_pair = dict(Counter((symbol, interval) for symbol, interval in changed_rows))
            changed = len(changed_rows)
            self.con.execute("INSERT INTO ingest_batches VALUES (?, now(), ?, ?)", [batch_id, rows_in, changed])
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise
        finally:
            self.con.unregister("staged_candles")
        self._next_batch_id += 1
        append_line_synced(self.journal_path, json.dumps({"batch": batch_id, "windows": [list(w) for w in windows]}))
        return UpsertResult(batch_id, rows_in, changed, by_pair)

    def record_gap(
        self,
        symbol: str,
        interval: str,
        start_ms: int,
        end_ms: int,
        status: str,
        reason: str,
        *,
        checked_at_ms: int | None = None,
    ) -> None:
        """Remember a range [start, end) with no candles: `open` (to fetch), `filled` or
        `confirmed_empty` (the exchange has nothing there, so it is not fetched again)."""
        if status not in {"open", "filled", "confirmed_empty"}:
            raise ValueError(f"unknown gap status {status!r}")
        checked = checked_at_ms if checked_at_ms is not None else int(time.time() * 1000)
        self.con.execute(
            """
            INSERT INTO gaps VALUES (?, ?, make_timestamptz(?::BIGINT * 1000), make_timestamptz(?::BIGINT * 1000), ?, ?,
                                     make_timestamptz(?::BIGINT * 1000))
            ON CONFLICT (symbol, interval, gap_start) DO UPDATE SET
                gap_end = excluded.gap_end, status = excluded.status, reason = excluded.reason,
                checked_at = excluded.checked_at
            """,
            [symbol, interval, start_ms, end_ms, status, reason, checked],
        )

    def checkpoint(self) -> None:
        """Fold the WAL into the database file; afterwards the journal only needs the last batch id."""
        self.con.execute("FORCE CHECKPOINT")
        tmp = Path(f"{self.journal_path}.tmp")
        tmp.write_text(json.dumps({"checkpointed_batch": self._next_batch_id - 1}) + "\n", encoding="utf-8")
        fsync_path(tmp)
        os.replace(tmp, self.journal_path)
        fsync_path(self.journal_path.parent)

    def close(self) -> None:
        try:
            self.checkpoint()
        finally:
            self.con.close()

    # -- reads ----------------------------------------------------------------------------------
    def last_open_time(self, symbol: str, interval: str) -> int | None:
        return newest_open_time(self.con, symbol, interval)

    def first_open_time(self, symbol: str, interval: str) -> int | None:
        row = self.con.execute("SELECT epoch_ms(min(open_time)) FROM candles WHERE symbol = ? AND interval = ?",
                               [symbol, interval]).fetchall()[0][0]
        return None if row is None else int(row)

    def count_candles(self) -> int:
        return count_candles(self.con)

    def read_candles(
        self, symbol: str, interval: str, start_ms: int | None = None, end_ms: int | None = None
    ) -> pl.DataFrame:
        """Stored candles in [start, end) as a frame with millisecond times, oldest first."""
        return read_candles(self.con, symbol, interval, start_ms, end_ms)

    def read_newest_candles(self, windows: list[tuple[str, str, int, int, int]]) -> list[pl.DataFrame]:
        """See `read_newest_candles`: several pairs' newest candles in one query."""
        return read_newest_candles(self.con, windows)

    def gap_records(self, symbol: str, interval: str, status: str | None = None) -> list[tuple[int, int, str, str]]:
        query = (
            "SELECT epoch_ms(gap_start), epoch_ms(gap_end), status, reason FROM gaps"
            " WHERE symbol = ? AND interval = ?" + (" AND status = ?" if status else "") + " ORDER BY gap_start"
        )
        params = [symbol, interval] + ([status] if status else [])
        return [(int(a), int(b), s, r) for a, b, s, r in self.con.execute(query, params).fetchall()]

    def find_holes(self, symbol: str, interval: str, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
        """Ranges [from, until) inside [start, end) with no stored candle, minus the ranges already
        confirmed empty on the exchange. Holes are found by the distance between neighbours, so
        Binance's own off-grid rows (after its 2018 restart) do not count as holes."""
        step = interval_ms(interval)
        start_ms = ceil_to_grid(start_ms, interval)
        if end_ms <= start_ms:
            return []
        times = [
            int(row[0])
            for row in self.con.execute(
                "SELECT epoch_ms(open_time) FROM candles WHERE symbol = ? AND interval = ?"
                " AND open_time >= make_timestamptz(?::BIGINT * 1000)"
                " AND open_time < make_timestamptz(?::BIGINT * 1000)"
                " ORDER BY open_time",
                [symbol, interval, start_ms, end_ms],
            ).fetchall()
        ]
        holes: list[tuple[int, int]] = []
        cursor = start_ms
        for open_time in times:
            if open_time > cursor:
                holes.append((cursor, open_time))
            cursor = max(cursor, open_time + step)
        if cursor < end_ms:
            holes.append((cursor, end_ms))
        confirmed = [(a, b) for a, b, _, _ in self.gap_records(symbol, interval, "confirmed_empty")]
        return subtract_ranges(holes, confirmed)


def subtract_ranges(ranges: list[tuple[int, int]], removed: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Half-open ranges minus half-open ranges."""
    result = []
    for start, end in ranges:
        pieces = [(start, end)]
        for cut_start, cut_end in removed:
            next_pieces = []
            for a, b in pieces:
                if cut_end <= a or cut_start >= b:
                    next_pieces.append((a, b))
                    continue
                if a < cut_start:
                    next_pieces.append((a, cut_start))
                if cut_end < b:
                    next_pieces.append((cut_end, b))
            pieces = next_pieces
        result.extend(pieces)
    return result


def count_candles(con: duckdb.DuckDBPyConnection) -> int:
    return int(con.execute("SELECT count(*) FROM candles").fetchall()[0][0])


def newest_open_time(con: duckdb.DuckDBPyConnection, symbol: str | None = None,
                     interval: str | None = None) -> int | None:
    """The newest stored open time (ms) of one pair, of every pair of a symbol or interval, or of all."""
    filters = [(column, value) for column, value in (("symbol", symbol), ("interval", interval)) if value is not None]
    where = " AND ".join(f"{column} = ?" for column, _ in filters) or "TRUE"
    newest = con.execute(f"SELECT epoch_ms(max(open_time)) FROM candles WHERE {where}",
                         [value for _, value in filters]).fetchall()[0][0]
    return None if newest is None else int(newest)


def stored_pairs(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """Every (symbol, interval) with stored candles, sorted."""
    return [(s, i) for s, i in con.execute("SELECT DISTINCT symbol, interval FROM candles ORDER BY 1, 2").fetchall()]


def count_confirmed_empty(con: duckdb.DuckDBPyConnection, symbol: str, interval: str) -> int:
    """Ranges the exchange confirmed have no candles (outages), for one pair."""
    return int(con.execute("SELECT count(*) FROM gaps WHERE symbol = ? AND interval = ? AND status = 'confirmed_empty'",
                           [symbol, interval]).fetchall()[0][0])


CANDLE_SELECT = (
    "SELECT symbol, interval, epoch_ms(open_time) AS open_time, epoch_ms(close_time) AS close_time,"
    " open, high, low, close, volume, quote_volume, taker_buy_base, taker_buy_quote, trades, source,"
    " epoch_ms(ingested_at) AS ingested_at FROM candles"
)


def read_candles(
    con: duckdb.DuckDBPyConnection,
    symbol: str,
    interval: str,
    start_ms: int | None = None,
    end_ms: int | None = None,
) -> pl.DataFrame:
    conditions = ["symbol = ?", "interval = ?"]
    params: list[object] = [symbol, interval]
    if start_ms is not None:
        conditions.append("open_time >= make_timestamptz(?::BIGINT * 1000)")
        params.append(start_ms)
    if end_ms is not None:
        conditions.append("open_time < make_timestamptz(?::BIGINT * 1000)")
        params.append(end_ms)
    query = CANDLE_SELECT + " WHERE " + " AND ".join(conditions) + " ORDER BY open_time"
    return con.sql(query, params=params).pl()


def read_newest_candles(con: duckdb.DuckDBPyConnection,
                        windows: list[tuple[str, str, int, int, int]]) -> list[pl.DataFrame]:
    """For each (symbol, interval, start_ms, end_ms, limit): the newest `limit` stored candles in [start, end),
    oldest first (read_candles' columns), all in one query: what the forecaster reads for a batch of pairs."""
    if not windows:
        return []
    values = ", ".join(["(?::INTEGER, ?, ?, make_timestamptz(?::BIGINT * 1000), make_timestamptz(?::BIGINT * 1000),"
                        " ?::INTEGER)"] * len(windows))
    params = [item for i, window in enumerate(windows) for item in (i, *window)]
    query = (
        f"WITH wanted(i, symbol, interval, lo, hi, lim) AS (VALUES {values}), "
        "picked AS (SELECT w.i, w.lim, c.* FROM candles c JOIN wanted w ON c.symbol = w.symbol"
        " AND c.interval = w.interval AND c.open_time >= w.lo AND c.open_time < w.hi"
        " QUALIFY row_number() OVER (PARTITION BY w.i ORDER BY c.open_time DESC) <= w.lim) "
        + CANDLE_SELECT.replace(" FROM candles", ", i FROM picked") + " ORDER BY i, open_time"
    )
    frame = con.sql(query, params=params).pl()
    parts = {key[0]: part.drop("i") for key, part in frame.partition_by("i", as_dict=True, maintain_order=True).items()}
    empty = frame.clear().drop("i")
    return [parts.get(i, empty) for i in range(len(windows))]
