"""``python -m carat.data synth|prepare|inspect|verify``: build, convert, inspect and check carat corpora.

synth    write a synthetic CMU-MOSEI-like corpus (deterministic from a seed)
prepare  convert CMU-MOSEI you hold (.csd HDF5 files or a MulT-style pickle) into sorted WebDataset shards
inspect  print a corpus' dataset card and write plots (lengths, labels, padding efficiency)
verify   check every shard against the manifest; exit status 1 with a report naming shard and key

Errors a user can fix (missing files, bad data, bad options) print one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from carat.errors import CaratError

_PICKLE_WARNING = (
    "SECURITY: unpickling executes arbitrary code from the file. Only use --source pickle on files you "
    "trust, and pass --trust-pickle to confirm; prefer the .csd source.")


def _show_progress(args: argparse.Namespace) -> bool:
    """tqdm bars only on a terminal, unless --no-progress."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def _storage_from_args(args: argparse.Namespace):
    from carat.data.shards import StorageConfig

    kwargs = {"dtype": args.dtype}
    if args.shard_max_mb is not None:
        kwargs["shard_max_bytes"] = int(args.shard_max_mb * 1024 * 1024)
    if args.shard_max_samples is not None:
        kwargs["shard_max_samples"] = args.shard_max_samples
    return StorageConfig(**kwargs)


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage")
    g.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="feature dtype on disk (default float16: half the bytes)")
    g.add_argument("--shard-max-mb", type=float, default=None, help="target shard size in MiB (default 256)")
    g.add_argument("--shard-max-samples", type=int, default=None, help="cap on samples per shard (default none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal)")


SYNTH_KNOBS = ("cue_strength", "cue_layout", "feature_scale_spread", "feature_mean_spread", "label_noise")
"""SynthConfig fields the synth command exposes (unset flags keep SynthConfig's defaults)."""


def _add_structure_args(p: argparse.ArgumentParser) -> None:
    from carat.data.synth import CUE_LAYOUTS, SynthConfig

    d = SynthConfig()
    g = p.add_argument_group("planted structure (defaults: the standard synthetic corpus)")
    g.add_argument("--cue-strength", type=float, default=None,
                   help=f"amplitude of a planted cue in background-noise units (default {d.cue_strength})")
    g.add_argument("--cue-layout", choices=CUE_LAYOUTS, default=None,
                   help="which modality carries which emotion: the default table, or each emotion's row permuted "
                        "across modalities from the seed (default default)")
    g.add_argument("--feature-scale-spread", type=float, default=None,
                   help=f"log-std of the per-dimension feature scale (default {d.feature_scale_spread}; ~2.0 "
                        "mimics real COVAREP/FACET magnitudes)")
    g.add_argument("--feature-mean-spread", type=float, default=None,
                   help=f"std of the per-dimension feature mean, in feature units (default {d.feature_mean_spread})")
    g.add_argument("--label-noise", type=float, default=None,
                   help=f"probability that a present emotion leaves no cue at all (default {d.label_noise})")


