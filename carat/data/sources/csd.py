"""Read CMU-MOSEI from CMU-MultimodalSDK computational sequences (``.csd`` HDF5 files), unaligned.

Layout (Zadeh et al., CMU-MultimodalSDK ``computational_sequence``): one root group per file named by its
``metadata/root name``; ``<root>/data/<video_id>/features`` [T, D] and ``<root>/data/<video_id>/intervals``
[T, 2] (start, end seconds); ``<root>/metadata/<key>`` one-element string datasets (some are malformed in real
files: unreadable ones are counted, never fatal).

Segments are the rows of the labels file: row k of video v, with interval [start, end), is segment
``v[k]``. Its frames in a modality are the frames whose interval **midpoint** lies in [start, end): a frame
straddling a boundary belongs to the segment holding most of it, and no frame is in two adjacent segments.
Lengths are computed from the intervals alone while listing (so the writer can sort), and features are read
lazily per segment with h5py random access (a contiguous slice when the frames are contiguous, as they are in
time-sorted files).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carat.data.corpus.card import IssueLog
from carat.data.sources.segment import EMOTIONS, FEATURE_DIMS, MODALITIES, Segment, SegmentRef
from carat.errors import DataError

CSD_FILES: dict[str, str] = {
    "text": "CMU_MOSEI_TimestampedWordVectors.csd",
    "visual": "CMU_MOSEI_VisualFacet42.csd",
    "audio": "CMU_MOSEI_COVAREP.csd",
    "labels": "CMU_MOSEI_Labels.csd",
}
LABEL_DIM = 1 + len(EMOTIONS)  # [sentiment, happy, sad, anger, surprise, disgust, fear]


@dataclass(frozen=True)
class CsdLocator:
    """Where a segment's frames are: per modality a (start, stop) slice or sorted frame indices."""

    video_id: str
    index: int
    frames: dict[str, tuple[int, int] | np.ndarray]
    label_row: np.ndarray


def select_frames(intervals: np.ndarray, start: float, end: float) -> tuple[int, int] | np.ndarray:
    """Frames whose interval midpoint lies in [start, end): a (first, stop) slice if contiguous, else indices."""
    mid = (intervals[:, 0] + intervals[:, 1]) * 0.5
    idx = np.flatnonzero((mid >= start) & (mid < end))
    if len(idx) == 0 or idx[-1] - idx[0] + 1 == len(idx):
        return (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)
    return idx


def _n_frames(sel: tuple[int, int] | np.ndarray) -> int:
    return sel[1] - sel[0] if isinstance(sel, tuple) else len(sel)


def read_metadata(root: Any) -> tuple[dict[str, str], list[str]]:
    """Readable metadata strings of a root group, and the keys that could not be read (tolerated)."""
    meta: dict[str, str] = {}
    bad: list[str] = []
    group = root.get("metadata")
    if group is None:
        return meta, ["<no metadata group>"]
    for key in group:
        try:
            value = group[key][()]
            if isinstance(value, np.ndarray):
                value = value.reshape(-1)[0] if value.size else ""
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace")
            meta[key] = str(value)
        except Exception:  # h5py raises many types on malformed datasets; the metadata is informative only
            bad.append(key)
    return meta, bad


