"""Analytic FLOP count of CARAT's forward pass, for model FLOPs utilisation (MFU).

Counts the matrix multiplications (2 FLOPs per multiply-add), which dominate: the alignment LSTMs, the
alignment products P @ x, the encoders (projections, attention scores and values, feed-forward), label
attention. Heads on [B, C, d] are negligible at these lengths and are left out. Training = 3x forward
(backward is about twice the forward), plus one more forward for checkpointed blocks when enabled.
"""

from __future__ import annotations

from carat.model.config import ModelConfig

FEATURES = {"text": 300, "visual": 35, "audio": 74}


def lstm_flops(length: int, inp: int, hidden: int, layers: int = 2) -> float:
    flops = 0.0
    for layer in range(layers):
        width = inp if layer == 0 else hidden
        flops += 2.0 * length * 4 * hidden * (width + hidden)
    return flops


def encoder_flops(length: int, feat: int, d: int, inter: int, layers: int) -> float:
    per_layer = 2.0 * length * (4 * d * d + 2 * d * inter) + 2.0 * 2 * length * length * d
    return 2.0 * length * feat * d + layers * per_layer


def sample_forward_flops(cfg: ModelConfig, lengths: dict[str, int]) -> float:
    """Forward FLOPs of one sample with the given raw lengths (text, visual, audio)."""
    d, inter, classes = cfg.hidden_size, cfg.intermediate_size, cfg.num_classes
    total = 0.0
    for m in ("text", "visual", "audio"):
        feat, raw = FEATURES[m], lengths[m]
        if m == "text":
            seq = min(raw, cfg.text_max_positions)
        else:
            seq = cfg.ctc_target_length or min(raw, getattr(cfg, f"{m}_max_positions"))
            total += lstm_flops(raw, feat, seq + 1) + 2.0 * seq * raw * feat
        total += encoder_flops(seq, feat, d, inter, getattr(cfg, f"{m}_layers"))
        total += 2.0 * seq * d * classes * 2  # label attention: logits and A @ H
    return total


def train_flops(cfg: ModelConfig, lengths: list[dict[str, int]]) -> float:
    return 3.0 * sum(sample_forward_flops(cfg, x) for x in lengths)
