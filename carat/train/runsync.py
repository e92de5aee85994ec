"""Run directories in object storage (``--train.storage_path=s3://bucket/runs``) for every launcher.

Training writes its run directory on local disk as always (checkpoints, metrics, results, plots) into a staging
directory named after the host and the run's URL; :class:`RunSync`, in the process that owns the run (rank 0, or
the Ray driver), mirrors it to ``<storage_path>/<run_name>``: whenever a checkpoint is committed (synchronously,
through :data:`carat.train.checkpoint.COMMIT_HOOKS`, when the training loop runs in that process; polled every
few seconds otherwise, as for Ray's workers) and once more when the run ends. A rerun of the same run name on
any machine first downloads the run from the bucket, so it resumes from the last checkpoint that reached it.
Under Ray, Ray Train keeps its own checkpoints in the bucket (``storage_filesystem``); carat mirrors the rest.

Order makes the bucket's copy consistent at every moment: what vouches for a checkpoint (``checkpoints/latest``,
each tag's completion marker) is read *before* the files are listed and uploaded *after* them, so the bucket
never holds a pointer or marker for a checkpoint whose files are not all there; files removed locally (pruned
checkpoints) are removed from the bucket after that. Every object is one PUT (atomic per object).

Several hosts: every host stages its own copy of the run, so no volume is shared. Rank 0 owns the run (its lock,
its files, what vouches for each checkpoint); on every other host one process mirrors what that host's ranks
write (their ZeRO partitions and RNG files) and downloads the run before a resume: local rank 0 under the
deepspeed launcher, the host's first Ray worker under Ray (whose driver mirrors its own host's copy). At each
checkpoint every host uploads its files before the collective that lets rank 0 write the completion marker, so
the order above holds across hosts; before the best model is scored, each host fetches the files of it that
other hosts wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

from carat.storage import ObjectPath, as_location, is_url
from carat.train.checkpoint import COMMIT_HOOKS, COMPLETE_FILE, FETCH_HOOKS, WRITTEN_HOOKS

POINTER_NAMES = ("latest", "carat_complete.json")
"""Files that vouch for a checkpoint (the ``latest`` pointer, a tag's completion marker,
:mod:`carat.train.checkpoint`): read before the other files are listed, uploaded after them."""
SKIPPED = (".carat-run.lock",)
"""Local-only files (the run lock is a flock on this machine)."""
POLL_S = 5.0
RAY_TRAIN_OBJECTS = ("checkpoint_", ".validate_storage_marker")
"""Name prefixes of what Ray Train writes into a run in object storage itself (its checkpoints, their index):
Ray restores them, so a worker's copy never fetches them."""


def staging_root() -> Path:
    """This host's staging area. Named after the host, so hosts that share a temporary directory (an NFS home)
    still keep one copy each: a host's copy holds what its ranks wrote, and only its mirror changes it."""
    base = Path(os.environ.get("CARAT_STAGING_DIR") or Path(tempfile.gettempdir()) / "carat-staging")
    return base / socket.gethostname()


def staged_storage(storage_path: str) -> Path:
    """The local directory that stands in for ``storage_path``: itself when local, else a staging directory
    named after the URL (the same URL gets the same directory on one machine)."""
    where = as_location(storage_path)
    if not isinstance(where, ObjectPath):
        return where
    digest = hashlib.sha256(where.url.encode()).hexdigest()[:16]
    return staging_root() / "runs" / f"{where.bucket}-{digest}"


