"""Crash-safe checkpoints: complete-or-absent tags, resume from the newest complete one, safe loading.

A DeepSpeed save writes one file per rank and state (model, optimizer shards), carat adds one RNG file per
rank, and the epoch's history record travels in the client state. A kill can stop that at any file. So:

1. DeepSpeed saves without its ``latest`` pointer; every rank writes its RNG file atomically and fsyncs what
   it wrote.
2. After a barrier, rank 0 writes ``carat_complete.json`` into the tag, atomically and fsync'ed: the name,
   size and sha256 of every file of the tag (from all ranks; each rank hashes its own files), the epoch, the
   step, the corpus fingerprint and the epoch's history record. Only then does it point ``latest`` at the tag.

A tag without that marker, or whose files do not match it (truncated, missing, or a same-size change its
hash sees), is incomplete. Resume takes the newest complete tag and says which newer ones it skipped and why;
a missing ``latest`` changes nothing. Export, evaluate, predict and ensemble scoring verify the tag they read
the same way. Checkpoints written before markers existed (no tag has one) resume from ``latest`` as before;
markers written before hashes existed (format 1) are checked by size only, with a note (:func:`unhashed_note`).

Hashing costs one read of what was just written (from the page cache) per save and one per verification:
sha256 (SHA-NI) runs at ~1.4 GB/s on an idle core; on a seed-preset tag (415 MiB) sealing took 0.35-0.56 s
against 0.54-1.17 s for the save itself on a busy 2-core VM (BENCHMARKS.md, 2026-12-07, checkpoint hashes).

Loading: DeepSpeed checkpoint files are pickles. carat loads every one with ``torch.load(weights_only=True)``
and registers, explicitly, the few non-tensor types DeepSpeed's state holds (:func:`deepspeed_safe_globals`),
so a crafted checkpoint cannot run code; it fails with an error naming the file and the type it wanted. Every
floating-point tensor loaded (weights, fp32 master copies, optimizer moments) must be finite: NaN saved by a
run that had diverged must not spread into the next one (:func:`require_finite`).

Saving: torch.save reports a failed write as ``RuntimeError: unexpected pos 128 vs 0`` with no errno; carat
saves through a file object that keeps the OSError (:func:`save_torch`, :func:`torch_save_reports_os_errors`),
so a full disk reads ``No space left on device while writing <file>``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from carat.atomic import fsync_dir, write_atomic, write_text_atomic
from carat.errors import CaratError

COMPLETE_FILE = "carat_complete.json"
"""Written last into a tag folder: the tag is complete iff it exists and every file it lists matches."""
HASH_KEY = "sha256"
"""The marker's map of file name -> hex digest (format 2). sha256: hardware-accelerated (SHA-NI) through
OpenSSL, faster here than blake2b, and the digest the shard table already uses."""
LATEST_FILE = "latest"
_EPOCH_TAG = re.compile(r"^epoch-(\d+)$")


class CheckpointError(CaratError):
    """A checkpoint cannot be written, read or resumed from; the message names the path and what to do."""


# -- saving ----------------------------------------------------------------------------------------------
def epoch_of_tag(tag: str) -> int | None:
    match = _EPOCH_TAG.match(tag)
    return int(match.group(1)) if match else None


def list_tag_files(tag_dir: Path) -> dict[str, int]:
    """Name -> size of the files in a tag folder (the marker and temporary files excluded)."""
    if not tag_dir.is_dir():
        return {}
    return {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir())
            if p.is_file() and p.name != COMPLETE_FILE and not p.name.endswith(".tmp")}


def fsync_files(tag_dir: Path, names: list[str]) -> None:
    """Flush files DeepSpeed wrote (it does not fsync) before the marker vouches for them."""
    for name in names:
        with open(tag_dir / name, "rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(tag_dir)


def file_sha256(path: Path, flush: bool = False) -> str:
    """The file's sha256; ``flush``: also fsync it (one open serves both)."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, HASH_KEY).hexdigest()
        if flush:
            os.fsync(handle.fileno())
    return digest


