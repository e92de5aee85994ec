"""The ``[storage]`` section: how segments are stored in shards (the writer is :mod:`carat.data.corpus.shards`).

Kept apart from that code so that reading a configuration (:mod:`carat.config`) loads no pyarrow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from carat.errors import ConfigError


@dataclass
class StorageConfig:
    """How segments are stored in shards."""

    dtype: Literal["float16", "float32"] = "float16"
    """Feature dtype on disk. float16 halves bytes; values beyond +-65504 are rejected (DataError), never
    stored as inf. Features are always returned as float32 by the loader."""
    shard_max_bytes: int = 256 * 1024 * 1024
    """Target maximum shard size in bytes (a single larger sample still gets its own shard). A few hundred
    MB suits object stores and node splitting."""
    shard_max_samples: int | None = None
    """Optional cap on samples per shard (None = no cap); small values make many shards in tests."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"storage.dtype={self.dtype!r} must be 'float16' or 'float32'")
        if not isinstance(self.shard_max_bytes, int) or self.shard_max_bytes < 64 * 1024:
            raise ConfigError(
                f"storage.shard_max_bytes={self.shard_max_bytes!r} must be an int >= 65536 (64 KiB); "
                "the default is 268435456 (256 MiB)")
        if self.shard_max_samples is not None and (
                not isinstance(self.shard_max_samples, int) or self.shard_max_samples < 1):
            raise ConfigError(
                f"storage.shard_max_samples={self.shard_max_samples!r} must be None or an int >= 1")


TINY_OVERRIDES: dict[str, object] = {"dtype": "float32", "shard_max_samples": 64}
