"""Model/loss configs (seed values, validation), bad-input errors, import hygiene of carat.model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from carat.errors import ConfigError, DataError
from carat.model import TINY_LOSS_OVERRIDES, TINY_MODEL_OVERRIDES, CARAT, LossConfig, ModelConfig
from tests.model_helpers import make_batch, tiny_model

LENGTHS = {"text": [7, 20, 3], "visual": [30, 11, 5], "audio": [90, 40, 17]}


def test_seed_defaults():
    cfg = ModelConfig()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.hidden_act) == (512, 512, 8, "gelu")
    assert (cfg.text_dropout, cfg.visual_dropout, cfg.audio_dropout, cfg.init_std) == (0.3, 0.3, 0.1, 0.02)
    assert (cfg.text_layers, cfg.visual_layers, cfg.audio_layers) == (4, 3, 3)
    assert (cfg.text_max_positions, cfg.visual_max_positions, cfg.audio_max_positions) == (600, 1200, 1200)
    assert (cfg.ctc_target_length, cfg.projection_size, cfg.queue_size) == (400, 64, 8192)
    assert (cfg.prototype_momentum, cfg.threshold) == (0.99, 0.2)
    loss = LossConfig()
    assert loss.pos_weight == (1.0, 1.1, 1.2, 2.5, 1.3, 3.0)
    assert (loss.temperature, loss.base_temperature) == (0.07, 0.07)
    assert (loss.lsr_clf_weight, loss.aug_clf_weight, loss.cl_weight, loss.recon_mse_weight,
            loss.aug_mse_weight, loss.beta_mse_weight, loss.total_aug_clf_weight, loss.shuffle_aug_clf_weight,
            loss.recon_clf_weight) == (0.01, 0.1, 1.0, 1.0, 1.0, 0.0, 1.0, 0.1, 0.0)


def test_tiny_preset_is_small():
    LossConfig(**TINY_LOSS_OVERRIDES)
    model = CARAT.from_config(ModelConfig(**TINY_MODEL_OVERRIDES))
    for m in ("text", "visual", "audio"):
        # The text encoder also carries a 400-row position table so tiny runs take full-length MOSEI text.
        limit = 15_000 if m == "text" else 10_000
        assert sum(p.numel() for p in getattr(model, f"{m}_encoder").parameters()) < limit


@pytest.mark.parametrize("overrides, message", [
    ({"num_heads": 12}, "num_heads=12 must divide model.hidden_size=512"),
    ({"hidden_size": 9, "num_heads": 3, "intermediate_size": 8}, "hidden_size=9 must be even"),
    ({"ctc_target_length": 1500}, "ctc_target_length=1500 must be in"),
    ({"ctc_target_length": None, "max_target_len": 2000}, "max_target_len=2000 must be <= 1200"),
    ({"checkpoint_encoders": ("speech",)}, "checkpoint_encoders has 'speech'"),
    ({"checkpoint_alignment": ("text",)}, "checkpoint_alignment has 'text'"),
    ({"alignment_chunk_frames": 0}, "alignment_chunk_frames=0 must be an integer >= 1"),
    ({"attention": "flash"}, "attention='flash'"),
    ({"audio_dropout": 1.0}, "audio_dropout=1.0 must be in"),
    ({"audio_compression_ratio": 0.0}, "audio_compression_ratio=0.0 must be > 0"),
    ({"text_overflow": "drop"}, "text_overflow='drop'"),
])
def test_model_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig(**overrides)


def test_loss_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="loss.temperature=0"):
        LossConfig(temperature=0)
    with pytest.raises(ConfigError, match="loss.pos_weight"):
        LossConfig(pos_weight=(1.0, -1.0))
    with pytest.raises(ConfigError, match="loss.cl_weight"):
        LossConfig(cl_weight=float("nan"))


def _bad(batch: dict, key: str, value: torch.Tensor) -> dict:
    return {**batch, key: value}


def test_bad_inputs_raise_data_errors_naming_modality_and_index():
    model = tiny_model().eval()
    batch = make_batch(LENGTHS)
    with pytest.raises(DataError, match=r"audio: expected features of shape \[batch, frames, 74\], got \(3, 90, 75\)"):
        model(**_bad(batch, "audio", torch.zeros(3, 90, 75)))
    empty = batch["visual_mask"].clone()
    empty[2] = False
    with pytest.raises(DataError, match=r"visual: batch index \[2\] has no real frame"):
        model(**_bad(batch, "visual_mask", empty))
    nan = batch["text"].clone()
    nan[1, 3, 7] = float("nan")
    with pytest.raises(DataError, match=r"text: batch index \[1\] contains NaN or inf"):
        model(**_bad(batch, "text", nan))
    holes = batch["audio_mask"].clone()
    holes[0, 5] = False
    with pytest.raises(DataError, match=r"audio_mask: batch index \[0\] is not of the form"):
        model(**_bad(batch, "audio_mask", holes))
    with pytest.raises(DataError, match="audio_mask: expected a bool mask"):
        model(**_bad(batch, "audio_mask", batch["audio_mask"].long()))
    with pytest.raises(DataError, match="visual: batch size 2 differs from text's 3"):
        model(**{**batch, "visual": batch["visual"][:2], "visual_mask": batch["visual_mask"][:2]})


def test_carat_model_imports_nothing_distributed_or_from_other_parts():
    code = ("import sys, carat.model\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'ray', 'webdataset')\n"
            "             or m.startswith(('carat.train', 'carat.data')))\n"
            "print(bad)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