def hash_files(paths: list[Path], flush: bool = False) -> list[str]:
    """sha256 of each file, the files hashed in parallel (hashlib releases the GIL): a tag's model and
    optimizer files take the time of the larger one, not of both."""
    if len(paths) < 2:
        return [file_sha256(path, flush) for path in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(lambda path: file_sha256(path, flush), paths))


def seal_files(tag_dir: Path, names: list[str]) -> dict[str, str]:
    """Name -> sha256 of files this rank wrote into a tag, each flushed to disk (DeepSpeed does not fsync)
    before the marker vouches for them."""
    digests = dict(zip(names, hash_files([tag_dir / name for name in names], flush=True)))
    fsync_dir(tag_dir)
    return digests


class _KeepsOSError(io.RawIOBase):
    """A write-only file torch.save writes into, keeping the OSError a write raised: torch turns it into a
    RuntimeError without errno or file name (``unexpected pos 128 vs 0``)."""

    def __init__(self, handle: io.BufferedWriter) -> None:
        super().__init__()
        self.handle = handle
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise


def save_torch(obj: Any, path: Path | str, save: Callable[..., None] | None = None, **kwargs: Any) -> None:
    """``torch.save(obj, path)`` whose failed writes raise the OSError (errno, ``path``), not torch's
    RuntimeError. ``save``: the torch.save to call (the original one while :func:`torch_save_reports_os_errors`
    has replaced it)."""
    save = save or torch.save
    try:
        with open(path, "wb") as handle:
            writer = _KeepsOSError(handle)
            try:
                save(obj, writer, **kwargs)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise OSError(writer.error.errno, writer.error.strerror, os.fspath(path)) from None
    except OSError as err:
        if err.filename is None:  # a failed flush at close names no file either
            raise OSError(err.errno, err.strerror, os.fspath(path)) from None
        raise


