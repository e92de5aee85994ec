"""Decoding of stored samples (``.npy`` and ``.json`` only) and collation into padded tensors with masks.

Workers make a :class:`~carat.data.loader.batch.CollatedBatch` (feature tensors in the stored dtype, small numpy
arrays, lists), with the feature tensors placed by an allocator (:data:`Alloc`: a slot of the loader's reused
shared-memory ring, or a fresh shared segment); :func:`to_batch` turns it into a
:class:`~carat.data.loader.batch.Batch` in the consuming process.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import numpy as np
import torch
from torch.utils.data import get_worker_info

from carat.data.loader.batch import Batch, CollatedBatch
from carat.data.sources.segment import EMOTIONS, FEATURE_DIMS, MODALITIES


@dataclass
class DecodedSample:
    """One sample read back from a shard: features in their stored dtype, labels, intensities."""

    key: str
    features: dict[str, np.ndarray]
    labels: np.ndarray
    """[6] uint8."""
    intensities: np.ndarray
    """[6] float32, NaN = unknown."""


_NPY_MAGIC_V1 = b"\x93NUMPY\x01\x00"
# The header carat's writer produces for a C-order 2-D float array (np.lib.format version 1.0). Parsing it with
# a regex instead of numpy's ast.literal_eval saves ~25 us per array; anything else takes the general path.
_NPY_HEADER = re.compile(rb"\{'descr': '(<f[248])', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \} *\n")


def decode_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` payload as a read-only array view (no copy); object arrays (pickles) are refused."""
    if data[:8] == _NPY_MAGIC_V1:
        header_end = 10 + int.from_bytes(data[8:10], "little")
        match = _NPY_HEADER.fullmatch(data, 10, header_end)
        if match is not None:
            shape = (int(match[2]), int(match[3]))
            return np.frombuffer(data, dtype=np.dtype(match[1].decode()), count=shape[0] * shape[1],
                                 offset=header_end).reshape(shape)
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


Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
"""Allocator of a padded feature tensor (shape, dtype) -> uninitialised tensor; see :func:`collate`."""


def shared_alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker, directly in a fresh shared-memory segment.

    Same trick as torch's default_collate: a worker's batch travels to the main process through shared
    memory, and allocating it there saves one more copy of every batch. Each fresh segment costs its page
    population and an fd transfer, which is why the loader normally writes into a reused pool instead
    (``carat.data.loader.shm_pool.SharedBufferPool``) and uses this only as the fallback.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).resize_(shape)


_NUMPY_DTYPE = {torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32)}


def _pad(arrays: list[np.ndarray], dim: int, alloc: Alloc) -> torch.Tensor:
    """[B, L, dim] zero-padded at the end, in the stored dtype.

    L is at least 1 so a batch whose samples all lack a modality still has a (fully masked) time axis.
    Features stay in their stored dtype (float16 by default) until :func:`to_batch`: a worker's batch crosses
    to the main process in shared memory, and half the bytes there is most of a worker's cost.
    """
    lens = [len(a) for a in arrays]
    width = max([1, *lens])
    half = all(a.dtype == np.float16 for a in arrays)
    out = alloc((len(arrays), width, dim), torch.float16 if half else torch.float32)
    target = out.numpy()  # numpy slice assignment: ~1 us per sample, vs ~4 us for a torch copy_ call
    for i, arr in enumerate(arrays):
        n = lens[i]
        if n:
            # Same dtype: a plain memcpy. Otherwise (float32/64 stored, or a float16 sample in a float32
            # batch) torch's vectorised cast; numpy's float16 conversion is ~20x slower.
            if arr.dtype == target.dtype:
                target[i, :n] = arr
            else:
                with warnings.catch_warnings():
                    # The arrays view immutable tar bytes; torch warns about that although it only reads them.
                    warnings.simplefilter("ignore", UserWarning)
                    out[i, :n].copy_(torch.from_numpy(arr))
        if n < width:
            target[i, n:] = 0  # only the padding is written twice, not the whole batch
    return out


def collate(samples: list[DecodedSample], weight: float, alloc: Alloc | None = None) -> CollatedBatch:
    """A worker's batch: padded feature tensors (stored dtype) and small numpy arrays (see
    :class:`~carat.data.loader.batch.CollatedBatch`), every sample with the same ``weight``.

    Only the three feature tensors go through shared memory; the rest is pickled inline (a shared-memory
    segment per small tensor costs ~0.2 ms). ``alloc`` places the feature tensors (default :func:`shared_alloc`;
    the loader's workers pass a slot of their reused buffer pool). :func:`to_batch` builds masks from the
    lengths and the :class:`Batch`. The one place a CollatedBatch is made; the others are copies of one.
    """
    alloc = shared_alloc if alloc is None else alloc
    # Padded in MODALITIES order, as before the batch was typed: the allocator's slot layout depends on it.
    features = {m: _pad([s.features[m] for s in samples], FEATURE_DIMS[m], alloc) for m in MODALITIES}
    return CollatedBatch(
        keys=[s.key for s in samples],
        **features,
        lengths=np.array([[len(s.features[m]) for m in MODALITIES] for s in samples], dtype=np.int64),
        labels=np.stack([s.labels for s in samples]).astype(np.float32),
        intensities=np.stack([s.intensities for s in samples]).astype(np.float32),
        weight=np.full(len(samples), float(weight), dtype=np.float32),
    )


