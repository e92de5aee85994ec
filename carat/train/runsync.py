"""Run directories in object storage (``--train.storage_path=s3://bucket/runs``) for every launcher.

Training writes its run directory on local disk as always (checkpoints through DeepSpeed and Ray, metrics,
results, plots) into a staging directory named after the run's URL; :class:`RunSync`, in the process that owns
the run (rank 0, or the Ray driver), mirrors it to ``<storage_path>/<run_name>``: whenever a checkpoint is
committed (synchronously, from :func:`carat.train.checkpoint.write_latest`, when the training loop runs in that
process; polled every few seconds otherwise, as for Ray's workers) and once more when the run ends. A rerun of the same
run name on any machine first downloads the run from the bucket, so it resumes from the last checkpoint that
reached it.

Order makes the bucket's copy consistent at every moment: what vouches for a checkpoint (``checkpoints/latest``,
each tag's completion marker) is read *before* the files are listed and uploaded *after* them, so the bucket
never holds a pointer or marker for a checkpoint whose files are not all there; files removed locally (pruned checkpoints) are removed from the
bucket after that. Every object is one PUT (atomic per object).

Scope: the staging directory is local to the owning process' machine, so ranks on other machines (a deepspeed
launch over several hosts, a Ray cluster of several nodes) still need a shared run directory
(``train.storage_path`` on a shared volume); the corpus, read by every rank, may be in the bucket either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from carat.storage import ObjectPath, as_location, is_url
from carat.train.checkpoint import COMMIT_HOOKS

POINTER_NAMES = ("latest", "carat_complete.json")
"""Files that vouch for a checkpoint (the ``latest`` pointer, a tag's completion marker,
:mod:`carat.train.checkpoint`): read before the other files are listed, uploaded after them."""
SKIPPED = (".carat-run.lock",)
"""Local-only files (the run lock is a flock on this machine)."""
POLL_S = 5.0


def staging_root() -> Path:
    return Path(os.environ.get("CARAT_STAGING_DIR") or Path(tempfile.gettempdir()) / "carat-staging")


def staged_storage(storage_path: str) -> Path:
    """The local directory that stands in for ``storage_path``: itself when local, else a staging directory
    named after the URL (the same URL gets the same directory on one machine)."""
    where = as_location(storage_path)
    if not isinstance(where, ObjectPath):
        return where
    digest = hashlib.sha256(where.url.encode()).hexdigest()[:16]
    return staging_root() / "runs" / f"{where.bucket}-{digest}"


class RunSync:
    """Mirrors a local run directory to a prefix in object storage (see the module docstring)."""

    def __init__(self, local: Path, remote: ObjectPath, poll_s: float = POLL_S):
        self.local = Path(local)
        self.remote = remote
        self.poll_s = poll_s
        self._sent: dict[str, tuple[int, int]] = {}
        """Files in the bucket as this process uploaded them: path -> (size, mtime_ns)."""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.error: Exception | None = None

    def download(self) -> int:
        """Fetch the run from the bucket into the local directory (a resume on another machine); returns the
        number of files fetched."""
        files = self.remote.walk_files() if self.remote.is_dir() else []
        for rel in files:
            target = self.local / rel
            (self.remote / rel).download_to(target)
            st = target.stat()
            self._sent[rel] = (st.st_size, st.st_mtime_ns)
        return len(files)

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

    def sync(self) -> int:
        """One pass: changed files, then pointers, then deletions; returns how many objects changed."""
        with self._lock:
            return self._sync()

    def _sync(self) -> int:
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
            changed += 1
        for rel, content in pointers.items():
            if self._sent.get(rel) != files.get(rel):
                (self.remote / rel).write_bytes(content)
                self._sent[rel] = files.get(rel, (len(content), 0))
                changed += 1
        for rel in sorted(set(self._sent) - set(files)):
            (self.remote / rel).unlink(missing_ok=True)
            del self._sent[rel]
            changed += 1
        return changed

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.sync()
            except Exception as exc:  # kept for the final pass; training goes on (the final sync raises)
                self.error = exc

    def start(self) -> None:
        self._thread = threading.Thread(target=self._poll, name="carat-run-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and make the bucket match the local directory (raises what that last pass meets)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sync()


@contextlib.contextmanager
def synced_run(run_dir: Path, storage_path: str, poll_s: float = POLL_S) -> Iterator[RunSync | None]:
    """For a ``storage_path`` in object storage: download ``run_dir``'s run from the bucket, mirror it there
    while the block runs, and once more at its end (also when it fails: the last checkpoint is what a rerun
    resumes from). Nothing for a local ``storage_path``. Only the process that owns the run calls this."""
    if not is_url(storage_path) or os.environ.get("RANK", "0") != "0":  # the owner only, as the run lock
        yield None
        return
    sync = RunSync(run_dir, as_location(storage_path) / run_dir.name, poll_s)
    run_dir.mkdir(parents=True, exist_ok=True)
    fetched = sync.download()
    if fetched:
        print(f"[carat] {sync.remote}: fetched {fetched} files of the run into {run_dir} (resume)", flush=True)
    sync.start()
    hook = lambda root, tag: sync.sync()  # noqa: E731 - a committed checkpoint reaches the bucket at once
    COMMIT_HOOKS.append(hook)
    try:
        yield sync
    except BaseException as run_error:
        COMMIT_HOOKS.remove(hook)
        stop_after_failure(sync, run_error)
        raise
    COMMIT_HOOKS.remove(hook)
    sync.stop()
    print(f"[carat] run directory synced to {sync.remote}", flush=True)


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
        target = local / rel
        current = target.is_file() and target.stat().st_size == remote.st_size and \
            target.stat().st_mtime >= remote.st_mtime  # fetched after the object's last change
        if not current:
            (where / rel).download_to(target)
    return local


__all__ = ["RunSync", "local_copy", "staged_storage", "synced_run"]
