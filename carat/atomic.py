"""Atomic file publication: write a temporary sibling, flush it to disk, rename it over the final name.

A reader (or a rerun after a crash) then sees either the old file or the complete new one, never a torn one.
Temporary names are unique per process and call (``<name>.<pid>.<random>.tmp``): two processes publishing
the same file at once (Ray Tune trials starting together) never write into each other's temporary file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


def temp_path(path: Path) -> Path:
    """A fresh temporary sibling for ``path``; its name ends in ``.tmp`` (stale-file cleanup relies on it)."""
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Flush ``tmp`` to disk, then rename it over ``final`` and flush the rename."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary sibling, which is then published as ``path``; on any error the
    temporary file is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, creating the parent folder if needed."""
    write_atomic(path, lambda tmp: tmp.write_text(text))
