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

import carat
from carat.atomic import publish, temp_path
from carat.errors import CaratError
from carat.inference import MEMBERS, is_ensemble, is_run_dir, load_model, resolve_checkpoint  # noqa: F401
from carat.train.checkpoint import check_complete, consolidate, read_client_state  # noqa: F401  (re-exported)


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
