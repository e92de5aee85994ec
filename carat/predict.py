"""``python -m carat.predict``: per-emotion scores and labels for shards or a ``.npz`` of features.

    python -m carat.predict --checkpoint runs/NAME --shards shards --split test --out preds.csv
    python -m carat.predict --checkpoint model.pt --npz features.npz --out preds.json
    python -m carat.predict --config predict.toml --predict.threshold=0.3 --show-config

Its flags are shorthands of the keys of the [predict] section (``PredictConfig``): a ``--config`` TOML file may
set them in a [predict] table, ``--predict.KEY=VALUE`` overrides any, and ``--show-config`` prints the resolved
section, every key documented. Precedence: defaults < --config file < flags < overrides.

The ``.npz`` holds right-padded arrays ``text`` [N, Lt, 300], ``visual`` [N, Lv, 35], ``audio`` [N, La, 74],
their lengths ``text_lengths``, ``visual_lengths``, ``audio_lengths`` [N], and optionally ``ids`` [N] (str).
It is read with ``allow_pickle=False``: no code in a features file ever runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from carat.data.loader.batch import Batch
from carat.data.sources.segment import EMOTIONS, FEATURE_DIMS, MODALITIES
from carat.cli import Alias, add_aliases, require, resolve_section, section_parser
from carat.config import describe_sections
from carat.errors import CaratError, ConfigError, DataError
from carat.inference import score_batches, score_split, torch_device
from carat.inference_config import ScoringConfig, scoring_aliases
from carat.metrics import above_threshold
from carat.storage import resolved
from carat.train.runsync import local_copy


@dataclass
class PredictConfig(ScoringConfig):
    """``python -m carat.predict``: which model, which clips (a shard split or a features file), where to write."""

    shards: str | None = None
    """Shard directory or object-store URL whose `split` is scored; give this or `npz`."""
    npz: str | None = None
    """Features .npz to score (its arrays: the description above, or `python -m carat.predict --help`); give
    this or `shards`."""
    out: str | None = None
    """Output file: .csv (a row per clip) or .json (with the emotions and the threshold). Required."""

    def __post_init__(self) -> None:
        if self.shards is not None and self.npz is not None:
            raise ConfigError(f"predict.shards={self.shards!r} and predict.npz={self.npz!r}: give one source of "
                              "clips, not both")
        if self.out is not None and Path(self.out).suffix not in (".json", ".csv"):
            raise ConfigError(f"predict.out={self.out!r}: use a .json or .csv file name")


SECTION = "predict"
SOURCE_ALIASES: tuple[Alias, ...] = (Alias("--shards", f"{SECTION}.shards"), Alias("--npz", f"{SECTION}.npz"))
ALIASES: tuple[Alias, ...] = scoring_aliases(SECTION) + SOURCE_ALIASES + (Alias("--out", f"{SECTION}.out"),)
"""Every flag is a documented shorthand of a [predict] key."""


def build_parser() -> argparse.ArgumentParser:
    parser = section_parser("python -m carat.predict", __doc__, SECTION)
    defaults = {SECTION: PredictConfig()}
    add_aliases(parser, [a for a in ALIASES if a not in SOURCE_ALIASES], defaults)
    add_aliases(parser.add_mutually_exclusive_group(), SOURCE_ALIASES, defaults)
    return parser


def npz_batches(path: Path, batch_size: int = 16) -> list[Batch]:
    """Batches from a features ``.npz``, with every array checked (names the array and the sample at fault)."""
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path} is not a readable .npz of plain arrays: {err}") from None
    missing = [k for m in MODALITIES for k in (m, f"{m}_lengths") if k not in data.files]
    if missing:
        raise DataError(f"{path}: missing arrays {missing}")
    n = len(_npz_array(data, "text", path))
    ids = ([str(x) for x in _npz_array(data, "ids", path)] if "ids" in data.files
           else [f"sample-{i}" for i in range(n)])
    arrays = {}
    for m in MODALITIES:
        x = _feature_array(_npz_array(data, m, path), m, path)
        lengths = _length_array(_npz_array(data, f"{m}_lengths", path), f"{m}_lengths", ids, path)
        if x.ndim != 3 or x.shape[0] != n or x.shape[2] != FEATURE_DIMS[m] or lengths.shape != (n,):
            raise DataError(f"{path}: {m} has shape {x.shape} / lengths {lengths.shape}; expected "
                            f"[{n}, L, {FEATURE_DIMS[m]}] and [{n}]")
        for i in range(n):
            if not 0 < lengths[i] <= x.shape[1]:
                raise DataError(f"{path}: sample {ids[i]}: {m} length {lengths[i]} outside 1..{x.shape[1]}")
            if not np.isfinite(x[i, : lengths[i]]).all():
                raise DataError(f"{path}: sample {ids[i]}: {m} features contain NaN or inf")
        arrays[m] = (x, lengths)
    batches = []
    for start in range(0, n, batch_size):
        idx = slice(start, min(start + batch_size, n))
        fields = {}
        for m in MODALITIES:
            x, lengths = arrays[m]
            width = int(lengths[idx].max())
            mask = np.arange(width)[None, :] < lengths[idx, None]
            fields[m] = torch.from_numpy(x[idx, :width] * mask[..., None])
            fields[f"{m}_mask"] = torch.from_numpy(mask)
        size = len(ids[idx])
        batches.append(Batch(keys=ids[idx], labels=torch.zeros(size, 6), intensities=torch.full((size, 6), float("nan")),
                             weight=torch.ones(size), **fields))
    return batches


def _npz_array(data: np.lib.npyio.NpzFile, name: str, path: Path) -> np.ndarray:
    """One array of the .npz. numpy refuses an object array only when it is read (allow_pickle=False): named
    here, since loading it would mean unpickling, i.e. running code from the file."""
    try:
        return data[name]
    except ValueError as err:
        if "allow_pickle" not in str(err):
            raise DataError(f"{path}: array {name!r} is unreadable: {err}") from None
        raise DataError(f"{path}: array {name!r} is an object array (pickled Python objects), which carat never "
                        "loads; save it as a plain numeric array (ids as strings)") from None


def _feature_array(x: np.ndarray, name: str, path: Path) -> np.ndarray:
    """Features as float32; DataError naming the array for anything that is not numbers."""
    if x.dtype.kind not in "fiu":
        raise DataError(f"{path}: array {name!r} has dtype {x.dtype}; features must be numbers (float32)")
    return x.astype(np.float32)


def _length_array(lengths: np.ndarray, name: str, ids: list[str], path: Path) -> np.ndarray:
    """Frame counts as int64. Whole-valued floats are accepted exactly; a fractional one is an error naming the
    array and sample, since truncating it would silently change which frames the model sees."""
    if lengths.dtype.kind in "iu":
        return lengths.astype(np.int64)
    if lengths.dtype.kind != "f":
        raise DataError(f"{path}: array {name!r} has dtype {lengths.dtype}; lengths must be integers")
    flat = lengths.reshape(-1)
    fractional = np.flatnonzero(~np.isfinite(flat) | (flat != np.round(flat)))
    if fractional.size:
        i = int(fractional[0])
        who = ids[i] if lengths.ndim == 1 and i < len(ids) else f"at index {i}"
        raise DataError(f"{path}: array {name!r}: sample {who} has length {flat[i]!r}, not a whole number "
                        f"({fractional.size} such); lengths count frames: store them as integers")
    return lengths.astype(np.int64)


def write_predictions(out: Path, keys, scores: np.ndarray, threshold: float | np.ndarray) -> None:
    labels = above_threshold(scores, threshold).astype(int)  # the one rule: float32 score > float32 threshold
    rows = [{"id": str(k), **{f"score_{e}": float(s[i]) for i, e in enumerate(EMOTIONS)},
             **{e: int(y[i]) for i, e in enumerate(EMOTIONS)}} for k, s, y in zip(keys, scores, labels)]
    try:
        _write_rows(out, rows, threshold)
    except OSError as err:  # a read-only or missing place: the path and the reason, in one line
        raise DataError(f"{out}: cannot write the predictions there ({err.strerror or err})") from None


def _write_rows(out: Path, rows: list[dict], threshold: float | np.ndarray) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        with out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["id"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        out.write_text(json.dumps({"emotions": list(EMOTIONS), "threshold": np.asarray(threshold).tolist(),
                                   "predictions": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    from carat.inference import load_model

    parser = build_parser()
    try:
        args, cfg = resolve_section(parser, argv, SECTION, PredictConfig, ALIASES)
        if args.show_config:
            print(describe_sections({SECTION: cfg}), end="")
            return 0
        require(parser, cfg, ALIASES, ("checkpoint", "out"))
        if cfg.shards is None and cfg.npz is None:
            parser.error("one of the arguments --shards --npz is required (or predict.shards / predict.npz in the "
                         "--config file)")
        model, run_cfg = load_model(local_copy(cfg.checkpoint), cfg.tag)
        device = torch_device(cfg.device)
        if cfg.npz is not None:
            pred = score_batches(model, npz_batches(Path(cfg.npz)), device)
        else:
            pred = score_split(model, run_cfg, resolved(cfg.shards), cfg.split, device)
        threshold = run_cfg.model.threshold if cfg.threshold is None else cfg.threshold
        write_predictions(Path(cfg.out), pred["keys"], pred["scores"], threshold)
    except CaratError as err:
        print(f"carat.predict: error: {err}", file=sys.stderr)
        return 1
    print(f"[carat] wrote {len(pred['keys'])} predictions to {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
