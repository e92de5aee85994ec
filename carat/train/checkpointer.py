"""The run's checkpoints, driven through its DeepSpeed engine: save each epoch, keep the best, resume, refuse, prune.

:class:`Checkpointer` applies the file protocol of :mod:`carat.train.checkpoint` (complete-or-absent tags, markers,
safe loading) to one rank of a run: what goes into a checkpoint (DeepSpeed's files, carat's client state from the
:class:`~carat.train.state.RunState`, one RNG file per rank), in which order the ranks write and vouch for it, how
best/ is swapped in, and how a resume restores the run. It is a module of its own because checkpoint.py reads and
writes files without an engine, and export, evaluate and predict use it without any of this.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from carat.config import CaratConfig, config_to_dict
from carat.train import dist
from carat.train.averaging import WeightAverage
from carat.train.checkpoint import (
    CheckpointError, KeptCopy, ResumePoint, checkpoint_write_errors, clear_tag, committed, corpus_fingerprint,
    fetch_written_elsewhere, files_written, find_resume_point, list_tag_files, load_checkpoint_file,
    read_client_state, recover_dir, replace_dir, require_intact, resume_refusal, safe_torch_load,
    save_torch_atomic, seal_files, torch_save_reports_os_errors, write_completion_marker, write_latest,
)
from carat.train.rundir import RunDir
from carat.train.state import RunState


def rng_state() -> dict[str, Any]:
    """Every RNG stream of this process, as tensors and plain numbers only: loadable with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` epoch tags (names sort by epoch); returns what was removed."""
    tags = sorted(p for p in root.glob("epoch-*") if p.is_dir())
    removed = tags[:-keep] if keep > 0 else []
    for tag in removed:
        shutil.rmtree(tag, ignore_errors=True)
    return removed


class Checkpointer:
    """One rank's side of the run's checkpoints. Every method is called on every rank (they hold barriers and
    gathers); rank 0 vouches for each checkpoint, and each rank that keeps a copy of the run directory on its
    host (``keeps_copy``) clears, swaps and prunes it there."""

    def __init__(self, engine: Any, state: RunState, cfg: CaratConfig, run: RunDir, *, shard_dir: Path,
                 resume_dir: Path | None, checkpoint_root: Path | None, host_copy: bool,
                 report: Callable[[dict[str, Any], Path | None], None], average: WeightAverage | None,
                 warn: Callable[[str], None]) -> None:
        self.engine = engine
        self.state = state
        self.cfg = cfg
        self.run = run
        self.shard_dir = shard_dir
        self.resume_dir = resume_dir
        """A DeepSpeed checkpoint directory (with a `latest` file) to resume from, or None for a fresh start."""
        self.checkpoint_root = checkpoint_root
        """Where epoch checkpoints are written; None = a per-epoch temporary directory (Ray copies it away)."""
        self.report = report
        """The launcher's callback, once per epoch on every rank, with the record and this rank's checkpoint."""
        self.average = average
        self.warn = warn
        self.rank = dist.rank()
        self.world = dist.world_size()
        self.is_main = self.rank == 0
        self.keeps_copy = self.is_main or host_copy
        """This rank maintains the run directory on its host (rank 0; one rank per host for a staged run)."""
        self.corpus = corpus_fingerprint(shard_dir)
        """Hash of the shard table trained on: a resume on other shards is refused."""

    # -- saving ------------------------------------------------------------------------------------------
    def client_state(self, record: dict[str, Any] | None = None) -> dict[str, Any]:
        """carat's state in every checkpoint; ``history`` (with this epoch's ``record``) makes history.jsonl
        reconstructible from the checkpoint alone."""
        state = self.state
        return {
            "epoch": state.epoch, "global_step": state.global_step, "best": dict(state.best),
            "history": state.history, "config": config_to_dict(self.cfg), "world_size": self.world,
            "warnings": list(state.warnings), "corpus": self.corpus, "record": record,
            "nonfinite_total": state.nonfinite_total,
            "initial_loss": state.initial_loss, "initial_loss_step": state.initial_loss_step,
            **({"weight_average": self.average.state_dict()} if self.average is not None else {}),
        }

    def save_epoch(self, record: dict[str, Any]) -> None:
        """The epoch's checkpoint, reported to the launcher; old tags pruned (``train.keep_checkpoints``). Without
        a checkpoint root it goes to a temporary folder that the report copies away (Ray)."""
        tag = f"epoch-{self.state.epoch:03d}"
        if self.checkpoint_root is not None:
            self.save_checkpoint(self.checkpoint_root, tag, record)
            self.report(record, self.checkpoint_root)
            if self.keeps_copy:
                prune_checkpoints(self.checkpoint_root, self.cfg.train.keep_checkpoints)
            return
        with tempfile.TemporaryDirectory(prefix="carat-ckpt-") as tmp:
            self.save_checkpoint(Path(tmp), tag, record)
            self.report(record, Path(tmp))

    def save_checkpoint(self, root: Path, tag: str, record: dict[str, Any] | None = None,
                        kept_copy: KeptCopy | None = None) -> None:
        """A complete-or-absent checkpoint (see :mod:`carat.train.checkpoint`): DeepSpeed's files and each
        rank's RNG file, fsync'ed, then rank 0's completion marker, then ``latest``. ``kept_copy``: what a
        failed save leaves valid when ``root`` is a staging folder."""
        tag_dir = root / tag
        with checkpoint_write_errors(root, tag, kept_copy):
            if self.keeps_copy:
                clear_tag(tag_dir)  # a torn tag of an earlier attempt, or the tag being replaced
            dist.barrier()
            with torch_save_reports_os_errors():  # a full disk: ENOSPC naming the file, not `unexpected pos`
                self.engine.save_checkpoint(str(root), tag=tag, client_state=self.client_state(record),
                                            save_latest=False)
            # DeepSpeed keeps rank 0's client state only; RNG streams differ per rank, so each rank saves its own.
            save_torch_atomic(rng_state(), tag_dir / f"rng_rank{self.rank}.pt")
            mine = list_tag_files(tag_dir)
            digests = seal_files(tag_dir, list(mine))  # each rank hashes (and fsyncs) what it wrote
            files_written()  # a run in a bucket: this host's files are there before the gather lets rank 0 vouch
            # Under Ray every rank saves into its own folder: the marker lists the files of all of them.
            files: dict[str, int] = {}
            hashes: dict[str, str] = {}
            for sizes, part in dist.gather_objects((mine, digests)):
                files.update(sizes)
                hashes.update(part)
            if self.is_main:
                write_completion_marker(tag_dir, files, {
                    "epoch": self.state.epoch, "global_step": self.state.global_step, "world_size": self.world,
                    "corpus": self.corpus, "record": record}, hashes)
                write_latest(root, tag)
        dist.barrier()

    def save_best(self) -> None:
        """best/ is replaced whole: written beside it, then swapped in, so a crash keeps the old best model.
        It holds `latest` too: under ZeRO-3 a module-only load ignores the tag and reads `latest`."""
        best = self.run.best
        staging = best.with_name(best.name + ".staging")
        try:
            self.save_checkpoint(staging, "best", kept_copy=KeptCopy(best, "best model"))
        except CheckpointError:
            if self.keeps_copy:  # a torn staging copy only holds the space the next save needs
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.keeps_copy:
            replace_dir(staging, best)
        files_written()
        dist.barrier()  # every host's best/ is in the bucket before rank 0's marker goes there
        if self.is_main:
            committed(best.parent, best.name)
        dist.barrier()  # ... and in the bucket before any host reads best/ back from it

    # -- resuming ----------------------------------------------------------------------------------------
    def recover_best(self) -> None:
        """Put back the old best/ when a crash interrupted its replacement (ranks that keep a copy)."""
        if self.keeps_copy:
            recover_dir(self.run.best)

    def find_resume(self) -> ResumePoint | None:
        """The newest complete checkpoint of the resume directory (None: start fresh), warning about newer
        incomplete ones that are skipped."""
        if self.resume_dir is None:
            return None
        point = find_resume_point(self.resume_dir)
        if point is not None and point.warning():
            self.warn(point.warning())
        if point is not None and point.note() and self.is_main:
            print(f"[carat] note: {point.note()}", flush=True)
        return point if point is not None and point.tag is not None else None

    def check_resumable(self, point: ResumePoint) -> None:
        """Refuse, before anything is written, a resume whose saved state means something else: another
        world size (ZeRO shards optimizer state by rank), another corpus, or changed config keys that
        shape the model, loss, schedule or batch plan (:data:`carat.train.checkpoint.RESUMABLE_CHANGES`)."""
        refusal = resume_refusal(read_client_state(point.root, point.tag), config_to_dict(self.cfg), self.corpus,
                                 self.world, point.root / point.tag, self.shard_dir, self.run.config)
        if refusal:
            raise CheckpointError(refusal)

    def resume(self, point: ResumePoint) -> None:
        """Load the engine's weights, optimizer and scheduler from ``point``, and restore the run state, the
        weight average and this rank's RNG streams from it."""
        directory, tag = point.root, point.tag
        with safe_torch_load():
            path, saved = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise CheckpointError(f"no DeepSpeed checkpoint could be loaded from {directory / tag}")
        self.state.restore(saved, self.cfg.train.select_metric)
        self.restore_average(saved, directory / tag)
        rng_file = directory / tag / f"rng_rank{self.rank}.pt"
        try:
            set_rng_state(load_checkpoint_file(rng_file))
        except (CheckpointError, KeyError, TypeError) as err:  # still a valid resume, only not bit-identical
            print(f"[carat] warning: {rng_file}: {err}; rank {self.rank} resumes with fresh RNG streams")
        if self.is_main:
            print(f"[carat] resumed from {directory / tag} after epoch {self.state.epoch} "
                  f"(step {self.state.global_step})")

    def load_best(self) -> None:
        """The best epoch's weights (and their average) into the engine, for the final evaluation; the model
        scored on test is the one saved. Nothing when no epoch wrote best/."""
        best = self.run.best
        if self.keeps_copy:  # a run staged on several hosts: this host's copy of best/ holds its own ranks' files
            fetch_written_elsewhere(best / "best")
        dist.barrier()
        if not (best / "best").is_dir():
            return
        require_intact(best / "best", "best model")
        with safe_torch_load():
            _, saved = self.engine.load_checkpoint(str(best), tag="best", load_module_only=True,
                                                   load_optimizer_states=False, load_lr_scheduler_states=False)
        self.restore_average(saved or {}, best / "best")

    def restore_average(self, saved: dict[str, Any], where: Path) -> None:
        if self.average is None:
            return
        if "weight_average" not in saved:
            raise CheckpointError(f"{where} holds no weight average, and train.ema_decay="
                                  f"{self.cfg.train.ema_decay} needs one")
        try:
            self.average.load_state_dict(saved["weight_average"], str(where))
        except ValueError as err:
            raise CheckpointError(str(err)) from None
