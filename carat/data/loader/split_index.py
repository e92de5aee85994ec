"""The split index: one split's manifest rows as arrays, checked against the shard files on disk.

Every rank reads the manifest (never the tars) to plan an epoch (:mod:`carat.data.loader.plan`); the same rows give
the reader each sample's shard and byte range (:mod:`carat.data.loader.tar_reader`). Shards missing or of the wrong
size are a :class:`~carat.errors.DataError` here, when the loader is built, not mid-epoch.

Each row carries its sample's hash from the manifest (:func:`carat.data.corpus.shards.sample_hash`), which the reader
checks on every read. A corpus written before hashes existed has none: it loads, with a note printed once per
process and corpus that its samples are not checked.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from carat.data.sources.segment import SPLITS
from carat.data.corpus.shards import ShardInfo, read_manifest, read_shard_table, sample_hashes_of
from carat.errors import ConfigError, DataError
from carat.storage import ObjectPath, as_location, resolved


@dataclass
class SplitIndex:
    """The manifest rows of one split as arrays (the planner's input and the reader's address book)."""

    split: str
    keys: list[str]
    shards: list[str]
    """Distinct shard paths (relative to the corpus root); ``shard_ids`` index into it."""
    shard_ids: np.ndarray
    lengths: np.ndarray
    """[N, 3] int64 (text, visual, audio)."""
    offsets: np.ndarray
    nbytes: np.ndarray
    labels: np.ndarray
    """[N, 6] uint8."""
    hashes: np.ndarray | None = None
    """[N] uint64 sample hashes recorded at write time; None for a corpus written before them."""
    shard_bytes: list[int] | None = None
    """Size of each shard in ``shards`` from the shard table (what a remote reader's block cache needs)."""
    shard_sha256: list[str] | None = None
    """sha256 of each shard in ``shards`` from the shard table (names its blocks in a block cache)."""

    def __len__(self) -> int:
        return len(self.keys)


def load_split_index(shard_dir: Path | ObjectPath, split: str) -> SplitIndex:
    """Read the manifest rows of ``split`` and check its shard files exist with their recorded sizes."""
    shard_dir = as_location(shard_dir)
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} must be one of {SPLITS}")
    manifest = read_manifest(shard_dir)
    rows = manifest.filter(pc.equal(manifest.column("split"), split))
    if rows.num_rows == 0:
        raise DataError(f"{shard_dir / 'manifest.parquet'}: no samples in split {split!r}")
    shard_col = rows.column("shard").to_pylist()
    shards = sorted(set(shard_col))
    lookup = {s: i for i, s in enumerate(shards)}
    index = SplitIndex(
        split=split,
        keys=rows.column("key").to_pylist(),
        shards=shards,
        shard_ids=np.array([lookup[s] for s in shard_col], dtype=np.int64),
        lengths=np.stack([rows.column(f"len_{m}").to_numpy() for m in ("text", "visual", "audio")], 1).astype(np.int64),
        offsets=rows.column("offset").to_numpy().astype(np.int64),
        nbytes=rows.column("nbytes").to_numpy().astype(np.int64),
        labels=np.array(rows.column("labels").to_pylist(), dtype=np.uint8).reshape(-1, 6),
        hashes=sample_hashes_of(rows, shard_dir / "manifest.parquet"),
    )
    table = _check_shard_files(shard_dir, index)
    index.shard_bytes = [table[rel].bytes for rel in shards]
    index.shard_sha256 = [table[rel].sha256 for rel in shards]
    if index.hashes is None:
        note_unhashed_corpus(shard_dir)
    return index


_NOTED: set[Path | ObjectPath] = set()
"""Corpora already noted as unhashed in this process (the loader is rebuilt every epoch)."""


def note_unhashed_corpus(shard_dir: Path | ObjectPath) -> None:
    """Say once per process that an older corpus' samples are read without a content check."""
    where = resolved(shard_dir)
    if where in _NOTED:
        return
    _NOTED.add(where)
    print(f"[carat] note: {where} has no per-sample hashes (written by an older carat): its samples are read "
          f"without a content check. `python -m carat.data verify {where}` checks the shards' sha256; rewriting "
          "the corpus with the command that made it adds the hashes.", file=sys.stderr, flush=True)


def _shard_sizes(shard_dir: Path | ObjectPath, rels: list[str]) -> dict[str, int]:
    """Size of each existing shard in ``rels``: a stat per local file, one listing for an object store (a
    request per shard would cost a round trip each, every epoch, on every rank)."""
    if isinstance(shard_dir, ObjectPath):
        listed = shard_dir.sizes_under()
        return {rel: listed[rel] for rel in rels if rel in listed}
    return {rel: (shard_dir / rel).stat().st_size for rel in rels if (shard_dir / rel).is_file()}


def _check_shard_files(shard_dir: Path | ObjectPath, index: SplitIndex) -> dict[str, ShardInfo]:
    """Manifest vs files: each shard present, of its recorded size, and holding every recorded byte range.
    Returns the shard table by shard path."""
    table = {info.shard: info for info in read_shard_table(shard_dir)}
    sizes = _shard_sizes(shard_dir, index.shards)
    for sid, rel in enumerate(index.shards):
        path = shard_dir / rel
        info = table.get(rel)
        if info is None:
            raise DataError(f"{path}: in the manifest but not in {shard_dir / 'shards.parquet'}")
        if rel not in sizes:
            raise DataError(f"{path}: shard listed in the manifest is missing")
        size = sizes[rel]
        if size != info.bytes:
            raise DataError(f"{path}: size {size} bytes does not match the manifest's shard table ({info.bytes}); "
                            "the shards were rewritten or truncated: rewrite the corpus or restore the files")
        ends = index.offsets[index.shard_ids == sid] + index.nbytes[index.shard_ids == sid]
        if len(ends) and int(ends.max()) > size:
            raise DataError(f"{path}: manifest byte ranges run past the end of the file ({size} bytes)")
    return table
