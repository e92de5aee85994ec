"""carat's one configuration tree: typed dataclasses owned by their components, loaded in one place.

Precedence: the preset's defaults < a TOML file (``--config FILE``) < ``--section.key=value`` overrides.
Every section is a dataclass defined next to the code it configures (``model`` in ``carat.model.config``,
``loader`` in ``carat.data.loader_config`` ...); this module only composes them, parses values against the field
types, and turns every mistake into a :class:`~carat.errors.ConfigError` that names the key and what is
allowed. The resolved tree is written to every run directory as ``config.toml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from carat.data.loader_config import TINY_OVERRIDES as TINY_LOADER
from carat.data.loader_config import LoaderConfig
from carat.data.prepare_config import PrepareConfig
from carat.data.storage_config import TINY_OVERRIDES as TINY_STORAGE
from carat.data.storage_config import StorageConfig
from carat.data.synth_config import TINY_OVERRIDES as TINY_SYNTH
from carat.data.synth_config import SynthConfig
from carat.errors import ConfigError
from carat.model.config import (
    REFERENCE_LOSS, REFERENCE_MODEL, TINY_LOSS_OVERRIDES, TINY_MODEL_OVERRIDES, LossConfig, ModelConfig,
    check_pos_weight, slots_per_second_ratios,
)
from carat.train.optim_config import TINY_OVERRIDES as TINY_OPTIM
from carat.train.optim_config import OptimConfig
from carat.tune.config import TuneConfig

PRESETS: tuple[str, ...] = ("seed", "official", "tiny", "small")


@dataclass
class TrainConfig:
    """How a run is launched, how long it trains, and where it writes."""

    launcher: Literal["ray", "deepspeed", "none"] = "ray"
    """ray: Ray Train TorchTrainer workers; deepspeed: under the `deepspeed` launcher; none: one process."""
    num_workers: int = 0
    """Ray workers (data-parallel ranks). 0 = one per GPU; on CPU one per Ray node, at least 2."""
    epochs: int = 15
    """Training epochs (the seed trains 15)."""
    shard_dir: str = "shards"
    """Directory holding manifest.parquet and the split shards (relative paths resolve against the cwd)."""
    synth_if_missing: bool = True
    """With no manifest in shard_dir, synthesize a corpus there first (the [synth] section says how)."""
    storage_path: str = "runs"
    """Where run directories live (shared storage for multi-node Ray)."""
    run_name: str | None = None
    """Run directory name; rerunning with the same name resumes. None = a new dated name."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3; selects ds_configs/zero<stage>.json unless ds_config is set."""
    ds_config: str | None = None
    """A DeepSpeed JSON file to use instead of the stage default (values carat owns are filled/checked)."""
    offload: bool = False
    """ZeRO-3 with optimizer and parameter offload to CPU (ds_configs/zero3_offload.json)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 on GPU, fp32 on CPU."""
    max_failures: int = 1
    """Ray FailureConfig: how many times crashed workers restart from the last checkpoint."""
    keep_checkpoints: int = 2
    """Epoch checkpoints kept (the newest ones; the best model is kept apart in best/)."""
    seed: int = 0
    """Seeds the parameters' initialisation, dropout and augmentation (the batch plan's shuffle is loader.seed;
    an ensemble's members add their index to both)."""
    ensemble_size: int = 1
    """Independently seeded runs (seeds seed, seed + 1, ...) trained one after another into RUN/members/ and
    scored by the mean of their probabilities (:mod:`carat.ensemble`); 1 = one model. Costs N times the
    training time; the small preset uses 3. Measured on eight seeds of the small preset's corpus (BENCHMARKS.md,
    Learning, 2026-12-07): test tuned F1 0.600 / 0.459 and macro-AUC 0.753 for one model, 0.620 / 0.480 and
    0.771 for two, 0.629 / 0.485 and 0.778 for three, 0.634 / 0.490 and 0.782 for four (means over every subset
    of the eight runs), where averaging one run's own epochs gave nothing."""
    tune_thresholds: bool = True
    """Also report test metrics at per-class thresholds tuned on validation."""
    select_metric: Literal["micro_f1", "macro_f1", "macro_auc", "tuned_micro_f1", "tuned_macro_f1"] = "micro_f1"
    """Validation metric that picks the best epoch (the model kept in best/ and scored on test). The seed
    selects on micro-F1 at the fixed threshold (micro_f1); on a small validation split that swings between
    epochs, while macro_auc (threshold-free ROC-AUC) and tuned_* (F1 at per-class thresholds tuned on the
    validation split itself) move smoothly."""
    ema_decay: float = 0.0
    """Per-step decay of an exponential moving average of the weights (:mod:`carat.train.averaging`), which
    validation, best/, the exported model and the final scores then use; 0 = off (the seed: evaluate the raw
    weights). Needs zero_stage <= 2. 0.998 averages over ~500 steps."""
    log_every: int = 10
    """Steps between JSONL/TensorBoard log lines; each also logs per-module gradient norms (grad/*, gathered
    from every rank under ZeRO, so it costs a little) and the model's diagnostics."""
    max_steps_per_epoch: int | None = None
    """Cap on steps per epoch (smoke tests); None = the whole epoch."""
    use_gpu: bool | None = None
    """None = use CUDA when available."""
    max_nonfinite_steps: int = 20
    """Steps in a row with a non-finite loss or gradient norm (each one is skipped: no update) before the run
    stops with an error naming the step, the loss terms and the batch's samples. 0 = stop at the first."""
    loss_explosion_factor: float = 20.0
    """Warn (once per epoch) when a step's loss exceeds this many times the median of the last 50 steps'
    losses: the usual sign of a learning rate too high, before the loss turns NaN. Stop the run as diverged
    (an error, exit status 1) when the loss stays above this many times the initial loss scale, the first
    step's loss: three steps in a row, or an epoch's median step loss. 0 = neither."""
    ray_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    """Console level of Ray Train's own logger (ray.train) under the Ray launcher. At INFO it prints each
    report's whole metric dict and every checkpoint path, per rank, per epoch; its log files in the Ray
    session directory keep every level either way."""
    verify_corpus: Literal["quick", "full", "off"] = "quick"
    """Check of the corpus before training (``python -m carat.data verify``): quick = manifest against shard
    table, sizes and the tar header at every sample's offset (seconds); full = also sha256 and every sample
    decoded (finite, non-empty, labels); off = only the loader's checks (shard sizes when it is built, each
    sample's hash as it is read: damaged payloads stop the run naming shard and key at any setting)."""

    def __post_init__(self) -> None:
        if self.max_nonfinite_steps < 0:
            raise ConfigError(f"max_nonfinite_steps={self.max_nonfinite_steps} must be >= 0 (0 = stop at the "
                              "first non-finite step)")
        if self.loss_explosion_factor < 0 or (0 < self.loss_explosion_factor <= 1):
            raise ConfigError(f"loss_explosion_factor={self.loss_explosion_factor} must be 0 (off) or > 1")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers} must be >= 0 (0 = automatic)")
        if self.epochs < 1:
            raise ConfigError(f"epochs={self.epochs} must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage={self.zero_stage} must be one of 0, 1, 2, 3")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay} must be in [0, 1) (0 = no weight average)")
        if self.ema_decay and self.zero_stage == 3:
            raise ConfigError(f"ema_decay={self.ema_decay} needs zero_stage <= 2: ZeRO-3 partitions the weights "
                              "that the average copies")
        if self.offload and self.zero_stage != 3:
            raise ConfigError(f"offload=true needs zero_stage=3 (got zero_stage={self.zero_stage})")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints={self.keep_checkpoints} must be >= 1 (resuming needs the newest)")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures={self.max_failures} must be >= 0")
        if self.ensemble_size < 1:
            raise ConfigError(f"ensemble_size={self.ensemble_size} must be >= 1 (1 = one model)")
        if self.log_every < 1:
            raise ConfigError(f"log_every={self.log_every} must be >= 1")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"max_steps_per_epoch={self.max_steps_per_epoch} must be >= 1 or unset")
        if self.run_name is not None and (not self.run_name or self.run_name in (".", "..")
                                          or any(c in self.run_name for c in "/\\\0")):
            # the run directory is storage_path/run_name: a name must not point outside storage_path
            raise ConfigError(f"run_name={self.run_name!r} must be a plain directory name (not '.' or '..', "
                              "no '/', '\\' or NUL)")


