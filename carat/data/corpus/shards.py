"""Deterministic, resumable WebDataset shard storage for segments, with a Parquet manifest.

Layout under ``out_dir`` (the corpus format, also in the project's data-formats design notes)::

    <split>/<split>-000000.tar ...   samples sorted by SegmentRef.sort_key (audio, visual, text, key)
    manifest.parquet                 one row per sample (MANIFEST_SCHEMA)
    shards.parquet                   one row per shard: path, split, num_samples, bytes, sha256 (SHARD_SCHEMA)
    .journal/<split>-NNNNNN.json     per finished shard, used only to resume an interrupted write

One tar sample is ``<k>.audio.npy``, ``<k>.json``, ``<k>.text.npy``, ``<k>.visual.npy`` (member names in
sorted order) where ``<k>`` is :func:`tar_key` of the segment key: WebDataset splits a member name at its
first '.', so '.' (and '/', '%') are percent-encoded. Arrays are ``.npy`` only: nothing is ever pickled.

Manifest columns beyond the contract: ``offset`` and ``nbytes`` give the byte range of a sample's members in
its tar, so a loader can read exactly the samples of a planned batch with a ranged read instead of streaming a
whole shard (see :mod:`carat.data.loader.pipeline`). ``sample_hash`` is the xxh3-64 hash of those bytes (headers,
payloads and padding), computed from the published shard: the loader checks it on every read, so a flipped
byte in a payload is an error naming shard and key, never finite garbage in a batch. xxh3 hashes ~60 GB/s
per core (about 3 us for a typical 190 kB sample), where zlib.crc32 and blake2b cost 50-210 us, as much as
the rest of the loader; the per-shard sha256 remains the strong check of ``verify``. Corpora written before
this column have no hashes: they load with a one-time note (:mod:`carat.data.loader.split_index`).

Determinism: shard boundaries are planned from the refs alone (estimated member sizes from lengths and
dtype), every tar header field is fixed (mtime 0, uid/gid 0, empty uname/gname, mode 0o644), and the
Parquet files are written from the same tables, so two runs over the same source give byte-identical files.

Atomicity and resume: every file is written to ``<name>.tmp`` and ``os.replace``'d. After a shard is
complete a journal entry records its sha256, its per-sample rows and a fingerprint of what it should contain
(dtype, keys, lengths). A rerun keeps a shard only when its journal fingerprint matches the plan and the file's
sha256 matches the journal; anything else (partial temp files, stale shards) is rewritten or removed. A
partial shard is never trusted. The fingerprint cannot see a change of feature *values* under the same keys
and lengths: pass ``resume=False`` (or a fresh ``out_dir``) after changing a source's content.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from carat.atomic import publish, temp_path, write_text_atomic
from carat.errors import DataError
from carat.storage import ObjectPath, as_location
from carat.data.corpus.storage_config import TINY_OVERRIDES, StorageConfig  # noqa: F401  (re-exported)
from carat.data.sources.segment import EMOTIONS, FEATURE_DIMS, MODALITIES, SPLITS, Segment, SegmentRef

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.parquet"
SHARDS_FILE = "shards.parquet"
JOURNAL_DIR = ".journal"
SAMPLE_HASH = "xxh3_64"
"""The per-sample hash of the manifest's ``sample_hash`` column (named in its metadata, so it can change)."""
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
_TAR_BLOCK = 512
_SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("split", pa.string()),
    ("shard", pa.string()),
    ("position", pa.int32()),
    ("len_text", pa.int32()),
    ("len_visual", pa.int32()),
    ("len_audio", pa.int32()),
    ("labels", pa.list_(pa.uint8())),
    ("offset", pa.int64()),
    ("nbytes", pa.int64()),
    ("sample_hash", pa.uint64()),
])
OPTIONAL_MANIFEST_COLUMNS = frozenset({"sample_hash"})
"""Columns a manifest of an older carat may lack (it is still read; see :func:`sample_hashes_of`)."""
SHARD_SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("split", pa.string()),
    ("num_samples", pa.int32()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
])


