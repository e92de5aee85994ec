"""``python -m carat.data verify DIR``: check a corpus against its manifest and report every problem found.

Two depths:

- ``quick`` (what training runs at start): the manifest and shard table agree (every shard listed, sample
  counts and positions), every shard file exists with its recorded size, and at each sample's manifest
  offset there is a tar header naming that sample. Reads 512 bytes per sample: seconds for CMU-MOSEI.
  A manifest from another corpus shows up here as a manifest/shard mismatch naming shard and key.
- ``full``: the quick checks, plus each shard's sha256 against the shard table, each sample's bytes against
  the hash recorded in the manifest (naming every changed sample), and every sample decoded: its members,
  ``.npy`` arrays of the manifest's shape (non-empty), finite values, labels 0/1 equal to the manifest's,
  intensities in [0, 3]. Finite garbage in a payload fails the sha256 and the sample's hash.

Training runs ``quick`` at start; the loader checks every sample's hash as it reads it (see
:mod:`carat.data.loader.tar_reader`), so payload damage that ``quick`` cannot see still stops a run naming the sample.

Each problem names the shard and, where there is one, the sample key. The report says what was checked.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from carat.data.sources.segment import MODALITIES
from carat.errors import DataError
from carat.storage import ObjectPath, as_location, with_retries

Depth = Literal["quick", "full"]
MAX_INTENSITY = 3.0  # CMU-MOSEI emotion intensities are means of 0..3 ratings


@dataclass(frozen=True)
class Problem:
    shard: str
    key: str | None
    what: str

    def __str__(self) -> str:
        return f"{self.shard}{f' [{self.key}]' if self.key else ''}: {self.what}"


@dataclass
class VerifyReport:
    corpus: Path | ObjectPath
    depth: Depth
    shards: int = 0
    samples: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the check could not cover (e.g. no per-sample hashes in an older corpus); not problems."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, limit: int = 50) -> str:
        head = (f"{self.corpus}: {self.depth} check of {self.shards} shards, {self.samples} samples: "
                + ("OK" if self.ok else f"{len(self.problems)} problem(s)"))
        lines = [head] + [f"  note: {n}" for n in self.notes] + [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        if not self.ok:
            lines.append("Rebuild the corpus with the command that made it (`python -m carat.data prepare|synth "
                         "--out DIR`: it rewrites what does not verify).")
        return "\n".join(lines)


def _check_tables(out_dir: Path, report: VerifyReport):
    """The manifest rows grouped by shard, after checking them against the shard table (problems recorded)."""
    from carat.data.corpus.shards import MANIFEST_FILE, SHARDS_FILE, read_manifest, read_shard_table, sample_hashes_of

    try:
        manifest = read_manifest(out_dir)
        shards = read_shard_table(out_dir)
    except DataError as err:
        report.problems.append(Problem(MANIFEST_FILE, None, str(err)))
        return None, []
    columns = ["key", "shard", "position", "len_text", "len_visual", "len_audio", "labels", "offset", "nbytes"]
    try:
        hashed = sample_hashes_of(manifest, out_dir / MANIFEST_FILE) is not None
    except DataError as err:
        report.problems.append(Problem(MANIFEST_FILE, None, str(err)))
        return None, []
    if not hashed:
        report.notes.append("no per-sample hashes (a corpus written by an older carat): damaged payloads are found "
                            "by the full check's sha256 and decoding only; rewrite the corpus to add them")
    rows: dict[str, list[dict]] = {}
    for row in manifest.select(columns + (["sample_hash"] if hashed else [])).to_pylist():
        rows.setdefault(row["shard"], []).append(row)
    listed = {info.shard for info in shards}
    for shard in sorted(set(rows) - listed):
        report.problems.append(Problem(shard, rows[shard][0]["key"], f"{MANIFEST_FILE} lists samples in a shard "
                                       f"{SHARDS_FILE} does not know: the manifest belongs to another corpus"))
    for info in shards:
        mine = rows.get(info.shard, [])
        positions = [r["position"] for r in mine]
        if len(mine) != info.num_samples or positions != list(range(len(mine))):
            report.problems.append(Problem(
                info.shard, mine[0]["key"] if mine else None,
                f"{MANIFEST_FILE} lists {len(mine)} samples (positions {positions[:3]}...), {SHARDS_FILE} "
                f"{info.num_samples}: manifest and shards do not match (a manifest from another corpus?)"))
    report.shards, report.samples = len(shards), manifest.num_rows
    return rows, shards


def _check_unlisted(out_dir: Path, shards: list, report: VerifyReport) -> None:
    """A tar in a split folder that the shard table does not list: a stale or foreign file beside the corpus
    (the loader never reads it, but a corpus is one writer's output)."""
    from carat.data.corpus.shards import SHARDS_FILE

    listed = {info.shard for info in shards}
    for split in sorted({info.split for info in shards}):
        for path in sorted((out_dir / split).glob("*.tar")):
            if f"{split}/{path.name}" not in listed:
                report.problems.append(Problem(f"{split}/{path.name}", None, f"shard not listed in {SHARDS_FILE} "
                                               "(a stale or foreign file)"))


def _read_headers(path: Path | ObjectPath, offsets: list[int]) -> list[bytes]:
    """The 512 bytes at each offset: preads of a local file, or concurrent ranged GETs of an object."""
    if isinstance(path, ObjectPath):
        return with_retries(path.url, "read tar headers", lambda: path.fs.cat_ranges(
            [path.path] * len(offsets), offsets, [o + 512 for o in offsets], on_error="raise"))
    with open(path, "rb") as handle:
        return [os.pread(handle.fileno(), 512, offset) for offset in offsets]


@contextlib.contextmanager
def _local_copy(path: Path | ObjectPath) -> Iterator[Path]:
    """``path`` itself when local; an object downloaded once into a temporary file (the full check reads every
    byte twice: the sha256 and the tar walk)."""
    if not isinstance(path, ObjectPath):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="carat-verify-") as tmp:
        local = Path(tmp) / path.name
        path.download_to(local)
        yield local


