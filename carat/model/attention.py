"""Multi-head self-attention of the CARAT encoders (BERT's ``TfSelfAttention`` / ``TfSelfOutput``).

Two interchangeable kernels: ``"sdpa"`` calls :func:`torch.nn.functional.scaled_dot_product_attention` (flash
or memory-efficient kernels on GPU, so the L x L score matrix is never stored), ``"eager"`` writes out
softmax(Q K^T / sqrt(d_head) + mask) V and is the numerical reference the tests compare against.

Padding enters as an additive key bias (0 on real frames, the dtype's most negative finite number on padding),
never as -inf: a query row whose keys are all padding then softmaxes to a finite uniform row instead of NaN.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [B, 1, 1, L] from a key mask [B, L] (True = real frame)."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    bias = bias.masked_fill(~mask, torch.finfo(dtype).min)
    return bias[:, None, None, :]


class MultiHeadSelfAttention(nn.Module):
    """Q, K, V projections and scaled dot-product attention over all heads (BERT self-attention)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float,
                 kernel: Literal["sdpa", "eager"] = "sdpa") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = hidden_size // num_heads
        self.kernel = kernel
        self.dropout_p = dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, d], key_mask [B, L] bool (True = real) -> context [B, L, d]."""
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(hidden)), self._heads(self.value(hidden))
        bias = padding_bias(key_mask, q.dtype)
        dropout = self.dropout_p if self.training else 0.0
        if self.kernel == "sdpa":
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        else:
            context = eager_attention(q, k, v, bias, dropout, self.training)
        b, _, length, _ = context.shape
        return context.transpose(1, 2).reshape(b, length, self.num_heads * self.head_size)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                    dropout: float, training: bool) -> torch.Tensor:
    """The reference kernel: softmax(q k^T / sqrt(d_head) + bias) v, with dropout on the probabilities."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores + bias, dim=-1)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, v)


class AttentionBlock(nn.Module):
    """Self-attention + output projection + dropout + residual + post-LayerNorm (BERT's ``TfAttention``)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, eps: float,
                 kernel: Literal["sdpa", "eager"] = "sdpa") -> None:
        super().__init__()
        self.self_attention = MultiHeadSelfAttention(hidden_size, num_heads, dropout, kernel)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        context = self.self_attention(hidden, key_mask)
        return self.layer_norm(self.dropout(self.dense(context)) + hidden)
