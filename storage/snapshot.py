"""Publishing a read-only snapshot of the live store at the path users open.

DuckDB refuses every other process (even read-only) while one holds a file read-write, so users never
open the live file. The writer publishes a snapshot instead, and a publish costs what changed since the
previous one, not the size of the store:

- the big tables (storage.snapshot_layout.PARTED_TABLES: candles, forecasts, model_events,
  ingest_batches) live in immutable Parquet part files under `<name>.parts/<table>/`. A publish writes
  one new part with the rows changed since the previous publish (plus the rows of any part holding an
  older version of a revised row), and now and then merges small parts (snapshot_layout.plan_merges);
- the snapshot file itself is a small DuckDB file, written in an older storage format that DuckDB 1.4+
  reads, holding the small tables whole, one view per big table over the exact list of its part files
  (same name, columns and types as the table), and the manifest of those files;
- the new small file is written to a temp name, fsynced and renamed over the public name: that rename is
  the atomic publish. A reader that holds the previous file keeps its views, whose part files are kept
  for `retention_s` after they leave the snapshot (storage.snapshot_layout.collect_garbage).
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import structlog

from storage.durable import fsync_path
from storage.snapshot_layout import (
    CHUNK_ROWS,
    NEWEST_ROWS,
    PARTED_TABLES,
    Manifest,
    PartedTable,
    PartFile,
    collect_garbage,
    fsync_tree_entries,
    plan_merges,
    read_manifest,
    timestamp_us,
    write_manifest,
)

log = structlog.get_logger("storage.snapshot")

# Storage format of published snapshots: readable by DuckDB >= 1.4.0, not only by 2.x.
SNAPSHOT_STORAGE_VERSION = "v1.4.0"
SNAPSHOT_MODE = 0o640
PARTS_DIR_MODE = 0o750
# How long a part file stays on disk after it left the snapshot: a reader holding an older snapshot open
# can query it for at least this long.
SNAPSHOT_RETENTION_S = 3600.0

# How far back a publish looks (seconds before the previous one) when the part counts disagree with the store,
# before it rebuilds the table.
LOOK_BACK_S = (3600.0, 86_400.0)

_TARGET_ALIAS = "kronos_snapshot_target"
_ADDED = "kronos_publish_added"


@dataclass
class PublishReport:
    path: Path
    seconds: float = 0.0
    bytes_written: int = 0  # part files plus the snapshot file
    parts_written: list[str] = field(default_factory=list)  # part file names, relative to the parts directory
    rows_written: int = 0  # rows in the part files written
    rows_changed: dict[str, int] = field(default_factory=dict)  # table -> rows new or changed since the last publish
    rebuilt: dict[str, str] = field(default_factory=dict)  # table -> why all its parts were rewritten
    merged: int = 0  # part files merged into bigger ones
    deleted: int = 0  # part files deleted after their retention


def parts_dir_for(target: str | Path) -> Path:
    """Where the part files of the snapshot `target` live: kronos.duckdb -> kronos.parts/."""
    target = Path(target)
    return target.with_name(f"{target.stem}.parts")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class SnapshotPublisher:
    """Publishes snapshots of one live store to one path. Used by the writer thread only (not thread-safe);
    keeps the manifest of the current snapshot in memory between publishes."""

    def __init__(
        self,
        target: str | Path,
        live_path: str | Path,
        *,
        storage_version: str = SNAPSHOT_STORAGE_VERSION,
        retention_s: float = SNAPSHOT_RETENTION_S,
    ) -> None:
        self.target = Path(target).absolute()
        self.parts_dir = parts_dir_for(self.target)
        self.live_path = str(Path(live_path).absolute())
        self.storage_version = storage_version
        self.retention_s = retention_s
        self._manifest: Manifest | None = None
        self._started = False
        # Set when a write ran while the wall clock read less than the last publish's: rows stamped then may
        # look older than that publish, so the next publish rebuilds every part instead of trusting the stamps.
        self.clock_regressed = False

    def note_write(self) -> None:
        """Called by the writer before each write: notices a wall clock that went back."""
        manifest = self._manifest
        if manifest is not None and manifest.watermark_us is not None and time.time() * 1e6 < manifest.watermark_us:
            self.clock_regressed = True

    def publish(self, con: duckdb.DuckDBPyConnection, catalog: str) -> PublishReport:
        """Publish the database `catalog` of `con` (the live store, read-write) atomically at the target."""
        began = time.monotonic()
        self.target.parent.mkdir(parents=True, exist_ok=True)
        if not self._started:
            self._remove_temp_leftovers()
            self._manifest = read_manifest(con, self.target)
            self._started = True
        previous = self._manifest
        if previous is not None and (previous.live_path != self.live_path or
                                     not all((self.parts_dir / part.name).exists() for part in previous.files)):
            previous = None  # a snapshot of another store, or parts deleted by hand: nothing can be reused
        now_us = int(con.execute("SELECT epoch_us(now())").fetchall()[0][0])
        rebuild_reason = None
        if previous is None:
            rebuild_reason = "no parts published before"
        elif self.clock_regressed or (previous.watermark_us is not None and now_us < previous.watermark_us):
            rebuild_reason = "the wall clock went back"
        manifest = previous.copy() if previous is not None else Manifest(live_path=self.live_path)
        manifest.sequence += 1
        report = PublishReport(self.target)
        run = _PublishRun(con, catalog, self.parts_dir, manifest, report)
        written: list[Path] = []
        try:
            tables = [row[0] for row in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main' "
                "ORDER BY table_name", [catalog]).fetchall()]
            for table in tables:
                if table in PARTED_TABLES:
                    run.update(PARTED_TABLES[table], previous_watermark_us=None if previous is None
                               else previous.watermark_us, rebuild_reason=rebuild_reason)
            manifest.watermark_us = now_us
            written = run.written_paths()
            temp = self._write_snapshot_file(con, catalog, tables, manifest)
        except BaseException:
            # Nothing published: the previous snapshot and every file it lists are untouched. What this
            # attempt wrote is unlisted and goes with the garbage after the retention.
            con.execute(f"DROP TABLE IF EXISTS temp.{_ADDED}")
            raise
        con.execute(f"DROP TABLE IF EXISTS temp.{_ADDED}")
        fsync_tree_entries(written)
        os.replace(temp, self.target)
        fsync_path(self.target.parent)
        self._manifest = manifest
        self.clock_regressed = False
        report.deleted = len(collect_garbage(self.parts_dir, manifest, self.retention_s))
        report.bytes_written += self.target.stat().st_size
        report.seconds = time.monotonic() - began
        return report

    def _remove_temp_leftovers(self) -> None:
        # A publish killed before its rename leaves its temp file; only the writer holding the live store
        # publishes here, so none of these belongs to a publish in progress.
        for leftover in self.target.parent.glob(f".{self.target.name}.publishing-*"):
            leftover.unlink(missing_ok=True)

    def _write_snapshot_file(self, con: duckdb.DuckDBPyConnection, catalog: str, tables: list[str],
                             manifest: Manifest) -> Path:
        temp = _attach_new_file(con, self.target, self.storage_version)
        try:
            # Every table, view, sequence and macro with its definition; then the rows.
            con.execute(f"COPY FROM DATABASE {_quote(catalog)} TO {_TARGET_ALIAS} (SCHEMA)")
            for table in tables:
                name = f"{_TARGET_ALIAS}.main.{_quote(table)}"
                parts = manifest.table_files(table)
                if table in PARTED_TABLES and parts:
                    con.execute(f"DROP TABLE {name}")
                    columns = table_columns(con, catalog, table)
                    con.execute(f"CREATE VIEW {name} AS {parquet_select(self.parts_dir, parts, columns)}")
                elif table not in PARTED_TABLES:
                    con.execute(f"INSERT INTO {name} SELECT * FROM {_quote(catalog)}.main.{_quote(table)}")
            write_manifest(con, _TARGET_ALIAS, manifest)
        finally:
            # DETACH checkpoints the file, so no .wal is left next to it.
            con.execute(f"DETACH {_TARGET_ALIAS}")
        # Readable by the service's group (who query it), by nobody else, whatever the process umask.
        os.chmod(temp, SNAPSHOT_MODE)
        fsync_path(temp)
        return temp


def _attach_new_file(con: duckdb.DuckDBPyConnection, target: Path, storage_version: str) -> Path:
    """Attach a fresh temp file next to `target` as _TARGET_ALIAS, in the given storage format."""
    temp = target.with_name(f".{target.name}.publishing-{os.getpid()}")
    for leftover in (temp, Path(f"{temp}.wal")):
        leftover.unlink(missing_ok=True)
    con.execute(f"ATTACH {_literal(str(temp))} AS {_TARGET_ALIAS} (STORAGE_VERSION {_literal(storage_version)})")
    return temp


def table_columns(con: duckdb.DuckDBPyConnection, catalog: str, table: str) -> list[tuple[str, str]]:
    """(name, type) of a table's columns, in order."""
    return [(str(name), str(kind)) for name, kind in con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = ? AND schema_name = 'main' "
        "AND table_name = ? ORDER BY column_index", [catalog, table]).fetchall()]