def _check_headers(path: Path | ObjectPath, rel: str, rows: list[dict], report: VerifyReport) -> None:
    """At each manifest offset, a ustar header whose member name starts with the sample's tar key."""
    from carat.data.corpus.shards import tar_key

    headers = _read_headers(path, [int(row["offset"]) for row in rows])
    for row, header in zip(rows, headers):
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        want = tar_key(row["key"])
        if len(header) < 512 or header[257:262] != b"ustar":
            report.problems.append(Problem(rel, row["key"], f"no tar header at its manifest offset "
                                           f"{row['offset']}: manifest and shard do not match"))
        elif name.split(".", 1)[0] != want:
            report.problems.append(Problem(rel, row["key"], f"the header at offset {row['offset']} is member "
                                           f"{name!r}, not this sample: manifest and shard do not match"))


def _sample_problems(sample: dict, row: dict) -> list[str]:
    """What is wrong with one decoded sample (empty: nothing)."""
    from carat.data.loader.collate import decode_sample

    lengths = (row["len_text"], row["len_visual"], row["len_audio"])
    try:
        decoded = decode_sample(sample, row["key"], lengths)
    except (ValueError, KeyError, TypeError) as err:
        return [f"undecodable: {err}"]
    found = []
    for modality in MODALITIES:
        arr = decoded.features[modality]
        if arr.shape[0] == 0:
            found.append(f"{modality} is an empty sequence")
        bad = int(arr.size - np.isfinite(arr).sum())
        if bad:
            found.append(f"{modality} has {bad} non-finite values")
    if not np.isin(decoded.labels, (0, 1)).all():
        found.append(f"labels {decoded.labels.tolist()} are not 0/1")
    elif list(decoded.labels) != list(row["labels"]):
        found.append(f"labels {decoded.labels.tolist()} differ from the manifest's {list(row['labels'])}")
    known = decoded.intensities[~np.isnan(decoded.intensities)]
    if known.size and ((known < 0).any() or (known > MAX_INTENSITY).any()):
        found.append(f"intensities {decoded.intensities.tolist()} outside [0, {MAX_INTENSITY:g}]")
    return found


