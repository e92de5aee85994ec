"""Corpora in object storage: ranged reads of shard objects (with an optional local block cache), and the
upload that publishes a corpus written locally.

*Reading.* :class:`~carat.data.loader.tar_reader.ShardReader` plans and merges byte ranges exactly as for local files;
for a corpus at an :class:`~carat.storage.ObjectPath` each merged range becomes one ranged GET
(:class:`ObjectRangeReader`). With ``loader.cache_dir`` set, ranges are served from fixed-size blocks kept on
local disk (:class:`BlockCache`): the first epoch fetches each block once (neighbouring batches share them,
since shards are length-sorted and batches are runs of consecutive samples), later epochs read locally. Blocks
are named by the shard's sha256 from the shard table, so a rewritten corpus never hits stale blocks, and two
URLs of the same corpus share them. The cache is bounded in bytes: a process that writes past the bound evicts
least recently used blocks down to 80% of it (concurrent workers may each overshoot by one fetch).

*Writing.* ``synth`` and ``prepare`` write into a local staging directory with their usual atomic, resumable
writer, then :func:`publish_corpus` uploads it: the old manifest is deleted first (a reader never pairs an old
manifest with new shards), then every shard (one PUT each: an object is never visible half-written), stale
objects are removed, and the shard table, card and manifest go last. A reader finds either no manifest or a
complete corpus.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from carat.errors import DataError
from carat.storage import ObjectPath

BLOCK_BYTES = 4 << 20
"""Cache block: large enough that a batch (~12 MB of ~190 kB clips) is a few blocks, small enough that the
first epoch over-fetches little at the start and end of a run of samples."""

PUBLISHED_LAST = ("shards.parquet", "card.json", "manifest.parquet")
"""Uploaded after every shard, in this order: the manifest is what makes a corpus visible to readers."""
NOT_PUBLISHED = (".journal", ".carat-write.lock", ".synth.lock", ".synth-in-progress")
"""Writer-side files that stay in the staging directory."""


class BlockCache:
    """Fixed-size blocks of shard objects on local disk, bounded in bytes, shared by processes and runs."""

    def __init__(self, directory: Path, max_bytes: int, block_bytes: int = BLOCK_BYTES):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.block_bytes = block_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._used = sum(size for _, size, _ in self._blocks())
        self.hits = 0
        self.misses = 0
        self.refetched = 0

    def _path(self, digest: str, block: int) -> Path:
        return self.directory / digest[:32] / f"{block:08d}"

    def _blocks(self) -> list[tuple[float, int, Path]]:
        """(mtime, bytes, path) of every cached block."""
        found = []
        for entry in os.scandir(self.directory):
            if not entry.is_dir():
                continue
            for block in os.scandir(entry.path):
                if block.name.isdigit():
                    try:
                        st = block.stat()
                    except FileNotFoundError:  # evicted by another process meanwhile
                        continue
                    found.append((st.st_mtime, st.st_size, Path(block.path)))
        return found

    def _cached(self, digest: str, block: int, lo: int, hi: int) -> bytes | None:
        """Bytes ``lo..hi`` of a cached block, or None when it is not (or no longer) cached."""
        path = self._path(digest, block)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            data = os.pread(fd, hi - lo, lo)
            os.utime(fd)  # least recently used goes first when the cache is full
        finally:
            os.close(fd)
        return data if len(data) == hi - lo else None

    def _store(self, digest: str, block: int, data: bytes) -> None:
        path = self._path(digest, block)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # whole blocks only: a reader never sees a partial one
        self._used += len(data)
        if self._used > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        blocks = sorted(self._blocks())
        total = sum(size for _, size, _ in blocks)
        target = int(self.max_bytes * 0.8)
        for _, size, path in blocks:
            if total <= target:
                break
            path.unlink(missing_ok=True)
            total -= size
        self._used = total

    def read(self, obj: ObjectPath, digest: str, object_bytes: int, start: int, size: int,
             refresh: bool = False) -> bytes:
        """Bytes ``start..start+size`` of ``obj`` (of ``object_bytes`` bytes, content hash ``digest``);
        ``refresh`` fetches every block of the range from the store again and replaces the cached copies (the
        reader asks for it when cached bytes fail their sample hashes)."""
        stop = min(start + size, object_bytes)
        if stop <= start:
            return b""
        B = self.block_bytes
        blocks = range(start // B, (stop - 1) // B + 1)
        parts: dict[int, bytes] = {}
        for b in blocks if not refresh else ():
            got = self._cached(digest, b, max(start, b * B) - b * B, min(stop, (b + 1) * B) - b * B)
            if got is not None:
                parts[b] = got
        if refresh:
            self.refetched += len(blocks)
        self.hits += len(parts)
        missing = [b for b in blocks if b not in parts]
        self.misses += len(missing)
        for group in _consecutive(missing):
            lo, hi = group[0] * B, min((group[-1] + 1) * B, object_bytes)
            data = obj.read_range(lo, hi)
            if len(data) != hi - lo:
                raise DataError(f"{obj}: read {len(data)} of {hi - lo} bytes at offset {lo}: the object is shorter "
                                f"than the shard table's {object_bytes} bytes (rewritten or truncated)")
            for b in group:
                block = data[b * B - lo : min((b + 1) * B, object_bytes) - lo]
                self._store(digest, b, block)
                parts[b] = block[max(start, b * B) - b * B : min(stop, (b + 1) * B) - b * B]
        return b"".join(parts[b] for b in blocks)


def _consecutive(blocks: list[int]) -> list[list[int]]:
    """Runs of consecutive block numbers (each fetched with one GET)."""
    groups: list[list[int]] = []
    for b in blocks:
        if groups and groups[-1][-1] == b - 1:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


class ObjectRangeReader:
    """Byte ranges of a remote corpus' shards: one ranged GET each, or through a :class:`BlockCache`."""

    def __init__(self, root: ObjectPath, shards: list[str], shard_bytes: list[int] | None,
                 shard_sha256: list[str] | None, cache: BlockCache | None):
        self.root = root
        self.shards = shards
        self.shard_bytes = shard_bytes
        self.shard_sha256 = shard_sha256
        # The cache names blocks by content hash: without the shard table's hashes it cannot be used safely.
        self.cache = cache if shard_bytes is not None and shard_sha256 is not None else None

    def read(self, sid: int, start: int, size: int, refresh: bool = False) -> bytes:
        obj = self.root / self.shards[sid]
        if self.cache is None:
            return obj.read_range(start, start + size)
        return self.cache.read(obj, self.shard_sha256[sid], self.shard_bytes[sid], start, size, refresh)


