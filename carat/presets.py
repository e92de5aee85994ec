"""carat's presets: each a function that returns the whole configuration tree.

``seed`` is every section's defaults (the configuration of the document this project started from);
``official`` the authors' published configuration, each value with its source (``--show-config`` prints them);
``tiny`` the quickstart (``python -m carat.train`` with no arguments) and ``small`` the tiny model trained longer
and three times over. The commands that train (``carat.train``, ``carat.tune``) default to :data:`DEFAULT_PRESET`;
``python -m carat.data`` defaults to ``seed``, because its ``prepare`` writes real corpora, which want the
seed's storage (256 MiB shards of float16, not tiny's 64-sample float32 shards). The per-section values of
``tiny`` stay beside their sections (``TINY_OVERRIDES`` in each ``*_config`` module), each with why.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Callable

from carat.data.loader.loader_config import TINY_OVERRIDES as TINY_LOADER
from carat.data.loader.loader_config import LoaderConfig
from carat.data.corpus.storage_config import TINY_OVERRIDES as TINY_STORAGE
from carat.data.corpus.storage_config import StorageConfig
from carat.data.sources.synth_config import TINY_OVERRIDES as TINY_SYNTH
from carat.data.sources.synth_config import SynthConfig
from carat.errors import ConfigError
from carat.model.config import (
    REFERENCE_LOSS, REFERENCE_MODEL, TINY_LOSS_OVERRIDES, TINY_MODEL_OVERRIDES, LossConfig, ModelConfig,
    slots_per_second_ratios,
)
from carat.train.optim_config import TINY_OVERRIDES as TINY_OPTIM
from carat.train.optim_config import OptimConfig
from carat.train.train_config import TrainConfig
from carat.tree import SECTIONS, CaratConfig

DEFAULT_PRESET = "tiny"


def seed() -> CaratConfig:
    """Every section's defaults."""
    return CaratConfig(preset="seed")


def tiny() -> CaratConfig:
    """The quickstart: a tiny CARAT with carat's learning fixes on a small, short synthetic corpus; the best epoch
    is chosen on validation macro ROC-AUC (a 94-clip validation split makes fixed-threshold F1 jump between
    epochs)."""
    return CaratConfig(
        preset="tiny", synth=SynthConfig(**TINY_SYNTH), storage=StorageConfig(**TINY_STORAGE),
        loader=LoaderConfig(**TINY_LOADER), model=ModelConfig(**TINY_MODEL_OVERRIDES),
        loss=LossConfig(**TINY_LOSS_OVERRIDES), optim=OptimConfig(**TINY_OPTIM),
        train=TrainConfig(epochs=8, zero_stage=2, select_metric="macro_auc"))


SMALL_SYNTH: dict[str, Any] = {"scale": 0.1, "length_scale": 0.25}


def small() -> CaratConfig:
    """The tiny model trained longer and three times over (a seed ensemble), for the scale-0.1 synthetic corpus
    (10x longer clips than the quickstart's): ~15 minutes on 2 cores through Ray (BENCHMARKS.md, Learning)."""
    base = tiny()
    # The seed's ~10 aligned slots per second at this corpus' frame rates: audio at 100 Hz x 0.25 has 25 frames
    # per second, so 0.4 slots per frame (tiny's one per frame averaged nothing); visual stays one per frame.
    # Measured on four seeds (BENCHMARKS.md, Learning, 2026-12-05): test tuned F1 0.558 / 0.468 against 0.550 /
    # 0.461 at one slot per frame, macro-AUC 0.754 against 0.747, and ~1.5x faster epochs.
    model = replace(base.model, **slots_per_second_ratios(SynthConfig.visual_hz, SynthConfig.audio_hz,
                                                         SMALL_SYNTH["length_scale"]))
    # The model stays tiny's 16-wide one. On the scale-0.1 corpus (1,633 train clips; BENCHMARKS.md, Learning,
    # 2026-12-03, third part) 30 epochs of it reach test tuned F1 +0.113 / +0.129 over the pooled floor (AUC
    # 0.745); the 64-wide, 2-layer model this preset had before reached -0.003 / +0.042 (AUC 0.672), and a
    # 32-wide one trailed the 16-wide one at every epoch it ran: at this corpus size width buys memorisation.
    # 30 epochs: on the scale-0.1 corpus validation AUC still rose until epoch ~18 (of 30; 12 were not enough).
    # Three seeds averaged (carat.ensemble): on eight seeds of the scale-0.1 corpus (BENCHMARKS.md, Learning,
    # 2026-12-07) one model reaches test tuned F1 0.600 / 0.459 and macro-AUC 0.753, and meets the macro half-gap
    # to the oracle on 2 of 8 seeds; three averaged reach 0.629 / 0.485 and 0.778, meeting it on 73% of the 56
    # seed triples. Averaging one run's own epochs gave nothing: the gain is in independent initialisations.
    train = replace(base.train, epochs=30, ensemble_size=3)
    return replace(base, preset="small", synth=SynthConfig(**SMALL_SYNTH), model=model, train=train)


