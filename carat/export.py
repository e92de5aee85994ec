"""``python -m carat.export``: a DeepSpeed (ZeRO) checkpoint -> one plain PyTorch file.

The output holds ``{"state_dict", "config", "carat_version", "source"}``: the CARAT model's fp32 weights and
buffers (prototypes, contrastive queue) merged from every rank's shards with DeepSpeed's ``zero_to_fp32``,
and the resolved config to rebuild the model with. ``carat.evaluate`` and ``carat.predict`` read either form.

    python -m carat.export --checkpoint runs/NAME --out model.pt          # the run's best model
    python -m carat.export --checkpoint runs/NAME/checkpoints --tag epoch-003 --out model.pt
    python -m carat.export --config export.toml --export.tag=epoch-003 --show-config

Its flags are shorthands of the keys of the [export] section (``ExportConfig``): a ``--config`` TOML file may set
them in an [export] table, ``--export.KEY=VALUE`` overrides any, and ``--show-config`` prints the resolved
section, every key documented. Precedence: defaults < --config file < flags < overrides.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import carat
from carat.atomic import publish, temp_path
from carat.cli import Alias, add_aliases, require, resolve_section, section_parser
from carat.config import describe_sections
from carat.errors import CaratError
from carat.inference import MEMBERS, is_ensemble, is_run_dir, load_model, resolve_checkpoint  # noqa: F401
from carat.inference_config import CheckpointSource, checkpoint_aliases
from carat.train.checkpoint import check_complete, consolidate, read_client_state  # noqa: F401  (re-exported)


@dataclass
class ExportConfig(CheckpointSource):
    """``python -m carat.export``: which checkpoint, which file."""

    checkpoint: str | None = None
    """Run directory (its best model) or DeepSpeed checkpoint folder; a path or an object-store URL
    (s3://bucket/runs/NAME). An ensemble run is exported member by member (runs/NAME/members/member-0). Required."""
    out: str | None = None
    """The plain PyTorch file to write (model.pt). Required."""


SECTION = "export"
ALIASES: tuple[Alias, ...] = checkpoint_aliases(SECTION) + (Alias("--out", f"{SECTION}.out"),)
"""Every flag is a documented shorthand of an [export] key."""


def build_parser() -> argparse.ArgumentParser:
    parser = section_parser("python -m carat.export", __doc__, SECTION)
    add_aliases(parser, ALIASES, {SECTION: ExportConfig()})
    return parser


def export(path: Path, out: Path, tag: str | None = None) -> Path:
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
    parser = build_parser()
    try:
        args, cfg = resolve_section(parser, argv, SECTION, ExportConfig, ALIASES)
        if args.show_config:
            print(describe_sections({SECTION: cfg}), end="")
            return 0
        require(parser, cfg, ALIASES, ("checkpoint", "out"))
        from carat.train.runsync import local_copy

        out = export(local_copy(cfg.checkpoint), Path(cfg.out), cfg.tag)
    except CaratError as err:
        print(f"carat.export: error: {err}", file=sys.stderr)
        return 1
    print(f"[carat] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
