"""fsync for files and directories: what makes a rename or an appended line survive a power cut.

kronos_model has its own twin for checkpoint directories: the two packages never import each other.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (after a rename into it), to disk."""
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def append_line_synced(path: Path, line: str) -> None:
    """Append one line and fsync it before returning."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())
