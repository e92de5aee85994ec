"""Convert CMU-MOSEI that a user holds (``.csd`` HDF5 files or a MulT-style pickle) into carat shards.

The flow is the same for every source: list every segment's key, split and lengths first (cheap), so the shard
writer can sort by length; then load one segment at a time in that order, replace NaN / inf values according
to the policy (counting them per modality), and write shards, manifest and dataset card. Segments a source
cannot use (a video missing from one modality, no frames in one modality, a video in no fold, corrupt data under
``on_error="skip"``) are counted by reason in the card, never dropped silently.

Non-finite values: CMU-MOSEI's COVAREP holds -inf and FACET / word vectors can hold NaN. ``nan_policy`` "zero"
replaces NaN by 0 (what MulT-style loaders do); "error" stops with the file and segment named. ``inf_policy``
"zero" replaces +-inf by 0; "clip" by the largest / smallest finite value of that feature dimension within the
segment (0 if the dimension has none); "error" stops. With an "error" policy and ``on_error="skip"`` the features
are scanned during listing (one extra read) so affected segments are skipped and counted instead.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from carat.data.corpus.card import IssueLog, ReferenceCollector, build_card, write_card
from carat.data.corpus.featstats import FeatureStatsAccumulator
from carat.data.corpus.prepare_config import TINY_OVERRIDES, PrepareConfig  # noqa: F401  (re-exported)
from carat.data.sources.segment import MODALITIES, SPLITS, Segment, SegmentRef
from carat.errors import ConfigError, DataError
from carat.storage import ObjectPath, as_location, is_url


class Source(Protocol):
    """What prepare needs from a source (carat.data.sources.csd.CsdSource, carat.data.sources.pickles.PickleSource)."""

    name: str
    issues: IssueLog
    notes: list[str]
    source_files: dict[str, Path]

    def list_refs(self, progress: bool = False) -> dict[str, list[SegmentRef]]: ...
    def load_raw(self, ref: SegmentRef) -> Segment: ...
    def describe(self, ref: SegmentRef, modality: str) -> str: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------- non-finite values

REPLACED_SHARE_ALARM = 0.01
"""prepare prints a modality whose share of replaced NaN/inf values reaches this (1%)."""


@dataclass
class NonFiniteLog:
    """NaN / +inf / -inf counts per modality (values and segments affected), and the policy applied."""

    nan_policy: str
    inf_policy: str
    counts: dict[str, dict[str, int]] = field(default_factory=lambda: {
        m: {"nan": 0, "posinf": 0, "neginf": 0, "segments": 0} for m in MODALITIES})
    totals: dict[str, dict[str, int]] = field(default_factory=lambda: {
        m: {"values": 0, "segments": 0, "all_non_finite": 0} for m in MODALITIES})
    """Every value and segment seen per modality, and segments whose values were all NaN/inf."""

    def to_dict(self) -> dict[str, Any]:
        return {"nan_policy": self.nan_policy, "inf_policy": self.inf_policy, "per_modality": self.counts,
                "seen": self.totals}

    def alarms(self, share: float = REPLACED_SHARE_ALARM) -> list[str]:
        """What a user must hear, not only find in the card: a modality with every value non-finite, segments
        that were entirely NaN/inf (replaced by zeros: no signal left), or a large share of replaced values."""
        lines = []
        for m in MODALITIES:
            seen, c = self.totals[m], self.counts[m]
            bad = c["nan"] + c["posinf"] + c["neginf"]
            if not seen["values"] or not bad:
                continue
            fraction = bad / seen["values"]
            if bad == seen["values"]:
                lines.append(f"{m}: every value in the source is NaN/inf ({bad}); the modality is all zeros now")
            elif seen["all_non_finite"]:
                lines.append(f"{m}: {seen['all_non_finite']} of {seen['segments']} segments were entirely NaN/inf "
                             f"and are zeros now ({fraction:.1%} of its values replaced)")
            elif fraction >= share:
                lines.append(f"{m}: {fraction:.1%} of its values were NaN/inf and replaced "
                             f"(nan_policy={self.nan_policy}, inf_policy={self.inf_policy})")
        return lines


def non_finite_counts(x: np.ndarray) -> tuple[int, int, int]:
    """(NaN, +inf, -inf) counts of an array."""
    return int(np.isnan(x).sum()), int(np.isposinf(x).sum()), int(np.isneginf(x).sum())


def clip_infinite(x: np.ndarray) -> np.ndarray:
    """Replace +-inf by the max / min finite value of the same column (0 where a column has none)."""
    out = x.copy()
    finite = np.isfinite(x)
    with np.errstate(invalid="ignore"):
        hi = np.where(finite, x, -np.inf).max(axis=0)
        lo = np.where(finite, x, np.inf).min(axis=0)
    hi = np.where(np.isfinite(hi), hi, 0.0)
    lo = np.where(np.isfinite(lo), lo, 0.0)
    rows, cols = np.nonzero(np.isposinf(x))
    out[rows, cols] = hi[cols]
    rows, cols = np.nonzero(np.isneginf(x))
    out[rows, cols] = lo[cols]
    return out


def sanitize_segment(seg: Segment, log: NonFiniteLog, where: Callable[[str], str]) -> Segment:
    """Count and replace NaN / inf in each modality per the policies; DataError under an "error" policy.

    ``where(modality)`` names the file and sample for the error message."""
    cleaned = {}
    for m in MODALITIES:
        x = np.asarray(getattr(seg, m), dtype=np.float32)
        nan, pos, neg = non_finite_counts(x)
        seen = log.totals[m]
        seen["values"] += int(x.size)
        seen["segments"] += 1
        if x.size and nan + pos + neg == x.size:
            seen["all_non_finite"] += 1
        if nan == pos == neg == 0:
            cleaned[m] = x
            continue
        c = log.counts[m]
        c["nan"] += nan
        c["posinf"] += pos
        c["neginf"] += neg
        c["segments"] += 1
        if nan and log.nan_policy == "error":
            raise DataError(f"{where(m)}: {nan} NaN values (nan_policy='error'; use 'zero' to replace them)")
        if (pos or neg) and log.inf_policy == "error":
            raise DataError(f"{where(m)}: {pos} +inf and {neg} -inf values (inf_policy='error'; use 'zero' or 'clip')")
        if pos or neg:
            x = clip_infinite(x) if log.inf_policy == "clip" else np.where(np.isinf(x), np.float32(0), x)
        if nan:
            x = np.where(np.isnan(x), np.float32(0), x)
        cleaned[m] = x.astype(np.float32, copy=False)
    return replace(seg, **cleaned)


def _scan_non_finite(source: Source, refs_by_split: dict[str, list[SegmentRef]], cfg: PrepareConfig,
                     progress: bool) -> dict[str, list[SegmentRef]]:
    """With an "error" policy and on_error="skip": drop (and count) segments holding the forbidden values."""
    from tqdm.auto import tqdm
    import sys

    kept: dict[str, list[SegmentRef]] = {}
    total = sum(len(r) for r in refs_by_split.values())
    with tqdm(total=total, desc="scanning NaN/inf", unit="seg", disable=not (progress and sys.stderr.isatty())) as bar:
        for split, refs in refs_by_split.items():
            kept[split] = []
            for ref in refs:
                seg = source.load_raw(ref)
                bad = []
                for m in MODALITIES:
                    nan, pos, neg = non_finite_counts(np.asarray(getattr(seg, m)))
                    if nan and cfg.nan_policy == "error":
                        bad.append(f"NaN in {m}")
                    if (pos or neg) and cfg.inf_policy == "error":
                        bad.append(f"inf in {m}")
                if bad:
                    source.issues.skip(f"non-finite values under an error policy ({bad[0]})", ref.key)
                else:
                    kept[split].append(ref)
                bar.update(1)
    return kept


# ---------------------------------------------------------------------------------------------- folds

def load_fold_lists(path: Path | None = None) -> tuple[dict[str, list[str]], str]:
    """(split -> video ids in file order, where they came from) of a folds JSON; see :func:`load_folds`."""
    try:
        if path is None:
            text = resources.files("carat.data.sources").joinpath("mosei_std_folds.json").read_text()
            origin = "carat/data/sources/mosei_std_folds.json"
        else:
            text, origin = Path(path).read_text(), str(path)
        doc = json.loads(text)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: folds file not found") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{path or 'mosei_std_folds.json'}: unreadable folds JSON ({exc})") from exc
    missing = [s for s in SPLITS if not isinstance(doc.get(s) if isinstance(doc, dict) else None, list)]
    if missing:
        raise DataError(f"{origin}: folds JSON needs lists {list(SPLITS)}; missing or not a list: {missing}")
    return {split: [str(v) for v in doc[split]] for split in SPLITS}, origin


def load_folds(path: Path | None = None) -> dict[str, str]:
    """video id -> split from a folds JSON ({"train": [...], "valid": [...], "test": [...]}).

    Default: the standard CMU-MOSEI folds shipped with carat (CMU-MultimodalSDK ``cmu_mosei_std_folds``)."""
    lists, origin = load_fold_lists(path)
    video_split: dict[str, str] = {}
    for split in SPLITS:
        for vid in lists[split]:
            if video_split.get(str(vid), split) != split:
                raise DataError(f"{origin}: video {vid!r} is in both {video_split[str(vid)]!r} and {split!r}")
            video_split[str(vid)] = split
    return video_split


# ------------------------------------------------------------------------------------------------ driver

def open_source(input_path: Path, cfg: PrepareConfig, issues: IssueLog, *, labels_path: Path | None = None,
                folds_path: Path | None = None, csd_files: dict[str, Path] | None = None) -> Source:
    """Construct the source named by ``cfg.source`` (files are opened and checked here)."""
    if cfg.source == "csd":
        from carat.data.sources.csd import CsdSource

        if labels_path is not None:
            raise ConfigError("--labels applies to --source pickle; for csd pass --labels-csd to override the "
                              "labels .csd file")
        return CsdSource(Path(input_path), load_folds(folds_path), roots=cfg.roots, files=csd_files or {},
                         on_error=cfg.on_error, issues=issues)
    from carat.data.sources.pickles import PickleSource

    if csd_files:
        raise ConfigError(f"--text-file/--visual-file/--audio-file/--labels-csd apply to --source csd, "
                          f"not pickle (got {sorted(csd_files)})")
    if folds_path is not None:
        raise ConfigError("--folds applies to --source csd; a pickle already holds its train/valid/test splits")
    return PickleSource(Path(input_path), labels_path=labels_path, trust=cfg.trust_pickle,
                        on_error=cfg.on_error, issues=issues)


def _ensure_loaded(refs_by_split: dict[str, list[SegmentRef]], loaded: set[str],
                   load: Callable[[SegmentRef], Segment]) -> int:
    """Load the segments the writer did not (shards kept from an interrupted run), so NaN/inf counts and the
    reference scorer cover the whole corpus. Returns how many were loaded here."""
    n = 0
    for refs in refs_by_split.values():
        for ref in refs:
            if ref.key not in loaded:
                load(ref)
                n += 1
    return n


def prepare_corpus(input_path: Path | str, out_dir: Path | str, cfg: PrepareConfig, storage: Any = None, *,
                   labels_path: Path | None = None, folds_path: Path | None = None,
                   csd_files: dict[str, Path] | None = None, progress: bool = False) -> Path | ObjectPath:
    """Convert a CMU-MOSEI source into shards + ``manifest.parquet`` + ``card.json`` in ``out_dir`` (a local
    directory, or an object-store URL: written locally, then uploaded manifest last).

    Nothing is written before the source is listed and every split found non-empty; ``out_dir`` is locked
    while it is written (a second writer gets :class:`~carat.locks.LockHeld`)."""
    from carat.data.corpus.outdir import check_writable_dir, corpus_write_lock
    from carat.data.corpus.shards import StorageConfig

    if is_url(out_dir):  # written locally, then published (carat.data.corpus.remote)
        from carat.data.corpus.remote import write_corpus_to

        return write_corpus_to(as_location(out_dir), lambda local: prepare_corpus(
            input_path, local, cfg, storage, labels_path=labels_path, folds_path=folds_path, csd_files=csd_files,
            progress=progress), progress=progress)
    out = Path(out_dir)
    check_writable_dir(out, "the corpus")  # before the (long) listing of the source
    # Real data goes here now: an interrupted train-time synthesis' marker must not make carat.train treat
    # these shards as its own leftovers (carat.data.corpus.provision.SYNTH_IN_PROGRESS).
    (out / ".synth-in-progress").unlink(missing_ok=True)
    storage = storage if storage is not None else StorageConfig()
    issues = IssueLog(max_keys=cfg.max_reported_keys)
    log = NonFiniteLog(cfg.nan_policy, cfg.inf_policy)
    source = open_source(Path(input_path), cfg, issues, labels_path=labels_path, folds_path=folds_path,
                         csd_files=csd_files)
    try:
        refs = source.list_refs(progress=progress)
        if cfg.on_error == "skip" and "error" in (cfg.nan_policy, cfg.inf_policy):
            refs = _scan_non_finite(source, refs, cfg, progress)
        refuse_empty_splits(refs, issues, input_path)
        with corpus_write_lock(out):
            _write_prepared(source, refs, out, cfg, storage, issues, log, progress)
    finally:
        source.close()
    report_skipped(issues, out)
    return out


def refuse_empty_splits(refs: dict[str, list[SegmentRef]], issues: IssueLog, input_path: Path | str) -> None:
    """DataError naming the first split without usable segments (a corpus needs all three), with what the
    source skipped; raised before anything is written."""
    skipped = ", ".join(f"{r}: {n}" for r, n in sorted(issues.skipped.items()))
    why = f"segments skipped: {skipped}" if skipped else "no segment was skipped"
    if sum(len(r) for r in refs.values()) == 0:
        raise DataError(f"{input_path}: no usable segments ({why if skipped else 'the source is empty'})")
    for split in SPLITS:
        if not refs.get(split):
            raise DataError(f"{input_path}: split {split!r} has no usable segments ({why}); train, valid and test "
                            "each need some: check the folds (--folds) and the source files. Nothing was written")


def report_skipped(issues: IssueLog, out: Path) -> None:
    """Segments the source left out, by reason, on the console (the card lists their first keys)."""
    if not issues.total_skipped:
        return
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted(issues.skipped.items()))
    print(f"[carat] skipped {issues.total_skipped} segments ({reasons}); the first keys of each reason are "
          f"listed under issues.skipped in {out / 'card.json'}", file=sys.stderr, flush=True)


def _write_prepared(source: Source, refs: dict[str, list[SegmentRef]], out: Path, cfg: PrepareConfig,
                    storage: Any, issues: IssueLog, log: NonFiniteLog, progress: bool) -> None:
    """Shards, manifest and card of the listed ``refs`` into ``out`` (whose lock the caller holds)."""
    from carat.data.corpus.shards import write_corpus

    loaded: set[str] = set()

    def load(ref: SegmentRef) -> Segment:
        seg = sanitize_segment(source.load_raw(ref), log, lambda m: source.describe(ref, m))
        loaded.add(ref.key)
        return seg

    collector = (ReferenceCollector(refs, max_train=cfg.reference_max_train, max_eval=cfg.reference_max_eval,
                                    seed=cfg.seed) if cfg.reference else None)
    stats = FeatureStatsAccumulator(storage.dtype)
    tracked = stats.wrap(collector.wrap(load) if collector else load)
    index = write_corpus(refs, tracked, out, storage, progress=progress)
    reloaded = _ensure_loaded(refs, loaded, tracked) if index.shards_reused else 0
    stats.complete(refs, load)  # a no-op after _ensure_loaded; kept so the stats never depend on it
    reference = None
    if collector is not None:
        collector.complete(load)
        reference = collector.score(progress=progress)
    card = build_card(
        out, source=source.name, config={"prepare": asdict(cfg), "storage": asdict(storage)},
        issues=issues, source_files=source.source_files, reference=reference, non_finite=log.to_dict(),
        notes=source.notes, feature_stats=stats.to_card(),
        extra={"write": {"shards_reused": index.shards_reused, "segments_loaded_after_write": reloaded}})
    write_card(out, card)
    for line in log.alarms():
        print(f"[carat] warning: {line} (see non_finite in {out / 'card.json'})", file=sys.stderr, flush=True)