class RunSync:
    """Mirrors a local run directory to a prefix in object storage (see the module docstring).

    ``owner``: the run's owner (rank 0 or the Ray driver) uploads what vouches for a checkpoint and removes from
    the bucket what its copy no longer has, unless a completion marker there lists it (another host's file of a
    complete tag); another host's mirror uploads its host's files and removes only what it uploaded itself.
    Pointers go up only when a commit is announced (:data:`COMMIT_HOOKS`) and at the end; the periodic passes
    (every ``poll_s`` seconds; None: none) send files only, so no pass can vouch for another host's files early."""

    def __init__(self, local: Path, remote: ObjectPath, poll_s: float | None = POLL_S, owner: bool = True,
                 not_fetched: tuple[str, ...] = ()):
        self.local = Path(local)
        self.remote = remote
        self.poll_s = poll_s
        self.owner = owner
        self.not_fetched = not_fetched
        """Name prefixes that :meth:`download` leaves in the bucket (:data:`RAY_TRAIN_OBJECTS` for a Ray worker)."""
        self._sent: dict[str, tuple[int, int]] = {}
        """Files in the bucket as this process uploaded or downloaded them: path -> (size, mtime_ns)."""
        self._uploaded: set[str] = set()
        """The files of ``_sent`` that this process uploaded."""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.error: Exception | None = None

    def download(self) -> int:
        """Fetch the run from the bucket into the local directory (a resume on another machine); returns the
        number of files fetched."""
        fetched = 0
        for rel, entry in (self.remote.entries_under() if self.remote.is_dir() else {}).items():
            target = self.local / rel
            if rel.startswith(self.not_fetched):
                continue
            if not is_current(target, entry):  # another process on this host fetched it already
                (self.remote / rel).download_to(target)
                fetched += 1
            st = target.stat()
            self._sent[rel] = (st.st_size, st.st_mtime_ns)
        return fetched

    def _local_files(self) -> dict[str, tuple[int, int]]:
        found = {}
        for path in self.local.rglob("*"):
            if path.is_file() and path.name not in SKIPPED and not path.name.endswith(".tmp"):
                try:
                    st = path.stat()
                except FileNotFoundError:  # removed meanwhile (a pruned checkpoint, a temp file renamed)
                    continue
                found[path.relative_to(self.local).as_posix()] = (st.st_size, st.st_mtime_ns)
        return found

    def _pointers(self) -> dict[str, bytes]:
        found = {}
        for path in self.local.rglob("*"):
            if path.name in POINTER_NAMES:
                with contextlib.suppress(FileNotFoundError):
                    found[path.relative_to(self.local).as_posix()] = path.read_bytes()
        return found

    def sync(self, pointers: bool = True) -> int:
        """One pass: changed files, then (``pointers``, and only by the owner) pointers, then deletions;
        returns how many objects changed."""
        with self._lock:
            return self._sync(pointers and self.owner)

    def sync_files(self) -> None:
        """A pass without pointers: this host's files of a checkpoint, before anything vouches for them."""
        self.sync(pointers=False)

    def _sync(self, with_pointers: bool) -> int:
        pointers = self._pointers()
        files = self._local_files()
        changed = 0
        for rel, stamp in sorted(files.items()):
            if rel in pointers or self._sent.get(rel) == stamp:
                continue
            try:
                (self.remote / rel).upload_from(self.local / rel)
            except FileNotFoundError:  # removed between the listing and the upload: the next pass sees it
                continue
            self._sent[rel] = stamp
            self._uploaded.add(rel)
            changed += 1
        for rel, content in pointers.items() if with_pointers else ():
            if self._sent.get(rel) != files.get(rel):
                (self.remote / rel).write_bytes(content)
                self._sent[rel] = files.get(rel, (len(content), 0))
                self._uploaded.add(rel)
                changed += 1
        for rel in sorted(set(self._sent) - set(files)):
            if self._may_remove(rel, pointers):
                (self.remote / rel).unlink(missing_ok=True)
                changed += 1
            del self._sent[rel]
            self._uploaded.discard(rel)
        return changed

    def _may_remove(self, rel: str, pointers: dict[str, bytes]) -> bool:
        """Whether a file gone from this copy goes from the bucket too (see the class docstring)."""
        if not self.owner:
            return rel in self._uploaded
        folder, _, name = rel.rpartition("/")
        marker = pointers.get(f"{folder}/{COMPLETE_FILE}" if folder else COMPLETE_FILE)
        if marker is None:
            return True
        try:
            return name not in json.loads(marker).get("files", {})
        except ValueError:  # a torn marker vouches for nothing
            return True

    def fetch_missing(self, tag_dir: Path) -> int:
        """Complete this copy of a committed tag folder from the bucket: the files its marker there lists that
        other hosts wrote, and the marker; returns how many were fetched."""
        rel_dir = tag_dir.relative_to(self.local).as_posix()
        marker = self.remote / rel_dir / COMPLETE_FILE
        with self._lock:
            if not marker.is_file():
                return 0
            fetched = 0
            for name in [*json.loads(marker.read_bytes()).get("files", {}), COMPLETE_FILE]:
                local = tag_dir / name
                if not local.is_file():
                    (self.remote / rel_dir / name).download_to(local)
                    st = local.stat()
                    self._sent[f"{rel_dir}/{name}"] = (st.st_size, st.st_mtime_ns)
                    fetched += 1
            return fetched

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.sync_files()
            except Exception as exc:  # kept for the final pass; training goes on (the final sync raises)
                self.error = exc

    def start(self) -> None:
        if self.poll_s is not None:
            self._thread = threading.Thread(target=self._poll, name="carat-run-sync", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop polling and make the bucket match the local directory (raises what that last pass meets)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sync()


@contextlib.contextmanager
def synced_run(run_dir: Path, storage_path: str, poll_s: float | None = POLL_S) -> Iterator[RunSync | None]:
    """For a ``storage_path`` in object storage: download ``run_dir``'s run from the bucket, mirror it there
    while the block runs, and once more at its end (also when it fails: the last checkpoint is what a rerun
    resumes from). Nothing for a local ``storage_path``. Only the process that owns the run calls this (rank 0,
    or the Ray driver, whose workers mirror the run while it trains: ``poll_s`` None)."""
    if not is_url(storage_path) or os.environ.get("RANK", "0") != "0":  # the owner only, as the run lock
        yield None
        return
    with _mirrored(RunSync(run_dir, as_location(storage_path) / run_dir.name, poll_s)) as sync:
        yield sync


@contextlib.contextmanager
def host_mirror(run_dir: Path, storage_path: str, mirrored: bool, owner: bool = False,
                not_fetched: tuple[str, ...] = (), poll_s: float = POLL_S) -> Iterator[None]:
    """``mirrored``: this process keeps a host's copy of a run in object storage: local rank 0 of a host other
    than rank 0's (deepspeed), or a Ray worker that keeps its host's copy (``owner``: rank 0). Then: that copy,
    downloaded first (a resume needs every host's files) and mirrored while the block runs (module docstring).
    Nothing otherwise."""
    if not mirrored:
        yield
        return
    with _mirrored(RunSync(run_dir, as_location(storage_path) / run_dir.name, poll_s, owner, not_fetched)):
        yield


@contextlib.contextmanager
def _mirrored(sync: RunSync) -> Iterator[RunSync]:
    sync.local.mkdir(parents=True, exist_ok=True)
    fetched = sync.download()
    if fetched:
        print(f"[carat] {sync.remote}: fetched {fetched} files of the run into {sync.local} (resume)", flush=True)
    sync.start()
    on_commit = lambda root, tag: sync.sync()  # noqa: E731 - a committed checkpoint reaches the bucket at once
    hooks = [(WRITTEN_HOOKS, sync.sync_files), (FETCH_HOOKS, sync.fetch_missing)] + (
        [(COMMIT_HOOKS, on_commit)] if sync.owner else [])
    for registry, hook in hooks:
        registry.append(hook)
    try:
        yield sync
    except BaseException as run_error:
        _remove(hooks)
        stop_after_failure(sync, run_error)
        raise
    _remove(hooks)
    sync.stop()
    what = "run directory" if sync.owner else f"files of this host ({socket.gethostname()})"
    print(f"[carat] {what} synced to {sync.remote}", flush=True)


def _remove(hooks: list) -> None:
    for registry, hook in hooks:
        registry.remove(hook)


def stop_after_failure(sync: RunSync, run_error: BaseException) -> None:
    """The last mirror pass of a run that failed: the run's own error is what the user must read, so a failed
    upload is a warning beside it, never in its place."""
    try:
        sync.stop()
    except Exception as sync_error:  # the store is down too: the local run directory still holds everything
        print(f"[carat] warning: the failed run's directory could not be mirrored to {sync.remote} "
              f"({sync_error}); it is complete in {sync.local}", file=sys.stderr, flush=True)
    else:
        print(f"[carat] run directory synced to {sync.remote} ({type(run_error).__name__} ended the run)",
              flush=True)


def is_current(local: Path, entry: SimpleNamespace) -> bool:
    """Whether ``local`` holds the object ``entry`` lists: its size, fetched or written after its last change."""
    return local.is_file() and local.stat().st_size == entry.st_size and local.stat().st_mtime >= entry.st_mtime


def fetch_run_files(run_dir: Path, storage_url: str) -> int:
    """Bring the files other hosts wrote into the driver's copy of a Ray run in object storage (rank 0 may have
    trained on another node): each object absent here or of another size, except Ray's own checkpoints, which
    Ray restores itself. Returns how many were fetched."""
    remote = as_location(storage_url) / run_dir.name
    fetched = 0
    for rel, entry in (remote.entries_under() if remote.is_dir() else {}).items():
        local = run_dir / rel
        if rel.startswith(RAY_TRAIN_OBJECTS) or is_current(local, entry):
            continue
        (remote / rel).download_to(local)
        fetched += 1
    return fetched


def local_copy(value: str | Path) -> Path:
    """A checkpoint, export or run directory given as a path or an object-store URL, as a local path (a URL is
    downloaded into the staging directory, once per URL and content)."""
    where = as_location(value)
    if not isinstance(where, ObjectPath):
        return where
    digest = hashlib.sha256(where.url.encode()).hexdigest()[:16]
    local = staging_root() / "fetched" / digest / where.name
    if where.is_file():
        where.download_to(local)
        return local
    files = where.entries_under() if where.is_dir() else {}
    if not files:
        from carat.errors import DataError

        raise DataError(f"{where}: no such checkpoint, export or run directory (nothing under this prefix)")
    for rel, remote in files.items():
        if not is_current(local / rel, remote):
            (where / rel).download_to(local / rel)
    return local


__all__ = ["RAY_TRAIN_OBJECTS", "RunSync", "fetch_run_files", "host_mirror", "local_copy", "staged_storage",
           "synced_run"]
