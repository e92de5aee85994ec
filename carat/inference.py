"""Inference: a model from any run, checkpoint or export, and its scores on a corpus split.

One home for what ``evaluate``, ``predict``, ``export``, the ensemble and the training loop's evaluation share:
which checkpoint a path means (:func:`resolve_checkpoint`), the model it holds (:func:`load_model`, a seed
ensemble's :class:`EnsembleModel` for an ensemble run) and the scores of every real sample
(:func:`collect_scores`). The commands are thin users of it; nothing here imports a command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from carat.config import CaratConfig, config_from_dict
from carat.data.loader.batch import Batch
from carat.errors import CaratError

MANIFEST = "ensemble.json"
MEMBERS = "members"


# -- scores --------------------------------------------------------------------------------------------------
@torch.no_grad()
def collect_scores(batches: Iterable[Batch], device: torch.device,
                   score: Callable[[Batch], torch.Tensor]) -> dict[str, np.ndarray]:
    """Keys, labels and ``score(batch)`` of every real (weight > 0) sample; fillers are dropped here."""
    keys: list[str] = []
    labels, scores = [], []
    for batch in batches:
        batch = batch.to(device)
        real = batch.weight > 0
        batch_scores = score(batch)
        keys += [k for k, keep in zip(batch.keys, real.tolist()) if keep]
        labels.append(batch.labels[real].float().cpu().numpy())
        scores.append(batch_scores[real].float().cpu().numpy())
    return {"keys": np.array(keys, dtype=object),
            "labels": np.concatenate(labels) if labels else np.zeros((0, 6), np.float32),
            "scores": np.concatenate(scores) if scores else np.zeros((0, 6), np.float32)}


def score_batches(model, batches: Iterable[Batch], device: torch.device) -> dict[str, np.ndarray]:
    """Scores of a plain (non-DeepSpeed) CARAT model."""
    model.eval().to(device)
    return collect_scores(batches, device, lambda batch: model.scores(model(**batch.model_inputs())))


def torch_device(name: str) -> torch.device:
    """A ``device`` config value (:class:`carat.inference_config.ScoringConfig`) as a torch device: ``auto`` is
    cuda when one is available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise CaratError(f"device={name!r} is not a torch device ({err}); use auto, cpu, cuda or cuda:N") from None


def score_split(model, cfg, shard_dir: Path, split: str, device: torch.device) -> dict[str, np.ndarray]:
    from carat.data.loader.pipeline import build_loader

    loader = build_loader(shard_dir, split, cfg.loader, rank=0, world_size=1, epoch=0, train=False)
    return score_batches(model, loader, device)


# -- which checkpoint, which model ---------------------------------------------------------------------------
def is_run_dir(path: Path) -> bool:
    """A training run's directory (its resolved config beside its checkpoints), not a DeepSpeed save dir."""
    return (path / "config.toml").is_file() and not (path / "latest").is_file()


