"""``python -m carat.data synth|prepare|inspect|verify``: build, convert, inspect and check carat corpora.

synth    write a synthetic CMU-MOSEI-like corpus (deterministic from a seed)
prepare  convert CMU-MOSEI you hold (.csd HDF5 files or a MulT-style pickle) into sorted WebDataset shards
inspect  print a corpus' dataset card and write plots (lengths, labels, padding efficiency)
verify   check every shard against the manifest; exit status 1 with a report naming shard and key

synth, prepare and inspect read the config tree of ``python -m carat.train``, through the command line every
carat command shares (:mod:`carat.cli`): ``--config FILE.toml`` (the same file; its [synth], [storage], [prepare]
and [loader] tables apply), ``--section.key=value`` overrides, checked by the same code, and ``--show-config``.
Some flags are documented shorthands of config keys (``--scale``, ``--seed``, ``--length-scale``, ``--dtype``,
``--shard-max-mb``, ``--source``, ``--trust-pickle``, ``--no-reference``): an unset flag leaves the config's
value. The other knobs are set as keys (``--synth.cue_layout=shuffled``, ``--prepare.nan_policy=error``); their
old flags (``--cue-layout``, ``--nan-policy`` ...) still work for one release, with a deprecation line.
Precedence: the preset (seed unless ``--preset``) < the ``--config`` file < the flags < ``--section.key=value``.

    python -m carat.data synth --out shards --preset tiny               # the quickstart's corpus
    python -m carat.data synth --out shards --config run.toml --synth.seed=3 --show-config

Errors a user can fix (missing files, bad data, bad options) print one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from carat.cli import Alias, add_aliases, add_config_arguments, alias_overrides, parse_command_line, tree_defaults
from carat.errors import CaratError, ConfigError
from carat.storage import as_location

if TYPE_CHECKING:
    from carat.config import CaratConfig

_PICKLE_WARNING = (
    "SECURITY: unpickling executes arbitrary code from the file. Only use --source pickle on files you "
    "trust, and pass --trust-pickle to confirm; prefer the .csd source.")

MIB = 1024 * 1024

# Shorthands name what a command makes and from what: the corpus' size and seed, its storage format, the source and
# the pickle confirmation. The knobs of the planted signal, the cleaning policies and the rest are config keys;
# their flags are deprecated (README, Changelog) and still work for one release.
SYNTH_ALIASES: tuple[Alias, ...] = (
    Alias("--scale", "synth.scale", "fraction of the real split sizes"),
    Alias("--seed", "synth.seed", "random seed: same seed, same bytes"),
    Alias("--length-scale", "synth.length_scale",
          "shrink all sequence lengths by this factor, for fast CPU tests only"),
)
STRUCTURE_ALIASES: tuple[Alias, ...] = (
    Alias("--cue-strength", "synth.cue_strength", "amplitude of a planted cue in background-noise units",
          deprecated=True),
    Alias("--cue-layout", "synth.cue_layout",
          "which modality carries which emotion: the default table, or each emotion's row permuted across "
          "modalities from the seed", deprecated=True),
    Alias("--feature-scale-spread", "synth.feature_scale_spread",
          "log-std of the per-dimension feature scale (~2.0 mimics real COVAREP/FACET magnitudes)", deprecated=True),
    Alias("--feature-mean-spread", "synth.feature_mean_spread",
          "std of the per-dimension feature mean, in feature units", deprecated=True),
    Alias("--label-noise", "synth.label_noise", "probability that a present emotion leaves no cue at all",
          deprecated=True),
)
STORAGE_ALIASES: tuple[Alias, ...] = (
    Alias("--dtype", "storage.dtype", "feature dtype on disk (float16: half the bytes)"),
    Alias("--shard-max-mb", "storage.shard_max_bytes", "target shard size in MiB",
          to_config=lambda mib: int(mib * MIB), show_default=lambda n: f"{n} ({n / MIB:g} MiB)"),
    Alias("--shard-max-samples", "storage.shard_max_samples", "cap on samples per shard", deprecated=True),
)
PREPARE_ALIASES: tuple[Alias, ...] = (
    Alias("--source", "prepare.source", "csd: a directory of the four CMU-MultimodalSDK files; pickle: a "
                                        "MulT-style pickle"),
    Alias("--trust-pickle", "prepare.trust_pickle",
          "confirm the pickle (and a .pt/.pkl labels file) is trusted: unpickling executes code", const=True),
    Alias("--nan-policy", "prepare.nan_policy", "NaN values: replace by 0 (counted in the card), or stop",
          deprecated=True),
    Alias("--inf-policy", "prepare.inf_policy",
          "+-inf values: zero, clip to the finite range of that dimension in the segment, or error", deprecated=True),
    Alias("--on-error", "prepare.on_error",
          "corrupt data (wrong dims, mismatched ids): raise, or skip and count in the card", deprecated=True),
    Alias("--no-reference", "prepare.reference", "skip the reference scorer in the card", const=False),
)
LOADER_ALIASES: tuple[Alias, ...] = (
    Alias("--token-budget", "loader.token_budget", "padded frames per batch for the padding-efficiency plot",
          deprecated=True),
)


def _add_config_args(p: argparse.ArgumentParser, sections: tuple[str, ...], aliases: tuple[Alias, ...],
                     required: tuple[str, ...]) -> None:
    """--config, --preset and --show-config for a command that reads ``sections`` of the tree through
    ``aliases`` and ``--section.key=value``; ``required`` arguments may be left out with --show-config."""
    tables = ", ".join(f"[{s}]" for s in sections)
    add_config_arguments(
        p.add_argument_group("configuration (the config tree of python -m carat.train)"),
        file_help=f"TOML file with [section] tables, e.g. the one given to carat.train: its {tables} apply",
        preset_help="defaults to start from (default: the file's preset with --config, else seed)",
        show_help=f"print the resolved {tables}, every key documented, and exit")
    keys = ", ".join(f"--{s}.KEY=VALUE" for s in sections)
    p.epilog = (f"Any key of {tables}: {keys}. Some flags above are shorthands of config keys: an unset flag "
                "leaves the config's value (the seed defaults shown, or those of --config / --preset). Precedence: "
                "preset < --config file < flags < --section.key=value.")
    p.set_defaults(sections=sections, aliases=aliases, required=required, command_parser=p)


def _show_progress(args: argparse.Namespace) -> bool:
    """tqdm bars only on a terminal, unless --no-progress."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def _add_storage_args(p: argparse.ArgumentParser, defaults: dict[str, object]) -> None:
    add_aliases(p.add_argument_group("storage"), STORAGE_ALIASES, defaults)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal)")


