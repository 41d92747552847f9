"""What a published snapshot is made of: which tables live in Parquet part files, the manifest that lists
those files, and when part files are merged or deleted.

A snapshot is a small DuckDB file (the path users open) holding the small tables, a view per big table
over an exact list of immutable Parquet files under `<name>.parts/`, and this manifest (schema
`kronos_snapshot`). A publish writes new part files only for the rows that changed, so its cost follows
the change, not the store. storage/snapshot.py does the writing; this module is the bookkeeping.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb

from storage.durable import fsync_path

MANIFEST_SCHEMA = "kronos_snapshot"
MANIFEST_FORMAT = "1"

# Part sizes. A file holding at least SEALED_ROWS rows is never merged again (only rewritten when one of its
# rows is revised); smaller files of one size class are merged once FAN_IN of them exist or they add up to
# SEALED_ROWS, so a publish rewrites at most ~2 x SEALED_ROWS rows and a view lists a bounded number of files.
SEALED_ROWS = 500_000
FAN_IN = 10
# The rows one file of a bulk write (a full rebuild, a large backfill) holds at most: a revision of one old
# row then rewrites one such file, not the table.
CHUNK_ROWS = 1_000_000
# About how many of the newest rows (by range column) a bulk write puts in a file of their own.
NEWEST_ROWS = 2_000


@dataclass(frozen=True)
class PartedTable:
    """A big table published as Parquet parts.

    changed_at: the column written with the clock whenever a row is stored or replaced; a publish takes the
    rows whose value is not older than the previous publish's clock reading (minus late_s).
    range_column: files are cut along it; it is part of the key (or never changes), so the file holding the
    old version of a revised row is found by its range.
    key: rows with the same key replace each other; None for append-only tables (duplicates allowed).
    late_s: how far before the previous publish a row may be stamped and still arrive after it (0 when the
    stamp is the database's own clock in the writer thread; more when the caller stamps rows before
    queueing them).
    """

    name: str
    changed_at: str
    range_column: str
    key: tuple[str, ...] | None
    order: tuple[str, ...]
    late_s: float = 0.0


PARTED_TABLES: dict[str, PartedTable] = {
    table.name: table
    for table in (
        PartedTable("candles", "ingested_at", "open_time", ("symbol", "interval", "open_time"),
                    ("symbol", "interval", "open_time")),
        # issued_at is stamped by the forecaster before the rows are queued to the writer.
        PartedTable("forecasts", "issued_at", "origin_time",
                    ("symbol", "interval", "origin_time", "model_version", "step"),
                    ("symbol", "interval", "origin_time", "model_version", "step"), late_s=300.0),
        PartedTable("model_events", "event_time", "event_time", None, ("event_time", "kind")),
        PartedTable("ingest_batches", "committed_at", "committed_at", None, ("batch_id",)),
    )
}


@dataclass(frozen=True)
class PartFile:
    table: str
    name: str  # relative to the parts directory: "candles/00000012-1a2b3c4d.parquet"
    rows: int
    bytes: int
    min_changed_us: int
    max_changed_us: int
    min_range_us: int
    max_range_us: int


@dataclass
class Manifest:
    """What the current snapshot is made of; the writer keeps it in memory between publishes."""

    live_path: str
    sequence: int = 0
    watermark_us: int | None = None  # the writer's clock when the previous publish read the store
    columns: dict[str, str] = field(default_factory=dict)  # table -> column signature its files were written with
    files: list[PartFile] = field(default_factory=list)
    retired: dict[str, float] = field(default_factory=dict)  # file name -> unix time it left the snapshot

    def table_files(self, table: str) -> list[PartFile]:
        return [part for part in self.files if part.table == table]

    def copy(self) -> Manifest:
        return replace(self, columns=dict(self.columns), files=list(self.files), retired=dict(self.retired))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp_us(text: str) -> int:
    """Microseconds since the epoch of a timestamp as DuckDB prints it ('2024-03-01 00:00:00.5+00')."""
    return (datetime.fromisoformat(text) - _EPOCH) // timedelta(microseconds=1)


# -- the manifest inside a snapshot file -------------------------------------------------------------------
def write_manifest(con: duckdb.DuckDBPyConnection, catalog: str, manifest: Manifest) -> None:
    """Store `manifest` in the (attached, new) snapshot database `catalog`."""
    schema = f'"{catalog}".{MANIFEST_SCHEMA}'
    con.execute(f"CREATE SCHEMA {schema}")
    con.execute(f"CREATE TABLE {schema}.publish_state (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute(
        f"CREATE TABLE {schema}.part_files (table_name VARCHAR, file VARCHAR, rows BIGINT, bytes BIGINT,"
        " min_changed_us BIGINT, max_changed_us BIGINT, min_range_us BIGINT, max_range_us BIGINT)"
    )
    con.execute(f"CREATE TABLE {schema}.retired_files (file VARCHAR, retired_at DOUBLE)")
    state = {"format": MANIFEST_FORMAT, "live_path": manifest.live_path, "sequence": str(manifest.sequence),
             "watermark_us": "" if manifest.watermark_us is None else str(manifest.watermark_us),
             **{f"columns:{table}": signature for table, signature in manifest.columns.items()}}
    con.executemany(f"INSERT INTO {schema}.publish_state VALUES (?, ?)", list(state.items()))
    if manifest.files:
        con.executemany(
            f"INSERT INTO {schema}.part_files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [[p.table, p.name, p.rows, p.bytes, p.min_changed_us, p.max_changed_us, p.min_range_us, p.max_range_us]
             for p in manifest.files],
        )
    if manifest.retired:
        con.executemany(f"INSERT INTO {schema}.retired_files VALUES (?, ?)", list(manifest.retired.items()))


def read_manifest(con: duckdb.DuckDBPyConnection, snapshot: Path) -> Manifest | None:
    """The manifest of the snapshot at `snapshot`, or None when there is none (no file, a whole-copy snapshot
    of an older kronosd, an unreadable file): the next publish then rebuilds every part."""
    if not snapshot.exists():
        return None
    alias = "kronos_snapshot_previous"
    escaped = str(snapshot).replace("'", "''")
    try:
        con.execute(f"ATTACH '{escaped}' AS {alias} (READ_ONLY)")
    except duckdb.Error:
        return None
    try:
        schema = f"{alias}.{MANIFEST_SCHEMA}"
        try:
            state = dict(con.execute(f"SELECT key, value FROM {schema}.publish_state").fetchall())
        except duckdb.CatalogException:
            return None
        if state.get("format") != MANIFEST_FORMAT:
            return None
        files = [PartFile(*row) for row in con.execute(f"SELECT * FROM {schema}.part_files").fetchall()]
        retired = dict(con.execute(f"SELECT file, retired_at FROM {schema}.retired_files").fetchall())
    finally:
        con.execute(f"DETACH {alias}")
    return Manifest(
        live_path=state["live_path"],
        sequence=int(state["sequence"]),
        watermark_us=int(state["watermark_us"]) if state.get("watermark_us") else None,
        columns={key.removeprefix("columns:"): value for key, value in state.items() if key.startswith("columns:")},
        files=files,
        retired=retired,
    )


# -- compaction -------------------------------------------------------------------------------------------
def size_class(rows: int) -> int:
    """0 below 1,000 rows, then one class per power of ten."""
    return 0 if rows < 1000 else int(math.log10(rows)) - 2


def plan_merges(parts: list[PartFile]) -> list[list[PartFile]]:
    """Groups of one table's unsealed files to merge into one file each: a size class with FAN_IN files, or
    whose files add up to SEALED_ROWS. Each row is thus rewritten about once per size class it climbs."""
    by_class: dict[int, list[PartFile]] = {}
    for part in sorted(parts, key=lambda p: (p.rows, p.name)):
        if part.rows < SEALED_ROWS:
            by_class.setdefault(size_class(part.rows), []).append(part)
    merges = []
    for members in by_class.values():
        group: list[PartFile] = []
        for part in members:
            group.append(part)
            if len(group) >= FAN_IN or (len(group) > 1 and sum(p.rows for p in group) >= SEALED_ROWS):
                merges.append(group)
                group = []
    return merges


# -- garbage collection -----------------------------------------------------------------------------------
def collect_garbage(parts_dir: Path, manifest: Manifest, retention_s: float, now: float | None = None) -> list[str]:
    """Delete part files no snapshot has listed for `retention_s` seconds: files retired by a publish (a
    reader that opened an older snapshot reads them until then) and files a crashed publish left (by their
    age). Returns the names deleted; forgets retired names once their file is gone."""
    now = time.time() if now is None else now
    listed = {part.name for part in manifest.files}
    deleted = []
    for name, retired_at in list(manifest.retired.items()):
        if now - retired_at >= retention_s:
            (parts_dir / name).unlink(missing_ok=True)
            del manifest.retired[name]
            deleted.append(name)
    if not parts_dir.is_dir():
        return deleted
    for path in parts_dir.glob("*/*"):
        name = path.relative_to(parts_dir).as_posix()
        if name in listed or name in manifest.retired:
            continue
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if age >= retention_s:
            if path.is_dir():
                for inner in path.iterdir():
                    inner.unlink(missing_ok=True)
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
            deleted.append(name)
    return deleted


def fsync_tree_entries(paths: list[Path]) -> None:
    """Flush new files and the directories that name them (a rename or create survives a power cut)."""
    for path in paths:
        fsync_path(path)
    for directory in {path.parent for path in paths}:
        fsync_path(directory)