def resolve_checkpoint(path: Path, tag: str | None) -> tuple[Path, str]:
    """Accept a run directory (its best model: there is no other), a DeepSpeed save dir (its newest complete
    tag, with a warning for newer damaged ones), or a tag folder."""
    if (path / "best" / "best").is_dir() and tag is None:
        return path / "best", "best"
    if tag is None and is_run_dir(path):
        # the run's last epoch is not its best: scoring it silently would report another model's figures
        raise CaratError(f"{path} has no best model ({path / 'best'} is missing: the run never finished an epoch, "
                         f"or best/ was removed); score one epoch's checkpoint with --checkpoint "
                         f"{path / 'checkpoints'} --tag epoch-NNN, or rerun the training")
    if tag is None and ((path / "latest").is_file() or any(path.glob("*/carat_complete.json"))):
        from carat.train.checkpoint import find_resume_point

        point = find_resume_point(path)  # the newest complete tag; `latest` may be missing, torn or damaged
        if point is not None and point.tag is not None:
            if point.warning():
                print(f"[carat] warning: {point.warning()}", file=sys.stderr, flush=True)
            return path, point.tag
        if (path / "latest").is_file():
            return path, (path / "latest").read_text().strip()
    if tag is not None and (path / tag).is_dir():
        return path, tag
    if list(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise CaratError(f"{path} holds no DeepSpeed checkpoint (expected a run directory, a folder with a "
                     f"'latest' file, or a tag folder with *model_states.pt){f' for tag {tag!r}' if tag else ''}")


def load_model(path: Path, tag: str | None = None):
    """(CARAT in eval mode, its CaratConfig) from an exported file or any checkpoint form; for an ensemble run
    directory (train.ensemble_size > 1) the :class:`carat.ensemble.EnsembleModel` of its members."""
    from carat.model import CARAT

    if is_ensemble(path):
        if tag is not None:
            raise CaratError(f"{path} is an ensemble run: --tag selects a checkpoint of one run, give a member's "
                             f"directory ({path / 'members'}/member-N) to pick one of its tags")
        return load_ensemble(path)

    if path.is_file():
        from carat.train.checkpoint import require_finite

        try:  # weights_only: a model file never gets to run code on load
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for foreign or corrupt files
            raise CaratError(f"{path} is not a readable carat export: {err}") from None
        if not isinstance(blob, dict) or "state_dict" not in blob or "config" not in blob:
            raise CaratError(f"{path} is not a carat export (expected keys state_dict and config)")
        require_finite(blob["state_dict"], path)
        weights, cfg = blob["state_dict"], config_from_dict(blob["config"])
    else:
        from carat.train.checkpoint import consolidate

        save_dir, tag = resolve_checkpoint(path, tag)
        weights, state = consolidate(save_dir, tag)
        cfg = config_from_dict(state["config"])
    model = CARAT.from_config(cfg.model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CaratError(f"{path}: checkpoint does not match the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return model.eval(), cfg


# -- seed ensembles (carat.ensemble trains them) -------------------------------------------------------------
def is_ensemble(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CaratError(f"{path}: unreadable ensemble manifest ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("members"), list) or not manifest["members"]:
        raise CaratError(f"{path}: an ensemble manifest needs a non-empty 'members' list")
    if any(not isinstance(m, str) or "/" in m or m in ("", ".", "..") for m in manifest["members"]):
        raise CaratError(f"{path}: member names must be plain directory names, got {manifest['members']}")
    return manifest


def member_dirs(run_dir: Path) -> list[Path]:
    """An ensemble run's member directories from its manifest; CaratError when one is missing or unfinished."""
    manifest = read_manifest(run_dir)
    dirs = [run_dir / MEMBERS / name for name in manifest["members"]]
    for path in dirs:
        if not (path / "results.json").is_file():
            raise CaratError(f"{run_dir}: ensemble member {path.name} did not finish (no {path / 'results.json'}); "
                             f"rerun the same train.run_name to finish it")
    return dirs


class EnsembleModel(nn.Module):
    """The members as one scorer with CARAT's evaluation interface: ``scores(model(**inputs))`` is the mean of
    the members' ``scores``, so :func:`score_batches` and ``carat.predict`` use it unchanged."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise CaratError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, **inputs: torch.Tensor) -> list:
        return [member(**inputs) for member in self.members]

    def scores(self, outputs: list) -> torch.Tensor:
        return torch.stack([m.scores(out) for m, out in zip(self.members, outputs)]).mean(dim=0)


def load_ensemble(run_dir: Path) -> tuple[EnsembleModel, CaratConfig]:
    """(EnsembleModel in eval mode, member 0's config) of a finished ensemble run."""
    loaded = [load_member(path) for path in member_dirs(run_dir)]
    return EnsembleModel([model for model, _ in loaded]).eval(), loaded[0][1]


def load_member(member_dir: Path) -> tuple[nn.Module, CaratConfig]:
    """A member's best model, or a CaratError naming the member and how to get it back."""
    from carat.train.checkpoint import tag_damage

    best = member_dir / "best" / "best"
    retrain = (f"restore {member_dir / 'best'} from a copy, or delete {member_dir} and rerun the same "
               "`python -m carat.train` command (it retrains that member)")
    if not best.is_dir():
        raise CaratError(f"ensemble member {member_dir.name} has no best model ({member_dir / 'best'} is "
                         f"missing); {retrain}")
    damage = tag_damage(best)
    if damage is not None:
        raise CaratError(f"ensemble member {member_dir.name}: its best model {best} is damaged or incomplete: "
                         f"{damage}; {retrain}")
    try:
        return load_model(member_dir)
    except CaratError as err:
        raise CaratError(f"ensemble member {member_dir.name}: {err}; {retrain}") from None