# Exponent bits of IEEE-754 half and single floats: all ones <=> inf or NaN.
_EXPONENT_BITS = {np.dtype(np.float16): (np.int16, 0x7C00), np.dtype(np.float32): (np.int32, 0x7F800000)}


def nonfinite_rows(features: Mapping[str, torch.Tensor]) -> dict[int, str]:
    """Rows of a batch's padded ``features`` (by modality) holding NaN/inf, with the modality, e.g. from
    flipped bits in a shard.

    A value is non-finite exactly when its exponent bits are all ones, so one integer AND + max over the raw
    bits of each modality decides for the whole batch (~0.3 ms for 10 MB of float16, ~8x faster than a float32
    sum and exact: no overflow false alarms); only a batch that has some looks for the rows."""
    bad: dict[int, str] = {}
    for modality in MODALITIES:
        x = features[modality].numpy()
        int_type, exponent = _EXPONENT_BITS[x.dtype]
        if x.size == 0:
            continue
        bits = np.bitwise_and(x.view(int_type), exponent)
        if int(bits.max()) != exponent:
            continue
        rows = np.flatnonzero((bits.reshape(len(x), -1) == exponent).any(axis=1)).tolist()
        for r in rows:
            bad.setdefault(r, f"{modality} has non-finite values")
    return bad


def select_rows(batch: CollatedBatch, keep: list[int]) -> CollatedBatch:
    """The collated batch restricted to rows ``keep`` (padding width unchanged; features in fresh memory)."""
    index = torch.tensor(keep, dtype=torch.long)
    features = {m: t.index_select(0, index) for m, t in batch.features().items()}
    return replace(batch, keys=[batch.keys[i] for i in keep], **features, lengths=batch.lengths[keep],
                   labels=batch.labels[keep], intensities=batch.intensities[keep], weight=batch.weight[keep])


def empty_filler() -> CollatedBatch:
    """A one-sample, one-frame, all-zero batch with weight 0: stands in when every sample of a planned batch
    was skipped as corrupt, so the rank still runs its planned step. Its single frame is marked real so that
    no encoder sees a fully masked sequence."""
    samples = [DecodedSample(
        key="<skipped>",
        features={m: np.zeros((1, FEATURE_DIMS[m]), np.float32) for m in MODALITIES},
        labels=np.zeros(len(EMOTIONS), np.uint8),
        intensities=np.full(len(EMOTIONS), np.nan, np.float32))]
    return collate(samples, weight=0.0)


def _features_out(x: torch.Tensor, dtype: torch.dtype | None, pin_memory: bool, copy: bool) -> torch.Tensor:
    """``x`` as ``dtype`` (None = as is) in memory the Batch owns, page-locked if ``pin_memory``.

    ``copy`` forces a fresh tensor even when nothing changes: a worker's pooled shared buffer is reused for a
    later batch, so the Batch must not keep a view of it."""
    dtype = x.dtype if dtype is None else dtype
    if x.dtype == dtype and not copy:
        return x.pin_memory() if pin_memory else x
    if pin_memory:
        out = torch.empty(x.shape, dtype=dtype, pin_memory=True)  # torch's caching host allocator
    else:
        # numpy asks the kernel for transparent huge pages on large arrays: a fresh 20 MB batch then costs
        # ~10 page faults instead of ~5,000 (measured: ~0.5 vs ~0.8-2.4 ms per audio tensor).
        out = torch.from_numpy(np.empty(tuple(x.shape), dtype=_NUMPY_DTYPE[dtype]))
    return out.copy_(x)  # vectorised half -> float cast, or a memcpy


def to_batch(collated: CollatedBatch, pin_memory: bool = False, dtype: torch.dtype | None = torch.float32,
             copy: bool = False) -> Batch:
    """The :class:`Batch` of a collated batch: features as ``dtype`` (float32 by default, the model's input;
    None keeps the stored dtype), bool masks (True = real frame) from the lengths, every tensor page-locked if
    ``pin_memory``, features copied out of ``collated`` if ``copy``. Runs in the consuming process, after the
    transfer (and after pooled features were resolved to tensors)."""
    def small(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.pin_memory() if pin_memory else t

    fields: dict[str, torch.Tensor] = {}
    lengths = torch.from_numpy(np.asarray(collated.lengths, dtype=np.int64))
    stored = collated.features()
    for j, modality in enumerate(MODALITIES):
        feats = _features_out(stored[modality], dtype, pin_memory, copy)
        fields[modality] = feats
        mask = torch.arange(feats.shape[1])[None, :] < lengths[:, j : j + 1]
        fields[f"{modality}_mask"] = mask.pin_memory() if pin_memory else mask
    return Batch(keys=list(collated.keys), labels=small(collated.labels), intensities=small(collated.intensities),
                 weight=small(collated.weight), **fields)
