"""Where carat reads and writes: a local path, or an object-store URL (``s3://``, ``gs://``, ``az://``, ``http(s)://``)
through fsspec.

A location is a :class:`pathlib.Path` when local and an :class:`ObjectPath` when it is a URL. ``ObjectPath``
offers the part of the pathlib API carat uses on corpora and run directories (``/``, ``is_file``, ``stat``,
``open``, ``read_bytes``, ``glob``, ...), so code that joins and tests paths works on both, while local paths
never go through fsspec (they stay exactly as fast as before). ``Path("s3://b/p")`` would silently become
``s3:/b/p``; :func:`as_location` is the one place a user's string becomes a location.

Credentials and endpoints are the ecosystem's: fsspec's S3 backend (s3fs, over botocore) reads the standard
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` / ``AWS_PROFILE`` / ``AWS_REGION``
variables, ``~/.aws/config``, instance roles, and ``AWS_ENDPOINT_URL`` for S3-compatible stores (MinIO, Ceph,
moto); its GCS backend (gcsfs) Google's application default credentials (``GOOGLE_APPLICATION_CREDENTIALS``,
``gcloud auth application-default login``, the metadata server), and ``STORAGE_EMULATOR_HOST`` for an emulator
(gcp-storage-emulator, fake-gcs-server), which carat then talks to anonymously, as Google's own client does.
carat never stores any of them: a location is only its URL.

Clients are made per process (:func:`filesystem` is keyed by the process id), so DataLoader workers forked
from a process that already used the store open their own connections. Every call that can fail transiently
(connection refused or reset, timeouts, a body cut short) is retried a bounded number of times with backoff,
then becomes one :class:`~carat.errors.DataError` line naming the object; a missing bucket or object and an
access denial are not retried.
"""

from __future__ import annotations

import os
import posixpath
import re
import time
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import IO, Any, Callable, Iterator, TypeVar

from carat.errors import DataError

T = TypeVar("T")

RETRIES = 3
"""Retries of a transient failure (so 4 attempts) before an operation becomes a DataError."""
BACKOFF_S = 0.25
"""First wait between attempts; doubled after each (0.25 + 0.5 + 1 s over the default retries)."""
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def is_url(value: object) -> bool:
    """True for ``scheme://...`` other than ``file://`` (which is a local path)."""
    if isinstance(value, ObjectPath):
        return True
    match = _SCHEME.match(str(value))
    return match is not None and match.group(1).lower() != "file"


def as_location(value: str | os.PathLike | ObjectPath) -> Path | ObjectPath:
    """A user's path or URL as a location: :class:`ObjectPath` for an object-store URL, else a local Path."""
    if isinstance(value, (ObjectPath, Path)):
        return value
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if text.lower().startswith("file://"):
        return Path(text[len("file://"):])
    return ObjectPath(text) if is_url(text) else Path(text)


def resolved(value: str | os.PathLike | ObjectPath) -> Path | ObjectPath:
    """:func:`as_location`, made absolute when local (a URL is absolute already)."""
    where = as_location(value)
    return where.resolve() if isinstance(where, Path) else where


# ------------------------------------------------------------------------------------------ filesystems

_FILESYSTEMS: dict[tuple[int, str], Any] = {}


def _s3_options() -> dict[str, Any]:
    # botocore's own retries multiply ours; keep them to one attempt unless the user configured them.
    if "AWS_MAX_ATTEMPTS" in os.environ or "AWS_RETRY_MODE" in os.environ:
        return {}
    return {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 10,
                              "read_timeout": 60}}


