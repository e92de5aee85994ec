"""The ``[prepare]`` section: how a real-data source is read and cleaned (the code is :mod:`carat.data.corpus.prepare`,
whose docstring gives the policies).

Kept apart from that code so that reading a configuration (:mod:`carat.config`) loads no data libraries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from carat.errors import ConfigError


@dataclass
class PrepareConfig:
    """How a real-data source is read and cleaned (see the module docstring for the policies)."""

    source: Literal["csd", "pickle"] = "csd"
    """``csd``: the four CMU-MultimodalSDK computational sequence files; ``pickle``: a MulT-style pickle."""
    nan_policy: Literal["zero", "error"] = "zero"
    """NaN values: replace by 0 (counted in the card), or stop with the file and segment named."""
    inf_policy: Literal["zero", "clip", "error"] = "zero"
    """+-inf values: replace by 0, clip to the finite range of that dimension in the segment, or stop."""
    on_error: Literal["raise", "skip"] = "raise"
    """Corrupt data (wrong feature dims, mismatched ids / interval counts, duplicate keys, non-finite values under
    an "error" policy): stop with a DataError naming file and sample, or skip those segments and count them."""
    trust_pickle: bool = False
    """Required for ``source="pickle"`` (and pickled label files): unpickling executes code from the file."""
    text_root: str = "glove_vectors"
    """Root group of the word-vector ``.csd`` file."""
    visual_root: str = "FACET 4.2"
    """Root group of the FACET ``.csd`` file."""
    audio_root: str = "COVAREP"
    """Root group of the COVAREP ``.csd`` file."""
    labels_root: str = "All Labels"
    """Root group of the labels ``.csd`` file."""
    max_reported_keys: int = 20
    """How many keys the card lists per skip reason (all are counted)."""
    reference: bool = True
    """Fit the logistic-regression reference floor on a bounded subsample and put it in the card."""
    reference_max_train: int = 4000
    """Reference scorer: at most this many train segments."""
    reference_max_eval: int = 3000
    """Reference scorer: at most this many valid / test segments each."""
    seed: int = 0
    """Seed of the reference scorer's subsample."""

    def __post_init__(self) -> None:
        choices = {"source": ("csd", "pickle"), "nan_policy": ("zero", "error"),
                   "inf_policy": ("zero", "clip", "error"), "on_error": ("raise", "skip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"prepare.{name}={getattr(self, name)!r} must be one of {allowed}")
        for name in ("text_root", "visual_root", "audio_root", "labels_root"):
            if not getattr(self, name):
                raise ConfigError(f"prepare.{name} must be a non-empty HDF5 group name")
        if self.max_reported_keys < 0:
            raise ConfigError(f"prepare.max_reported_keys={self.max_reported_keys} must be >= 0")
        if self.reference_max_train < 2 or self.reference_max_eval < 2:
            raise ConfigError("prepare.reference_max_train and prepare.reference_max_eval must be >= 2")

    @property
    def roots(self) -> dict[str, str]:
        return {"text": self.text_root, "visual": self.visual_root, "audio": self.audio_root,
                "labels": self.labels_root}


TINY_OVERRIDES: dict[str, object] = {"reference_max_train": 400, "reference_max_eval": 200}
