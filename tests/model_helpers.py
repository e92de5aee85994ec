"""Tiny CARAT models and padded random batches for the tests/test_model_*.py files."""

from __future__ import annotations

import dataclasses

import torch

from carat.model import CARAT, TINY_MODEL_SIZE, ModelConfig

DIMS = {"text": 300, "visual": 35, "audio": 74}


def tiny_config(**overrides: object) -> ModelConfig:
    """The tiny preset's size with the reference behaviour: each test names the learning fix it exercises."""
    return ModelConfig(**{**TINY_MODEL_SIZE, **overrides})


def tiny_model(seed: int = 0, **overrides: object) -> CARAT:
    torch.manual_seed(seed)
    return CARAT.from_config(tiny_config(**overrides))


def padded(lengths: list[int], dim: int, generator: torch.Generator, total: int | None = None):
    """[B, L, dim] random frames zero-padded after each sample's length, and the bool mask."""
    total = total or max(lengths)
    frames = torch.randn(len(lengths), total, dim, generator=generator)
    mask = torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]
    return frames * mask[..., None], mask


def make_batch(lengths: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs with the given per-sample lengths per modality."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for name in ("text", "visual", "audio"):
        batch[name], batch[f"{name}_mask"] = padded(lengths[name], DIMS[name], g)
    return batch


def stack_samples(samples: list[dict[str, torch.Tensor]], garbage: bool = True) -> dict[str, torch.Tensor]:
    """Collate single-sample batches into one padded batch; ``garbage`` fills the padding with random values
    (finite), so a test sees any leak of padded frames even where zero padding would hide it."""
    g = torch.Generator().manual_seed(123)
    batch = {}
    for name in ("text", "visual", "audio"):
        longest = max(s[name].shape[1] for s in samples)
        frames, masks = [], []
        for s in samples:
            pad = longest - s[name].shape[1]
            shape = (1, pad, s[name].shape[2])
            filler = torch.randn(shape, generator=g) if garbage else torch.zeros(shape)
            frames.append(torch.cat([s[name], filler], dim=1))
            masks.append(torch.nn.functional.pad(s[f"{name}_mask"], (0, pad)))
        batch[name], batch[f"{name}_mask"] = torch.cat(frames), torch.cat(masks)
    return batch


def perturb_parameters(model: torch.nn.Module, scale: float = 0.1, seed: int = 7) -> None:
    """Add noise to every parameter (LayerNorm biases start at 0, which would hide padding leaks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def labels_for(batch_size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (batch_size, 6), generator=g).float()


def output_tensors(out) -> dict[str, torch.Tensor]:
    return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)
            if isinstance(getattr(out, f.name), torch.Tensor)}