def _cmd_synth(args: argparse.Namespace, cfg: CaratConfig) -> int:
    from carat.data.sources.synth import split_sizes, synthesize_corpus

    sizes = split_sizes(cfg.synth)
    if args.format == "csd":
        from carat.data.sources.synth_csd import write_synthetic_csd

        print(f"exporting {sum(sizes.values())} synthetic segments {sizes} as CMU-MultimodalSDK .csd files into "
              f"{args.out} (seed {cfg.synth.seed}, length_scale {cfg.synth.length_scale})", file=sys.stderr)
        out = write_synthetic_csd(Path(args.out), cfg.synth)
        print(f"wrote {out}; convert with: python -m carat.data prepare --source csd --input {out} --out SHARDS")
        return 0
    print(f"synthesising {sum(sizes.values())} segments {sizes} into {args.out} "
          f"(seed {cfg.synth.seed}, length_scale {cfg.synth.length_scale}, {cfg.storage.dtype})", file=sys.stderr)
    out = synthesize_corpus(args.out, cfg.synth, cfg.storage, progress=_show_progress(args),
                            reference=not args.no_reference)
    print(f"wrote {out}")
    return 0


def _cmd_prepare(args: argparse.Namespace, cfg: CaratConfig) -> int:
    from carat.data.corpus.prepare import prepare_corpus

    overrides = {m: Path(p) for m, p in (("text", args.text_file), ("visual", args.visual_file),
                                         ("audio", args.audio_file), ("labels", args.labels_csd)) if p}
    out = prepare_corpus(Path(args.input), args.out, cfg.prepare, cfg.storage,
                         labels_path=Path(args.labels) if args.labels else None,
                         folds_path=Path(args.folds) if args.folds else None,
                         csd_files=overrides, progress=_show_progress(args))
    print(f"wrote {out}")
    return 0


