"""``python -m carat.export``: a DeepSpeed (ZeRO) checkpoint -> one plain PyTorch file.

The output holds ``{"state_dict", "config", "carat_version", "source"}``: the CARAT model's fp32 weights and
buffers (prototypes, contrastive queue) merged from every rank's shards with DeepSpeed's ``zero_to_fp32``,
and the resolved config to rebuild the model with. ``carat.evaluate`` and ``carat.predict`` read either form.

    python -m carat.export --checkpoint runs/NAME --out model.pt          # the run's best model
    python -m carat.export --checkpoint runs/NAME/checkpoints --tag epoch-003 --out model.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

import carat
from carat.atomic import publish, temp_path
from carat.config import config_from_dict
from carat.errors import CaratError

MODULE_PREFIX = "model."  # the training wrapper holds CARAT as `.model` next to the loss


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


def read_client_state(save_dir: Path, tag: str) -> dict[str, Any]:
    """The model-states file of rank 0 (DeepSpeed's state plus carat's client state), loaded with
    ``weights_only=True``: a crafted checkpoint cannot run code."""
    from carat.train.checkpoint import load_checkpoint_file

    files = sorted((save_dir / tag).glob("*model_states.pt"))
    if not files:
        raise CaratError(f"{save_dir / tag} has no *model_states.pt file")
    state = load_checkpoint_file(files[0])
    if not isinstance(state, dict):
        raise CaratError(f"{files[0]} is not a DeepSpeed model-states file (it holds a {type(state).__name__})")
    return state


def check_complete(save_dir: Path, tag: str) -> None:
    """A torn or damaged tag (a save that a kill interrupted, a truncated file, bytes that no longer match the
    marker's sha256) is an error naming the file. Checkpoints from before completion markers (no tag in
    ``save_dir`` has one) are taken as they are; markers from before hashes are checked by size, with a note."""
    from carat.train.checkpoint import COMPLETE_FILE, incomplete_reason, unhashed_note

    tag_dir = save_dir / tag
    has_markers = (tag_dir / COMPLETE_FILE).exists() or any(save_dir.glob(f"*/{COMPLETE_FILE}"))
    reason = incomplete_reason(tag_dir) if has_markers else None
    if reason is None:
        if has_markers and unhashed_note(tag_dir):
            print(f"[carat] note: {unhashed_note(tag_dir)}", file=sys.stderr, flush=True)
        return
    if tag == "best":  # a best model has nothing to fall back to
        raise CaratError(f"best model {tag_dir} is damaged or incomplete: {reason}; restore it from a copy, or "
                         f"score one epoch's checkpoint with --checkpoint {save_dir.parent / 'checkpoints'} "
                         "--tag epoch-NNN")
    raise CaratError(f"{tag_dir} is a damaged or incomplete checkpoint ({reason}); pick another tag with --tag "
                     f"(tags: {', '.join(sorted(p.name for p in save_dir.iterdir() if p.is_dir()))})")


def consolidate(save_dir: Path, tag: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(CARAT state dict in fp32, the checkpoint's client state) from a sharded DeepSpeed checkpoint."""
    from carat.train.checkpoint import CheckpointError, safe_torch_load

    check_complete(save_dir, tag)
    state = read_client_state(save_dir, tag)
    if list((save_dir / tag).glob("*optim_states.pt")) and not _is_stage0(state):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with safe_torch_load():
                full = get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
        except CaratError:
            raise
        except Exception as err:  # a damaged shard file: DeepSpeed raises whatever torch.load raised
            raise CheckpointError(f"{save_dir / tag}: cannot merge the ZeRO shards ({type(err).__name__}: "
                                  f"{str(err)[:300]})") from None
    else:  # ZeRO stage 0 keeps the whole module in the model-states file
        full = state["module"]
    weights = {k[len(MODULE_PREFIX):]: v.float() if v.is_floating_point() else v
               for k, v in full.items() if k.startswith(MODULE_PREFIX)}
    if not weights:
        raise CaratError(f"{save_dir / tag}: no '{MODULE_PREFIX}*' weights found; is this a carat checkpoint?")
    from carat.train.averaging import averaged_weights

    average = averaged_weights(state)  # train.ema_decay: the weights the run evaluated
    unknown = sorted(set(average) - set(weights))
    if unknown:
        raise CaratError(f"{save_dir / tag}: its weight average names parameters the model lacks ({unknown[:3]})")
    return {**weights, **average}, state


def _is_stage0(state: dict[str, Any]) -> bool:
    return int(state.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)) == 0


def load_model(path: Path, tag: str | None = None):
    """(CARAT in eval mode, its CaratConfig) from an exported file or any checkpoint form; for an ensemble run
    directory (train.ensemble_size > 1) the :class:`carat.ensemble.EnsembleModel` of its members."""
    from carat.ensemble import is_ensemble, load_ensemble
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
        save_dir, tag = resolve_checkpoint(path, tag)
        weights, state = consolidate(save_dir, tag)
        cfg = config_from_dict(state["config"])
    model = CARAT.from_config(cfg.model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CaratError(f"{path}: checkpoint does not match the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return model.eval(), cfg


def export(path: Path, out: Path, tag: str | None = None) -> Path:
    from carat.ensemble import MEMBERS, is_ensemble

    if is_ensemble(path):  # one file holds one model; evaluate and predict read the ensemble directory itself
        raise CaratError(f"{path} is an ensemble run: export its members one by one ({path / MEMBERS}/member-N), "
                         f"or give {path} itself to carat.evaluate / carat.predict")
    save_dir, tag = resolve_checkpoint(path, tag)
    weights, state = consolidate(save_dir, tag)
    blob = {"state_dict": weights, "config": state["config"], "carat_version": carat.__version__,
            "source": {"checkpoint": str(save_dir), "tag": tag, "epoch": state.get("epoch"),
                       "world_size": state.get("world_size")}}
    from carat.train.checkpoint import save_torch

    tmp = temp_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_torch(blob, tmp)
        publish(tmp, out)
    except OSError as err:  # a full disk or a read-only folder: say which file, not torch's `unexpected pos`
        raise CaratError(f"{err.strerror or err} while writing {err.filename or out}: free space there or "
                         "choose another --out") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m carat.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="run directory or DeepSpeed checkpoint; a path or an object-store URL")
    parser.add_argument("--tag", help="checkpoint tag (default: the run's best, else `latest`)")
    parser.add_argument("--out", type=Path, required=True, help="output .pt file")
    args = parser.parse_args(argv)
    try:
        from carat.train.runsync import local_copy

        out = export(local_copy(args.checkpoint), args.out, args.tag)
    except CaratError as err:
        print(f"carat.export: error: {err}", file=sys.stderr)
        return 1
    print(f"[carat] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
