"""The per-modality Transformer encoder of CARAT (the reference's ``TfModel``, a post-LN BERT encoder).

Linear(feature dim -> d) + learned position embedding + LayerNorm + dropout, then N layers of self-attention and
a GELU feed-forward block, each with residual + post-LayerNorm; a tanh pooler on the first position (computed,
as in the reference, but unused by the losses). Padded frames are masked out of every attention.

Activation checkpointing (``checkpoint_layers``) recomputes each layer in the backward pass instead of storing
its activations (``torch.utils.checkpoint``, non-reentrant, RNG state restored so dropout masks match).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from carat.model.attention import AttentionBlock


class InputEmbedding(nn.Module):
    """Frame projection + learned absolute position embedding + LayerNorm + dropout (``TfEmbeddings``).
    """

    def __init__(self, input_dim: int, hidden_size: int, max_positions: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.frame_projection = nn.Linear(input_dim, hidden_size)
        self.position_embedding = nn.Embedding(max_positions, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(frames.shape[1], device=frames.device)
        embedded = self.frame_projection(frames) + self.position_embedding(positions)[None]
        return self.dropout(self.layer_norm(embedded))


class FeedForward(nn.Module):
    """Linear(d -> intermediate), activation, Linear(intermediate -> d), dropout, residual, post-LayerNorm."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float, eps: float,
                 activation: Literal["gelu", "relu"] = "gelu") -> None:
        super().__init__()
        self.intermediate = nn.Linear(hidden_size, intermediate_size)
        self.output = nn.Linear(intermediate_size, hidden_size)
        self.activation = F.gelu if activation == "gelu" else F.relu
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        update = self.output(self.activation(self.intermediate(hidden)))
        return self.layer_norm(self.dropout(update) + hidden)


class TransformerLayer(nn.Module):
    """One post-LN BERT layer (``TfLayer``): attention block then feed-forward block."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, dropout: float, eps: float,
                 activation: Literal["gelu", "relu"] = "gelu", kernel: Literal["sdpa", "eager"] = "sdpa") -> None:
        super().__init__()
        self.attention = AttentionBlock(hidden_size, num_heads, dropout, eps, kernel)
        self.feed_forward = FeedForward(hidden_size, intermediate_size, dropout, eps, activation)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.attention(hidden, key_mask))


class Pooler(nn.Module):
    """tanh(W h_0 + b) (``TfPooler``); kept for parameter parity with the reference, unused by the losses."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class ModalityEncoder(nn.Module):
    """The reference's ``TfModel``: embedding, ``num_layers`` Transformer layers, pooler.

    forward(frames [B, L, input_dim], mask [B, L] bool) -> (hidden [B, L, d], pooled [B, d]).
    """

    def __init__(self, input_dim: int, hidden_size: int, intermediate_size: int, num_heads: int,
                 num_layers: int, max_positions: int, dropout: float, *, eps: float = 1e-12,
                 activation: Literal["gelu", "relu"] = "gelu", kernel: Literal["sdpa", "eager"] = "sdpa",
                 init_std: float = 0.02, checkpoint_layers: bool = False) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.checkpoint_layers = checkpoint_layers
        self.embedding = InputEmbedding(input_dim, hidden_size, max_positions, dropout, eps)
        self.layers = nn.ModuleList(
            TransformerLayer(hidden_size, intermediate_size, num_heads, dropout, eps, activation, kernel)
            for _ in range(num_layers)
        )
        self.pooler = Pooler(hidden_size)
        self.apply(lambda module: bert_init(module, init_std))

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if frames.shape[1] > self.max_positions:
            # Callers bound the length (text overflow policy, alignment width); this guards the index error.
            raise ValueError(f"sequence of {frames.shape[1]} steps exceeds max_positions={self.max_positions}")
        hidden = self.embedding(frames)
        for layer in self.layers:
            if self.checkpoint_layers and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, mask, use_reentrant=False)
            else:
                hidden = layer(hidden, mask)
        return hidden, self.pooler(hidden)


def bert_init(module: nn.Module, std: float) -> None:
    """BERT init, as the reference's ``init_weights``: N(0, std) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