def _gcs_emulator() -> str | None:
    """``STORAGE_EMULATOR_HOST`` when set (gcsfs reads it too, and takes "default" for unset)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    return host if host not in ("", "default") else None


def _new_filesystem(protocol: str, **options: Any) -> Any:
    """A new fsspec filesystem for ``protocol`` (never fsspec's shared instance)."""
    if protocol in ("gs", "gcs") and _gcs_emulator():
        # An emulator serves the JSON API only and checks no credentials: gcsfs' JSON-API filesystem, anonymous, as
        # Google's client libraries do. gcsfs' default filesystem first asks the Storage Control API (gRPC) for each
        # bucket's layout, which no emulator serves: every lookup would wait out a 60 s retry deadline. Without a
        # token it would also look for Google credentials (the metadata server) first.
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(token="anon", skip_instance_cache=True, **options)
    import fsspec

    return fsspec.filesystem(protocol, skip_instance_cache=True, **options)


def filesystem(protocol: str) -> Any:
    """This process' fsspec filesystem for ``protocol``: made on first use in each process (a forked worker
    never reuses its parent's connections or event loop)."""
    key = (os.getpid(), protocol)
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        options = _s3_options() if protocol in ("s3", "s3a") else {}
        try:
            fs = _new_filesystem(protocol, **options)
        except (ImportError, ValueError) as exc:
            raise DataError(f"{protocol}://: no fsspec backend for this store ({exc}); install the package fsspec "
                            f"names (s3fs for s3://, gcsfs for gs://, adlfs for az://)") from None
        if hasattr(fs, "retries"):
            fs.retries = 1  # s3fs retries a cut-short body itself; the bound here is ours (RETRIES)
        for stale in [k for k in _FILESYSTEMS if k[0] != key[0]]:
            del _FILESYSTEMS[stale]
        _FILESYSTEMS[key] = fs
    return fs


def arrow_filesystem(location: ObjectPath) -> tuple[Any, str]:
    """The store as a pyarrow filesystem and the path in it, as Ray Train's ``storage_filesystem`` takes them:
    through fsspec, so Ray's uploads use the credentials and endpoint carat uses everywhere, with botocore's
    default retries (Ray's persistence has none of carat's bounded ones)."""
    import pyarrow.fs

    fs = _new_filesystem(location.protocol)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), location.path


def forget_filesystems() -> None:
    """Drop this process' clients, so the next use reads the environment again (credentials, endpoint)."""
    _FILESYSTEMS.clear()


def endpoint_note(protocol: str) -> str:
    """Where requests go, for error messages (never credentials)."""
    if protocol in ("s3", "s3a"):
        return f" (endpoint {os.environ.get('AWS_ENDPOINT_URL') or os.environ.get('AWS_ENDPOINT_URL_S3') or 'AWS'})"
    if protocol in ("gs", "gcs"):
        return f" (endpoint {_gcs_emulator() or 'GCS'})"
    return ""


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying: network, timeout, a response cut short; not a missing object or a denial."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    module = type(exc).__module__.split(".", 1)[0]
    return module in ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "fsspec", "s3fs", "asyncio")


