"""Where a command's file output goes: `-` is stdout, a regular file is replaced atomically, anything else
(a FIFO, a terminal, /dev/stdout) is written in place.

An atomic rename onto /dev/stdout would replace the symlink with a regular file as root and fail as anyone
else, so only paths that are (or will be) regular files get the temp-file-and-rename treatment; a symlink to a
regular file keeps its link and has its target replaced.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

STDOUT = "-"
# Symlinks into these trees point at devices or descriptors, never at files to replace.
_SPECIAL_TREES = ("/dev/", "/proc/")


def describe(target: str | Path) -> str:
    return "stdout" if str(target) == STDOUT else str(target)


@contextlib.contextmanager
def open_output(target: str | Path) -> Iterator[BinaryIO]:
    """A binary file for `target`; the output appears only when the block finishes without an error."""
    if str(target) == STDOUT:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    path = _replaceable_file(Path(target))
    if path is None:
        with open(target, "wb") as stream:
            yield stream
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _replaceable_file(path: Path) -> Path | None:
    """The regular file to replace atomically for `path`, or None to write into `path` as it is."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISLNK(mode):
        resolved = Path(os.path.realpath(path))
        if str(resolved).startswith(_SPECIAL_TREES) or str(path).startswith(_SPECIAL_TREES):
            return None
        return _replaceable_file(resolved)
    return None
