"""The CARAT network and its objective (Peng et al., AAAI 2024), free of distributed code.

    from carat.model import CARAT, ModelConfig, LossConfig, CaratOutput, CaratLoss
    model = CARAT.from_config(ModelConfig())
    out = model(text=..., text_mask=..., visual=..., visual_mask=..., audio=..., audio_mask=...)
    terms = CaratLoss.from_config(LossConfig(), model_cfg)(model, out, labels, sample_weight)
    model.update_memory(out, labels, gather=fn)      # training, after backward/step
    probabilities = model.scores(out)

Imports only torch, numpy and the standard library (plus carat.errors); a test enforces it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "CARAT": "carat.model.carat", "CaratOutput": "carat.model.carat",
    "LossConfig": "carat.model.config", "ModelConfig": "carat.model.config",
    "TINY_LOSS_OVERRIDES": "carat.model.config", "TINY_MODEL_OVERRIDES": "carat.model.config",
    "TINY_MODEL_SIZE": "carat.model.config",
    "TERMS": "carat.model.losses", "CaratLoss": "carat.model.losses",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """The exports load on first use (PEP 562), so that reading a configuration (``carat.model.config``, which
    :mod:`carat.config` imports) loads no torch."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'carat.model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
