"""The few collectives the training loop needs, written so they also work in a single process.

Batches have different sizes on different ranks (token-budget batching), so every gather here first
exchanges row counts and pads to the largest, which gloo and NCCL both require.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    """Sum a Python number over ranks (float64 so sample counts stay exact)."""
    return float(all_reduce_sums([value], device)[0])


def all_reduce_sums(values: torch.Tensor | list[float], device: torch.device) -> torch.Tensor:
    """Sum a vector of numbers over ranks in one collective (float64, on ``device``): several scalar
    all-reduces cost one round trip each, and on a GPU one device sync each."""
    tensor = (values.to(device=device, dtype=torch.float64) if isinstance(values, torch.Tensor)
              else torch.tensor([float(v) for v in values], dtype=torch.float64, device=device))
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (any number of rows) from every rank along dim 0, in rank order.

    Used as the model's ``gather`` hook so the contrastive queue and the prototypes are updated from the
    features of all ranks and stay identical everywhere. Gradients do not flow through the gather.
    """
    if not is_distributed() or world_size() == 1:
        return tensor
    tensor = tensor.detach().contiguous()
    count = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (evaluation results: small, once per evaluation)."""
    if not is_distributed() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not is_distributed() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