def _cmd_inspect(args: argparse.Namespace, cfg: CaratConfig) -> int:
    from carat.data.corpus.card import oracle_lines, read_card
    from carat.data.corpus.inspect import inspect_corpus

    report = inspect_corpus(as_location(args.dir), plots_dir=Path(args.plots) if args.plots else None,
                            plots=not args.no_plots, loader=cfg.loader)
    print(report)
    for line in oracle_lines(read_card(as_location(args.dir)).get("reference_scorer")):
        print(line)
    return 0


def _cmd_verify(args: argparse.Namespace, cfg: CaratConfig | None) -> int:
    """verify reads no configuration (``cfg`` is None): the corpus says what it should hold."""
    from carat.data.corpus.verify import verify_corpus

    report = verify_corpus(as_location(args.dir), "quick" if args.quick else "full")
    print(report.format(limit=args.max_problems))
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    from carat.config import CaratConfig

    defaults = tree_defaults(CaratConfig())  # the seed values, for the help
    parser = argparse.ArgumentParser(prog="python -m carat.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{synth,prepare,inspect,verify}")

    p = sub.add_parser("synth", help="write a synthetic CMU-MOSEI-like corpus",
                       description="Write a synthetic CMU-MOSEI-like corpus: real split sizes and dims, long-tailed "
                                   "unaligned lengths, test-split label prevalences, a planted multimodal signal, "
                                   "and a dataset card with a logistic-regression reference floor.")
    p.add_argument("--out", help="output directory (shards, manifest.parquet, card.json); required")
    p.add_argument("--format", choices=("shards", "csd"), default="shards",
                   help="shards: carat's sorted WebDataset shards + card (default); csd: the four CMU-MultimodalSDK "
                        ".csd files of CMU-MOSEI (standard-fold video ids), to run `prepare --source csd` on; "
                        "storage and reference options apply to shards only")
    add_aliases(p.add_argument_group("corpus size"), SYNTH_ALIASES, defaults)
    p.add_argument("--no-reference", action="store_true", help="skip the reference scorer in the card")
    add_aliases(p.add_argument_group("planted structure"), STRUCTURE_ALIASES, defaults)
    _add_storage_args(p, defaults)
    _add_config_args(p, ("synth", "storage"), SYNTH_ALIASES + STRUCTURE_ALIASES + STORAGE_ALIASES, ("--out",))
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="convert CMU-MOSEI .csd files or a pickle into shards",
                       description="Convert CMU-MOSEI you hold into sorted WebDataset shards + manifest + card. "
                                   "--source csd reads a directory with the four CMU-MultimodalSDK files "
                                   "(CMU_MOSEI_TimestampedWordVectors.csd, CMU_MOSEI_VisualFacet42.csd, "
                                   "CMU_MOSEI_COVAREP.csd, CMU_MOSEI_Labels.csd). --source pickle reads a "
                                   "MulT/TAILOR-style pickle. " + _PICKLE_WARNING)
    p.add_argument("--input", help="csd: directory of the .csd files; pickle: the .pkl file; required")
    p.add_argument("--out", help="output directory; required")
    p.add_argument("--folds", help="JSON with train/valid/test video id lists (default: the standard folds)")
    p.add_argument("--text-file", help="csd: override the word-vector file path")
    p.add_argument("--visual-file", help="csd: override the FACET file path")
    p.add_argument("--audio-file", help="csd: override the COVAREP file path")
    p.add_argument("--labels-csd", help="csd: override the labels file path")
    p.add_argument("--labels", help="pickle: emotion labels (.npy/.npz [N,6] 0/1 per split, or CARAT-style "
                                    "token lists [BOS, e..., EOS] with tokens 4..9 = happy..fear)")
    add_aliases(p.add_argument_group("source and cleaning"), PREPARE_ALIASES, defaults)
    _add_storage_args(p, defaults)
    _add_config_args(p, ("prepare", "storage"), PREPARE_ALIASES + STORAGE_ALIASES, ("--input", "--out"))
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("inspect", help="print a corpus' dataset card and write plots",
                       description="Print the dataset card of a corpus and write PNG plots: length histograms, "
                                   "label prevalence, padding efficiency of sorted-bucketed vs random batching.")
    p.add_argument("dir", nargs="?", help="corpus directory (with card.json and manifest.parquet); required")
    p.add_argument("--plots", help="plot directory (default DIR/plots)")
    p.add_argument("--no-plots", action="store_true", help="print the summary only")
    add_aliases(p.add_argument_group("batching"), LOADER_ALIASES, defaults)
    _add_config_args(p, ("loader",), LOADER_ALIASES, ("dir",))
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("verify", help="check every shard against the manifest",
                       description="Check a corpus: manifest against shard table, sizes, headers at every sample's "
                                   "offset; by default also sha256, decodability, finite values, non-empty "
                                   "sequences, label ranges. Exit status 1 with a report naming shard and key.")
    p.add_argument("dir", help="corpus directory (with manifest.parquet and shards.parquet)")
    p.add_argument("--quick", action="store_true", help="sizes and headers only (what training checks at start)")
    p.add_argument("--max-problems", type=int, default=50, help="problems to print (all are counted)")
    p.set_defaults(func=_cmd_verify, sections=(), command_parser=p)
    return parser