_SOURCE = "github.com/chengzju/CARAT at 3210086"
_REFERENCE_MODEL_NOTE = "the reference's model (carat.model.config.REFERENCE_MODEL)"
_REFERENCE_LOSS_NOTE = "the reference's objective (carat.model.config.REFERENCE_LOSS)"

OFFICIAL: dict[str, tuple[Any, str]] = {
    "model.hidden_size": (256, "models/configs/*_config.json and main.py --hidden_size (paper: d = 256)"),
    "model.intermediate_size": (256, "models/configs/*_config.json"),
    "model.num_heads": (8, "models/configs/*_config.json"),
    "model.text_dropout": (0.3, "models/configs/text_config.json: hidden and attention dropout 0.3"),
    "model.visual_dropout": (0.3, "models/configs/visual_config.json: hidden and attention dropout 0.3"),
    "model.audio_dropout": (0.3, "models/configs/audio_config.json: hidden and attention dropout 0.3"),
    "model.init_std": (0.02, "models/configs/*_config.json initializer_range"),
    "model.text_layers": (6, "train.sh (main.py default 6; paper: l_t = 6)"),
    "model.visual_layers": (4, "train.sh (main.py default 3; paper: l_v = 4)"),
    "model.audio_layers": (4, "train.sh (main.py default 3; paper: l_a = 4)"),
    "model.visual_max_positions": (500, "models/configs/visual_config.json max_position_embeddings"),
    "model.audio_max_positions": (500, "models/configs/audio_config.json max_position_embeddings"),
    "model.ctc_target_length": (500, "models/models.py: the unaligned mode's aligner length (50 with "
                                     "--unaligned_mask_same_length). train.sh trains --aligned, on word-aligned "
                                     "data without an aligner (model.aligner='none' on aligned data); carat's "
                                     "corpora are unaligned, so the unaligned mode"),
    "model.projection_size": (64, "main.py --proj_size (paper: d_z = 64)"),
    "model.queue_size": (8192, "main.py --moco_queue (paper: 8192)"),
    "model.prototype_momentum": (0.99, "main.py --proto_m"),
    "model.threshold": (0.25, "train.sh --binary_threshold (main.py default 0.35)"),
    **{f"model.{key}": (value, _REFERENCE_MODEL_NOTE) for key, value in REFERENCE_MODEL.items()},
    "model.queue_init": ("noise", "models/models.py: the queue starts as Gaussian noise normalised over dim 0, its "
                                  "labels Gaussian floats"),
    "loss.lsr_clf_weight": (0.01, "train.sh (main.py default 1.0)"),
    "loss.aug_clf_weight": (0.1, "train.sh (main.py default 1.0)"),
    "loss.cl_weight": (1.0, "train.sh"),
    "loss.recon_mse_weight": (1.0, "train.sh"),
    "loss.aug_mse_weight": (1.0, "train.sh"),
    "loss.beta_mse_weight": (0.0, "train.sh (main.py default 1.0; the paper names six loss weights, 0.01, 0.1, 1, "
                                  "1, 0.1 and 1, without a one-to-one map to the script's nine)"),
    "loss.total_aug_clf_weight": (1.0, "train.sh"),
    "loss.shuffle_aug_clf_weight": (0.1, "train.sh (main.py default 1.0)"),
    "loss.temperature": (0.07, "models/losses.py SupConLoss"),
    "loss.base_temperature": (0.07, "models/losses.py SupConLoss"),
    **{f"loss.{key}": (value, _REFERENCE_LOSS_NOTE) for key, value in REFERENCE_LOSS.items()},
    "optim.lr": (5e-5, "train.sh --lr (main.py default 1e-4)"),
    "optim.warmup_fraction": (0.1, "main.py --warmup_proportion, BertAdam's warmup_linear"),
    "optim.epoch_decay": (1.0, "none in main.py: --lr_decay is parsed and never used"),
    "optim.weight_decay": (0.01, "main.py: BertAdam weight_decay"),
    "optim.decay_input_norm": (True, "main.py decays every parameter whose name has neither 'bias' nor "
                                     "'LayerNorm': the input norms (*_norm.norm2d.weight) included"),
    "optim.coef_lr": (1.0, "main.py parses --coef_lr 0.1 but gives every group lr x 1.0"),
    "optim.betas": ((0.9, 0.999), "BertAdam defaults b1, b2 (paper: Adam)"),
    "optim.eps": (1e-6, "BertAdam default e"),
    "optim.grad_clip": (1.0, "main.py clip_grad_norm_(all parameters, 1.0) before each step; BertAdam's "
                             "per-parameter clip at 1.0 then never acts"),
    "loader.max_batch_size": (64, "main.py --batch_size (clips per step on one GPU)"),
    "loader.remainder": ("drop", "main.py: the train loader drops its last partial batch"),
    "train.epochs": (20, "main.py --epochs, train.sh (paper: 20 epochs)"),
    "train.select_metric": ("micro_f1", "main.py keeps the epoch with the best validation micro-F1 (paper: best "
                                        "validation F1); carat scores every validation sample, the reference "
                                        "a shuffled subset that drops the last partial batch"),
    "train.seed": (1, "train.sh --seed 1 (the same number; not the same random stream)"),
    "train.precision": ("fp32", "main.py trains in float32 (no autocast); --train.precision=auto for bf16 on GPU"),
}
"""The ``official`` preset: the authors' published configuration (their train.sh and main.py, models/ at the
commit the parity test's golden files come from) as far as carat can express it, each value with its source,
which ``--show-config`` prints. Where their code and the paper (Peng et al., AAAI 2024) disagree, the code wins
and the source names the paper's value. What carat cannot express (BertAdam's missing bias correction, their
unmasked padding, their validation subset) is in the README, "How carat differs from the published code". The text position table stays carat's 600 (theirs holds 60: their text is cut to 50
words; carat's corpora have up to 374)."""


