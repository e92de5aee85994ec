"""Read CMU-MOSEI from a MulT / TAILOR / CARAT-style pickle of padded arrays.

SECURITY: unpickling executes arbitrary code stored in the file. carat refuses unless the caller passes
``trust=True`` (``--trust-pickle`` on the command line). Prefer the ``.csd`` source when you have it. A ``.pt``
labels file of plain tensors / lists / dicts is read with ``torch.load(weights_only=True)``, which runs no
code, and needs no trust; ``.npy`` / ``.npz`` label files are read with ``allow_pickle=False`` unless trusted.

Layout (e.g. ``mosei_senti_data_noalign.pkl`` of MulT, Tsai et al., ACL 2019): a dict with ``train`` / ``valid``
/ ``test``, each a dict of ``text`` [N, 50, 300], ``vision`` [N, 500, 35], ``audio`` [N, 500, 74] (may hold
-inf), ``labels`` and ``id``. Sequences are left zero-padded (or truncated) and no lengths are stored, so a
sequence's length is recovered by stripping its all-zero leading rows: a genuine all-zero first frame is
indistinguishable from padding, and sequences truncated by the pickle stay truncated (the card says so).

Emotion labels: the pickle's own ``labels`` when they are [N, 6] (0/1 or raw intensities) or [N, 1, 7]
(sentiment + 6 raw intensities); otherwise (e.g. sentiment-only [N, 1, 1]) from a separate file:
``.npz`` with ``train`` / ``valid`` / ``test`` arrays, a ``.npy`` [N_train + N_valid + N_test, 6] in split order,
or a pickled ``.pkl`` / ``.pt`` dict (trusted only). Each split's labels are either [N, 6] 0/1 or CARAT-style
token lists ``[BOS, e..., EOS]`` (tokens 4..9 = happy..fear; 0..3 are PAD/UNK/BOS/EOS), as a list of lists or
an int array padded with 0.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carat.data.corpus.card import IssueLog
from carat.data.sources.segment import EMOTIONS, FEATURE_DIMS, MODALITIES, SPLITS, Segment, SegmentRef
from carat.errors import DataError

PICKLE_KEYS: dict[str, str] = {"text": "text", "visual": "vision", "audio": "audio"}
SPECIAL_TOKENS = 4  # CARAT's PAD=0, UNK=1, BOS=2, EOS=3; emotion e is token 4 + e
BOS = 2
UNTRUSTED_MESSAGE = ("refusing to unpickle {path}: unpickling executes arbitrary code from the file. If you trust "
                     "it, pass --trust-pickle (trust_pickle=True); prefer the .csd source")


@dataclass(frozen=True)
class PickleLocator:
    index: int
    video_id: str


def leading_padding(x: np.ndarray) -> np.ndarray:
    """[N] number of all-zero leading rows of each [N, T, D] sequence (T when the row is all zero).

    NaN and inf are not zero, so they count as real frames."""
    nonzero = (x != 0).any(axis=2)  # [N, T]
    first = nonzero.argmax(axis=1)
    return np.where(nonzero.any(axis=1), first, x.shape[1])


def decode_tokens(tokens: Any, where: str) -> np.ndarray:
    """CARAT token list [BOS, e..., EOS] -> [6] 0/1 (4..9 -> happy..fear; 0..3 ignored)."""
    out = np.zeros(len(EMOTIONS), dtype=np.uint8)
    for t in np.asarray(tokens, dtype=np.int64).reshape(-1):
        if t < SPECIAL_TOKENS:
            continue
        if t >= SPECIAL_TOKENS + len(EMOTIONS):
            raise DataError(f"{where}: token {int(t)} is not an emotion token (4..9 = {', '.join(EMOTIONS)})")
        out[t - SPECIAL_TOKENS] = 1
    return out


def labels_from_array(value: Any, n: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels [n, 6] uint8, intensities [n, 6] float32, NaN when binary) from one split's labels.

    Accepts [n, 6] 0/1 or raw intensities, or CARAT token lists (ragged lists, or an int array padded with 0
    whose rows start with BOS=2), optionally inside a dict under 'labels' / 'tgt'."""
    if isinstance(value, dict):
        for key in ("labels", "tgt", "emotions", "label"):
            if key in value:
                return labels_from_array(value[key], n, f"{where}[{key!r}]")
        raise DataError(f"{where}: a dict without 'labels' / 'tgt' (keys: {sorted(map(str, value))[:8]})")
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # a torch tensor from a .pt file
        value = value.numpy()
    rows = list(value)
    if len(rows) != n:
        raise DataError(f"{where}: {len(rows)} label rows for {n} segments")
    try:
        arr = np.asarray(rows, dtype=np.float64).reshape(n, -1) if rows else np.zeros((0, len(EMOTIONS)))
    except (ValueError, TypeError):
        arr = None  # ragged: token lists
    is_tokens = arr is None or (arr.shape[1] > 0 and len(arr) > 0 and (arr[:, 0] == BOS).all()
                                and not np.isin(arr, (0, 1)).all())
    if not is_tokens:
        if arr.shape[1] != len(EMOTIONS):
            raise DataError(f"{where}: labels of shape {arr.shape}; expected [N, 6] or token lists [BOS, e..., EOS]")
        if not np.isfinite(arr).all():
            raise DataError(f"{where}: non-finite label values")
        binary = np.isin(arr, (0, 1)).all()
        intens = np.full(arr.shape, np.nan, np.float32) if binary else arr.astype(np.float32)
        return (arr > 0).astype(np.uint8), intens
    labels = np.zeros((n, len(EMOTIONS)), np.uint8)
    for i, r in enumerate(rows):
        labels[i] = decode_tokens(r, f"{where} row {i}")
    return labels, np.full(labels.shape, np.nan, np.float32)


