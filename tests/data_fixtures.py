"""Writers of tiny CMU-MOSEI source files in the exact layouts users hold, plus what carat must read from them.

``.csd``: the CMU-MultimodalSDK ``computational_sequence`` HDF5 layout (``write_CSD``): one root group,
``<root>/data/<vid>/{features,intervals}``, ``<root>/metadata/<key>`` one-element variable-length string
datasets (non-string values json-dumped). Pickle: MulT's ``mosei_senti_data_noalign.pkl`` layout.

Expected segments are computed here independently of carat's code (a plain loop over frames).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

EMOTIONS = ("happy", "sad", "anger", "surprise", "disgust", "fear")
DIMS = {"text": 300, "visual": 35, "audio": 74}
CSD_NAMES = {
    "text": ("CMU_MOSEI_TimestampedWordVectors.csd", "glove_vectors"),
    "visual": ("CMU_MOSEI_VisualFacet42.csd", "FACET 4.2"),
    "audio": ("CMU_MOSEI_COVAREP.csd", "COVAREP"),
    "labels": ("CMU_MOSEI_Labels.csd", "All Labels"),
}
RATES = {"text": 3.0, "visual": 30.0, "audio": 100.0}


def standard_fold_videos(n: dict[str, int]) -> dict[str, list[str]]:
    """The first n[split] video ids of each standard fold (so the packaged folds apply)."""
    folds = json.loads((Path(__file__).resolve().parents[1] / "carat/data/sources/mosei_std_folds.json").read_text())
    return {split: folds[split][:k] for split, k in n.items()}


def write_csd(path: Path, root: str, videos: dict[str, tuple[np.ndarray, np.ndarray]],
              metadata: dict[str, object] | None = None) -> None:
    """One computational sequence file in the SDK's layout."""
    meta = {"root name": root, "computational sequence description": f"{root} (carat test fixture)",
            "dimension names": None, "computational sequence version": "1.0", "alignment compatible": True,
            "dataset name": "CMU-MOSEI", "dataset version": "1.0", "creator": "carat tests",
            "contact": "nobody@example.com", "featureset bib citation": "", "dataset bib citation": ""}
    meta.update(metadata or {})
    with h5py.File(path, "w") as f:
        data = f.create_group(root).create_group("data")
        for vid, (features, intervals) in videos.items():
            g = data.create_group(vid)
            g.create_dataset("features", data=features)
            g.create_dataset("intervals", data=intervals)
        mg = f[root].create_group("metadata")
        for key, value in meta.items():
            ds = mg.create_dataset(key, (1,), dtype=h5py.special_dtype(vlen=str))
            ds[0] = value if isinstance(value, str) else json.dumps(value)


@dataclass
class CsdFixture:
    """Paths of the four files and, per expected segment key, its split, frames and labels."""

    directory: Path
    expected: dict[str, dict] = field(default_factory=dict)
    videos: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    labels: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    no_fold_video: str = "zzNotInAnyFold"

    def path(self, kind: str) -> Path:
        return self.directory / CSD_NAMES[kind][0]

    def rewrite(self, kind: str, root: str | None = None, **meta: object) -> None:
        data = self.labels if kind == "labels" else self.videos[kind]
        write_csd(self.path(kind), root or CSD_NAMES[kind][1], data, meta or None)


