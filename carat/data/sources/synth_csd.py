"""Export a synthetic corpus as CMU-MultimodalSDK computational sequences (``.csd``), the files users hold.

So the path a user takes with real CMU-MOSEI (``python -m carat.data prepare --source csd --input DIR``) can be
run end to end on data whose planted signal is known. The four files have the SDK layout that
:mod:`carat.data.sources.csd` reads: one root group (``glove_vectors``, ``FACET 4.2``, ``COVAREP``,
``All Labels``) with ``data/<video_id>/{features, intervals}`` and one-element string ``metadata`` datasets.

Videos: synthetic video ``v`` of a split becomes the real video id ``folds[split][v % n]`` of the standard folds
(``carat/data/sources/mosei_std_folds.json``), so ``prepare`` assigns the right split without a ``--folds``
file. A split with more synthetic videos than fold ids (train at scale 1: ~2,330 videos for 2,250 ids) wraps
around: several synthetic videos follow one another in one real video (each keeps its own speaker offset).

Time: the segments of a video are consecutive labelled intervals separated by ``GAP_SECONDS``. A segment lasts
``max(visual frames / visual_hz, audio frames / audio_hz)`` seconds; visual and audio frames are timestamped at
their rate from the segment's start, and its words are spread evenly over the segment (word intervals). Every
frame's midpoint falls inside its own segment, so ``prepare`` (midpoint rule) gets back exactly the frames of
:meth:`SyntheticCorpus.load`, stored as float32. Synthetic key ``trainVVVVV[k]`` becomes ``<real id>[j]``;
:func:`csd_key_map` gives the mapping, also written to ``synth_csd.json`` beside the files.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from carat.atomic import publish, temp_path, write_text_atomic
from carat.data.sources.csd import CSD_FILES
from carat.data.sources.segment import MODALITIES, SPLITS, Segment, SegmentRef
from carat.data.sources.synth import SynthConfig, SyntheticCorpus
from carat.errors import DataError

CSD_ROOTS: dict[str, str] = {"text": "glove_vectors", "visual": "FACET 4.2", "audio": "COVAREP",
                             "labels": "All Labels"}
"""Root group names of the SDK files (the defaults of :class:`carat.data.corpus.prepare.PrepareConfig`)."""
GAP_SECONDS = 0.5
"""Silence between consecutive labelled segments of a video (and before the first)."""
MAP_FILE = "synth_csd.json"


def video_layout(corpus: SyntheticCorpus) -> dict[str, dict[str, list[SegmentRef]]]:
    """split -> real video id -> the synthetic segments it holds, in time order.

    Synthetic video ``v`` goes to ``folds[split][v % n]``; refs are in index order, so a wrapped-around video
    holds its synthetic videos one after another."""
    from carat.data.corpus.prepare import load_fold_lists

    folds, origin = load_fold_lists()
    layout: dict[str, dict[str, list[SegmentRef]]] = {}
    for split in SPLITS:
        ids = folds[split]
        if not ids:
            raise DataError(f"{origin}: no {split} video ids to name synthetic videos with")
        videos: dict[str, list[SegmentRef]] = {}
        for ref in corpus.refs()[split]:
            videos.setdefault(ids[ref.locator.video_index % len(ids)], []).append(ref)
        layout[split] = videos
    return layout


def csd_key_map(corpus: SyntheticCorpus) -> dict[str, str]:
    """Synthetic segment key -> the key ``prepare`` gives it when reading the exported files."""
    return {ref.key: f"{vid}[{j}]" for videos in video_layout(corpus).values()
            for vid, refs in videos.items() for j, ref in enumerate(refs)}


def segment_seconds(ref: SegmentRef, cfg: SynthConfig) -> float:
    """How long a segment lasts: its visual or audio frames at their rate, whichever is longer."""
    _, visual, audio = ref.lengths
    return max(visual / cfg.visual_hz, audio / cfg.audio_hz)


def frame_intervals(start: float, n: int, step: float) -> np.ndarray:
    """[n, 2] (start, end) seconds of n consecutive frames of ``step`` seconds from ``start``."""
    begin = start + np.arange(n, dtype=np.float64) * step
    return np.stack([begin, begin + step], axis=1)


def _video_sequences(segments: list[Segment], refs: list[SegmentRef], cfg: SynthConfig
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """kind -> (features, intervals) of one real video made of consecutive synthetic segments."""
    parts: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {k: ([], []) for k in (*MODALITIES, "labels")}
    rates = {"visual": cfg.visual_hz, "audio": cfg.audio_hz}
    t = GAP_SECONDS
    for seg, ref in zip(segments, refs):
        duration = segment_seconds(ref, cfg)
        for m in MODALITIES:
            x = getattr(seg, m)
            step = duration / len(x) if m == "text" else 1.0 / rates[m]
            parts[m][0].append(np.asarray(x, dtype=np.float32))
            parts[m][1].append(frame_intervals(t, len(x), step))
        row = np.concatenate([[seg.sentiment], seg.intensities]).astype(np.float64)
        parts["labels"][0].append(row[None])
        parts["labels"][1].append(np.array([[t, t + duration]], dtype=np.float64))
        t += duration + GAP_SECONDS
    return {k: (np.concatenate(f), np.concatenate(iv)) for k, (f, iv) in parts.items()}


def _metadata(kind: str, cfg: SynthConfig) -> dict[str, Any]:
    root = CSD_ROOTS[kind]
    return {
        "root name": root,
        "computational sequence description": f"{root} of a synthetic CMU-MOSEI-like corpus (carat.data.sources.synth, "
                                              f"seed {cfg.seed}); not real data",
        "dimension names": None, "computational sequence version": "1.0", "alignment compatible": True,
        "dataset name": "CMU-MOSEI (synthetic)", "dataset version": "1.0", "creator": "carat.data.sources.synth_csd",
        "contact": "", "featureset bib citation": "", "dataset bib citation": "",
    }


def _write_metadata(handle: Any, root: str, meta: dict[str, Any]) -> None:
    """One-element variable-length string datasets, non-strings json-dumped (the SDK's ``write_CSD``)."""
    import h5py

    group = handle[root].create_group("metadata")
    for key, value in meta.items():
        ds = group.create_dataset(key, (1,), dtype=h5py.special_dtype(vlen=str))
        ds[0] = value if isinstance(value, str) else json.dumps(value)


def write_synthetic_csd(out_dir: Path | str, cfg: SynthConfig) -> Path:
    """Write the corpus of ``cfg`` as the four CMU-MOSEI ``.csd`` files (and ``synth_csd.json``) in ``out_dir``.

    One real video at a time is generated and written, so memory holds one video, never the corpus. Each file is
    written under a temporary name and renamed when complete; ``out_dir`` is locked meanwhile (a second writer
    gets :class:`~carat.locks.LockHeld`). Returns ``out_dir``."""
    from carat.data.corpus.outdir import corpus_write_lock

    with corpus_write_lock(Path(out_dir)) as out:
        _write_csd_files(out, cfg)
    return Path(out_dir)


def _write_csd_files(out: Path, cfg: SynthConfig) -> None:
    """The four .csd files and synth_csd.json of ``cfg`` into ``out`` (whose lock the caller holds)."""
    import h5py

    corpus = SyntheticCorpus(cfg)
    layout = video_layout(corpus)
    paths = {kind: out / name for kind, name in CSD_FILES.items()}
    temps = {kind: temp_path(p) for kind, p in paths.items()}
    handles: dict[str, Any] = {}
    try:
        for kind, tmp in temps.items():
            handles[kind] = h5py.File(tmp, "w")
            handles[kind].create_group(CSD_ROOTS[kind]).create_group("data")
        for videos in layout.values():
            for vid, refs in videos.items():
                sequences = _video_sequences([corpus.load(r) for r in refs], refs, cfg)
                for kind, (features, intervals) in sequences.items():
                    group = handles[kind][CSD_ROOTS[kind]]["data"].create_group(vid)
                    group.create_dataset("features", data=features)
                    group.create_dataset("intervals", data=intervals)
        for kind, handle in handles.items():
            _write_metadata(handle, CSD_ROOTS[kind], _metadata(kind, cfg))
            handle.close()
        for kind in paths:
            publish(temps[kind], paths[kind])
    except BaseException:
        for handle in handles.values():
            handle.close()
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    key_map = {ref.key: f"{vid}[{j}]" for videos in layout.values()
               for vid, refs in videos.items() for j, ref in enumerate(refs)}
    write_text_atomic(out / MAP_FILE, json.dumps({
        "note": "synthetic CMU-MOSEI-like corpus exported as CMU-MultimodalSDK .csd files "
                "(carat.data.sources.synth_csd); "
                "convert with: python -m carat.data prepare --source csd --input <this folder> --out <shards>",
        "synth": asdict(cfg),
        "videos": {split: len(videos) for split, videos in layout.items()},
        "csd_key_of": key_map,
    }, indent=1) + "\n")


__all__ = ["write_synthetic_csd", "csd_key_map", "video_layout", "segment_seconds", "CSD_ROOTS", "GAP_SECONDS"]
