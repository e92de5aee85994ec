"""The CARAT network and its objective (Peng et al., AAAI 2024), free of distributed code.

    from carat.model import CARAT, ModelConfig, LossConfig, CaratOutput, CaratLoss
    model = CARAT.from_config(ModelConfig())
    out = model(text=..., text_mask=..., visual=..., visual_mask=..., audio=..., audio_mask=...)
    terms = CaratLoss.from_config(LossConfig(), model_cfg)(model, out, labels, sample_weight)
    model.update_memory(out, labels, gather=fn)      # training, after backward/step
    probabilities = model.scores(out)

Imports only torch, numpy and the standard library (plus carat.errors); a test enforces it.
"""

from carat.model.carat import CARAT, CaratOutput
from carat.model.config import LossConfig, ModelConfig, TINY_LOSS_OVERRIDES, TINY_MODEL_OVERRIDES, TINY_MODEL_SIZE
from carat.model.losses import TERMS, CaratLoss

__all__ = ["CARAT", "CaratOutput", "CaratLoss", "LossConfig", "ModelConfig", "TERMS", "TINY_LOSS_OVERRIDES",
           "TINY_MODEL_OVERRIDES", "TINY_MODEL_SIZE"]