def _frames(rng: np.random.Generator, duration: float, rate: float, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous frames over [0, duration) at a fixed rate, random features."""
    n = int(duration * rate)
    starts = np.arange(n) / rate
    ends = starts + 1.0 / rate
    feats = rng.standard_normal((n, dim)).astype(np.float32)
    return feats, np.stack([starts, ends], axis=1)


def make_csd_fixture(directory: Path, *, seed: int = 0, per_split: dict[str, int] | None = None,
                     segments_per_video: int = 3) -> CsdFixture:
    """Four consistent .csd files: videos of the standard folds plus one video in no fold."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    folds = standard_fold_videos(per_split or {"train": 3, "valid": 2, "test": 2})
    fx = CsdFixture(directory)
    fx.videos = {m: {} for m in DIMS}
    video_split = {v: s for s, vids in folds.items() for v in vids}
    video_split[fx.no_fold_video] = None
    for vid, split in video_split.items():
        seg_bounds, t = [], 0.3
        for _ in range(segments_per_video):
            length = float(rng.uniform(1.0, 2.5))
            seg_bounds.append((t, t + length))
            t += length + float(rng.uniform(0.0, 0.4))
        duration = t + 0.5
        for m, dim in DIMS.items():
            fx.videos[m][vid] = _frames(rng, duration, RATES[m], dim)
        values = np.zeros((segments_per_video, 7), dtype=np.float64)
        values[:, 0] = np.round(rng.uniform(-3, 3, segments_per_video) * 3) / 3
        values[:, 1:] = rng.integers(0, 4, (segments_per_video, 6)) * (rng.random((segments_per_video, 6)) < 0.4) / 3.0
        fx.labels[vid] = (values, np.asarray(seg_bounds, dtype=np.float64))
        if split is None:
            continue
        for k, (start, end) in enumerate(seg_bounds):
            exp = {"split": split, "video_id": vid, "labels": (values[k, 1:] > 0).astype(np.uint8),
                   "intensities": values[k, 1:].astype(np.float32), "sentiment": float(values[k, 0])}
            for m in DIMS:
                feats, iv = fx.videos[m][vid]
                keep = [i for i in range(len(iv)) if start <= (iv[i, 0] + iv[i, 1]) / 2 < end]
                exp[m] = feats[keep]
            fx.expected[f"{vid}[{k}]"] = exp
    for m in DIMS:
        fx.rewrite(m)
    fx.rewrite("labels")
    return fx


# ------------------------------------------------------------------------------------------------- pickle

@dataclass
class PickleFixture:
    path: Path
    data: dict
    expected: dict[str, dict]
    sizes: dict[str, int]
    emotion_labels: dict[str, np.ndarray]


def make_pickle_fixture(path: Path, *, seed: int = 0, sizes: dict[str, int] | None = None,
                        steps: tuple[int, int, int] = (8, 20, 24), label_form: str = "sentiment_only",
                        id_form: str = "pairs") -> PickleFixture:
    """A MulT-style pickle: left zero-padded [N, T, D] arrays, ``labels`` per ``label_form``:
    "sentiment_only" [N,1,1], "seven" [N,1,7] raw (sentiment + intensities), "six" [N,6] 0/1."""
    rng = np.random.default_rng(seed)
    sizes = sizes or {"train": 6, "valid": 3, "test": 4}
    data, expected, emotion_labels = {}, {}, {}
    for s_index, (split, n) in enumerate(sizes.items()):
        arrays = {}
        lengths = {}
        for m, key, t in zip(DIMS, ("text", "vision", "audio"), steps):
            arr = np.zeros((n, t, DIMS[m]), dtype=np.float32)
            lens = rng.integers(1, t + 1, n)
            lens[0] = t  # one unpadded (full-length) sequence per split
            for i, length in enumerate(lens):
                arr[i, t - length:] = rng.standard_normal((length, DIMS[m])).astype(np.float32)
                arr[i, t - length, 0] = 1.5  # a first real frame is never all-zero
            arrays[key], lengths[m] = arr, lens
        intens = rng.integers(0, 4, (n, 6)) * (rng.random((n, 6)) < 0.4) / 3.0
        sentiment = np.round(rng.uniform(-3, 3, n) * 3) / 3
        binary = (intens > 0).astype(np.uint8)
        if label_form == "sentiment_only":
            labels = sentiment.reshape(n, 1, 1).astype(np.float32)
        elif label_form == "seven":
            labels = np.concatenate([sentiment[:, None], intens], axis=1).reshape(n, 1, 7).astype(np.float32)
        elif label_form == "six":
            labels = binary.astype(np.float32)
        else:
            raise ValueError(label_form)
        vids = [f"{split}vid{i // 2:03d}" for i in range(n)]
        if id_form == "pairs":
            ids = np.array([[v, str(i % 2)] for i, v in enumerate(vids)])
            keys = [f"{v}[{i % 2}]" for i, v in enumerate(vids)]
        else:
            ids = np.array([f"{v}_{i % 2}" for i, v in enumerate(vids)])
            keys = [f"{v}_{i % 2}[0]" for i, v in enumerate(vids)]
        data[split] = {**arrays, "labels": labels, "id": ids}
        emotion_labels[split] = binary
        for i, key in enumerate(keys):
            expected[key] = {
                "split": split, "labels": binary[i],
                "intensities": intens[i].astype(np.float32) if label_form == "seven" else None,
                "sentiment": float(np.float32(sentiment[i])) if label_form != "six" else None,
                **{m: arrays[k][i, arrays[k].shape[1] - lengths[m][i]:] for m, k in zip(DIMS, ("text", "vision", "audio"))},
            }
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return PickleFixture(path, data, expected, dict(sizes), emotion_labels)


def tokens_of(binary: np.ndarray) -> list[list[int]]:
    """CARAT token lists [BOS=2, 4+e ..., EOS=3] of [N, 6] 0/1 labels."""
    return [[2] + [4 + e for e in np.flatnonzero(row)] + [3] for row in binary]


def padded_tokens(binary: np.ndarray, width: int = 8) -> np.ndarray:
    out = np.zeros((len(binary), width), dtype=np.int64)
    for i, toks in enumerate(tokens_of(binary)):
        out[i, :len(toks)] = toks
    return out


# ------------------------------------------------------------------------------------------------ reading

def read_corpus_samples(out_dir: Path) -> dict[str, dict]:
    """Every sample of every shard (tarfile + np.load, independent of carat's loader): key -> arrays + json."""
    import io
    import tarfile

    samples: dict[str, dict] = {}
    for tar_path in sorted(Path(out_dir).glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                stem, _, ext = member.name.partition(".")
                payload = tar.extractfile(member).read()
                entry = samples.setdefault((tar_path.parent.name, stem), {})
                if ext == "json":
                    entry["json"] = json.loads(payload)
                else:
                    entry[ext.split(".")[0]] = np.load(io.BytesIO(payload), allow_pickle=False)
    out: dict[str, dict] = {}
    for (split, _), entry in samples.items():
        key = entry["json"]["key"]
        assert key not in out, f"{key} stored twice"
        assert entry["json"]["split"] == split
        out[key] = entry
    return out


def tiny_loop_corpus(out: Path) -> Path:
    """The smallest synthetic corpus the real training loop runs on (scale 0.005, 16-sample shards, no
    reference scorer): shared by the end-to-end, checkpoint-safety and divergence tests."""
    from carat.data.corpus.shards import StorageConfig
    from carat.data.sources.synth import SynthConfig, synthesize_corpus

    synthesize_corpus(out, SynthConfig(scale=0.005, length_scale=0.05, seed=1),
                      StorageConfig(dtype="float32", shard_max_samples=16), reference=False)
    return out


def loop_args(shards: Path, storage: Path, name: str, epochs: int, *extra: str) -> list[str]:
    """``carat.train`` arguments for a one-process tiny-preset run on a fixture corpus (``extra`` last, so it
    wins)."""
    return ["--preset", "tiny", f"--train.shard_dir={shards}", f"--train.storage_path={storage}",
            f"--train.run_name={name}", f"--train.epochs={epochs}", "--train.synth_if_missing=false",
            "--loader.num_workers=0", "--launcher", "none", *extra]