class StorageError(DataError):
    """A store operation failed (after retries where they apply); ``missing``: the object does not exist."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


def _as_denial(exc: BaseException) -> BaseException:
    """A denial as the PermissionError s3fs raises: gcsfs reports HTTP 403 as a plain ``OSError("Forbidden: ...")``
    (which would otherwise read as a transient network error)."""
    if type(exc) is OSError and str(exc).startswith("Forbidden:"):
        return PermissionError(*exc.args)
    return exc


def storage_error(url: str, exc: BaseException, doing: str, attempts: int = 1) -> StorageError:
    """One line naming the object, what was being done and why it failed."""
    protocol = url.split("://", 1)[0]
    exc = _as_denial(exc)
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, PermissionError):
        credentials = ("GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`"
                       if protocol in ("gs", "gcs") else "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        why = f"access denied ({detail}): check the credentials ({credentials}) and the bucket's policy"
    elif isinstance(exc, FileNotFoundError):
        why = f"not found ({detail})"
    else:
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        why = f"{type(exc).__name__}{tries}: {detail}"
    return StorageError(f"{url}: cannot {doing}: {why}{endpoint_note(protocol)}",
                        missing=isinstance(exc, FileNotFoundError))


def with_retries(url: str, doing: str, call: Callable[[], T], retries: int = RETRIES) -> T:
    """``call()``, retried on transient failures with doubling backoff; DataError naming ``url`` when it gives
    up or the failure is permanent."""
    for attempt in range(retries + 1):
        try:
            return call()
        except DataError:
            raise
        except Exception as exc:  # fsspec backends raise OSError, botocore and aiohttp types
            if not is_transient(_as_denial(exc)) or attempt == retries:
                raise storage_error(url, exc, doing, attempt + 1) from None
            time.sleep(BACKOFF_S * 2 ** attempt)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------ ObjectPath


URL_PATH_PROTOCOLS = ("http", "https")
"""Protocols whose fsspec filesystem names files by their whole URL."""

class ObjectPath:
    """An object-store URL with the subset of :class:`pathlib.Path` that carat uses on corpora and runs.

    Object stores have no directories: ``mkdir`` does nothing, ``is_dir`` means "some object has this prefix".
    Writes are single PUTs (multipart for large files, still visible only when complete), so an object is
    never seen half-written. Pickles as its URL alone (DataLoader workers make their own client)."""

    __slots__ = ("url",)

    def __init__(self, url: str):
        scheme, _, rest = str(url).partition("://")
        rest = posixpath.normpath(rest).lstrip("/") if rest.strip("/") else ""
        if not rest or rest == ".":
            raise DataError(f"{url}: an object-store URL needs a bucket (scheme://bucket/prefix)")
        self.url = f"{scheme.lower()}://{rest}"

    # -- names
    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def key(self) -> str:
        """The URL without its scheme: ``bucket/key`` (``host/path`` for http(s))."""
        return self.url.split("://", 1)[1]

    @property
    def path(self) -> str:
        """What fsspec calls the path: the key for a store, the whole URL for http(s) (its filesystem takes URLs)."""
        return self.url if self.protocol in URL_PATH_PROTOCOLS else self.key

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> ObjectPath:
        parent = posixpath.dirname(self.key)
        return ObjectPath(f"{self.protocol}://{parent}") if parent else self

    @property
    def fs(self) -> Any:
        return filesystem(self.protocol)

    def __truediv__(self, part: str | os.PathLike) -> ObjectPath:
        return ObjectPath(f"{self.url}/{PurePosixPath(os.fspath(part)).as_posix()}")

    def joinpath(self, *parts: str) -> ObjectPath:
        out = self
        for part in parts:
            out = out / part
        return out

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __reduce__(self):
        return (ObjectPath, (self.url,))

    def as_posix(self) -> str:
        return self.url

    def resolve(self) -> ObjectPath:
        return self

    absolute = resolve

    def relative_to(self, other: ObjectPath | str) -> PurePosixPath:
        base = str(other).rstrip("/") + "/"
        if not self.url.startswith(base):
            raise ValueError(f"{self.url} is not under {other}")
        return PurePosixPath(self.url[len(base):])

    # -- queries
    def _call(self, doing: str, call: Callable[[], T]) -> T:
        return with_retries(self.url, doing, call)

    def _info(self) -> dict | None:
        """The object's (or prefix's) metadata, None when there is none. A denial is an error, not "absent"
        (fsspec's ``exists`` would answer False)."""
        try:
            return self._call("look up", lambda: self.fs.info(self.path))
        except StorageError as err:
            if err.missing:
                return None
            raise

    def _check_bucket(self) -> None:
        """DataError naming the bucket when it is absent (asked only after a lookup came back empty)."""
        if self.protocol not in ("s3", "s3a", "gs", "gcs") or self.path == self.bucket:
            return
        if ObjectPath(f"{self.protocol}://{self.bucket}")._info() is None:
            raise DataError(f"{self.url}: bucket {self.bucket!r} does not exist{endpoint_note(self.protocol)}; "
                            "create it or fix the URL")

    def exists(self) -> bool:
        found = self._info() is not None
        if not found:
            self._check_bucket()
        return found

    def is_file(self) -> bool:
        info = self._info()
        if info is None:
            self._check_bucket()
        return info is not None and info.get("type") == "file"

    def is_dir(self) -> bool:
        return self._call("look up", lambda: self.fs.isdir(self.path))

    def stat(self) -> SimpleNamespace:
        info = self._call("stat", lambda: self.fs.info(self.path))
        return SimpleNamespace(st_size=int(info.get("size") or 0), st_mtime=_mtime(info))

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        matches = self._call("list", lambda: self.fs.glob(f"{self.path}/{pattern}"))
        for match in sorted(matches):
            yield self._entry(match)

    def iterdir(self) -> Iterator[ObjectPath]:
        entries = self._call("list", lambda: self.fs.ls(self.path, detail=False))
        for entry in sorted(entries):
            if entry.rstrip("/") != self.path:
                yield self._entry(entry)

    def _entry(self, listed: str) -> ObjectPath:
        """An fsspec listing's name as a location (stores list keys, http(s) lists URLs)."""
        return ObjectPath(listed if "://" in listed else f"{self.protocol}://{listed}")

    def entries_under(self) -> dict[str, SimpleNamespace]:
        """``st_size`` and ``st_mtime`` of every object under this prefix, by path relative to it (one listing)."""
        found = self._call("list", lambda: self.fs.find(self.path, detail=True))
        for name, info in found.items():
            if info.get("size") is None:  # an http(s) directory page lists names only: ask each file
                found[name] = self._entry(name)._call("stat", lambda: self.fs.info(name))
        return {posixpath.relpath(name, self.path): SimpleNamespace(st_size=int(info.get("size") or 0),
                                                                    st_mtime=_mtime(info))
                for name, info in found.items()}

    def sizes_under(self) -> dict[str, int]:
        """Size of every object under this prefix, by path relative to it (one listing)."""
        return {rel: entry.st_size for rel, entry in self.entries_under().items()}

    def walk_files(self) -> list[str]:
        """Every object under this prefix, relative to it (sorted)."""
        found = self._call("list", lambda: self.fs.find(self.path))
        return sorted(posixpath.relpath(f, self.path) for f in found)

    # -- reading
    def open(self, mode: str = "rb", **kwargs: Any) -> IO:
        if any(c in mode for c in "wax+"):
            raise ValueError(f"{self.url}: open for writing is not atomic on an object store; use write_bytes")
        return self._call("open", lambda: self.fs.open(self.path, mode, **kwargs))

    def read_bytes(self) -> bytes:
        return self._call("read", lambda: self.fs.cat_file(self.path))

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def read_range(self, start: int, stop: int) -> bytes:
        """Bytes ``start..stop`` (one ranged GET; fewer at the end of the object)."""
        return self._call(f"read bytes {start}..{stop}", lambda: self.fs.cat_file(self.path, start=start, end=stop))

    # -- writing (each one PUT: atomic per object)
    def write_bytes(self, data: bytes) -> int:
        self._call("write", lambda: self.fs.pipe_file(self.path, bytes(data)))
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def upload_from(self, local: Path) -> None:
        """Upload a local file to this object (multipart for large files; visible only once complete)."""
        self._call("upload", lambda: self.fs.put_file(os.fspath(local), self.path))

    def download_to(self, local: Path) -> None:
        """Download this object to ``local`` (through a temporary name, renamed when complete)."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
        self._call("download", lambda: self.fs.get_file(self.path, os.fspath(tmp)))
        os.replace(tmp, local)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._call("delete", lambda: self.fs.rm_file(self.path))
        except StorageError as err:
            if not (missing_ok and err.missing):
                raise

    def remove_tree(self) -> None:
        """Delete every object under this prefix (nothing if there is none)."""
        files = self.walk_files() if self.is_dir() else []
        if files:
            self._call("delete", lambda: self.fs.rm([f"{self.path}/{f}" for f in files]))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: object stores have prefixes, not directories (the bucket must exist)."""
        bucket = ObjectPath(f"{self.protocol}://{self.bucket}")
        if self.protocol in ("s3", "s3a", "gs", "gcs") and bucket._info() is None:
            raise DataError(f"{self.url}: bucket {self.bucket!r} does not exist{endpoint_note(self.protocol)}; "
                            "create it or fix the URL")


def _mtime(info: dict) -> float:
    stamp = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if stamp is None:
        return 0.0
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)


__all__ = ["ObjectPath", "as_location", "filesystem", "is_url", "resolved", "storage_error", "with_retries"]
