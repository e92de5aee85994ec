"""Output directories of ``synth`` and ``prepare``: checked before any work, and locked while a corpus is written.

Two writers into one directory would interleave shards, or the last one would silently replace the first
corpus; the second writer gets an error naming the holder instead (the same flock as the run-directory lock of
``carat.train``, :mod:`carat.locks`; the kernel drops it when its process dies, so nothing stale is left
behind). A read-only, missing or misnamed output path is a one-line :class:`~carat.errors.DataError` naming the
path, not an ``OSError`` traceback.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from carat.errors import DataError
from carat.locks import FileLock

CORPUS_LOCK = ".carat-write.lock"
"""The lock file inside a corpus directory while ``synth`` or ``prepare`` writes it."""


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: Path, what: str) -> None:
    """DataError naming ``path`` unless it is, or can be created as, a writable directory; creates nothing, so
    a long job can run it before its expensive first step."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: not a directory; {what} needs a directory here")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise DataError(f"{path}: cannot create {what} here: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):  # access(2) also says EROFS on a read-only mount
        reason = "read-only file system" if _read_only_mount(existing) else "permission denied"
        raise DataError(f"{path}: cannot write {what} here ({reason} at {existing}); choose a writable path")


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def make_dir(path: Path, what: str) -> Path:
    """``mkdir -p path``; the OSError of a read-only or unmakeable path as one DataError naming it."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{path}: cannot create {what} here: {err.strerror or err}") from None
    return Path(path)


@contextlib.contextmanager
def corpus_write_lock(out_dir: Path) -> Iterator[Path]:
    """Create ``out_dir`` and hold its writer lock for the block; LockHeld names another writer at once."""
    out_dir = make_dir(Path(out_dir), "a corpus directory")
    with FileLock(out_dir / CORPUS_LOCK, what=f"corpus directory {out_dir}") as lock:
        yield lock.path.parent


__all__ = ["CORPUS_LOCK", "check_writable_dir", "corpus_write_lock", "make_dir"]