@contextlib.contextmanager
def torch_save_reports_os_errors() -> Iterator[None]:
    """Within this block, ``torch.save`` to a path (as DeepSpeed's save_checkpoint calls it) goes through
    :func:`save_torch`, so a full disk is an OSError naming the file."""
    original = torch.save

    def reporting(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if args or not isinstance(f, (str, os.PathLike)):
            return original(obj, f, *args, **kwargs)
        save_torch(obj, f, original, **kwargs)

    torch.save = reporting
    try:
        yield
    finally:
        torch.save = original


def save_torch_atomic(obj: Any, path: Path) -> None:
    write_atomic(path, lambda tmp: save_torch(obj, tmp))


def write_completion_marker(tag_dir: Path, files: dict[str, int], info: dict[str, Any],
                            hashes: dict[str, str] | None = None) -> None:
    """Publish the marker (last, atomically, fsync'ed): the tag is complete from here on. ``hashes``: each
    file's sha256 (format 2); without them (format 1, as an older carat wrote) only sizes are vouched for."""
    doc: dict[str, Any] = {"format": 2 if hashes is not None else 1, "tag": tag_dir.name,
                           "files": dict(sorted(files.items()))}
    if hashes is not None:
        missing = sorted(set(files) - set(hashes))
        if missing:
            raise CheckpointError(f"{tag_dir}: no sha256 for {missing}: every rank must hash the files it wrote")
        doc[HASH_KEY] = {name: hashes[name] for name in sorted(files)}
    write_text_atomic(tag_dir / COMPLETE_FILE, json.dumps({**doc, **info}, indent=1, default=str) + "\n")


WRITTEN_HOOKS: list[Callable[[], None]] = []
"""Called on every rank once its files of a checkpoint are on disk, before rank 0 vouches for them: the mirror
of this host's copy of a run in object storage (carat.train.runsync) uploads them there, so the bucket never
holds a marker for files another host has not sent yet."""
COMMIT_HOOKS: list[Callable[[Path, str], None]] = []
"""Called on rank 0 once a checkpoint is committed (``latest`` points at a new tag, or best/ was swapped in):
the run's mirror uploads what vouches for it (carat.train.runsync)."""


FETCH_HOOKS: list[Callable[[Path], None]] = []
"""Called, on the ranks that keep a host's copy of a run in object storage, before they read a committed tag
folder: the mirror (carat.train.runsync) fetches the tag's files that other hosts wrote."""


def fetch_written_elsewhere(tag_dir: Path) -> None:
    for hook in list(FETCH_HOOKS):
        hook(tag_dir)


def files_written() -> None:
    for hook in list(WRITTEN_HOOKS):
        hook()


def committed(root: Path, tag: str) -> None:
    for hook in list(COMMIT_HOOKS):
        hook(root, tag)


def write_latest(root: Path, tag: str) -> None:
    write_text_atomic(root / LATEST_FILE, tag)
    committed(root, tag)


def clear_tag(tag_dir: Path) -> None:
    """Remove a tag about to be (re)written, marker first, so a crash mid-save never leaves an old marker
    vouching for new, partial files."""
    (tag_dir / COMPLETE_FILE).unlink(missing_ok=True)
    shutil.rmtree(tag_dir, ignore_errors=True)


def replace_dir(staging: Path, final: Path) -> None:
    """Swap a completely written ``staging`` folder in as ``final`` (the best model), keeping the old one
    until the new one is in place: a crash leaves the old or the new folder, see :func:`recover_dir`."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Undo a :func:`replace_dir` a crash interrupted: put the old folder back if the new one never arrived,
    and drop an unfinished staging folder."""
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.exists():
        os.replace(old, final)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(final.with_name(final.name + ".staging"), ignore_errors=True)


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0


@dataclass(frozen=True)
class KeptCopy:
    """What stays valid when a save into a staging folder fails: the folder it would have replaced."""

    path: Path
    what: str  # e.g. "best model"


@contextlib.contextmanager
def checkpoint_write_errors(root: Path, tag: str, kept_copy: KeptCopy | None = None) -> Iterator[None]:
    """Turn an OSError while saving (disk full, quota, permissions) into a CheckpointError naming the path,
    the space a checkpoint needs (the previous one's size) and the checkpoint that stays valid: the newest
    complete tag under ``root``, or ``kept_copy`` for a save into a staging folder (best/)."""
    try:
        yield
    except OSError as err:
        where = err.filename or (root / tag)
        kept = _what_stays_valid(root, tag, kept_copy)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            sizes = [_dir_bytes(root / p.name) for p in root.iterdir() if p.is_dir() and p.name != tag] \
                if root.is_dir() else []
            if kept_copy is not None:
                sizes.append(_dir_bytes(kept_copy.path))
            need = max(sizes, default=0)
            free = shutil.disk_usage(root).free if root.exists() else shutil.disk_usage(root.parent).free
            what = "No space left on device" if err.errno == errno.ENOSPC else "Disk quota exceeded"
            raise CheckpointError(
                f"{what} while writing {where} (checkpoint {root / tag}): a checkpoint needs about "
                f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; {kept}. Free space (or lower "
                f"train.keep_checkpoints) and rerun the same command") from err
        raise CheckpointError(f"cannot write checkpoint {root / tag} ({where}: {err.strerror or err}); {kept}") from err


def _what_stays_valid(root: Path, tag: str, kept_copy: KeptCopy | None) -> str:
    if kept_copy is not None:
        if (kept_copy.path / tag / COMPLETE_FILE).is_file() or (kept_copy.path / COMPLETE_FILE).is_file():
            return f"the previous {kept_copy.what} {kept_copy.path} stays valid"
        return f"there is no earlier {kept_copy.what}"
    previous = find_resume_point(root, quiet=True) if root.is_dir() else None
    if previous and previous.tag and previous.tag != tag:
        return f"the previous checkpoint {root / previous.tag} stays valid and a rerun resumes from it"
    return "no earlier complete checkpoint exists"


# -- resuming --------------------------------------------------------------------------------------------
def read_marker(tag_dir: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((tag_dir / COMPLETE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("files"), dict) else None


def incomplete_reason(tag_dir: Path) -> str | None:
    """Why a tag cannot be resumed from or loaded (None: complete and, where its marker has hashes, every
    file's content is what was saved). Sizes first: a torn file is named without reading it."""
    if not (tag_dir / COMPLETE_FILE).is_file():
        return "no completion marker (the save was interrupted)"
    marker = read_marker(tag_dir)
    if marker is None:
        return f"unreadable {COMPLETE_FILE}"
    present = list_tag_files(tag_dir)
    for name, size in marker["files"].items():
        if name not in present:
            return f"{name} is missing"
        if present[name] != int(size):
            return f"{name} is {present[name]} bytes, the marker says {size} (truncated or overwritten)"
    return _content_mismatch(tag_dir, marker)


def _content_mismatch(tag_dir: Path, marker: dict[str, Any]) -> str | None:
    hashes = marker.get(HASH_KEY)
    if not isinstance(hashes, dict):
        return None  # format 1: sizes only (see unhashed_note)
    names = list(marker["files"])
    unhashed = [name for name in names if not isinstance(hashes.get(name), str)]
    if unhashed:
        return f"{COMPLETE_FILE} has no sha256 for {unhashed[0]}"
    for name, digest in zip(names, hash_files([tag_dir / name for name in names])):
        if digest != hashes[name]:
            return (f"{name} does not match its sha256 in {COMPLETE_FILE} (same size, other bytes: damaged on "
                    "disk or in a copy after the save)")
    return None


def unhashed_note(tag_dir: Path) -> str | None:
    """A note for a complete tag whose marker an older carat wrote without content hashes: only its sizes
    could be checked. None for a hashed marker (or no marker)."""
    marker = read_marker(tag_dir)
    if marker is None or isinstance(marker.get(HASH_KEY), dict):
        return None
    return (f"{tag_dir} was written by an older carat: its {COMPLETE_FILE} holds no content hashes, so only "
            "file sizes were checked")


def tag_damage(tag_dir: Path) -> str | None:
    """:func:`incomplete_reason` of a tag with nothing to fall back to (a best model, a tag asked for by
    name); a tag of a carat from before markers is taken as it is."""
    if not (tag_dir / COMPLETE_FILE).exists() and is_legacy_tag(tag_dir):
        return None
    return incomplete_reason(tag_dir)


def require_intact(tag_dir: Path, what: str = "checkpoint") -> None:
    """CheckpointError naming the file when the tag ``tag_dir`` is incomplete or changed since its save."""
    reason = tag_damage(tag_dir)
    if reason is not None:
        raise CheckpointError(f"{what} {tag_dir} is damaged or incomplete: {reason}; restore it from a copy "
                              "or retrain it")


def is_legacy_tag(tag_dir: Path) -> bool:
    """A tag an older carat wrote (it has no marker by design), told apart from a torn save of this carat:
    its model-states file loads and its client state lacks the ``record`` key this carat always saves."""
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        return False
    try:
        state = load_checkpoint_file(files[0])
    except CheckpointError:
        return False
    return isinstance(state, dict) and "epoch" in state and "record" not in state


@dataclass
class ResumePoint:
    """Where to resume: ``root`` (a DeepSpeed save dir) and ``tag``; None = start fresh."""

    root: Path
    tag: str | None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(tag, reason) of newer tags that were not complete."""
    legacy: bool = False
    """No tag has a marker (written before markers existed): ``latest`` is trusted as before."""

    def warning(self) -> str | None:
        if not self.skipped:
            return None
        said = "; ".join(f"{self.root / tag}: {reason}" for tag, reason in self.skipped)
        target = f"resuming from {self.root / self.tag}" if self.tag else "no complete checkpoint: starting fresh"
        return f"skipped incomplete checkpoint(s) {said}; {target}"

    def note(self) -> str | None:
        """Said when the tag resumed from was only checked by size (its marker predates hashes)."""
        return unhashed_note(self.root / self.tag) if self.tag else None


def candidate_tags(root: Path) -> list[str]:
    """Tag folders of a save dir, newest first (epoch tags by number, then any other tag with a marker)."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
            and (epoch_of_tag(p.name) is not None or (p / COMPLETE_FILE).exists())]
    return sorted(tags, key=lambda t: (epoch_of_tag(t) is not None, epoch_of_tag(t) or 0, t), reverse=True)


def find_resume_point(root: Path, quiet: bool = False) -> ResumePoint | None:
    """The newest complete tag of ``root``; None when ``root`` holds no checkpoint at all.

    CheckpointError when tags exist, none is complete and one of them had been completed (its files were
    damaged afterwards): starting over would silently throw that training away."""
    tags = candidate_tags(root)
    latest = (root / LATEST_FILE).read_text().strip() if (root / LATEST_FILE).is_file() else None
    if not tags and latest is None:
        return None
    if not any((root / t / COMPLETE_FILE).exists() for t in tags):
        # Written before completion markers existed: trust `latest` as before, or the newest tag with
        # DeepSpeed's model file when `latest` was deleted (never a silent restart from epoch 0).
        if latest and (root / latest).is_dir():
            return ResumePoint(root, latest, legacy=True)
        legacy = next((t for t in tags if is_legacy_tag(root / t)), None)
        if legacy is not None:
            return ResumePoint(root, legacy, legacy=True)
    skipped: list[tuple[str, str]] = []
    for tag in tags:
        reason = incomplete_reason(root / tag)
        if reason is None:
            return ResumePoint(root, tag, skipped)
        skipped.append((tag, reason))
    damaged = [(t, r) for t, r in skipped if (root / t / COMPLETE_FILE).exists()]
    if damaged and not quiet:
        said = "; ".join(f"{root / t}: {r}" for t, r in damaged)
        raise CheckpointError(f"every checkpoint in {root} is damaged ({said}); restore them from a copy, or move "
                              f"{root} away to start this run over")
    return ResumePoint(root, None, skipped)


# -- what may change on resume ---------------------------------------------------------------------------
RESUMABLE_CHANGES: tuple[str, ...] = (
    "preset", "synth.", "storage.", "prepare.", "tune.", "loader.num_workers",
    "train.launcher", "train.num_workers", "train.shard_dir", "train.synth_if_missing", "train.storage_path",
    "train.run_name", "train.max_failures", "train.keep_checkpoints", "train.log_every", "train.select_metric",
    "train.tune_thresholds", "train.use_gpu", "train.max_nonfinite_steps", "train.loss_explosion_factor",
    "train.verify_corpus", "train.ray_log_level",
)
"""Config keys (or section prefixes) a resumed run may change: where things live, how it is launched and
logged. Anything else (model size, loss, optimizer and schedule, epochs, batch plan, seed) changes what the
saved state means, so a resume that changes it is refused. (The world size is checked on its own.)"""


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every key that differs and may not change on resume. A key only one side
    knows (a version added or removed it) is not compared."""
    old, new = _flatten(saved), _flatten(current)
    allowed = lambda key: any(key == a or (a.endswith(".") and key.startswith(a)) for a in RESUMABLE_CHANGES)
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in sorted(set(old) & set(new))
            if old[key] != new[key] and not allowed(key)]


def corpus_fingerprint(shard_dir: Path) -> str | None:
    """A short hash of the corpus' shard table (each shard's path and sha256): equal iff the same shards."""
    import hashlib

    from carat.data.corpus.shards import read_shard_table

    try:
        shards = read_shard_table(shard_dir)
    except CaratError:
        return None
    digest = hashlib.sha256()
    for info in sorted(shards, key=lambda s: s.shard):
        digest.update(f"{info.shard}:{info.sha256}\n".encode())
    return digest.hexdigest()[:16]


def ray_checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Ray Train's ``checkpoint_*`` folders of ``run_dir``, oldest first (their names are timestamps)."""
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def complete_point(root: Path) -> ResumePoint | None:
    """The newest complete tag of a save dir, or None when it has none (a damaged one is skipped, quietly)."""
    point = find_resume_point(root, quiet=True)
    return point if point is not None and point.tag is not None else None


def newest_checkpoint(run_dir: Path) -> ResumePoint | None:
    """The complete checkpoint a rerun of ``run_dir`` would resume from: Ray's newest intact ``checkpoint_*``
    (Ray registers one only after carat's save completed; :func:`usable_ray_checkpoint` skips a damaged one) or
    the newest complete tag in ``checkpoints/``."""
    for directory in reversed(ray_checkpoint_dirs(run_dir)):
        point = complete_point(directory)
        if point is not None:
            return point
    return complete_point(run_dir / "checkpoints")


def damaged_ray_checkpoint(run_dir: Path) -> str | None:
    """Why Ray's newest ``checkpoint_*`` of ``run_dir`` cannot be resumed from (None: it can, or there is none).
    Ray Train hands its workers its newest registered checkpoint only; :func:`usable_ray_checkpoint` makes
    them fall back to the newest earlier one that is intact."""
    ray_dirs = ray_checkpoint_dirs(run_dir)
    if not ray_dirs:
        return None
    newest = ray_dirs[-1]
    damaged = [(tag, incomplete_reason(newest / tag)) for tag in candidate_tags(newest)
               if (newest / tag / COMPLETE_FILE).exists()]
    if not damaged or any(reason is None for _, reason in damaged):
        return None
    tag, reason = damaged[0]
    return f"Ray's newest checkpoint {newest / tag} is damaged: {reason}"


def earlier_ray_checkpoint(run_dir: Path, than: Path | None = None) -> Path | None:
    """The newest intact ``checkpoint_*`` of ``run_dir`` older than ``than`` (default: older than the newest)."""
    ray_dirs = ray_checkpoint_dirs(run_dir)
    limit = than.name if than is not None else (ray_dirs[-1].name if ray_dirs else "")
    return next((d for d in reversed(ray_dirs) if d.name < limit and complete_point(d) is not None), None)


def usable_ray_checkpoint(given: Path, run_dir: Path) -> Path:
    """The checkpoint a Ray worker resumes from: the one Ray handed it (``given``, its newest), or, when that one
    is damaged, the newest intact earlier one of the run (a warning says so); ``given`` when there is none (the
    loop then names the damage)."""
    if complete_point(given) is not None:
        return given
    earlier = earlier_ray_checkpoint(run_dir, than=given)
    if earlier is None:
        return given
    if os.environ.get("RANK", "0") == "0":
        print(f"[carat] warning: Ray's newest checkpoint {given.name} is damaged; resuming from the earlier "
              f"{earlier}", file=sys.stderr, flush=True)
    return earlier


def resume_refusal(saved: dict[str, Any], current_config: dict[str, Any], corpus: str | None, world: int | None,
                   where: Path, shard_dir: Path, saved_config_file: Path) -> str | None:
    """Why the checkpoint ``where`` (its client state ``saved``) cannot resume under ``current_config`` with
    ``world`` ranks (None: not known yet) on the corpus with fingerprint ``corpus``; None when it can. Used by
    the driver before any worker starts and by each worker before it loads."""
    problems = config_mismatches(saved.get("config", {}), current_config)
    if saved.get("corpus") and corpus and saved["corpus"] != corpus:
        problems.insert(0, f"corpus: shards {saved['corpus']} -> {corpus} ({shard_dir} holds other shards than "
                           "the run trained on)")
    saved_world = saved.get("world_size")
    wrong_world = world is not None and saved_world is not None and int(saved_world) != world
    if not problems and not wrong_world:
        return None
    parts = []
    if wrong_world:  # ZeRO shards optimizer state by rank: a checkpoint only loads into the world that wrote it
        parts.append(f"{where} was written by {saved_world} ranks and this run has {world}: resume with "
                     f"{saved_world} workers (--train.num_workers={saved_world})")
    if problems:
        parts.append(f"{'also ' if wrong_world else f'cannot resume {where} with this configuration; '}these "
                     f"differ from the saved run: {'; '.join(problems)}")
    return (f"{'; '.join(parts)}. Rerun with the saved values (see {saved_config_file}) or start a new "
            "--run-name")


# -- safe loading ----------------------------------------------------------------------------------------
def deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types found in DeepSpeed 0.19 checkpoint files, allowed explicitly for weights_only
    loading: ZeRO's fragment addresses and loss-scaler bookkeeping, and the enums/containers it pickles."""
    import collections

    allowed: list[Any] = [collections.OrderedDict, collections.defaultdict, dict, list, set, tuple]
    candidates = (
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
        ("deepspeed.checkpoint.constants", ()),
    )
    import importlib

    for module_name, names in candidates:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # a DeepSpeed version without that module: nothing to allow from it
            continue
        allowed += [getattr(module, n) for n in names if hasattr(module, n)]
    return allowed


def nonfinite_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the floating-point tensors in a loaded checkpoint object (nested dicts, lists, tuples)
    that hold NaN or inf. DeepSpeed's bookkeeping objects are not looked into: they hold no weights."""
    if torch.is_tensor(obj):
        return [] if _all_finite(obj) else [prefix or "<tensor>"]
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    bad: list[str] = []
    for key, value in items:
        bad += nonfinite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    return bad


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite. A NaN or inf anywhere makes the sum non-finite, so a finite sum
    settles it in one pass without a boolean copy (20x faster than ``isfinite().all()`` on a 300 MiB
    optimizer file); only a non-finite sum (or one that overflowed) needs the elementwise check."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def require_finite(obj: Any, path: Path | str) -> Any:
    """``obj`` (loaded from ``path``), or a CheckpointError naming the file and its non-finite tensors."""
    bad = nonfinite_tensors(obj)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"{path}: non-finite values (NaN/inf) in {', '.join(bad[:3])}{more}: the run had "
                              "diverged before this save, or the file was altered; resume from an earlier "
                              "checkpoint (move this tag away) or retrain with a lower optim.lr")
    return obj


def load_checkpoint_file(path: Path) -> Any:
    """``torch.load`` of one checkpoint file with ``weights_only=True``: no code in it can run. A torn file,
    one that asks for a type carat does not allow, or one holding non-finite tensors gives a CheckpointError
    naming the file."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file missing") from None
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError ... for such files
        raise load_refusal(path, err) from None
    return require_finite(loaded, path)


def load_refusal(path: Any, err: Exception) -> CheckpointError:
    """The one-line error for a checkpoint file that a weights-only load refused or could not read."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err).splitlines()[0]) if str(err) else type(err).__name__
    if "weights_only" in str(err) or "global" in str(err).lower():
        return CheckpointError(f"{path}: refused to load: it needs a type carat does not allow in a "
                               f"checkpoint ({text[:300]}); a carat checkpoint never does, so it was "
                               "written by something else or tampered with")
    return CheckpointError(f"{path}: unreadable checkpoint file ({type(err).__name__}: {text[:300]}); it is "
                           "truncated or not a checkpoint")


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Within this block, ``torch.load`` (as DeepSpeed's loaders call it) loads with ``weights_only=True`` and
    DeepSpeed's safe globals: DeepSpeed 0.19 passes ``weights_only=False`` itself. What it loads must be
    finite (:func:`require_finite`): a resume or a best model never starts from NaN weights or moments."""
    original = torch.load

    def guarded(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        source = args[0] if args else kwargs.get("f", "<checkpoint file>")
        try:
            loaded = original(*args, **kwargs)
        except pickle.UnpicklingError as err:  # inside DeepSpeed's loaders: name the file, one line
            raise load_refusal(source, err) from None
        return require_finite(loaded, source)

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        torch.load = guarded
        try:
            yield
        finally:
            torch.load = original


# -- reading a DeepSpeed checkpoint back (export, evaluate, predict, the resume checks) ------------------------
MODULE_PREFIX = "model."  # the training wrapper holds CARAT as `.model` next to the loss


def read_client_state(save_dir: Path, tag: str) -> dict[str, Any]:
    """The model-states file of rank 0 (DeepSpeed's state plus carat's client state), loaded with
    ``weights_only=True``: a crafted checkpoint cannot run code."""
    files = sorted((save_dir / tag).glob("*model_states.pt"))
    if not files:
        raise CaratError(f"{save_dir / tag} has no *model_states.pt file")
    state = load_checkpoint_file(files[0])
    if not isinstance(state, dict):
        raise CaratError(f"{files[0]} is not a DeepSpeed model-states file (it holds a {type(state).__name__})")
    return state


def check_complete(save_dir: Path, tag: str) -> None:
    """A torn or damaged tag (a save that a kill interrupted, a truncated file, bytes that no longer match the
    marker's sha256) is an error naming the file. Checkpoints from before completion markers (no tag in
    ``save_dir`` has one) are taken as they are; markers from before hashes are checked by size, with a note."""
    tag_dir = save_dir / tag
    has_markers = (tag_dir / COMPLETE_FILE).exists() or any(save_dir.glob(f"*/{COMPLETE_FILE}"))
    reason = incomplete_reason(tag_dir) if has_markers else None
    if reason is None:
        if has_markers and unhashed_note(tag_dir):
            print(f"[carat] note: {unhashed_note(tag_dir)}", file=sys.stderr, flush=True)
        return
    if tag == "best":  # a best model has nothing to fall back to
        raise CaratError(f"best model {tag_dir} is damaged or incomplete: {reason}; restore it from a copy, or "
                         f"score one epoch's checkpoint with --checkpoint {save_dir.parent / 'checkpoints'} "
                         "--tag epoch-NNN")
    raise CaratError(f"{tag_dir} is a damaged or incomplete checkpoint ({reason}); pick another tag with --tag "
                     f"(tags: {', '.join(sorted(p.name for p in save_dir.iterdir() if p.is_dir()))})")


def consolidate(save_dir: Path, tag: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(CARAT state dict in fp32, the checkpoint's client state) from a sharded DeepSpeed checkpoint."""
    check_complete(save_dir, tag)
    state = read_client_state(save_dir, tag)
    if list((save_dir / tag).glob("*optim_states.pt")) and not _is_stage0(state):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with safe_torch_load():
                full = get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
        except CaratError:
            raise
        except Exception as err:  # a damaged shard file: DeepSpeed raises whatever torch.load raised
            raise CheckpointError(f"{save_dir / tag}: cannot merge the ZeRO shards ({type(err).__name__}: "
                                  f"{str(err)[:300]})") from None
    else:  # ZeRO stage 0 keeps the whole module in the model-states file
        full = state["module"]
    weights = {k[len(MODULE_PREFIX):]: v.float() if v.is_floating_point() else v
               for k, v in full.items() if k.startswith(MODULE_PREFIX)}
    if not weights:
        raise CaratError(f"{save_dir / tag}: no '{MODULE_PREFIX}*' weights found; is this a carat checkpoint?")
    from carat.train.averaging import averaged_weights

    average = averaged_weights(state)  # train.ema_decay: the weights the run evaluated
    unknown = sorted(set(average) - set(weights))
    if unknown:
        raise CaratError(f"{save_dir / tag}: its weight average names parameters the model lacks ({unknown[:3]})")
    return {**weights, **average}, state


def _is_stage0(state: dict[str, Any]) -> bool:
    return int(state.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)) == 0
