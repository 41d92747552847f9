"""Publishing a read-only copy of the live store at the path users open.

DuckDB refuses every other process (even read-only) while one holds a file read-write, so users never
open the live file. Instead the writer copies the whole database into a temp file, fsyncs it and
renames it over the public name. A reader that holds the previous snapshot keeps reading its (now
unlinked) inode; opening again shows the new data. The copy is written in an older storage format
so that DuckDB 1.4+ clients can open it (see docs/storage.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from storage.durable import fsync_path

# Storage format of published snapshots: readable by DuckDB >= 1.4.0, not only by 2.x.
SNAPSHOT_STORAGE_VERSION = "v1.4.0"
SNAPSHOT_MODE = 0o640


def publish_snapshot(
    con: duckdb.DuckDBPyConnection,
    source_catalog: str,
    target: str | Path,
    *,
    storage_version: str = SNAPSHOT_STORAGE_VERSION,
) -> Path:
    """Copy the database `source_catalog` of `con` to `target` atomically; returns `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.publishing-{os.getpid()}")
    for leftover in (temp, Path(f"{temp}.wal")):
        leftover.unlink(missing_ok=True)
    alias = "kronos_snapshot_target"
    escaped = str(temp).replace("'", "''")
    con.execute(f"ATTACH '{escaped}' AS {alias} (STORAGE_VERSION '{storage_version}')")
    try:
        con.execute(f'COPY FROM DATABASE "{source_catalog}" TO {alias}')
    finally:
        # DETACH checkpoints the copy, so no .wal is left next to it.
        con.execute(f"DETACH {alias}")
    # Readable by the service's group (who query it), by nobody else, whatever the process umask.
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
