"""An exponential moving average of the model's weights (``train.ema_decay``), the weights carat evaluates.

Validation after each epoch, the best model in best/ (and so ``carat.export``, ``carat.evaluate`` and
``carat.predict``) and the final scores use the average; training itself steps the raw weights. On the small
validation splits of emotion corpora the raw weights' scores jump between epochs (BENCHMARKS.md, Learning):
the average smooths those jumps, so the epoch chosen on validation is less a matter of luck.

The average is kept in fp32 on each rank for the full parameters, which ZeRO stages 0-2 hold on every rank
(stage 3 partitions them: refused). It is part of every checkpoint's client state, so a resumed run averages
on exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

WARMUP_STEPS = 10
"""The decay at update t is min(decay, (1 + t) / (WARMUP_STEPS + t)): early updates weigh more, so the
average leaves the random initialisation within the first epoch instead of after 1 / (1 - decay) steps."""


class WeightAverage:
    """fp32 shadow copies of ``model``'s parameters, moved towards them after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay} must be in (0, 1)")
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (WARMUP_STEPS + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        keep = self.current_decay()
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - keep)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """``model`` holds the averaged weights inside the block and its own ones again after it."""
        params = dict(model.named_parameters())
        saved = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.shadow[name].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {name: t.detach().cpu() for name, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any], where: str) -> None:
        """Restore from a checkpoint's client state; ``where`` names it in the error for a mismatch."""
        shadow = state.get("shadow")
        if not isinstance(shadow, dict) or set(shadow) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(shadow or {}))[:3]
            raise ValueError(f"{where}: its weight average does not match the model (missing {missing})")
        for name, tensor in shadow.items():
            self.shadow[name].copy_(tensor)
        self.updates = int(state.get("updates", 0))


def averaged_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The averaged parameters a checkpoint's client state holds (empty without an average)."""
    average = state.get("weight_average")
    if not isinstance(average, dict) or not isinstance(average.get("shadow"), dict):
        return {}
    return {name: t.float() for name, t in average["shadow"].items()}
