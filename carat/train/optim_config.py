"""The ``[optim]`` section: AdamW's settings and the learning-rate schedule (the code is :mod:`carat.train.optim`).

Kept apart from that code so that reading a configuration (:mod:`carat.config`) loads no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from carat.errors import ConfigError


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (defaults = the seed configuration)."""

    lr: float = 3e-5
    """Peak learning rate, reached at the end of warmup (before the per-epoch decay)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam moment decay rates (beta1, beta2)."""
    eps: float = 1e-6
    """Adam denominator epsilon (BERT's 1e-6 rather than torch's 1e-8)."""
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to biases and norm weights (any parameter with ndim <= 1), except
    the input LayerNorm weights with decay_input_norm."""
    decay_input_norm: bool = False
    """Also decay the weights of the per-frame input LayerNorms (text_norm, visual_norm, audio_norm), as the
    reference does (its exemption rule matches names containing "bias" or "LayerNorm", and its input norms are
    named ``*_norm.norm2d``). False = carat's rule: no 1-d parameter is decayed."""
    warmup_fraction: float = 0.2
    """Fraction of all training steps with a linear warmup from 0 to lr; then linear decay to 0 at the end
    (the seed's 0.2; the reference's 0.1)."""
    epoch_decay: float = 0.98
    """The lr is further multiplied by epoch_decay ** epoch (epoch counted from 0). The seed's 0.98; the
    reference has none (1.0: its --lr_decay is parsed but unused)."""
    coef_lr: float = 0.1
    """LR multiplier of the parameters under coef_lr_modules (the reference parses 0.1 but never applies it:
    1.0 reproduces it)."""
    coef_lr_modules: tuple[str, ...] = ("text_encoder", "visual_encoder", "audio_encoder")
    """Module names whose parameters train at lr * coef_lr (matched as whole dotted name components)."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold, applied by the training loop / DeepSpeed; 0 disables. 1.0 is the
    reference's (which BertAdam's per-parameter clip at 1.0 then never changes)."""

    def __post_init__(self) -> None:
        _check_positive_finite("lr", self.lr)
        _check_positive_finite("eps", self.eps)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas={self.betas} must be two values in [0, 1), e.g. (0.9, 0.999)")
        if not 0.0 <= self.weight_decay < 1.0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be in [0, 1) (seed 0.01)")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"warmup_fraction={self.warmup_fraction} must be in [0, 1) (fraction of all steps)")
        if not 0.0 < self.epoch_decay <= 1.0:
            raise ConfigError(f"epoch_decay={self.epoch_decay} must be in (0, 1] (1 = no per-epoch decay)")
        _check_positive_finite("coef_lr", self.coef_lr)
        if any(not isinstance(m, str) or not m or m.startswith(".") or m.endswith(".")
               for m in self.coef_lr_modules):
            raise ConfigError(f"coef_lr_modules={self.coef_lr_modules} must be non-empty dotted module names "
                              "such as 'text_encoder'")
        if not (self.grad_clip >= 0.0 and self.grad_clip != float("inf")):
            raise ConfigError(f"grad_clip={self.grad_clip} must be a finite value >= 0 (0 disables clipping)")


def _check_positive_finite(name: str, value: float) -> None:
    if not (value > 0.0 and value != float("inf")):
        raise ConfigError(f"{name}={value} must be a finite value > 0")


TINY_OVERRIDES: dict[str, object] = {"lr": 1e-2, "warmup_fraction": 0.1, "coef_lr": 1.0}
"""Tiny runs train a few epochs of a few steps: a larger lr and a short warmup so the loss visibly drops, and
the encoders at the full lr: measured on a strong-signal synthetic corpus (816 train clips, 6 epochs), with
coef_lr 0.1 the randomly initialised tiny encoders never leave the label prior (valid micro-F1 0.44, the
all-positive level); at 1.0 they reach 0.57. (The seed's 0.1 comes from encoders meant to start pre-trained.)
lr 3e-3 rather than 1e-3: at 1e-3 validation AUC still climbs at the last of 8 epochs (~200 steps) and test
macro-AUC on the strong-signal bench corpus is 0.60-0.63; at 3e-3 it is 0.66-0.68, at 1e-2 no better (0.67)
(BENCHMARKS.md, Learning, 2026-12-03). With the quickstart's 3,265-clip corpus, one slot per frame and 32 clips
per step, lr 1e-2 against 3e-3: test macro-AUC 0.797 against 0.759, tuned F1 0.639 / 0.553 against 0.570 / 0.519
(one seed each, 8 epochs)."""
