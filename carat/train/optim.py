"""CARAT's optimisation: AdamW over four parameter groups and a warmup / linear-decay / epoch-decay schedule.

What the authors' published code (github.com/chengzju/CARAT, main.py and models/optimization.py) does:
``BertAdam`` with lr 1e-4 by default (5e-5 in their train.sh), linear warmup over the first 10% of all steps then
linear decay to 0 (BERT's ``warmup_linear``), no per-epoch decay (``--lr_decay`` is parsed and never used),
weight decay 0.01 on every parameter whose name contains neither "bias" nor "LayerNorm" (so their per-frame
input LayerNorms, ``*_norm.norm2d.weight``, are decayed), the global gradient norm clipped at 1.0 before each
step and, inside BertAdam, each parameter's gradient clipped to norm 1.0. Their ``--coef_lr`` (0.1) is parsed
and used for nothing: every group trains at lr. The ``official`` preset (carat.config) sets these values.

The ``seed`` defaults are the configuration of the document this project started from, not the authors': lr
3e-5, warmup over 20% of steps, the lr further multiplied by 0.98 per epoch, weight decay 0.01 except on every
1-d parameter (biases and all LayerNorm weights), coef_lr 0.1 applied, global clipping at 1.0.

How carat differs, and why:

- **AdamW instead of BertAdam.** BertAdam is Adam *without bias correction*: its step is
  lr * m_t / (sqrt(v_t) + eps) with the raw moment averages, so early steps are *larger* than Adam's, by
  (1 - 0.9^t) / sqrt(1 - 0.999^t) for a steady gradient: 3.2x at step 1, ~6.5x around step 12, 3.2x at step 100,
  1.26x at step 1,000 (the warmup keeps the lr small over most of that stretch). carat uses
  :class:`torch.optim.AdamW` (bias-corrected moments, the same decoupled weight decay), the optimizer DeepSpeed's
  ZeRO stages support; no option restores BertAdam (it would need a custom optimizer under ZeRO and under its
  CPU offload).
- **Clipping.** carat clips the *global* gradient norm at ``grad_clip`` (DeepSpeed's ``gradient_clipping``,
  which works on ZeRO's sharded gradients). That is the reference's clipping exactly: after a global clip at 1.0
  no parameter's gradient norm exceeds 1.0, so BertAdam's per-parameter clip at 1.0 never acts.
- **Weight decay exemptions.** carat exempts every 1-d parameter; the reference's name rule decays the input
  LayerNorm weights too. ``decay_input_norm=true`` (set by the official preset) restores that.
- **coef_lr is applied.** The reference builds separate parameter groups for "pretrained-style" modules (as in
  CLIP4Clip, whose code it follows) but passes every group the same lr. carat applies ``coef_lr`` to the
  parameters under ``coef_lr_modules`` (the modality encoders); ``coef_lr=1.0`` (the official preset)
  reproduces the reference's effective behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from carat.errors import ConfigError
from carat.train.optim_config import TINY_OVERRIDES, OptimConfig  # noqa: F401  (re-exported)


# ------------------------------------------------------------------------------------------ parameter groups
def _under_any(name: str, modules: tuple[str, ...]) -> bool:
    """Whether a parameter name lies under one of ``modules``, matching whole dotted components anywhere
    in the name, so wrapped models ('module.text_encoder.layer.0.weight') match too."""
    dotted = f".{name}."
    return any(f".{m}." in dotted for m in modules)


INPUT_NORMS: tuple[str, ...] = ("text_norm", "visual_norm", "audio_norm")
"""CARAT's per-frame input LayerNorms (the reference's ``*_norm.norm2d``)."""


def is_input_norm_weight(name: str) -> bool:
    """Whether a parameter name is an input LayerNorm's weight, also inside a wrapper ('module.text_norm.weight')."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in INPUT_NORMS


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Trainable parameters split into (coef_lr yes/no) x (weight decay yes/no) groups.

    Each group dict carries ``params``, ``lr`` (= cfg.lr * lr_scale, the schedule's base), ``lr_scale``
    (coef_lr or 1), ``weight_decay`` and a ``name`` such as "coef_lr/decay". Parameters with ndim <= 1
    (biases, LayerNorm/BatchNorm weights, scalars) get no weight decay, except the input LayerNorm weights
    with ``cfg.decay_input_norm``. Empty groups are left out (ZeRO
    optimizers dislike empty groups). A coef_lr_modules entry that matches no parameter is a ConfigError
    (a typo would otherwise silently train the encoders at full lr).
    """
    # Full-lr groups first, so param_groups[0] / get_last_lr()[0] is the headline (fusion/classifier) lr.
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (slow, decay): [] for slow in (False, True) for decay in (True, False)
    }
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = p.ndim > 1 or (cfg.decay_input_norm and is_input_norm_weight(name))
            buckets[(_under_any(name, cfg.coef_lr_modules), decay)].append(p)
    if not any(buckets.values()):
        raise ConfigError(f"{type(model).__name__} has no trainable parameters to optimise")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    unmatched = [m for m in cfg.coef_lr_modules if not any(_under_any(n, (m,)) for n in names)]
    if unmatched:
        raise ConfigError(f"optim.coef_lr_modules entries {unmatched} match no trainable parameter of "
                          f"{type(model).__name__}; top-level modules are "
                          f"{sorted(n for n, _ in model.named_children())}")
    groups = []
    for (slow, decay), params in buckets.items():
        if params:
            scale = cfg.coef_lr if slow else 1.0
            groups.append({
                "params": params,
                "lr": cfg.lr * scale,
                "lr_scale": scale,
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "name": f"{'coef_lr' if slow else 'base_lr'}/{'decay' if decay else 'no_decay'}",
            })
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (bias-corrected, decoupled weight decay) over :func:`param_groups`; see the module docstring
    for how it differs from the reference's BertAdam. Gradient clipping is the caller's (cfg.grad_clip)."""
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


# -------------------------------------------------------------------------------------------------- schedule
def lr_multiplier(step: int, total_steps: int, steps_per_epoch: int, cfg: OptimConfig) -> float:
    """The factor on each group's base lr at optimizer step ``step`` (0-based).

    BERT's ``warmup_linear`` of x = step / total_steps: x / w during warmup (w = warmup_fraction), then
    (1 - x) / (1 - w) down to 0 at total_steps (and 0 beyond), times epoch_decay ** (step // steps_per_epoch).
    As in the reference, step 0 has factor 0 when there is a warmup.
    """
    if total_steps < 1 or steps_per_epoch < 1:
        raise ValueError(f"total_steps={total_steps} and steps_per_epoch={steps_per_epoch} must be >= 1")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    x = step / total_steps
    w = cfg.warmup_fraction
    base = x / w if x < w else max((1.0 - x) / (1.0 - w), 0.0)
    return base * cfg.epoch_decay ** (step // steps_per_epoch)


class WarmupLinearEpochDecay(LambdaLR):
    """:class:`LambdaLR` running :func:`lr_multiplier` on every group (group lr = cfg.lr * lr_scale * factor).

    Its state_dict also records the schedule's shape, and loading a state from a run with a different
    shape (other total steps, steps per epoch, warmup or decay) is a ConfigError rather than a silent jump.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int,
                 cfg: OptimConfig) -> None:
        lr_multiplier(0, total_steps, steps_per_epoch, cfg)  # validates the arguments before use
        self.schedule = {"total_steps": int(total_steps), "steps_per_epoch": int(steps_per_epoch),
                         "warmup_fraction": float(cfg.warmup_fraction), "epoch_decay": float(cfg.epoch_decay)}

        def factor(step: int) -> float:
            return lr_multiplier(step, total_steps, steps_per_epoch, cfg)

        super().__init__(optimizer, lr_lambda=factor)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("schedule")
        if saved is not None and saved != self.schedule:
            raise ConfigError(f"the checkpoint's lr schedule {saved} differs from this run's {self.schedule}; "
                              "resume with the same epochs, batch plan and optim settings")
        super().load_state_dict(state_dict)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int,
                    cfg: OptimConfig) -> WarmupLinearEpochDecay:
    """The configured schedule on ``optimizer`` (a torch optimizer: the one from :func:`build_optimizer`).

    With DeepSpeed, pass it (or :func:`scheduler_factory`'s callable) as ``deepspeed.initialize(...,
    lr_scheduler=...)``: ZeRO optimizers keep the wrapped optimizer's param_group dicts, so setting their
    lr here reaches the sharded step, and the engine saves/loads the scheduler state with its checkpoints.
    Call ``step()`` once per optimizer step (DeepSpeed's engine does this itself).
    """
    return WarmupLinearEpochDecay(optimizer, total_steps, steps_per_epoch, cfg)


def scheduler_factory(total_steps: int, steps_per_epoch: int,
                      cfg: OptimConfig) -> Callable[[torch.optim.Optimizer], WarmupLinearEpochDecay]:
    """A callable ``optimizer -> scheduler``, the form deepspeed.initialize(lr_scheduler=...) also accepts
    (the engine calls it with the client optimizer it was given)."""
    lr_multiplier(0, total_steps, steps_per_epoch, cfg)

    def make(optimizer: torch.optim.Optimizer) -> WarmupLinearEpochDecay:
        return build_scheduler(optimizer, total_steps, steps_per_epoch, cfg)

    return make