def _load_pt_safely(path: Path) -> Any:
    """A ``.pt`` labels file of tensors, lists, dicts and numbers loads with ``weights_only=True`` (no code can
    run), trusted or not; None when it holds anything else (then only a trusted full unpickle can read it)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except Exception:  # it needs other types, or is not a torch file at all
        return None


def _unpickle(path: Path, trust: bool) -> Any:
    if path.suffix == ".pt":
        safe = _load_pt_safely(path)
        if safe is not None:
            return safe
    if not trust:
        raise DataError(UNTRUSTED_MESSAGE.format(path=path))
    try:
        if path.suffix == ".pt":
            import torch

            return torch.load(path, map_location="cpu", weights_only=False)  # trusted by the user
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")  # MulT's pickles come from Python 2 era numpy
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except Exception as exc:  # unpickling raises arbitrary types
        raise DataError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc})") from exc


def load_label_file(path: Path, sizes: dict[str, int], trust: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split (labels, intensities) from a separate label file (see the module docstring for forms)."""
    if not path.is_file():
        raise DataError(f"{path}: labels file not found")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=trust) as z:
                doc = {k: z[k] for k in z.files}
        except ValueError as exc:
            raise DataError(f"{path}: holds object arrays (pickled); pass --trust-pickle if you trust it") from exc
    elif path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=trust)
        except ValueError as exc:
            raise DataError(f"{path}: holds an object array (pickled); pass --trust-pickle if you trust it") from exc
        if arr.dtype == object and arr.shape == ():
            doc = arr.item()
        else:
            total = sum(sizes.values())
            if len(arr) != total:
                raise DataError(f"{path}: {len(arr)} rows; expected {total} (train + valid + test of the pickle, "
                                "in that order) or use a .npz with one array per split")
            doc, start = {}, 0
            for split in SPLITS:
                doc[split] = arr[start:start + sizes[split]]
                start += sizes[split]
    elif path.suffix in (".pkl", ".pickle", ".pt"):
        doc = _unpickle(path, trust)
    else:
        raise DataError(f"{path}: unknown labels format {path.suffix!r} (use .npz, .npy, .pkl or .pt)")
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a mapping of {list(SPLITS)} to label arrays, got {type(doc).__name__}")
    missing = [s for s in SPLITS if s in sizes and s not in doc]
    if missing:
        raise DataError(f"{path}: no labels for splits {missing} (found {sorted(map(str, doc))[:8]})")
    return {s: labels_from_array(doc[s], sizes[s], f"{path} [{s}]") for s in sizes}


