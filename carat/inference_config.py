"""The config fields of the commands that read a trained model (``evaluate``, ``predict``, ``export``), defined
once: each command's own section (``[evaluate]`` in :mod:`carat.evaluate` ...) extends these, and its flags
(``--checkpoint``, ``--split`` ...) are :class:`~carat.cli.Alias` es of the section's keys. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from carat.cli import Alias


@dataclass
class CheckpointSource:
    """Which trained model a command reads."""

    checkpoint: str | None = None
    """Run directory (its best model; an ensemble run: its members' mean), DeepSpeed checkpoint folder, or
    `carat.export` file; a path or an object-store URL (s3://bucket/runs/NAME). Required."""
    tag: str | None = None
    """Checkpoint tag in a DeepSpeed checkpoint folder (epoch-003); none = the run's best model, else the folder's
    newest complete tag."""


@dataclass
class ScoringConfig(CheckpointSource):
    """How a command scores with that model."""

    split: Literal["train", "valid", "test"] = "test"
    """Corpus split to score."""
    threshold: float | None = None
    """Decision threshold on the emotion scores; none = the model's own (model.threshold of its config)."""
    device: str = "auto"
    """torch device to score on (cpu, cuda, cuda:1); auto = cuda when one is available, else cpu."""


def checkpoint_aliases(section: str) -> tuple[Alias, ...]:
    """``--checkpoint`` and ``--tag``: documented shorthands of ``section``'s keys."""
    return (Alias("--checkpoint", f"{section}.checkpoint"), Alias("--tag", f"{section}.tag"))


def scoring_aliases(section: str) -> tuple[Alias, ...]:
    """The flags of :class:`ScoringConfig`'s keys (``--checkpoint``, ``--tag``, ``--split``, ``--threshold``,
    ``--device``), documented shorthands of ``section``'s keys."""
    return checkpoint_aliases(section) + tuple(Alias(f"--{key}", f"{section}.{key}")
                                               for key in ("split", "threshold", "device"))