def _cmd_synth(args: argparse.Namespace) -> int:
    from carat.data.synth import SynthConfig, split_sizes, synthesize_corpus

    knobs = {name: getattr(args, name) for name in SYNTH_KNOBS if getattr(args, name) is not None}
    cfg = SynthConfig(seed=args.seed, scale=args.scale, length_scale=args.length_scale, **knobs)
    sizes = split_sizes(cfg)
    if args.format == "csd":
        from carat.data.synth_csd import write_synthetic_csd

        print(f"exporting {sum(sizes.values())} synthetic segments {sizes} as CMU-MultimodalSDK .csd files into "
              f"{args.out} (seed {cfg.seed}, length_scale {cfg.length_scale})", file=sys.stderr)
        out = write_synthetic_csd(Path(args.out), cfg)
        print(f"wrote {out}; convert with: python -m carat.data prepare --source csd --input {out} --out SHARDS")
        return 0
    storage = _storage_from_args(args)
    print(f"synthesising {sum(sizes.values())} segments {sizes} into {args.out} "
          f"(seed {cfg.seed}, length_scale {cfg.length_scale}, {storage.dtype})", file=sys.stderr)
    out = synthesize_corpus(Path(args.out), cfg, storage, progress=_show_progress(args),
                            reference=not args.no_reference)
    print(f"wrote {out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from carat.data.prepare import PrepareConfig, prepare_corpus

    cfg = PrepareConfig(source=args.source, nan_policy=args.nan_policy, inf_policy=args.inf_policy,
                        on_error=args.on_error, trust_pickle=args.trust_pickle, reference=not args.no_reference)
    overrides = {m: Path(p) for m, p in (("text", args.text_file), ("visual", args.visual_file),
                                         ("audio", args.audio_file), ("labels", args.labels_csd)) if p}
    out = prepare_corpus(Path(args.input), Path(args.out), cfg, _storage_from_args(args),
                         labels_path=Path(args.labels) if args.labels else None,
                         folds_path=Path(args.folds) if args.folds else None,
                         csd_files=overrides, progress=_show_progress(args))
    print(f"wrote {out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from carat.data.card import oracle_lines, read_card
    from carat.data.inspect import inspect_corpus

    report = inspect_corpus(Path(args.dir), plots_dir=Path(args.plots) if args.plots else None,
                            plots=not args.no_plots, token_budget=args.token_budget)
    print(report)
    for line in oracle_lines(read_card(Path(args.dir)).get("reference_scorer")):
        print(line)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from carat.data.verify import verify_corpus

    report = verify_corpus(Path(args.dir), "quick" if args.quick else "full")
    print(report.format(limit=args.max_problems))
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m carat.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{synth,prepare,inspect,verify}")

    p = sub.add_parser("synth", help="write a synthetic CMU-MOSEI-like corpus",
                       description="Write a synthetic CMU-MOSEI-like corpus: real split sizes and dims, long-tailed "
                                   "unaligned lengths, test-split label prevalences, a planted multimodal signal, "
                                   "and a dataset card with a logistic-regression reference floor.")
    p.add_argument("--out", required=True, help="output directory (shards, manifest.parquet, card.json)")
    p.add_argument("--format", choices=("shards", "csd"), default="shards",
                   help="shards: carat's sorted WebDataset shards + card (default); csd: the four CMU-MultimodalSDK "
                        ".csd files of CMU-MOSEI (standard-fold video ids), to run `prepare --source csd` on; "
                        "storage and reference options apply to shards only")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the real split sizes (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0): same seed, same bytes")
    p.add_argument("--length-scale", type=float, default=1.0,
                   help="shrink all sequence lengths by this factor, for fast CPU tests only (default 1.0)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference scorer in the card")
    _add_structure_args(p)
    _add_storage_args(p)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="convert CMU-MOSEI .csd files or a pickle into shards",
                       description="Convert CMU-MOSEI you hold into sorted WebDataset shards + manifest + card. "
                                   "--source csd reads a directory with the four CMU-MultimodalSDK files "
                                   "(CMU_MOSEI_TimestampedWordVectors.csd, CMU_MOSEI_VisualFacet42.csd, "
                                   "CMU_MOSEI_COVAREP.csd, CMU_MOSEI_Labels.csd). --source pickle reads a "
                                   "MulT/TAILOR-style pickle. " + _PICKLE_WARNING)
    p.add_argument("--source", choices=("csd", "pickle"), required=True)
    p.add_argument("--input", required=True, help="csd: directory of the .csd files; pickle: the .pkl file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--folds", help="JSON with train/valid/test video id lists (default: the standard folds)")
    p.add_argument("--text-file", help="csd: override the word-vector file path")
    p.add_argument("--visual-file", help="csd: override the FACET file path")
    p.add_argument("--audio-file", help="csd: override the COVAREP file path")
    p.add_argument("--labels-csd", help="csd: override the labels file path")
    p.add_argument("--labels", help="pickle: emotion labels (.npy/.npz [N,6] 0/1 per split, or CARAT-style "
                                    "token lists [BOS, e..., EOS] with tokens 4..9 = happy..fear)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="confirm the pickle (and a .pt/.pkl labels file) is trusted: unpickling executes code")
    p.add_argument("--nan-policy", choices=("zero", "error"), default="zero", help="NaN values (default zero)")
    p.add_argument("--inf-policy", choices=("zero", "clip", "error"), default="zero",
                   help="+-inf values: zero, clip to the finite range of that dimension in the segment, or error")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="corrupt data (wrong dims, mismatched ids): raise, or skip and count in the card")
    p.add_argument("--no-reference", action="store_true", help="skip the reference scorer in the card")
    _add_storage_args(p)
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("inspect", help="print a corpus' dataset card and write plots",
                       description="Print the dataset card of a corpus and write PNG plots: length histograms, "
                                   "label prevalence, padding efficiency of sorted-bucketed vs random batching.")
    p.add_argument("dir", help="corpus directory (with card.json and manifest.parquet)")
    p.add_argument("--plots", help="plot directory (default DIR/plots)")
    p.add_argument("--no-plots", action="store_true", help="print the summary only")
    p.add_argument("--token-budget", type=int, default=None,
                   help="padded frames per batch for the padding-efficiency plot (default: the loader's)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("verify", help="check every shard against the manifest",
                       description="Check a corpus: manifest against shard table, sizes, headers at every sample's "
                                   "offset; by default also sha256, decodability, finite values, non-empty "
                                   "sequences, label ranges. Exit status 1 with a report naming shard and key.")
    p.add_argument("dir", help="corpus directory (with manifest.parquet and shards.parquet)")
    p.add_argument("--quick", action="store_true", help="sizes and headers only (what training checks at start)")
    p.add_argument("--max-problems", type=int, default=50, help="problems to print (all are counted)")
    p.set_defaults(func=_cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; returns the exit status (CaratError -> one line on stderr, status 1)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CaratError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (shards written so far are kept and reused on a rerun)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
