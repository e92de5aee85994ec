"""``python -m carat.data inspect DIR``: a readable summary of a corpus' dataset card, and plots.

Plots (PNG, matplotlib's object-oriented API on an Agg canvas, nothing global): sequence-length histograms per
modality, label prevalence per split, and the padding efficiency (real frames / padded frames) of length-sorted
token-budget batching versus random batching under the same budget. Batches are planned with the loader's own
planner (:mod:`carat.data.loader.plan`), so the figure is what training gets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from carat.data.corpus.card import read_card, tuned_micro_f1
from carat.data.loader.loader_config import LoaderConfig
from carat.data.sources.segment import EMOTIONS, MODALITIES, SPLITS
from carat.errors import DataError
from carat.storage import ObjectPath, as_location

PLOT_FILES = ("lengths.png", "label_prevalence.png", "padding_efficiency.png")


# --------------------------------------------------------------------------------------------- summary

def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _reference_lines(ref: dict[str, Any] | None) -> list[str]:
    if not ref:
        return ["reference scorer: not computed"]
    if "skipped" in ref:
        return [f"reference scorer: {ref['skipped']}"]
    lines = [f"reference scorer (floor to beat; {ref['method']}):",
             f"  {'view':<8} {'micro@0.5':>9} {'macro@0.5':>9} {'micro*':>8} {'macro*':>8} {'AUC':>6}"]
    for view in ("fused", *MODALITIES):
        if view not in ref:
            continue
        r = ref[view]
        auc = r.get("macro_roc_auc")
        lines.append(f"  {view:<8} {r['threshold_0.5']['micro_f1']:9.3f} {r['threshold_0.5']['macro_f1']:9.3f} "
                     f"{tuned_micro_f1(r):8.3f} {r['tuned_on_valid']['macro_f1']:8.3f} "
                     f"{auc if auc is None else format(auc, '6.3f')}")
    base = ref.get("all_positive_baseline")
    if base:
        lines.append(f"  (* tuned on valid: micro-F1 at one shared threshold, macro-F1 at per-emotion thresholds; "
                     f"predicting every emotion gives micro {base['micro_f1']:.3f}, "
                     f"macro {base['macro_f1']:.3f})")
    if "subsample" in ref:
        used = ", ".join(f"{s} {v['used']}/{v['of']}" for s, v in ref["subsample"].items())
        lines.append(f"  segments used: {used}")
    return lines


def format_card(card: dict[str, Any]) -> str:
    """The card as a few readable tables."""
    lines = [f"carat corpus: source {card.get('source')}, carat {card.get('carat_version')}, "
             f"created {card.get('created_utc')}"]
    lines += [f"  note: {n}" for n in card.get("notes", [])]
    counts = card.get("counts", {})
    shards = card.get("shards", {})
    lines.append("segments: " + ", ".join(f"{s} {counts[s]}" for s in SPLITS if s in counts)
                 + f" (total {counts.get('total', 0)}); shards "
                 + ", ".join(f"{s} {shards[s]['count']} ({_fmt_bytes(shards[s]['bytes'])})"
                             for s in SPLITS if s in shards))
    lines.append("lengths (all splits):  " + "  ".join(f"{k:>7}" for k in ("min", "p50", "p90", "p99", "max", "mean")))
    for m in MODALITIES:
        stats = card.get("lengths", {}).get("all", {}).get(m, {})
        lines.append(f"  {m:<20} " + "  ".join(f"{stats.get(k, float('nan')):7.0f}" if k != "mean" else
                                               f"{stats.get(k, float('nan')):7.1f}"
                                               for k in ("min", "p50", "p90", "p99", "max", "mean")))
    lines.append("label prevalence (%):  " + " ".join(f"{e[:7]:>8}" for e in EMOTIONS))
    for split, prev in card.get("label_prevalence", {}).items():
        lines.append(f"  {split:<20} " + " ".join(f"{100 * prev[e]:8.1f}" for e in EMOTIONS))
    nf = card.get("non_finite") or {}
    if nf:
        per = nf.get("per_modality", {})
        lines.append(f"non-finite values (nan_policy={nf.get('nan_policy')}, inf_policy={nf.get('inf_policy')}): "
                     + "; ".join(f"{m} nan {c['nan']} +inf {c['posinf']} -inf {c['neginf']} in {c['segments']} segs"
                                 for m, c in per.items()))
    issues = card.get("issues", {})
    lines.append(f"skipped segments: {issues.get('skipped_total', 0)}")
    for reason, entry in issues.get("skipped", {}).items():
        lines.append(f"  {entry['count']:>6}  {reason}  (e.g. {', '.join(entry['first_keys'][:3])})")
    for reason, entry in issues.get("notes", {}).items():
        lines.append(f"  note {entry['count']:>4}  {reason}  (e.g. {', '.join(entry['first_keys'][:3])})")
    for name, f in card.get("source_files", {}).items():
        lines.append(f"source {name}: {f['path']} ({_fmt_bytes(f['bytes'])}, sha256 {f['sha256'][:16]}...)")
    lines += _reference_lines(card.get("reference_scorer"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- padding

def split_lengths(corpus_dir: Path, split: str = "train") -> np.ndarray:
    """[N, 3] (text, visual, audio) lengths of a split from the manifest, in stored (sorted) order."""
    from carat.data.corpus.shards import read_manifest

    table = read_manifest(corpus_dir)
    splits = np.asarray(table.column("split").to_pylist())
    sel = splits == split
    return np.stack([np.asarray(table.column(f"len_{m}").to_numpy())[sel] for m in MODALITIES], axis=1)


def padding_comparison(lengths: np.ndarray, *, token_budget: int, max_batch_size: int,
                       weights: tuple[float, float, float], seed: int = 0, min_batch_size: int = 1) -> dict[str, Any]:
    """Padding efficiency of length-sorted vs random token-budget batches (the loader's planner for both)."""
    from carat.data.loader.plan import cost_order, padding_efficiency, plan_batches

    orders = {"sorted": cost_order(lengths, weights),
              "random": np.random.default_rng(seed).permutation(len(lengths))}
    out = {}
    for name, order in orders.items():
        batches = plan_batches(lengths, token_budget, max_batch_size, weights, order=order,
                               min_batch_size=min_batch_size)
        out[name] = {**padding_efficiency(lengths, batches, weights), "batches": len(batches)}
    return out


# --------------------------------------------------------------------------------------------- plots

def _figure(width: float = 9.0, height: float = 3.6) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_lengths(lengths_by_split: dict[str, np.ndarray], path: Path) -> Path:
    fig = _figure(12.0, 3.6)
    for j, m in enumerate(MODALITIES):
        ax = fig.add_subplot(1, 3, j + 1)
        values = np.concatenate([v[:, j] for v in lengths_by_split.values()])
        bins = np.linspace(values.min(), values.max() + 1, 40) if len(values) else 10
        for split, v in lengths_by_split.items():
            ax.hist(v[:, j], bins=bins, histtype="step", linewidth=1.5, label=split, density=True)
        ax.set_title(f"{m} length (frames)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_prevalence(card: dict[str, Any], path: Path) -> Path:
    fig = _figure(8.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    prev = {s: v for s, v in card.get("label_prevalence", {}).items() if s in SPLITS}
    width = 0.8 / max(len(prev), 1)
    x = np.arange(len(EMOTIONS))
    for i, (split, p) in enumerate(prev.items()):
        ax.bar(x + i * width, [100 * p[e] for e in EMOTIONS], width, label=split)
    ax.set_xticks(x + width * (len(prev) - 1) / 2, EMOTIONS)
    ax.set_ylabel("segments with the emotion (%)")
    ax.legend()
    return _save(fig, path)


def plot_padding(lengths: np.ndarray, budgets: list[int], max_batch_size: int, weights: tuple[float, float, float],
                 path: Path) -> Path:
    fig = _figure(11.0, 3.8)
    ax = fig.add_subplot(1, 2, 1)
    curves = {name: [] for name in ("sorted", "random")}
    for b in budgets:
        comp = padding_comparison(lengths, token_budget=b, max_batch_size=max_batch_size, weights=weights)
        for name in curves:
            curves[name].append(comp[name]["cost"])
    for name, ys in curves.items():
        ax.plot(budgets, ys, marker="o", label=f"{name} batches")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("token budget (padded frames per batch)")
    ax.set_ylabel("real / padded frames (costliest modality)")
    ax.legend()
    ax = fig.add_subplot(1, 2, 2)
    mid = padding_comparison(lengths, token_budget=budgets[len(budgets) // 2], max_batch_size=max_batch_size,
                             weights=weights)
    x = np.arange(len(MODALITIES))
    for i, name in enumerate(("sorted", "random")):
        ax.bar(x + 0.4 * i, [mid[name][m] for m in MODALITIES], 0.4, label=name)
    ax.set_xticks(x + 0.2, MODALITIES)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"per modality at budget {budgets[len(budgets) // 2]}")
    ax.legend()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- entry

def inspect_corpus(corpus_dir: Path | ObjectPath | str, *, plots_dir: Path | None = None, plots: bool = True,
                   loader: LoaderConfig | None = None) -> str:
    """The card summary plus the padding comparison, planned as training plans (``loader``'s token budget,
    batch-size bounds and modality weights); writes the plots unless ``plots`` is False."""
    corpus_dir = as_location(corpus_dir)
    if not corpus_dir.is_dir():
        raise DataError(f"{corpus_dir}: not a directory")
    card = read_card(corpus_dir)
    loader = loader or LoaderConfig()
    weights = tuple(loader.modality_weights)
    lengths = {s: split_lengths(corpus_dir, s) for s in SPLITS}
    lengths = {s: v for s, v in lengths.items() if len(v)}
    if not lengths:
        raise DataError(f"{corpus_dir}: the manifest lists no segments")
    split = "train" if "train" in lengths else next(iter(lengths))
    comp = padding_comparison(lengths[split], token_budget=loader.token_budget,
                              max_batch_size=loader.max_batch_size, weights=weights,
                              min_batch_size=loader.min_batch_size)
    report = [format_card(card),
              f"padding efficiency ({split}, token budget {loader.token_budget}, max batch {loader.max_batch_size}, "
              f"min batch {loader.min_batch_size}, modality weights {', '.join(f'{w:g}' for w in weights)}; "
              "real / padded frames):"]
    for name, r in comp.items():
        report.append(f"  {name:<7} batches {r['batches']:>6}  cost {r['cost']:.3f}  "
                      + "  ".join(f"{m} {r[m]:.3f}" for m in MODALITIES))
    if plots:
        report.append(_write_plots(card, lengths, split, loader, weights, corpus_dir, plots_dir))
    return "\n".join(report)


def _write_plots(card: dict[str, Any], lengths: dict[str, np.ndarray], split: str, loader: LoaderConfig,
                 weights: tuple[float, ...], corpus_dir: Path | ObjectPath, plots_dir: Path | None) -> str:
    """Write the three plots; the report line says where. The default place is inside the corpus, which may be
    read-only (a shared or mounted corpus): then the summary still prints and the line says how to get plots.
    A ``plots_dir`` the user named that cannot be written is a DataError naming it."""
    from carat.data.corpus.outdir import check_writable_dir

    if plots_dir is None and isinstance(corpus_dir, ObjectPath):
        return f"plots not written: {corpus_dir} is in object storage; pass --plots DIR to write them locally"
    out = Path(plots_dir) if plots_dir is not None else corpus_dir / "plots"
    budgets = sorted({max(1, loader.token_budget // 8), max(1, loader.token_budget // 2), loader.token_budget,
                      loader.token_budget * 4})
    try:
        check_writable_dir(out, "plots")
        written = [plot_lengths(lengths, out / PLOT_FILES[0]), plot_prevalence(card, out / PLOT_FILES[1]),
                   plot_padding(lengths[split], budgets, loader.max_batch_size, weights, out / PLOT_FILES[2])]
    except (DataError, OSError) as err:
        if plots_dir is not None and isinstance(err, DataError):
            raise
        if plots_dir is not None:
            raise DataError(f"{out}: cannot write plots there ({err.strerror or err})") from None
        return (f"plots not written: {out} cannot be written (a read-only corpus?); pass --plots DIR to write them "
                "elsewhere, or --no-plots")
    return "plots: " + ", ".join(str(p) for p in written)
