"""Decoding of stored samples (``.npy`` and ``.json`` only) and collation into padded tensors with masks.

Workers return plain dicts (tensors and lists): the DataLoader can pin them in the main process, where
:func:`to_batch` turns them into a :class:`~carat.data.batch.Batch`.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from carat.data.batch import Batch
from carat.data.segment import EMOTIONS, FEATURE_DIMS, MODALITIES


@dataclass
class DecodedSample:
    """One sample read back from a shard: features in their stored dtype, labels, intensities."""

    key: str
    features: dict[str, np.ndarray]
    labels: np.ndarray
    """[6] uint8."""
    intensities: np.ndarray
    """[6] float32, NaN = unknown."""


def decode_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` payload as a read-only array view (no copy); object arrays (pickles) are refused."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if dtype.hasobject:
        raise ValueError("object arrays (pickles) are not accepted")
    count = math.prod(shape)
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def decode_sample(sample: dict, key: str, lengths: tuple[int, int, int]) -> DecodedSample:
    """Check and decode one grouped tar sample against its manifest row; ValueError says what is wrong."""
    meta_raw = sample.get("json")
    if meta_raw is None:
        raise ValueError("no .json member")
    meta = json.loads(meta_raw)
    if meta.get("key") != key:
        raise ValueError(f"json key {meta.get('key')!r} differs from the manifest key")
    features = {}
    for modality, length in zip(MODALITIES, lengths):
        payload = sample.get(f"{modality}.npy")
        if payload is None:
            raise ValueError(f"no .{modality}.npy member")
        arr = decode_npy(payload)
        expected = (int(length), FEATURE_DIMS[modality])
        if arr.shape != expected:
            raise ValueError(f"{modality} shape {arr.shape} differs from the manifest's {expected}")
        if arr.dtype.kind != "f":
            raise ValueError(f"{modality} dtype {arr.dtype} is not floating point")
        features[modality] = arr
    labels = np.asarray(meta["labels"], dtype=np.uint8)
    if labels.shape != (len(EMOTIONS),):
        raise ValueError(f"labels {meta['labels']!r} are not {len(EMOTIONS)} values")
    raw = meta.get("intensities") or [None] * len(EMOTIONS)
    intensities = np.array([np.nan if v is None else v for v in raw], dtype=np.float32)
    return DecodedSample(key=key, features=features, labels=labels, intensities=intensities)


def _pad(arrays: list[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, L, dim] float32 zero-padded at the end, and the [B, L] True-on-real-frames mask.

    L is at least 1 so a batch whose samples all lack a modality still has a (fully masked) time axis.
    """
    lens = np.array([len(a) for a in arrays], dtype=np.int64)
    width = max(1, int(lens.max()) if len(lens) else 1)
    out = np.zeros((len(arrays), width, dim), dtype=np.float32)  # calloc: padding costs no writes
    for i, arr in enumerate(arrays):
        out[i, : len(arr)] = arr  # float16 -> float32 happens in this copy
    mask = np.arange(width)[None, :] < lens[:, None]
    return out, mask


def collate(samples: list[DecodedSample], weight: float) -> dict:
    """Padded float32 features, bool masks, labels, intensities and per-sample weights, as tensors."""
    out: dict = {"keys": [s.key for s in samples]}
    for modality in MODALITIES:
        feats, mask = _pad([s.features[modality] for s in samples], FEATURE_DIMS[modality])
        out[modality] = torch.from_numpy(feats)
        out[f"{modality}_mask"] = torch.from_numpy(mask)
    out["labels"] = torch.from_numpy(np.stack([s.labels for s in samples]).astype(np.float32))
    out["intensities"] = torch.from_numpy(np.stack([s.intensities for s in samples]))
    out["weight"] = torch.full((len(samples),), float(weight), dtype=torch.float32)
    return out


def empty_filler() -> dict:
    """A one-sample, one-frame, all-zero batch with weight 0: stands in when every sample of a planned batch
    was skipped as corrupt, so the rank still runs its planned step. Its single frame is marked real so that
    no encoder sees a fully masked sequence."""
    samples = [DecodedSample(
        key="<skipped>",
        features={m: np.zeros((1, FEATURE_DIMS[m]), np.float32) for m in MODALITIES},
        labels=np.zeros(len(EMOTIONS), np.uint8),
        intensities=np.full(len(EMOTIONS), np.nan, np.float32))]
    return collate(samples, weight=0.0)


def to_batch(parts: dict) -> Batch:
    """The :class:`Batch` of a collated dict (after the DataLoader has pinned its tensors)."""
    return Batch(keys=list(parts["keys"]), text=parts["text"], text_mask=parts["text_mask"],
                 visual=parts["visual"], visual_mask=parts["visual_mask"], audio=parts["audio"],
                 audio_mask=parts["audio_mask"], labels=parts["labels"], intensities=parts["intensities"],
                 weight=parts["weight"])