@dataclass
class CaratConfig:
    """The whole configuration tree; one section per component."""

    preset: str = "seed"
    synth: SynthConfig = field(default_factory=SynthConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Only read by ``python -m carat.tune``; a training run ignores it."""

    def __post_init__(self) -> None:
        check_cross_sections(self)


def check_cross_sections(cfg: CaratConfig) -> None:
    """Checks that involve two sections, run whenever a config is built: a mismatch fails in the launching
    process before Ray or DeepSpeed start, not as a shape error inside a worker."""
    from carat.data.segment import EMOTIONS, FEATURE_DIMS

    model = cfg.model
    check_pos_weight(cfg.loss, model)
    if model.num_classes != len(EMOTIONS):
        raise ConfigError(f"model.num_classes={model.num_classes}, but carat's corpora carry {len(EMOTIONS)} "
                          f"labels ({', '.join(EMOTIONS)})")
    for modality, size in FEATURE_DIMS.items():
        configured = getattr(model, f"{modality}_dim")
        if configured != size:
            raise ConfigError(f"model.{modality}_dim={configured}, but carat's {modality} features are {size}-d "
                              "(every shard is checked against that size)")


SECTIONS: tuple[str, ...] = tuple(f.name for f in fields(CaratConfig) if f.name != "preset")

_TINY: dict[str, dict[str, Any]] = {
    "synth": TINY_SYNTH,
    "storage": TINY_STORAGE,
    "loader": TINY_LOADER,
    "model": TINY_MODEL_OVERRIDES,
    "loss": TINY_LOSS_OVERRIDES,
    "optim": TINY_OPTIM,
    "train": {"epochs": 8, "zero_stage": 2, "select_metric": "macro_auc"},
}
"""The quickstart: a tiny CARAT with carat's learning fixes on a small, short synthetic corpus; the best epoch
is chosen on validation macro ROC-AUC (a 94-clip validation split makes fixed-threshold F1 jump between
epochs)."""

_SMALL_SYNTH: dict[str, Any] = {"scale": 0.1, "length_scale": 0.25}

_SMALL: dict[str, dict[str, Any]] = {
    **_TINY,
    "synth": _SMALL_SYNTH,
    # The seed's ~10 aligned slots per second at this corpus' frame rates: audio at 100 Hz x 0.25 has 25 frames
    # per second, so 0.4 slots per frame (tiny's one per frame averaged nothing); visual stays one per frame.
    # Measured on four seeds (BENCHMARKS.md, Learning, 2026-12-05): test tuned F1 0.558 / 0.468 against 0.550 /
    # 0.461 at one slot per frame, macro-AUC 0.754 against 0.747, and ~1.5x faster epochs.
    "model": {**TINY_MODEL_OVERRIDES, **slots_per_second_ratios(SynthConfig.visual_hz, SynthConfig.audio_hz,
                                                                 _SMALL_SYNTH["length_scale"])},
    # The model stays tiny's 16-wide one. On the scale-0.1 corpus (1,633 train clips; BENCHMARKS.md, Learning,
    # 2026-12-03, third part) 30 epochs of it reach test tuned F1 +0.113 / +0.129 over the pooled floor (AUC
    # 0.745); the 64-wide, 2-layer model this preset had before reached -0.003 / +0.042 (AUC 0.672), and a
    # 32-wide one trailed the 16-wide one at every epoch it ran: at this corpus size width buys memorisation.
    # 30 epochs: on the scale-0.1 corpus validation AUC still rose until epoch ~18 (of 30; 12 were not enough).
    # Three seeds averaged (carat.ensemble): on eight seeds of the scale-0.1 corpus (BENCHMARKS.md, Learning,
    # 2026-12-07) one model reaches test tuned F1 0.600 / 0.459 and macro-AUC 0.753, and meets the macro half-gap
    # to the oracle on 2 of 8 seeds; three averaged reach 0.629 / 0.485 and 0.778, meeting it on 73% of the 56
    # seed triples. Averaging one run's own epochs gave nothing: the gain is in independent initialisations.
    "train": {"epochs": 30, "zero_stage": 2, "select_metric": "macro_auc", "ensemble_size": 3},
}
"""The tiny model trained longer and three times over (a seed ensemble), for the scale-0.1 synthetic corpus
(10x longer clips than the quickstart's): ~15 minutes on 2 cores through Ray (BENCHMARKS.md, Learning)."""


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


def preset_values(name: str) -> dict[str, dict[str, Any]]:
    """The overrides a preset applies on top of the seed defaults."""
    if name == "seed":
        return {}
    if name == "official":
        return _sections(OFFICIAL)
    if name in ("tiny", "small"):
        table = _TINY if name == "tiny" else _SMALL
        return {section: dict(values) for section, values in table.items()}
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _parse_text(value: Any, parse: Any) -> Any:
    """``parse(value)`` for a command-line string, None when it is not one or does not parse."""
    if not isinstance(value, str):
        return None
    try:
        return parse(value)
    except ValueError:
        return None


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a TOML or command-line value to the field type ``tp``; ConfigError naming ``key`` if impossible."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list for {_type_name(tp)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        parsed = _parse_text(value, lambda text: int(text.replace("_", "")))
        if parsed is not None:
            return parsed
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        parsed = _parse_text(value, float)
        if parsed is not None:
            return parsed
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


RETIRED_KEYS: dict[str, Any] = {
    "model.modality_dropout": 0.0,
    "model.temporal_conv_kernel": 0,
    "model.label_pooling": "attention",
}
"""Options measured, rejected and removed after 0.1.0 (their figures stay in BENCHMARKS.md, "Learning"), with the
value that meant "off". Run directories and configs written before carry them: that value is accepted with a
deprecation line for one release; any other value names the removal, since such a model cannot be rebuilt."""
_retired_seen: set[str] = set()


def _same_value(value: Any, off: Any) -> bool:
    """``value`` (from TOML, a saved config or a command line's text) means ``off``."""
    if isinstance(off, str):
        return value == off
    try:
        return float(value) == float(off)
    except (TypeError, ValueError):
        return False


def _retired(key: str, value: Any) -> bool:
    """True for a retired key at its "off" value (to be skipped); a ConfigError for any other value."""
    if key not in RETIRED_KEYS:
        return False
    off = RETIRED_KEYS[key]
    if not _same_value(value, off):
        raise ConfigError(f"{key}={value!r}: this option was removed after carat 0.1.0 (measured and rejected: "
                          f"BENCHMARKS.md, Learning); only {off!r}, what it meant by off, is still read")
    if key not in _retired_seen:
        _retired_seen.add(key)
        print(f"carat: {key} was removed after 0.1.0 and is ignored at {off!r}; drop it from the config "
              f"(accepted for one release)", file=sys.stderr)
    return True


def _build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    kwargs = {}
    for name, value in values.items():
        if _retired(f"{section}.{name}", value):
            continue
        if name not in names:
            raise ConfigError(f"unknown key {section}.{name}{_suggest(name, names)}")
        kwargs[name] = coerce(value, hints[name], f"{section}.{name}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"[{section}] {err}") from None


def _merge(base: dict[str, dict[str, Any]], extra: dict[str, Any], origin: str) -> None:
    for section, values in extra.items():
        if section not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section [{section}]{_suggest(section, list(SECTIONS))}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table of key = value")
        base.setdefault(section, {}).update(values)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` -> (the rest, the ``--section.key[=value]`` overrides with their values), so that a command with
    positional arguments never takes an override's value for one (``inspect --loader.token_budget 700 DIR``:
    700 belongs to the override, DIR to the command). A value is the next word unless it starts with ``--``."""
    rest: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if arg.startswith("--") and "." in name:  # a mistyped section too: carat.config then names it
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(argv[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """``["--model.hidden_size=64", "--train.epochs", "3"]`` -> ``{"model": {...}, "train": {...}}``."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value: --section.key=value")
            i += 1
            value = args[i]
        section, _, key = name.partition(".")
        if not key:
            raise ConfigError(f"override {arg!r} must name section.key")
        out.setdefault(section, {})[key] = value
        i += 1
    return out


def load_config(
    preset: str = "seed", file: str | Path | None = None, overrides: list[str] | None = None
) -> CaratConfig:
    """Resolve a preset, an optional TOML file and ``--section.key=value`` overrides into a CaratConfig."""
    values: dict[str, dict[str, Any]] = {}
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
        preset = str(data.pop("preset", preset))
        _merge(values, data, str(path))
    merged = preset_values(preset)
    for section, section_values in values.items():
        merged.setdefault(section, {}).update(section_values)
    _merge(merged, parse_overrides(list(overrides or [])), "command line")
    built = {}
    for section in SECTIONS:
        cls = next(f for f in fields(CaratConfig) if f.name == section).default_factory
        built[section] = _build_section(section, cls, merged.get(section, {}))
    return CaratConfig(preset=preset, **built)


def config_to_dict(cfg: CaratConfig) -> dict[str, Any]:
    """A plain, JSON/TOML-friendly dict of the resolved config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _toml_value(value: Any) -> str:
    if value is None:  # TOML has no null; coerce() reads "none" back as None (also inside lists)
        return '"none"'
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def config_to_toml(cfg: CaratConfig) -> str:
    """The resolved config as TOML that ``load_config(file=...)`` reads back (TOML has no null: None is "none")."""
    data = config_to_dict(cfg)
    lines = [f"preset = {_toml_value(data.pop('preset'))}"]
    for section, values in data.items():
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_toml_value('none' if v is None else v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (litgpt style), read from its source."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (frozen app): documented keys are a nicety, not a need
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe_config(cfg: CaratConfig) -> str:
    """The resolved config as commented TOML: every key, its value, and what it means; under a preset with
    sources (``official``), also where the preset's value comes from and whether this config overrides it."""
    import textwrap

    data = config_to_dict(cfg)
    sources = PRESET_SOURCES.get(cfg.preset, {})
    preset = json.loads(json.dumps(preset_values(cfg.preset))) if sources else {}
    lines = [f"preset = {_toml_value(data.pop('preset'))}"]
    for section, values in data.items():
        cls = type(getattr(cfg, section))
        docs = field_docs(cls)
        lines.append(f"\n[{section}]")
        for key, value in values.items():
            for doc_line in textwrap.wrap(docs.get(key, ""), 100):
                lines.append(f"# {doc_line}")
            source = sources.get(f"{section}.{key}")
            if source is not None:
                expected = preset[section][key]
                note = "" if value == expected else f" [overridden here; the preset's value: {_toml_value(expected)}]"
                for doc_line in textwrap.wrap(f"{cfg.preset}: {source}{note}", 100):
                    lines.append(f"# {doc_line}")
            lines.append(f"{key} = {_toml_value('none' if value is None else value)}")
    return "\n".join(lines) + "\n"


def config_from_dict(data: dict[str, Any]) -> CaratConfig:
    """Rebuild a CaratConfig from :func:`config_to_dict` output (a checkpoint's saved config)."""
    data = dict(data)
    preset = data.pop("preset", "seed")
    built = {}
    for section in SECTIONS:
        cls = next(f for f in fields(CaratConfig) if f.name == section).default_factory
        built[section] = _build_section(section, cls, data.get(section, {}))
    return CaratConfig(preset=preset, **built)


# ------------------------------------------------------------------------------------- command lines
def config_parser(prog: str, doc: str | None, sections: str, file_help: str) -> "argparse.ArgumentParser":
    """The arguments every config-driven command shares (carat.train, carat.tune): --config, --preset,
    --show-config; any other --section.key=value is left to :func:`cli_config` as an override."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Any config value: --section.key=value (sections: {sections}). "
               "Precedence: preset < --config file < overrides.",
    )
    add_config_arguments(parser, file_help,
                         preset_help="defaults to start from (default: tiny without --config, else the file's "
                                     "preset or seed)",
                         show_help="print the resolved configuration, every key documented, and exit")
    return parser


def add_config_arguments(parser: Any, file_help: str, preset_help: str, show_help: str) -> None:
    """--config, --preset and --show-config on ``parser`` (a parser or an argument group): the three arguments
    every config-driven command (carat.train, carat.tune, carat.data) shares, with its own help texts."""
    parser.add_argument("--config", type=Path, help=file_help)
    parser.add_argument("--preset", choices=PRESETS, help=preset_help)
    parser.add_argument("--show-config", action="store_true", help=show_help)


def cli_config(args: "argparse.Namespace", overrides: list[str]) -> CaratConfig:
    """The config a command line names: the tiny preset without --config (the quickstart), else the file's
    own preset (or seed) unless --preset says otherwise; then the overrides."""
    if args.config is not None and args.preset is None:
        return load_config(file=args.config, overrides=overrides)
    return load_config(preset=args.preset or "tiny", file=args.config, overrides=overrides)