def resolve_config(args: argparse.Namespace, extras: list[str]) -> CaratConfig:
    """The command's config: the preset (seed unless --preset, or the --config file's own), the file, the alias
    flags given, then the ``--section.key=value`` overrides; keys of sections the command does not read are
    refused rather than ignored."""
    from carat.config import SECTIONS, load_config, parse_overrides

    for section, values in parse_overrides(list(extras)).items():
        if section in SECTIONS and section not in args.sections:
            key = next(iter(values))
            raise ConfigError(f"--{section}.{key} has no effect on `{args.command}`, which reads "
                              f"{', '.join(f'[{s}]' for s in args.sections)}; put it in the --config file of "
                              "carat.train instead")
    return load_config(preset=args.preset or "seed", file=args.config,
                       overrides=alias_overrides(args, args.aliases) + list(extras))


def _check_required(args: argparse.Namespace) -> None:
    """The arguments a command needs unless it only shows its config (argparse's message and exit status 2)."""
    missing = [name for name in args.required if getattr(args, name.lstrip("-").replace("-", "_")) is None]
    if missing:
        args.command_parser.error(f"the following arguments are required: {', '.join(missing)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; returns the exit status (CaratError -> one line on stderr, status 1)."""
    args, extras = parse_command_line(build_parser(), argv)
    try:
        cfg = None
        if args.sections:
            cfg = resolve_config(args, extras)
            if args.show_config:
                from carat.config import describe_config

                print(describe_config(cfg, args.sections), end="")
                return 0
            _check_required(args)
        return int(args.func(args, cfg))
    except CaratError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, a path made read-only mid-run: the file and the reason, in one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (shards written so far are kept and reused on a rerun)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