def _sections(flat: dict[str, tuple[Any, str]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, (value, _) in flat.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


PRESET_SOURCES: dict[str, dict[str, str]] = {"official": {key: f"{_SOURCE}, {source}"
                                                          for key, (_, source) in OFFICIAL.items()}}
"""Per preset, where each of its values comes from (``--show-config`` prints it above the key)."""


def official() -> CaratConfig:
    """The authors' published configuration (:data:`OFFICIAL`, each value with its source)."""
    sections = _sections(OFFICIAL)
    classes = {f.name: f.default_factory for f in fields(CaratConfig) if f.name in SECTIONS}
    return CaratConfig(preset="official", **{name: classes[name](**values) for name, values in sections.items()})


PRESETS: dict[str, Callable[[], CaratConfig]] = {"seed": seed, "official": official, "tiny": tiny, "small": small}


def preset_values(name: str) -> dict[str, dict[str, Any]]:
    """What preset ``name`` sets apart from the seed defaults, per section: the base a TOML file and the
    command line's overrides are laid over."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    tree, base = PRESETS[name](), seed()
    values: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        mine, default = getattr(tree, section), getattr(base, section)
        changed = {f.name: getattr(mine, f.name) for f in fields(mine)
                   if f.init and getattr(mine, f.name) != getattr(default, f.name)}
        if changed:
            values[section] = changed
    return values
