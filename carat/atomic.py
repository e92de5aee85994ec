"""Atomic file publication: write a temporary sibling, flush it to disk, rename it over the final name.

A reader (or a rerun after a crash) then sees either the old file or the complete new one, never a torn one.
"""

from __future__ import annotations

import os
from pathlib import Path


def temp_path(path: Path) -> Path:
    """The temporary sibling a file is written to before it is published."""
    return path.with_name(path.name + ".tmp")


def publish(tmp: Path, final: Path) -> None:
    """Flush ``tmp`` to disk, then rename it over ``final``."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, creating the parent folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.write_text(text)
    publish(tmp, path)