# ------------------------------------------------------------------------------------------- publishing


def staging_dir(url: ObjectPath) -> Path:
    """A local directory to write the corpus for ``url`` into before upload. The same URL gets the same
    directory, so a rerun after an interruption resumes the writer's journal (every finished shard is kept)."""
    root = Path(os.environ.get("CARAT_STAGING_DIR") or Path(tempfile.gettempdir()) / "carat-staging")
    name = hashlib.sha256(url.url.encode()).hexdigest()[:16]
    return root / f"{url.bucket}-{name}"


def publish_corpus(local: Path, url: ObjectPath, *, progress: bool = False) -> None:
    """Upload the corpus written in ``local`` to ``url`` so that readers see no corpus or a complete one."""
    local = Path(local)
    if not (local / "manifest.parquet").is_file():
        raise DataError(f"{local}: no manifest.parquet; nothing complete to upload to {url}")
    url.mkdir()  # a missing bucket is an error naming it, before anything is uploaded
    (url / "manifest.parquet").unlink(missing_ok=True)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    files = [f for f in files if f.split("/", 1)[0] not in NOT_PUBLISHED and not f.endswith(".tmp")]
    first = [f for f in files if f not in PUBLISHED_LAST]
    for i, rel in enumerate(first):
        if progress:
            print(f"upload {i + 1}/{len(first)}: {url / rel}", file=sys.stderr, flush=True)
        (url / rel).upload_from(local / rel)
    wanted = set(files)
    stale = [rel for rel in url.walk_files() if rel not in wanted and rel != "manifest.parquet"]
    for rel in stale:
        (url / rel).unlink(missing_ok=True)
    for rel in PUBLISHED_LAST:
        if (local / rel).is_file():
            (url / rel).upload_from(local / rel)


def discard_staging(local: Path) -> None:
    """Remove a staging directory once its corpus is published."""
    shutil.rmtree(local, ignore_errors=True)


def write_corpus_to(url: ObjectPath, write: Callable[[Path], object], *, progress: bool = False) -> ObjectPath:
    """``write(local_dir)`` a corpus into the staging directory of ``url``, then publish it there. The bucket
    is checked first (an error before hours of writing); the staging directory is kept if anything fails, so
    the rerun resumes from its journal."""
    url.mkdir()
    local = staging_dir(url)
    write(local)
    publish_corpus(local, url, progress=progress)
    discard_staging(local)
    return url


__all__ = ["BlockCache", "ObjectRangeReader", "discard_staging", "publish_corpus", "staging_dir", "write_corpus_to"]