@dataclass(frozen=True)
class ShardInfo:
    """One written shard: path relative to the corpus root, its split, sample count, size and sha256."""

    shard: str
    split: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class CorpusIndex:
    """What :func:`write_corpus` wrote: the manifest table, the shard list and per-split counts."""

    out_dir: Path
    manifest: pa.Table
    shards: list[ShardInfo]
    counts: dict[str, int]
    """Samples per split."""
    shards_reused: int = 0
    """Shards kept from an earlier, interrupted run after their checksum was verified."""
    dtype: str = "float16"


# ----------------------------------------------------------------------------------------------- keys


def tar_key(key: str) -> str:
    """The ``__key__`` of a segment in a tar: '%', '.' and '/' percent-encoded (reversible, collision-free)."""
    if not key:
        raise DataError("empty segment key")
    return key.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")


def shard_name(split: str, index: int) -> str:
    """Relative path of a split's ``index``-th shard."""
    return f"{split}/{split}-{index:06d}.tar"


# -------------------------------------------------------------------------------------- size planning


def _npy_nbytes(length: int, dim: int, dtype: np.dtype) -> int:
    """Exact size of ``np.save`` of a C-order [length, dim] array (format 1.0 header + data)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (length, dim)})
    return buf.tell() + length * dim * dtype.itemsize


def _member_bytes(size: int) -> int:
    """Bytes a regular member occupies in a tar: one header block plus data padded to 512."""
    return _TAR_BLOCK + _TAR_BLOCK * math.ceil(size / _TAR_BLOCK)


def _tar_file_bytes(member_bytes: int) -> int:
    """Final tar size: members, two end-of-archive blocks, padded to tarfile's 10 KiB record size."""
    return tarfile.RECORDSIZE * math.ceil((member_bytes + 2 * _TAR_BLOCK) / tarfile.RECORDSIZE)


def estimate_sample_bytes(lengths: tuple[int, int, int], dtype: str) -> int:
    """Bytes of one sample in a tar, from lengths alone (the json member is counted as one data block)."""
    np_dtype = np.dtype(dtype).newbyteorder("<")
    total = _member_bytes(_TAR_BLOCK)  # the json is ~300 bytes: one block
    for modality, length in zip(MODALITIES, lengths):
        total += _member_bytes(_npy_nbytes(int(length), FEATURE_DIMS[modality], np_dtype))
    return total


def plan_shards(refs: list[SegmentRef], storage: StorageConfig) -> list[list[SegmentRef]]:
    """Cut sorted refs into consecutive shards under ``shard_max_bytes`` / ``shard_max_samples``.

    Planned from lengths only, so a rerun knows every shard's contents before loading anything.
    """
    shards: list[list[SegmentRef]] = []
    current: list[SegmentRef] = []
    current_bytes = 0
    for ref in refs:
        size = estimate_sample_bytes(ref.lengths, storage.dtype)
        full = current and (
            _tar_file_bytes(current_bytes + size) > storage.shard_max_bytes
            or (storage.shard_max_samples is not None and len(current) >= storage.shard_max_samples))
        if full:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(ref)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


# ------------------------------------------------------------------------------------------ validation