def _check_samples(path: Path, rel: str, rows: list[dict], report: VerifyReport) -> None:
    """Every sample of a shard, in order, decoded and checked against its manifest row."""
    from carat.data.corpus.shards import tar_key

    by_key = {tar_key(r["key"]): r for r in rows}
    groups: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                key, _, suffix = info.name.partition(".")
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                handle = tar.extractfile(info)
                groups[key][suffix] = handle.read() if handle else b""
    except (tarfile.TarError, OSError, EOFError) as err:
        report.problems.append(Problem(rel, None, f"unreadable tar after {len(order)} samples: {err}"))
    expected = [tar_key(r["key"]) for r in rows]
    if order != expected[: len(order)] or len(order) != len(expected):
        missing = [k for k in expected if k not in groups]
        extra = [k for k in order if k not in by_key]
        report.problems.append(Problem(rel, (missing or extra or [None])[0], f"holds {len(order)} samples, the "
                                       f"manifest lists {len(expected)} (missing {missing[:3]}, unlisted {extra[:3]})"))
    for key in order:
        row = by_key.get(key)
        if row is None:
            continue
        for what in _sample_problems(groups[key], row):
            report.problems.append(Problem(rel, row["key"], what))


def _check_digests(path: Path, info, rows: list[dict], report: VerifyReport) -> None:
    """The shard's sha256 against the shard table and each sample's bytes against its manifest hash, from one
    read of the file (rows in file order, as the manifest lists them)."""
    from carat.data.corpus.shards import digest_shard

    ordered = sorted(rows, key=lambda r: r["offset"])
    try:
        digest, hashes = digest_shard(path, [(int(r["offset"]), int(r["nbytes"])) for r in ordered])
    except DataError as err:
        report.problems.append(Problem(info.shard, None, str(err)))
        return
    if digest != info.sha256:
        report.problems.append(Problem(info.shard, None, f"sha256 {digest[:16]}... differs from the shard "
                                       f"table's {info.sha256[:16]}... (the payload changed)"))
    for row, got in zip(ordered, hashes):
        if "sample_hash" in row and got != row["sample_hash"]:
            report.problems.append(Problem(info.shard, row["key"], (
                f"bytes differ from the hash recorded at write time (offset {row['offset']}, {row['nbytes']} "
                "bytes): the sample was damaged or modified since")))


def verify_corpus(out_dir: Path | ObjectPath | str, depth: Depth = "full") -> VerifyReport:
    """Check ``out_dir`` (a directory or an object-store URL) at ``depth`` (see the module docstring); every
    problem is in the report."""
    out_dir = as_location(out_dir)
    report = VerifyReport(out_dir, depth)
    rows, shards = _check_tables(out_dir, report)
    if rows is None:
        return report
    if isinstance(out_dir, Path):
        _check_unlisted(out_dir, shards, report)
    for info in shards:
        path, mine = out_dir / info.shard, rows.get(info.shard, [])
        if not path.is_file():
            report.problems.append(Problem(info.shard, None, "shard file missing"))
            continue
        size = path.stat().st_size
        if size != info.bytes:
            report.problems.append(Problem(info.shard, None, f"{size} bytes, the shard table says {info.bytes} "
                                           "(truncated or replaced)"))
            continue
        _check_headers(path, info.shard, mine, report)
        if depth == "full":
            with _local_copy(path) as local:
                _check_digests(local, info, mine, report)
                _check_samples(local, info.shard, mine, report)
    return report


def require_verified(out_dir: Path, depth: Depth) -> None:
    """DataError with the report when ``out_dir`` does not verify at ``depth`` (training's start check)."""
    report = verify_corpus(out_dir, depth)
    if not report.ok:
        raise DataError(report.format(limit=10))


__all__ = ["Problem", "VerifyReport", "verify_corpus", "require_verified"]
