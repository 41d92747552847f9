"""The single writer: a thread that owns the CandleStore, fed by a queue.

Everything that touches the live database (upserts, gap records, the reads a backfill bases its
decisions on, snapshot publishing) runs in this thread, in submission order. Upserts waiting in the
queue are merged into one batch (one transaction, one dedupe) — DuckDB is built for bulk writes,
not many small transactions. asyncio code awaits the returned futures without blocking its loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
import structlog

from storage.snapshot import SNAPSHOT_RETENTION_S, SNAPSHOT_STORAGE_VERSION, PublishReport, SnapshotPublisher
from storage.store import CandleStore, UpsertResult

log = structlog.get_logger("storage.writer")

T = TypeVar("T")

# Upserts merged into one transaction at most; bounds memory and the length of a transaction.
MAX_ROWS_PER_TRANSACTION = 200_000


# How many snapshot intervals a due publish may wait for the queue to drain.
SNAPSHOT_MAX_DEFERRAL = 3


class _Stop:
    pass


def _resolve(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Settle a future unless its awaiter gave up on it (an asyncio task cancelled while awaiting
    cancels the wrapped future). The work itself is always done: an upsert is never dropped."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class StoreWriter:
    """Owns a CandleStore in a dedicated thread. Use as a context manager or call start()/close()."""

    def __init__(
        self,
        db_path: str | Path,
        *,
        snapshot_path: str | Path | None = None,
        snapshot_interval_s: float = 60.0,
        memory_limit: str = "1GB",
        threads: int = 2,
        snapshot_storage_version: str = SNAPSHOT_STORAGE_VERSION,
        snapshot_retention_s: float = SNAPSHOT_RETENTION_S,
    ) -> None:
        self.db_path = Path(db_path)
        self.snapshot_path = Path(snapshot_path) if snapshot_path else None
        self.snapshot_interval_s = snapshot_interval_s
        self.snapshot_storage_version = snapshot_storage_version
        self._publisher = (
            SnapshotPublisher(self.snapshot_path, self.db_path, storage_version=snapshot_storage_version,
                              retention_s=snapshot_retention_s)
            if self.snapshot_path else None
        )
        self.last_publish: PublishReport | None = None
        self._store_options = {"memory_limit": memory_limit, "threads": threads}
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._opened: Future[CandleStore] = Future()
        self._last_publish: float | None = None
        self._held: Any = None
        self._dirty_since_publish = False
        self._snapshot_hold = threading.Event()  # set while a burst of reads/writes (a forecast tick) runs
        self.snapshots_published = 0
        # Called in the writer thread with the seconds each snapshot publish took (metrics); must be quick.
        self.on_snapshot: Callable[[float], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> StoreWriter:
        self._thread = threading.Thread(target=self._run, name="kronos-store-writer", daemon=True)
        self._thread.start()
        self._opened.result()  # re-raises an open error (locked file, newer schema) here
        return self

    def close(self) -> None:
        """Finish queued work, publish a final snapshot if anything changed, checkpoint and close."""
        if self._thread is None:
            return
        self._queue.put(_Stop())
        self._thread.join()
        self._thread = None

    @property
    def alive(self) -> bool:
        """The writer thread runs (a dead writer means nothing is stored: the watchdog must notice)."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> StoreWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submitting work ------------------------------------------------------------------------
    def submit(self, frame: pl.DataFrame) -> Future[UpsertResult]:
        future: Future[UpsertResult] = Future()
        self._queue.put(("upsert", frame, future))
        return future

    def call(self, func: Callable[[CandleStore], T]) -> Future[T]:
        """Run func(store) in the writer thread, after everything submitted before it."""
        future: Future[T] = Future()
        self._queue.put(("call", func, future))
        return future

    def hold_snapshots(self) -> None:
        """A due snapshot waits (at most SNAPSHOT_MAX_DEFERRAL intervals) until `release_snapshots`: the forecaster
        holds it while a tick's batches read and insert, so a publish never lands between two of them."""
        self._snapshot_hold.set()

    def release_snapshots(self) -> None:
        self._snapshot_hold.clear()
        self.call(lambda store: None)  # wake the thread: a snapshot that came due meanwhile is published now

    def request_snapshot(self) -> Future[Path | None]:
        return self.call(lambda store: self._publish(store, force=True))

    async def upsert(self, frame: pl.DataFrame) -> UpsertResult:
        return await asyncio.wrap_future(self.submit(frame))

    async def run(self, func: Callable[[CandleStore], T]) -> T:
        return await asyncio.wrap_future(self.call(func))

    @property
    def recovery(self):
        return self._opened.result().recovery

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            store = CandleStore(self.db_path, **self._store_options)
        except BaseException as exc:
            self._opened.set_exception(exc)
            return
        self._opened.set_result(store)
        try:
            while True:
                item, self._held = (self._held, None) if self._held is not None else (self._queue.get(), None)
                if isinstance(item, _Stop):
                    break
                pending = [item]
                if item[0] == "upsert":
                    pending = self._gather_upserts(item)
                self._execute(store, pending)
                # A due snapshot waits while work is queued or held (a forecast's read right behind a tick's candles
                # must not wait for a publish), but not beyond SNAPSHOT_MAX_DEFERRAL intervals.
                idle = self._held is None and self._queue.empty() and not self._snapshot_hold.is_set()
                overdue = (self._last_publish is not None and time.monotonic() - self._last_publish
                           >= SNAPSHOT_MAX_DEFERRAL * max(self.snapshot_interval_s, 1.0))
                if idle or overdue:
                    self._publish_quietly(store, final=False)
            self._publish_quietly(store, final=True)
        finally:
            store.close()

    def _gather_upserts(self, first: tuple) -> list[tuple]:
        """Take the upserts queued right behind `first`. Any other kind of work ends the batch and is
        held back to run next, so submission order is kept."""
        batch, rows = [first], first[1].height
        while rows < MAX_ROWS_PER_TRANSACTION:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Stop) or item[0] != "upsert":
                self._held = item
                break
            batch.append(item)
            rows += item[1].height
        return batch

    def _execute(self, store: CandleStore, pending: list[tuple]) -> None:
        if self._publisher is not None:
            self._publisher.note_write()
        kind = pending[0][0]
        if kind == "call":
            _, func, future = pending[0]
            try:
                _resolve(future, func(store))
            except Exception as exc:
                _resolve(future, error=exc)
            return
        frames = [frame for _, frame, _ in pending]
        try:
            result = store.upsert(pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0])
        except Exception as exc:
            log.error("upsert_failed", error=str(exc), batches=len(frames))
            for _, _, future in pending:
                _resolve(future, error=exc)
            return
        if result.rows_changed:
            self._dirty_since_publish = True
        # Merged submissions share one transaction: each pair's changes are reported to the first submission
        # that carried that pair, so callers that add up their results (per pair or in all) get the true total.
        unclaimed = dict(result.changed_by_pair)
        for _, frame, future in pending:
            pairs = frame.select("symbol", "interval").unique().rows() if frame.height else []
            mine = {pair: unclaimed.pop(pair) for pair in map(tuple, pairs) if pair in unclaimed}
            _resolve(future, UpsertResult(result.batch_id, frame.height, sum(mine.values()), mine))

    def _publish_quietly(self, store: CandleStore, *, final: bool) -> None:
        # A failed publish (disk full, …) must not stop ingestion; users keep the previous snapshot.
        try:
            self._publish(store, force=False, final=final)
        except Exception as exc:
            log.error("snapshot_publish_failed", path=str(self.snapshot_path), error=str(exc))

    def _publish(self, store: CandleStore, *, force: bool, final: bool = False) -> Path | None:
        if self._publisher is None or self.snapshot_path is None:
            return None
        due = self._last_publish is None or time.monotonic() - self._last_publish >= self.snapshot_interval_s
        needed = self._dirty_since_publish or not self.snapshot_path.exists()
        if not force and not (needed and (due or final)):
            return None
        report = self._publisher.publish(store.con, store.catalog)
        store.checkpoint()
        if self.on_snapshot is not None:
            self.on_snapshot(report.seconds)
        self._last_publish = time.monotonic()
        self._dirty_since_publish = False
        self.snapshots_published += 1
        self.last_publish = report
        log.info("snapshot_published", path=str(report.path), seconds=round(report.seconds, 3),
                 bytes_written=report.bytes_written, parts_written=len(report.parts_written),
                 rows_changed=report.rows_changed, **({"rebuilt": report.rebuilt} if report.rebuilt else {}))
        return report.path
