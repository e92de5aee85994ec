"""Seed ensembles (``train.ensemble_size`` > 1): N independently seeded CARAT runs, scored by their mean.

On a corpus of a few thousand clips one run's test macro-F1 moves by ~0.02 with its seed alone (BENCHMARKS.md,
Learning): each seed memorises different noise in the train split. The mean of several runs' probabilities
cancels part of it, where the mean of one run's epochs does not (they are nearly one model). Layout:

    RUN/ensemble.json            members, their seeds, the rule
    RUN/members/member-0 ...     each a complete run directory (checkpoints, best/, history, results.json)
    RUN/results.json, results.txt, card.json    the ensemble's own metrics and verdict

Members train one after another through the same launcher and loop as any run, with seeds train.seed,
train.seed + 1, ... and batch plans loader.seed, loader.seed + 1, ...; rerunning the same run name skips finished members and resumes an interrupted one.
Thresholds are tuned on the ensemble's validation scores, as for one run. ``carat.evaluate`` and
``carat.predict`` accept RUN and score with the mean of its members.

A member is scored from its best model (its ``best/``, verified against the hashes of its marker) or not at
all: a member without one, or with a damaged one, is an error naming it, never its last epoch in its place. A
rerun that trains nothing rescores the members and keeps RUN/results.json unless the figures are the same: a
difference means the members changed since, and deleting RUN/results.json is how a user accepts new figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from carat.config import CaratConfig
from carat.errors import CaratError
from carat.inference import (  # noqa: F401  (the reading side lives in carat.inference; re-exported)
    MANIFEST, MEMBERS, EnsembleModel, is_ensemble, load_ensemble, load_member, member_dirs, read_manifest)



def member_name(index: int) -> str:
    return f"member-{index}"


def member_config(cfg: CaratConfig, run_dir: Path, index: int) -> CaratConfig:
    """Member ``index``: the run's config with its own seeds and run directory RUN/members/member-<index>.
    Both seeds move with the member: ``train.seed`` (initialisation, dropout, augmentation) and ``loader.seed``
    (the batch plan: which clips share a batch, and in which order the steps come), so the members differ in
    every random choice a lone run's seed spread comes from."""
    train = dataclasses.replace(cfg.train, seed=cfg.train.seed + index, ensemble_size=1,
                                run_name=member_name(index), storage_path=str(run_dir / MEMBERS))
    loader = dataclasses.replace(cfg.loader, seed=cfg.loader.seed + index)
    return dataclasses.replace(cfg, train=train, loader=loader)


def write_manifest(run_dir: Path, cfg: CaratConfig) -> None:
    from carat.train.rundir import write_json_atomic

    size = cfg.train.ensemble_size
    write_json_atomic(run_dir / MANIFEST, {
        "members": [member_name(i) for i in range(size)],
        "seeds": [cfg.train.seed + i for i in range(size)],
        "loader_seeds": [cfg.loader.seed + i for i in range(size)],
        "rule": "mean of the members' probabilities (CARAT.scores)",
    })


# -- training ------------------------------------------------------------------------------------------------
def train_ensemble(cfg: CaratConfig, run_dir: Path, launch: Callable[[CaratConfig, Path], None],
                   precheck: Callable[[CaratConfig, Path], None]) -> list[int] | None:
    """Train the members that have not finished, one after another, each by ``launch(member_cfg, member_dir)``
    (the launcher's own entry: Ray Train or the in-process loop). Returns, on rank 0, the indices of the
    members trained now (rank 0 then scores the ensemble, :func:`evaluate_ensemble`); None on other ranks."""
    main = os.environ.get("RANK", "0") == "0"
    trained: list[int] = []
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(run_dir, cfg)
    for index in range(cfg.train.ensemble_size):
        member = member_config(cfg, run_dir, index)
        member_dir = run_dir / MEMBERS / member_name(index)
        precheck(member, member_dir)  # a changed config is refused before a finished member is reused
        if (member_dir / "results.json").is_file():
            if main:
                print(f"[carat] ensemble member {index} (seed {member.train.seed}) already finished: kept")
            continue
        if main:
            print(f"[carat] ensemble member {index + 1}/{cfg.train.ensemble_size} (seed {member.train.seed})",
                  flush=True)
        launch(member, member_dir)
        trained.append(index)
    return trained if main else None