class CsdSource:
    """The four CMU-MOSEI ``.csd`` files as a carat source (list refs, then load segments lazily)."""

    name = "csd"

    def __init__(self, input_dir: Path, folds: dict[str, str], *, roots: dict[str, str],
                 files: dict[str, Path] | None = None, on_error: str = "raise", issues: IssueLog | None = None) -> None:
        import h5py

        self.folds = folds
        self.on_error = on_error
        self.issues = issues if issues is not None else IssueLog()
        self.notes: list[str] = [
            "Source: CMU-MultimodalSDK .csd files, unaligned. A segment is a labels-file row; its frames are those "
            "whose interval midpoint lies in [start, end) of the segment.",
            "Labels: emotion present when its raw intensity (annotator mean, 0..3) > 0; raw intensities and "
            "sentiment kept in each sample's json.",
        ]
        self.paths = {kind: Path(files[kind]) if files and kind in files else Path(input_dir) / name
                      for kind, name in CSD_FILES.items()}
        self.source_files = dict(self.paths)
        self.metadata: dict[str, dict[str, str]] = {}
        self._files: dict[str, Any] = {}
        self.groups: dict[str, Any] = {}
        try:
            for kind, path in self.paths.items():
                if not path.is_file():
                    hint = (f"expected the CMU-MultimodalSDK file {CSD_FILES[kind]} in {input_dir}, or pass "
                            f"--{'labels-csd' if kind == 'labels' else kind + '-file'}")
                    raise DataError(f"{path}: missing {kind} file ({hint})")
                try:
                    handle = h5py.File(path, "r")
                except OSError as exc:
                    raise DataError(f"{path}: not a readable HDF5 .csd file ({exc})") from exc
                self._files[kind] = handle
                root = roots[kind]
                if root not in handle:
                    raise DataError(f"{path}: root group {root!r} not found (found {sorted(handle.keys())}); is this "
                                    f"the {kind} file? Override the expected name with prepare.{kind}_root")
                if "data" not in handle[root]:
                    raise DataError(f"{path}: group {root!r} has no 'data' subgroup (not a computational sequence)")
                self.groups[kind] = handle[root]["data"]
                meta, bad = read_metadata(handle[root])
                self.metadata[kind] = meta
                for key in bad:
                    self.issues.note(f"unreadable metadata in {kind} file (tolerated)", key)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------- listing

    def _fail(self, message: str, reason: str, keys: list[str]) -> None:
        """Corrupt data: raise, or skip ``keys`` under ``reason`` (on_error="skip")."""
        if self.on_error == "raise":
            raise DataError(message + " (pass --on-error skip to skip and count such segments)")
        for key in keys:
            self.issues.skip(reason, key)

    def _modality_intervals(self, modality: str, vid: str, keys: list[str]) -> np.ndarray | None:
        """The video's frame intervals after shape checks, or None (recorded) when unusable."""
        path = self.paths[modality]
        group = self.groups[modality]
        if vid not in group:
            for key in keys:
                self.issues.skip(f"video missing from the {modality} file", key)
            return None
        try:
            feats, intervals = group[vid]["features"], group[vid]["intervals"]
        except KeyError as exc:
            self._fail(f"{path}: video {vid!r} lacks 'features' or 'intervals' ({exc})",
                       f"malformed video group in the {modality} file", keys)
            return None
        dim = FEATURE_DIMS[modality]
        if len(feats.shape) != 2 or feats.shape[1] != dim:
            self._fail(f"{path}: video {vid!r}: features have shape {feats.shape}, expected [T, {dim}]",
                       f"wrong feature dims in the {modality} file", keys)
            return None
        iv = np.asarray(intervals[()], dtype=np.float64)
        if iv.ndim != 2 or iv.shape != (feats.shape[0], 2):
            self._fail(f"{path}: video {vid!r}: intervals have shape {iv.shape}, features {feats.shape}; expected "
                       f"[{feats.shape[0]}, 2]", f"intervals do not match features in the {modality} file", keys)
            return None
        return iv

    def _video_labels(self, vid: str) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.paths["labels"]
        try:
            values = np.asarray(self.groups["labels"][vid]["features"][()], dtype=np.float64)
            intervals = np.asarray(self.groups["labels"][vid]["intervals"][()], dtype=np.float64)
        except KeyError as exc:
            self._fail(f"{path}: video {vid!r} lacks 'features' or 'intervals' ({exc})",
                       "malformed video group in the labels file", [f"{vid}[*]"])
            return None
        if values.ndim != 2 or values.shape[1] != LABEL_DIM or intervals.shape != (len(values), 2):
            self._fail(f"{path}: video {vid!r}: labels {values.shape} / intervals {intervals.shape}; expected "
                       f"[S, {LABEL_DIM}] (sentiment + 6 emotions) and [S, 2]",
                       "malformed labels", [f"{vid}[{k}]" for k in range(max(len(values), 1))])
            return None
        return values, intervals

    def list_refs(self, progress: bool = False) -> dict[str, list[SegmentRef]]:
        """Every usable labelled segment with its lengths (from intervals only); the rest counted by reason."""
        from tqdm.auto import tqdm

        refs: dict[str, list[SegmentRef]] = {}
        label_videos = sorted(self.groups["labels"].keys())
        for modality in MODALITIES:  # ids not matching across modalities: reported
            for vid in sorted(set(self.groups[modality].keys()) - set(label_videos)):
                self.issues.note(f"video in the {modality} file has no labels", vid)
        for vid in tqdm(label_videos, desc="listing segments", unit="video",
                        disable=not (progress and sys.stderr.isatty())):
            labelled = self._video_labels(vid)
            if labelled is None:
                continue
            values, label_iv = labelled
            keys = [f"{vid}[{k}]" for k in range(len(values))]
            split = self.folds.get(vid)
            if split is None:
                self.issues.note("video in no standard fold", vid)
                for key in keys:
                    self.issues.skip("video in no fold", key)
                continue
            bad_rows = ~np.isfinite(values).all(axis=1) | ~np.isfinite(label_iv).all(axis=1)
            if bad_rows.any():
                bad_keys = [keys[k] for k in np.flatnonzero(bad_rows)]
                self._fail(f"{self.paths['labels']}: segment {bad_keys[0]}: non-finite label or interval values",
                           "non-finite labels or label interval", bad_keys)
            intervals = {m: self._modality_intervals(m, vid, [k for k, b in zip(keys, bad_rows) if not b])
                         for m in MODALITIES}
            if any(iv is None for iv in intervals.values()):
                continue
            for k, key in enumerate(keys):
                if bad_rows[k]:
                    continue
                start, end = label_iv[k]
                frames = {m: select_frames(intervals[m], start, end) for m in MODALITIES}
                empty = [m for m in MODALITIES if _n_frames(frames[m]) == 0]
                if empty:
                    self.issues.skip(f"no frames in {empty[0]}", key)
                    continue
                lengths = tuple(_n_frames(frames[m]) for m in MODALITIES)
                locator = CsdLocator(vid, k, frames, values[k].astype(np.float32))
                refs.setdefault(split, []).append(SegmentRef(key, split, lengths, locator))
        return refs

    # ------------------------------------------------------------------------------------------- loading

    def describe(self, ref: SegmentRef, modality: str) -> str:
        return f"{self.paths[modality]}: segment {ref.key}"

    def load_raw(self, ref: SegmentRef) -> Segment:
        """Read one segment's frames (no NaN/inf replacement: prepare applies the policy)."""
        loc: CsdLocator = ref.locator
        feats = {}
        for m in MODALITIES:
            sel = loc.frames[m]
            ds = self.groups[m][loc.video_id]["features"]
            try:
                x = ds[sel[0]:sel[1]] if isinstance(sel, tuple) else ds[sel]
            except Exception as exc:  # a truncated / corrupt HDF5 chunk
                raise DataError(f"{self.describe(ref, m)}: cannot read features ({exc})") from exc
            feats[m] = np.asarray(x, dtype=np.float32)
        row = loc.label_row
        intensities = row[1:].astype(np.float32)
        return Segment(key=ref.key, video_id=loc.video_id, split=ref.split,
                       text=feats["text"], visual=feats["visual"], audio=feats["audio"],
                       labels=(intensities > 0).astype(np.uint8), intensities=intensities,
                       sentiment=float(row[0]))

    def close(self) -> None:
        for handle in self._files.values():
            with contextlib.suppress(Exception):  # closing is best effort: a broken file is already reported
                handle.close()
        self._files.clear()