def parquet_select(parts_dir: Path, parts: list[PartFile], columns: list[tuple[str, str]]) -> str:
    """A SELECT of the rows of `parts` with the table's exact column names, order and types."""
    files = ", ".join(_literal(str(parts_dir / part.name)) for part in parts)
    projection = ", ".join(f"CAST({_quote(name)} AS {kind}) AS {_quote(name)}" for name, kind in columns)
    return f"SELECT {projection} FROM read_parquet([{files}])"


class _PublishRun:
    """One publish's work on the part files: which rows changed, which parts they replace, writing parts."""

    def __init__(self, con: duckdb.DuckDBPyConnection, catalog: str, parts_dir: Path, manifest: Manifest,
                 report: PublishReport) -> None:
        self.con = con
        self.catalog = catalog
        self.parts_dir = parts_dir
        self.manifest = manifest
        self.report = report
        self._written: list[PartFile] = []
        self._token = secrets.token_hex(4)

    def written_paths(self) -> list[Path]:
        return [self.parts_dir / part.name for part in self._written]

    def update(self, table: PartedTable, *, previous_watermark_us: int | None, rebuild_reason: str | None) -> None:
        columns = table_columns(self.con, self.catalog, table.name)
        signature = ", ".join(f"{name} {kind}" for name, kind in columns)
        live = f"{_quote(self.catalog)}.main.{_quote(table.name)}"
        reason = rebuild_reason
        if reason is None and self.manifest.columns.get(table.name) != signature:
            reason = "its columns changed" if table.name in self.manifest.columns else "no parts published before"
        if reason is None and previous_watermark_us is not None:
            reason = self._catch_up(table, columns, live, previous_watermark_us)
        if reason is not None:
            log.info("snapshot_parts_rebuilt", table=table.name, reason=reason)
            self.report.rebuilt[table.name] = reason
            self._retire(self.manifest.table_files(table.name))
            stored = int(self.con.execute(f"SELECT count(*) FROM {live}").fetchall()[0][0])
            self.report.rows_changed[table.name] = stored
            self._add(self._write(table, f"SELECT * FROM {live}", stored))
        self.manifest.columns[table.name] = signature
        for group in plan_merges(self.manifest.table_files(table.name)):
            self._retire(group)
            self.report.merged += len(group)
            self._add(self._write(table, parquet_select(self.parts_dir, group, columns), sum(p.rows for p in group)))

    def _catch_up(self, table: PartedTable, columns: list[tuple[str, str]], live: str,
                  watermark_us: int) -> str | None:
        """Publish the table's changes since the last publish; None, or why the table must be rebuilt."""
        stored = int(self.con.execute(f"SELECT count(*) FROM {live}").fetchall()[0][0])
        # Inserts that slipped past the stamps (stamped long before they were stored) show up as a count that
        # differs: look further back before rebuilding the whole table.
        for late_s in (table.late_s, *(s for s in LOOK_BACK_S if s > table.late_s)):
            reason = self._apply_changes(table, columns, live, watermark_us, late_s)
            if reason is not None:
                return reason
            listed = sum(part.rows for part in self.manifest.table_files(table.name))
            if listed == stored:
                return None
        return f"its parts hold {listed} rows, the store {stored}"

    def _apply_changes(self, table: PartedTable, columns: list[tuple[str, str]], live: str, watermark_us: int,
                       late_s: float) -> str | None:
        """Write one part with the rows stamped since `late_s` before the last publish that it lacks; None, or
        why the table must be rebuilt."""
        since = int(watermark_us - late_s * 1_000_000)
        stamped = f"{_quote(table.changed_at)} >= make_timestamptz({since}::BIGINT)"
        current = self.manifest.table_files(table.name)
        # Rows stamped since `since` that are already published (at most late_s worth) are not new.
        recent = [part for part in current if part.max_changed_us >= since]
        live_window = f"SELECT * FROM {live} WHERE {stamped}"
        published_window = (f"SELECT * FROM ({parquet_select(self.parts_dir, recent, columns)}) WHERE {stamped}"
                            if recent else None)
        query = live_window + (f" EXCEPT ALL {published_window}" if published_window else "")
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE {_ADDED} AS {query}")
        added = int(self.con.execute(f"SELECT count(*) FROM temp.{_ADDED}").fetchall()[0][0])
        self.report.rows_changed[table.name] = self.report.rows_changed.get(table.name, 0) + added
        if table.key is None and published_window:
            gone = int(self.con.execute(
                f"SELECT count(*) FROM ({published_window} EXCEPT ALL {live_window})").fetchall()[0][0])
            if gone:
                return f"{gone} published rows are no longer in the store"
        if not added:
            return None
        replaced: list[PartFile] = []
        source = f"SELECT * FROM temp.{_ADDED}"
        if table.key is not None:
            replaced = self._parts_holding_keys(table, current)
            if replaced:
                keys = ", ".join(_quote(column) for column in table.key)
                kept = parquet_select(self.parts_dir, replaced, columns)
                source = f"SELECT * FROM ({kept}) AS kept ANTI JOIN temp.{_ADDED} USING ({keys}) UNION ALL {source}"
        self._retire(replaced)
        self._add(self._write(table, source, added + sum(part.rows for part in replaced)))
        return None

    def _parts_holding_keys(self, table: PartedTable, current: list[PartFile]) -> list[PartFile]:
        """The parts holding an older version of a changed row (they are rewritten without it)."""
        assert table.key is not None
        low, high = self.con.execute(
            f"SELECT epoch_us(min({_quote(table.range_column)})), epoch_us(max({_quote(table.range_column)})) "
            f"FROM temp.{_ADDED}").fetchall()[0]
        candidates = [part for part in current if part.max_range_us >= low and part.min_range_us <= high]
        if not candidates:
            return []
        files = ", ".join(_literal(str(self.parts_dir / part.name)) for part in candidates)
        keys = ", ".join(_quote(column) for column in table.key)
        holding = {str(row[0]) for row in self.con.execute(
            f"SELECT DISTINCT filename FROM read_parquet([{files}], filename = true) AS old "
            f"SEMI JOIN temp.{_ADDED} USING ({keys})").fetchall()}
        return [part for part in candidates if str(self.parts_dir / part.name) in holding]

    def _write(self, table: PartedTable, source: str, rows: int) -> list[PartFile]:
        """Write the rows of `source` as part files of at most ~CHUNK_ROWS rows, cut along the range column and
        sorted by the table's order inside each (so a reader's filter on a pair skips most row groups)."""
        if rows <= 0:
            return []
        column = _quote(table.range_column)
        bounds: list[int] = []
        if rows > 2 * NEWEST_ROWS:
            chunks = -(-rows // CHUNK_ROWS)
            # The newest rows get a file of their own: they are the ones revised next (a REST record replacing
            # a websocket copy), and a revision rewrites the whole file holding the old version.
            fractions = [i / chunks for i in range(1, chunks)] + [1 - NEWEST_ROWS / rows]
            quantiles = self.con.execute(
                f"SELECT list_transform(approx_quantile({column}, {fractions}), lambda x: epoch_us(x)) FROM ({source})"
            ).fetchall()[0][0]
            bounds = sorted(set(int(value) for value in quantiles or []))
        directory = self.parts_dir / table.name
        if not directory.exists():
            directory.mkdir(parents=True, mode=PARTS_DIR_MODE)
            os.chmod(self.parts_dir, PARTS_DIR_MODE)
        order = ", ".join(_quote(name) for name in table.order)
        parts = []
        edges: list[int | None] = [None, *bounds, None]
        for low, high in itertools.pairwise(edges):
            conditions = [f"{column} >= make_timestamptz({low}::BIGINT)" if low is not None else "TRUE",
                          f"{column} < make_timestamptz({high}::BIGINT)" if high is not None else "TRUE"]
            name = f"{table.name}/{self.manifest.sequence:08d}-{self._token}-{len(self._written):03d}.parquet"
            path = self.parts_dir / name
            stats = self.con.execute(
                f"COPY (SELECT * FROM ({source}) WHERE {' AND '.join(conditions)} ORDER BY {order}) "
                f"TO {_literal(str(path))} (FORMAT parquet, RETURN_STATS)").fetchall()
            written = sum(int(row[1]) for row in stats)
            if not written:
                path.unlink(missing_ok=True)
                continue
            _, count, size, _, column_stats, *_ = stats[0]
            changed = column_stats[_quote(table.changed_at)]
            ranged = column_stats[column]
            part = PartFile(table.name, name, int(count), int(size), timestamp_us(changed["min"]),
                            timestamp_us(changed["max"]), timestamp_us(ranged["min"]), timestamp_us(ranged["max"]))
            os.chmod(path, SNAPSHOT_MODE)
            self._written.append(part)
            self.report.parts_written.append(name)
            self.report.rows_written += part.rows
            self.report.bytes_written += part.bytes
            parts.append(part)
        return parts

    def _add(self, parts: list[PartFile]) -> None:
        self.manifest.files.extend(parts)

    def _retire(self, parts: list[PartFile]) -> None:
        gone = {part.name for part in parts}
        self.manifest.files = [part for part in self.manifest.files if part.name not in gone]
        now = time.time()
        for name in gone:
            self.manifest.retired[name] = now


def copy_whole_database(
    con: duckdb.DuckDBPyConnection,
    source_catalog: str,
    target: str | Path,
    *,
    storage_version: str = SNAPSHOT_STORAGE_VERSION,
) -> Path:
    """A self-contained copy of the database `source_catalog` of `con` at `target` (temp file, fsync, rename):
    how snapshots were published before part files; benchmarks/snapshot_scale.py compares the two."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _attach_new_file(con, target, storage_version)
    try:
        con.execute(f"COPY FROM DATABASE {_quote(source_catalog)} TO {_TARGET_ALIAS}")
    finally:
        con.execute(f"DETACH {_TARGET_ALIAS}")
    os.chmod(temp, SNAPSHOT_MODE)
    fsync_path(temp)
    os.replace(temp, target)
    fsync_path(target.parent)
    return target


def open_read_only(path: str | Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to a published snapshot, times shown in UTC."""
    con = duckdb.connect(str(path), read_only=True)
    con.execute("SET TimeZone = 'UTC'")
    return con
