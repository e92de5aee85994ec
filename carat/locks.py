"""Advisory file locks (``fcntl.flock``) for what two carat processes must not do at once.

- Synthesizing the quickstart corpus: Ray Tune trials, or several ``python -m carat.train`` started together,
  may all find the default shard directory empty; one synthesizes, the others wait and then use its corpus.
- Training into one run directory: a second process with the same run name would interleave checkpoints
  and logs with the first; it gets an error naming the holder instead.

The kernel drops a flock when its process dies, so a killed run never leaves a stale lock behind. flock
works across processes of one machine and on NFSv4 / Lustre with locking enabled; on a filesystem without
locking the lock is a no-op there, which is why the lock file also records who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from carat.errors import CaratError


class LockHeld(CaratError):
    """Another process holds the lock; the message names it (host, pid, since when)."""


class LockPathError(CaratError):
    """The lock file cannot be created (read-only or missing directory); the message names the directory."""


class FileLock:
    """An exclusive flock on ``path`` (created if needed). ``blocking=False`` raises :class:`LockHeld` at once
    when another process holds it; ``blocking=True`` waits up to ``timeout`` seconds."""

    def __init__(self, path: Path, *, what: str, blocking: bool = False, timeout: float = 3600.0) -> None:
        self.path = Path(path)
        self.what = what
        self.blocking = blocking
        self.timeout = timeout
        self._fd: int | None = None

    def holder(self) -> str:
        """Who wrote the lock file last (the current holder while it is held), for error messages."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "another process"
        return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
                if info else "another process")

    def acquire(self) -> "FileLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # the first write of a run or corpus: a read-only or unmakeable path shows here
            raise LockPathError(f"{self.path.parent}: cannot write there ({err.strerror or err}), which {self.what} "
                                "needs; choose a writable path") from None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not self.blocking:
                    holder = self.holder()
                    os.close(fd)
                    raise LockHeld(f"{self.what} is in use by {holder} (lock {self.path}); wait for it to "
                                   "finish or choose another name") from None
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise LockHeld(f"timed out after {self.timeout:.0f} s waiting for {self.what} "
                                   f"(held by {self.holder()}, lock {self.path})") from None
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