def _ids(raw: Any, n: int, where: str) -> list[tuple[str, str]]:
    """(key, video_id) per row from the pickle's ``id`` entries: strings ``vid`` / ``vid[k]`` or (vid, k, ...)."""
    if raw is None:
        return [(f"{where}_{i}[0]", f"{where}_{i}") for i in range(n)]
    items = list(raw)
    if len(items) != n:
        raise DataError(f"{where}: {len(items)} ids for {n} segments")
    out, per_video = [], {}
    for item in items:
        parts = [item] if isinstance(item, (str, bytes)) or np.ndim(item) == 0 else list(np.asarray(item).reshape(-1))
        parts = [p.decode() if isinstance(p, bytes) else str(p) for p in parts]
        vid = parts[0]
        if len(parts) == 1 and vid.endswith("]") and "[" in vid:
            out.append((vid, vid[:vid.rindex("[")]))
            continue
        if len(parts) >= 2 and parts[1] != "":
            k = parts[1]
        else:
            k = str(per_video.get(vid, 0))
            per_video[vid] = per_video.get(vid, 0) + 1
        out.append((f"{vid}[{k}]", vid))
    return out


class PickleSource:
    """A MulT-style pickle as a carat source. Holds the unpickled arrays (the pickle format cannot be read lazily)."""

    name = "pickle"

    def __init__(self, path: Path, *, labels_path: Path | None = None, trust: bool = False,
                 on_error: str = "raise", issues: IssueLog | None = None) -> None:
        self.path = Path(path)
        self.on_error = on_error
        self.issues = issues if issues is not None else IssueLog()
        if not self.path.is_file():
            raise DataError(f"{self.path}: pickle file not found")
        self.source_files: dict[str, Path] = {"pickle": self.path}
        data = _unpickle(self.path, trust)
        if not isinstance(data, dict) or not all(s in data for s in SPLITS):
            found = sorted(map(str, data))[:8] if isinstance(data, dict) else type(data).__name__
            raise DataError(f"{self.path}: expected a dict with {list(SPLITS)} (found {found})")
        self.arrays: dict[str, dict[str, np.ndarray]] = {}
        sizes = {}
        for split in SPLITS:
            self.arrays[split] = self._split_arrays(data[split], split)
            sizes[split] = len(self.arrays[split]["text"])
        self.label_source = self._resolve_labels(data, sizes, labels_path, trust)
        self.ids = {s: _ids(data[s].get("id"), sizes[s], f"{self.path} [{s}] id") for s in SPLITS}
        self.notes = [
            "Source: MulT-style pickle of padded arrays. Sequence lengths were recovered by stripping all-zero "
            "leading rows (left zero padding): a genuine all-zero first frame cannot be told from padding, and "
            "sequences the pickle truncated (e.g. to 50 words / 500 frames) stay truncated.",
            f"Emotion labels: {self.label_source}.",
        ]

    def _split_arrays(self, doc: Any, split: str) -> dict[str, np.ndarray]:
        if not isinstance(doc, dict):
            raise DataError(f"{self.path} [{split}]: expected a dict of arrays, got {type(doc).__name__}")
        out = {}
        for m, key in PICKLE_KEYS.items():
            if key not in doc:
                raise DataError(f"{self.path} [{split}]: missing {key!r} (found {sorted(map(str, doc))})")
            arr = np.asarray(doc[key])
            dim = FEATURE_DIMS[m]
            if arr.ndim != 3 or arr.shape[2] != dim:
                raise DataError(f"{self.path} [{split}][{key!r}]: shape {arr.shape}, expected [N, T, {dim}]")
            out[m] = arr
        counts = {PICKLE_KEYS[m]: len(a) for m, a in out.items()}
        if len(set(counts.values())) != 1:
            raise DataError(f"{self.path} [{split}]: modalities disagree on the number of segments {counts}")
        out["labels"] = np.asarray(doc["labels"]) if "labels" in doc else None
        return out

    def _resolve_labels(self, data: dict, sizes: dict[str, int], labels_path: Path | None, trust: bool) -> str:
        """Fill self.labels[split] = (labels, intensities, sentiment or None); returns a description."""
        self.labels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        own = {s: self.arrays[s]["labels"] for s in SPLITS}
        sentiment: dict[str, np.ndarray | None] = {}
        for s in SPLITS:
            lab = own[s]
            sentiment[s] = None
            if lab is not None and lab.ndim >= 2 and lab.reshape(len(lab), -1).shape[1] in (1, 1 + len(EMOTIONS)):
                sentiment[s] = lab.reshape(len(lab), -1)[:, 0].astype(np.float32)
        if labels_path is not None:
            for s, (y, intens) in load_label_file(Path(labels_path), sizes, trust).items():
                self.labels[s] = (y, intens, sentiment[s])
            self.source_files["labels"] = Path(labels_path)
            return f"from {labels_path}"
        for s in SPLITS:
            lab = own[s]
            flat = None if lab is None else lab.reshape(len(lab), -1)
            if flat is None or flat.shape[1] not in (len(EMOTIONS), 1 + len(EMOTIONS)) or len(flat) != sizes[s]:
                shape = None if lab is None else lab.shape
                raise DataError(f"{self.path} [{s}]: labels {shape} hold no emotions (sentiment only?); pass "
                                "--labels FILE with the 6 emotion labels per split")
            emo = flat[:, -len(EMOTIONS):].astype(np.float32)
            if not np.isfinite(emo).all():
                raise DataError(f"{self.path} [{s}]: non-finite emotion label values")
            binary = np.isin(emo, (0, 1)).all()
            intens = np.full(emo.shape, np.nan, np.float32) if binary else emo
            self.labels[s] = ((emo > 0).astype(np.uint8), intens,
                              sentiment[s] if flat.shape[1] == 1 + len(EMOTIONS) else None)
        return "the pickle's own labels array"

    def list_refs(self, progress: bool = False) -> dict[str, list[SegmentRef]]:
        """Refs with lengths recovered from the zero padding; empty sequences and duplicate keys counted."""
        refs: dict[str, list[SegmentRef]] = {}
        seen: set[str] = set()
        for split in SPLITS:
            pads = {m: leading_padding(self.arrays[split][m]) for m in MODALITIES}
            steps = {m: self.arrays[split][m].shape[1] for m in MODALITIES}
            for i, (key, vid) in enumerate(self.ids[split]):
                lengths = tuple(int(steps[m] - pads[m][i]) for m in MODALITIES)
                empty = [m for m, n in zip(MODALITIES, lengths) if n == 0]
                if empty:
                    self.issues.skip(f"all-zero (empty) {empty[0]} sequence", key)
                    continue
                if key in seen:
                    if self.on_error == "raise":
                        raise DataError(f"{self.path} [{split}] row {i}: duplicate segment id {key!r} (pass "
                                        "--on-error skip to skip and count duplicates)")
                    self.issues.skip("duplicate segment id", key)
                    continue
                seen.add(key)
                refs.setdefault(split, []).append(SegmentRef(key, split, lengths, PickleLocator(i, vid)))
        return refs

    def describe(self, ref: SegmentRef, modality: str) -> str:
        return f"{self.path} [{ref.split}][{PICKLE_KEYS[modality]!r}] row {ref.locator.index} ({ref.key})"

    def load_raw(self, ref: SegmentRef) -> Segment:
        loc: PickleLocator = ref.locator
        arrays = self.arrays[ref.split]
        feats = {m: np.array(arrays[m][loc.index, arrays[m].shape[1] - n:], dtype=np.float32)
                 for m, n in zip(MODALITIES, ref.lengths)}
        labels, intens, sentiment = self.labels[ref.split]
        return Segment(key=ref.key, video_id=loc.video_id, split=ref.split, text=feats["text"],
                       visual=feats["visual"], audio=feats["audio"], labels=labels[loc.index].copy(),
                       intensities=intens[loc.index].copy(),
                       sentiment=None if sentiment is None else float(sentiment[loc.index]))

    def close(self) -> None:
        self.arrays.clear()