def evaluate_ensemble(cfg: CaratConfig, run_dir: Path, shard_dir: Path, rescore: bool = False) -> dict[str, Any]:
    """Score the ensemble on valid and test, tune thresholds on valid, judge it against the card and write
    RUN/results.json, results.txt and card.json (the same files and keys as one run's).

    ``rescore``: no member was trained by this call. An existing RUN/results.json is then kept: the new
    figures must equal it (:func:`check_same_figures`), else it is an error naming what differs."""
    from carat.inference import score_split
    from carat.report import assemble_results, judge, write_results_files
    from carat.train.rundir import RunDir, copy_card

    model, member_cfg = load_ensemble(run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    valid, test = (score_split(model, member_cfg, shard_dir, split, device) for split in ("valid", "test"))
    dirs = member_dirs(run_dir)
    members = {path.name: json.loads((path / "results.json").read_text()) for path in dirs}
    card_path = shard_dir / "card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    results = assemble_results(
        valid, test, cfg.model.threshold, cfg.train.tune_thresholds, card,
        ensemble_size=len(members), launcher=cfg.train.launcher, run_dir=str(run_dir),
        members=[member_summary(name, r) for name, r in members.items()],
        nonfinite_steps=int(sum(r.get("nonfinite_steps", 0) for r in members.values())))
    run = RunDir(run_dir)
    copy_card(shard_dir, run)
    end_warnings = judge(results, card)
    results["warnings"] = [f"{name}: {w}" for name, r in members.items() for w in r.get("warnings", [])]
    results["warnings"] += end_warnings
    if rescore and run.results.is_file():
        check_same_figures(run.results, results)
        print(f"[carat] ensemble results unchanged: {run.results}")
        return results
    write_results_files(results, run.results, run.results_table, cfg.model.threshold,
                        heading=f"ensemble of {len(members)} members")
    return results


SCORED_KEYS: tuple[str, ...] = ("valid", "test", "test_tuned", "test_tuned_micro", "tuned_thresholds",
                                 "tuned_micro_threshold", "members")
"""The figures of results.json that come from scoring the members (the rest is derived, or says where)."""
SAME_FIGURE = 1e-6
"""Rescoring on CPU is bit-identical; this leaves room for a GPU's reduction order."""


def _figures(tree: Any, prefix: str = "") -> dict[str, float]:
    """Path -> number of every numeric leaf (bools and strings excluded)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix: float(tree)}
    else:
        return {}
    out: dict[str, float] = {}
    for key, value in items:
        out.update(_figures(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def figure_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``path saved -> now`` for each scored figure both results hold that differs (NaN equals NaN); figures
    only one side has (a carat version added them) are not compared."""
    old = _figures({k: saved[k] for k in SCORED_KEYS if k in saved})
    new = _figures({k: now[k] for k in SCORED_KEYS if k in now})
    differ = lambda a, b: not (abs(a - b) <= SAME_FIGURE or (a != a and b != b))
    return [f"{key} {old[key]:.4f} -> {new[key]:.4f}" for key in sorted(set(old) & set(new))
            if differ(old[key], new[key])]


def check_same_figures(path: Path, results: dict[str, Any]) -> None:
    """CaratError, leaving ``path`` as it is, when ``results`` scores differently than the saved results."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CaratError(f"{path}: unreadable ({err}); delete it and rerun to score the ensemble again") from None
    differences = figure_differences(saved if isinstance(saved, dict) else {}, results)
    if differences:
        shown = "; ".join(differences[:3]) + (f" and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise CaratError(f"rescoring the ensemble's members gives other figures than {path} ({shown}): kept the "
                         "file. Its members changed after it was written; check them, or delete it and rerun "
                         "the same command to accept the new figures")


def member_summary(name: str, results: dict[str, Any]) -> dict[str, Any]:
    """One member's own test figures, kept beside the ensemble's so the gain of averaging is visible."""
    def f1s(key: str) -> dict[str, float] | None:
        block = results.get(key)
        if not isinstance(block, dict):
            return None
        return {k: float(block[k]) for k in ("micro_f1", "macro_f1", "macro_auc") if k in block}

    return {"name": name, "best_epoch": results.get("best_epoch"), "test": f1s("test"),
            "test_tuned": f1s("test_tuned"), "test_tuned_micro": f1s("test_tuned_micro")}