def _checked_features(seg: Segment, ref: SegmentRef, storage_dtype: np.dtype) -> dict[str, np.ndarray]:
    """Each modality as a C-contiguous little-endian array of the storage dtype, or DataError naming the key."""
    out: dict[str, np.ndarray] = {}
    for modality, expected_len in zip(MODALITIES, ref.lengths):
        arr = np.asarray(getattr(seg, modality))
        dim = FEATURE_DIMS[modality]
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise DataError(f"segment {seg.key!r}: {modality} has shape {arr.shape}, expected [L, {dim}]")
        if arr.shape[0] != expected_len:
            raise DataError(
                f"segment {seg.key!r}: {modality} has {arr.shape[0]} frames but its ref says {expected_len}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise DataError(f"segment {seg.key!r}: {modality} dtype {arr.dtype} is not floating point")
        if arr.shape[0] == 0:  # the model cannot attend over nothing; sources skip and count such segments
            raise DataError(f"segment {seg.key!r}: {modality} is an empty sequence (0 frames); the source must "
                            "skip it (prepare counts such segments in the card)")
        finite = np.isfinite(arr)
        if not finite.all():
            bad = int(arr.size - finite.sum())
            raise DataError(f"segment {seg.key!r}: {modality} has {bad} non-finite values (NaN/inf); the "
                            "source must replace them before writing (see the card's NaN/inf policy)")
        if storage_dtype == np.float16 and arr.size:
            peak = float(np.abs(arr).max())
            if peak > FLOAT16_MAX:
                raise DataError(
                    f"segment {seg.key!r}: {modality} has |value| {peak:.6g} beyond the float16 range "
                    f"(+-{FLOAT16_MAX:g}); store with storage.dtype='float32' or rescale the features")
        stored = np.ascontiguousarray(arr, dtype=storage_dtype.newbyteorder("<"))
        if stored.size and not np.isfinite(stored).all():  # e.g. float64 beyond float32 range
            raise DataError(f"segment {seg.key!r}: {modality} overflows {storage_dtype} on conversion")
        out[modality] = stored
    return out


def _checked_meta(seg: Segment, ref: SegmentRef, split: str) -> dict:
    """The sample's json document, after checking key, split, labels, intensities and sentiment."""
    if seg.key != ref.key:
        raise DataError(f"loaded segment key {seg.key!r} does not match its ref {ref.key!r}")
    if seg.split != split:
        raise DataError(f"segment {seg.key!r}: split {seg.split!r} does not match the {split!r} list")
    labels = np.asarray(seg.labels)
    if labels.shape != (len(EMOTIONS),) or not np.isin(labels, (0, 1)).all():
        raise DataError(f"segment {seg.key!r}: labels {labels.tolist()} must be {len(EMOTIONS)} values in {{0, 1}}")
    intensities = np.asarray(seg.intensities, dtype=np.float64)
    if intensities.shape != (len(EMOTIONS),) or np.isinf(intensities).any():
        raise DataError(f"segment {seg.key!r}: intensities {intensities.tolist()} must be {len(EMOTIONS)} "
                        "finite values (NaN = unknown)")
    sentiment = seg.sentiment
    if sentiment is not None and not math.isfinite(float(sentiment)):
        raise DataError(f"segment {seg.key!r}: sentiment {sentiment!r} is not finite")
    return {
        "key": seg.key,
        "video_id": str(seg.video_id),
        "split": split,
        "labels": [int(x) for x in labels],
        "intensities": [None if math.isnan(x) else float(x) for x in intensities],
        "sentiment": None if sentiment is None else float(sentiment),
        "lengths": dict(zip(MODALITIES, (int(n) for n in ref.lengths))),
    }


# --------------------------------------------------------------------------------------- tar writing


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    """A regular-file header with every variable field fixed, so tars are byte-for-byte reproducible."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def _sample_members(key: str, meta: dict, feats: dict[str, np.ndarray]) -> list[tuple[str, bytes]]:
    """(member name, payload) of one sample in sorted name order."""
    k = tar_key(key)
    members = {f"{k}.{m}.npy": _npy_bytes(feats[m]) for m in MODALITIES}
    members[f"{k}.json"] = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return sorted(members.items())


def sample_hash(data: bytes | memoryview) -> int:
    """The :data:`SAMPLE_HASH` of one sample's bytes in its tar (its manifest byte range), as an unsigned int."""
    return xxhash.xxh3_64_intdigest(data)


def digest_shard(path: Path, spans: list[tuple[int, int]], chunk: int = 8 * 1024 * 1024) -> tuple[str, list[int]]:
    """The file's sha256 and the :func:`sample_hash` of each (offset, nbytes) span, in one sequential read.

    ``spans`` are the samples in file order, as the writer lays them out (one after another from offset 0)."""
    digest = hashlib.sha256()
    hashes: list[int] = []
    with open(path, "rb") as f:
        pos = 0
        for offset, nbytes in spans:
            if offset < pos:
                raise DataError(f"{path}: sample byte ranges overlap at offset {offset}")
            digest.update(f.read(offset - pos))  # nothing between samples in carat's layout; kept general
            data = f.read(nbytes)
            digest.update(data)
            hashes.append(sample_hash(data))
            pos = offset + len(data)
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest(), hashes


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    """Hex sha256 of a file, read in chunks (shards are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _write_shard(out_dir: Path, rel: str, split: str, refs: list[SegmentRef],
                 load: Callable[[SegmentRef], Segment], storage_dtype: np.dtype,
                 on_sample: Callable[[], None]) -> tuple[ShardInfo, list[dict]]:
    """Stream ``refs`` (loaded one at a time) into shard ``rel`` atomically; returns the shard and its rows."""
    path = out_dir / rel
    tmp = temp_path(path)
    rows: list[dict] = []
    try:
        with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for position, ref in enumerate(refs):
                seg = load(ref)
                feats = _checked_features(seg, ref, storage_dtype)
                meta = _checked_meta(seg, ref, split)
                start = tar.offset
                for name, payload in _sample_members(ref.key, meta, feats):
                    tar.addfile(_tar_member(name, len(payload)), io.BytesIO(payload))
                rows.append({"key": ref.key, "position": position, "offset": start,
                             "nbytes": tar.offset - start, "labels": meta["labels"]})
                on_sample()
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Hashed from the published file, not from what was meant to be written: the hashes vouch for the disk.
    sha256, hashes = digest_shard(path, [(row["offset"], row["nbytes"]) for row in rows])
    for row, digest in zip(rows, hashes):
        row["sample_hash"] = digest
    info = ShardInfo(shard=rel, split=split, num_samples=len(refs), bytes=path.stat().st_size, sha256=sha256)
    return info, rows


# ------------------------------------------------------------------------------------------- journal


def _fingerprint(rel: str, refs: list[SegmentRef], dtype: str) -> str:
    """What a shard must contain: format, dtype, name and its (key, lengths) list, hashed."""
    digest = hashlib.sha256(f"carat-shard-v{FORMAT_VERSION}|{dtype}|{rel}".encode())
    for ref in refs:
        digest.update(f"|{ref.key}:{ref.lengths[0]},{ref.lengths[1]},{ref.lengths[2]}".encode())
    return digest.hexdigest()


def _journal_path(out_dir: Path, rel: str) -> Path:
    return out_dir / JOURNAL_DIR / (Path(rel).stem + ".json")


def _write_json_atomic(path: Path, doc: dict) -> None:
    write_text_atomic(path, json.dumps(doc, sort_keys=True))


def _reusable_shard(out_dir: Path, rel: str, fingerprint: str, n: int) -> tuple[ShardInfo, list[dict]] | None:
    """The shard of an earlier run, if its journal matches the plan and the file matches its checksum."""
    path, journal = out_dir / rel, _journal_path(out_dir, rel)
    if not (path.is_file() and journal.is_file()):
        return None
    try:
        doc = json.loads(journal.read_text())
        if doc.get("fingerprint") != fingerprint or len(doc["rows"]) != n:
            return None
        if path.stat().st_size != doc["bytes"]:
            return None
        rows = doc["rows"]
        sha256, hashes = digest_shard(path, [(row["offset"], row["nbytes"]) for row in rows])
        if sha256 != doc["sha256"]:
            return None
        for row, digest in zip(rows, hashes):  # recomputed: journals of older carat versions have none
            row["sample_hash"] = digest
        info = ShardInfo(shard=rel, split=doc["split"], num_samples=n, bytes=doc["bytes"], sha256=doc["sha256"])
        return info, rows
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unreadable journal is simply not trusted


def _remove_stale(out_dir: Path, planned: set[str]) -> None:
    """Delete temp files and shards / journal entries of ours that the current plan does not contain."""
    for split in SPLITS:
        split_dir = out_dir / split
        if not split_dir.is_dir():
            continue
        for path in split_dir.iterdir():
            rel = f"{split}/{path.name}"
            if path.name.endswith(".tmp") or (_SHARD_NAME.match(path.name) and rel not in planned):
                path.unlink()
    journal_dir = out_dir / JOURNAL_DIR
    if journal_dir.is_dir():
        stems = {Path(rel).stem for rel in planned}
        for path in journal_dir.iterdir():
            if path.name.endswith(".tmp") or path.stem not in stems:
                path.unlink()


# --------------------------------------------------------------------------------------------- corpus


def _sorted_splits(refs_by_split: dict[str, list[SegmentRef]]) -> list[tuple[str, list[SegmentRef]]]:
    """Splits in SPLITS order, refs sorted by sort_key; rejects unknown splits, mislabelled refs, duplicates."""
    seen: set[str] = set()
    out = []
    for split in refs_by_split:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    for split in (s for s in SPLITS if s in refs_by_split):
        if not refs_by_split[split]:  # refused before anything is written: a split must hold samples
            raise DataError(f"split {split!r} has no segments: every split given to the writer needs at least one")
        refs = sorted(refs_by_split[split], key=lambda r: r.sort_key)
        for ref in refs:
            if ref.split != split:
                raise DataError(f"segment {ref.key!r} has split {ref.split!r} but is listed under {split!r}")
            if ref.key in seen:
                raise DataError(f"duplicate segment key {ref.key!r}")
            if len(ref.lengths) != 3 or any(int(n) < 0 for n in ref.lengths):
                raise DataError(f"segment {ref.key!r}: bad lengths {ref.lengths!r}")
            tar_key(ref.key)
            seen.add(ref.key)
        out.append((split, refs))
    return out


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm  # lazy: no import-time side effects / cost

    return tqdm(total=total, unit="seg", desc="writing shards",
                disable=not (enabled and sys.stderr.isatty()))


def _tables(manifest_rows: list[dict], shards: list[ShardInfo], dtype: str) -> tuple[pa.Table, pa.Table]:
    meta = {b"carat.format_version": str(FORMAT_VERSION).encode(), b"carat.storage_dtype": dtype.encode()}
    manifest = pa.Table.from_pylist(
        manifest_rows, schema=MANIFEST_SCHEMA.with_metadata({**meta, b"carat.sample_hash": SAMPLE_HASH.encode()}))
    shard_table = pa.Table.from_pylist([s.__dict__ for s in shards], schema=SHARD_SCHEMA.with_metadata(meta))
    return manifest, shard_table


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = temp_path(path)
    pq.write_table(table, tmp, compression="zstd")
    publish(tmp, path)


def write_corpus(refs_by_split: dict[str, list[SegmentRef]], load: Callable[[SegmentRef], Segment],
                 out_dir: Path, storage: StorageConfig, *, progress: bool = True,
                 resume: bool = True) -> CorpusIndex:
    """Write every split's segments, sorted by ``SegmentRef.sort_key``, into deterministic tar shards.

    ``load`` is called once per ref, in sorted order, one segment in memory at a time. Each loaded segment
    is checked (key, split, lengths vs its ref, feature dims, finite values, float16 range, labels 0/1):
    DataError names the key. Shards, ``shards.parquet`` and ``manifest.parquet`` are written atomically.
    With ``resume`` a shard completed (and journalled) by an interrupted earlier run is kept after its
    sha256 is verified; the result is byte-identical to an uninterrupted run either way.
    """
    out_dir = Path(out_dir)
    splits = _sorted_splits(refs_by_split)
    plans = {split: plan_shards(refs, storage) for split, refs in splits}
    planned = {shard_name(split, i) for split, shards in plans.items() for i in range(len(shards))}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in plans:
        (out_dir / split).mkdir(exist_ok=True)
    _remove_stale(out_dir, planned)
    # The final files must not advertise a corpus that is being rewritten.
    for name in (MANIFEST_FILE, SHARDS_FILE):
        (out_dir / name).unlink(missing_ok=True)

    storage_dtype = np.dtype(storage.dtype)
    manifest_rows: list[dict] = []
    shard_infos: list[ShardInfo] = []
    reused = 0
    total = sum(len(refs) for _, refs in splits)
    with _progress_bar(total, progress) as bar:
        for split, shards in plans.items():
            for index, refs in enumerate(shards):
                rel = shard_name(split, index)
                fingerprint = _fingerprint(rel, refs, storage.dtype)
                kept = _reusable_shard(out_dir, rel, fingerprint, len(refs)) if resume else None
                if kept is not None:
                    info, rows = kept
                    reused += 1
                    bar.update(len(refs))
                else:
                    _journal_path(out_dir, rel).unlink(missing_ok=True)
                    info, rows = _write_shard(out_dir, rel, split, refs, load, storage_dtype,
                                              on_sample=lambda: bar.update(1))
                    _write_json_atomic(_journal_path(out_dir, rel), {
                        "fingerprint": fingerprint, "split": split, "bytes": info.bytes,
                        "sha256": info.sha256, "rows": rows})
                shard_infos.append(info)
                for ref, row in zip(refs, rows):
                    manifest_rows.append({
                        "key": ref.key, "split": split, "shard": rel, "position": row["position"],
                        "len_text": ref.lengths[0], "len_visual": ref.lengths[1], "len_audio": ref.lengths[2],
                        "labels": row["labels"], "offset": row["offset"], "nbytes": row["nbytes"],
                        "sample_hash": row["sample_hash"]})
    manifest, shard_table = _tables(manifest_rows, shard_infos, storage.dtype)
    _write_parquet_atomic(shard_table, out_dir / SHARDS_FILE)
    _write_parquet_atomic(manifest, out_dir / MANIFEST_FILE)
    counts = {split: len(refs) for split, refs in splits}
    return CorpusIndex(out_dir=out_dir, manifest=manifest, shards=shard_infos, counts=counts,
                       shards_reused=reused, dtype=storage.dtype)


# ---------------------------------------------------------------------------------- reading / checks


def _parquet_source(path: Path | ObjectPath) -> Path | pa.BufferReader:
    """What pyarrow reads: a local path as is, an object fetched whole (one GET, retried by the storage layer;
    manifests are megabytes)."""
    return pa.BufferReader(path.read_bytes()) if isinstance(path, ObjectPath) else path


def _read_parquet(path: Path | ObjectPath, schema: pa.Schema, optional: frozenset[str] = frozenset()) -> pa.Table:
    if not path.is_file():
        raise DataError(f"{path}: missing; write the corpus first (python -m carat.data synth|prepare)")
    source = _parquet_source(path)
    try:
        table = pq.read_table(source)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: unreadable Parquet file ({exc})") from exc
    missing = [f.name for f in schema if f.name not in table.column_names and f.name not in optional]
    if missing:
        raise DataError(f"{path}: missing columns {missing}; was it written by this carat version?")
    return table


def read_manifest(out_dir: Path) -> pa.Table:
    """The corpus manifest (one row per sample); DataError naming the file if missing or malformed."""
    return _read_parquet(as_location(out_dir) / MANIFEST_FILE, MANIFEST_SCHEMA, OPTIONAL_MANIFEST_COLUMNS)


def sample_hashes_of(manifest: pa.Table, where: Path) -> np.ndarray | None:
    """The manifest's per-sample hashes as uint64, or None for a corpus written before they existed."""
    if "sample_hash" not in manifest.column_names:
        return None
    algorithm = (manifest.schema.metadata or {}).get(b"carat.sample_hash", b"").decode()
    if algorithm != SAMPLE_HASH:
        raise DataError(f"{where}: sample hashes of kind {algorithm!r}, this carat knows {SAMPLE_HASH!r}; "
                        "read it with the carat version that wrote it, or rewrite the corpus")
    column = manifest.column("sample_hash")
    if column.null_count:
        raise DataError(f"{where}: {column.null_count} samples have no sample_hash; rewrite the corpus")
    return column.to_numpy().astype(np.uint64)


def read_shard_table(out_dir: Path) -> list[ShardInfo]:
    """The per-shard table (path, split, samples, bytes, sha256) written beside the manifest."""
    table = _read_parquet(as_location(out_dir) / SHARDS_FILE, SHARD_SCHEMA)
    return [ShardInfo(**{k: row[k] for k in SHARD_SCHEMA.names}) for row in table.to_pylist()]


def storage_dtype(out_dir: Path) -> str:
    """The dtype the corpus' features were stored with (from the manifest metadata)."""
    meta = pq.read_schema(_parquet_source(as_location(out_dir) / MANIFEST_FILE)).metadata or {}
    return meta.get(b"carat.storage_dtype", b"float16").decode()


def _iter_tar_keys(path: Path) -> Iterator[tuple[str, int]]:
    """(sample tar key, member count) in file order, reading headers only."""
    current, count = None, 0
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            key = info.name.split(".", 1)[0]
            if key != current:
                if current is not None:
                    yield current, count
                current, count = key, 0
            count += 1
    if current is not None:
        yield current, count
