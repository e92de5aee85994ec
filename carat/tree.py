"""The configuration tree: one section per component, each a dataclass defined beside the code it configures,
and the checks that involve two sections. :mod:`carat.presets` fills it, :mod:`carat.config` loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from carat.data.loader.loader_config import LoaderConfig
from carat.data.corpus.prepare_config import PrepareConfig
from carat.data.corpus.storage_config import StorageConfig
from carat.data.sources.synth_config import SynthConfig
from carat.errors import ConfigError
from carat.model.config import LossConfig, ModelConfig, check_pos_weight
from carat.train.optim_config import OptimConfig
from carat.train.train_config import TrainConfig
from carat.tune.config import TuneConfig


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
    from carat.data.sources.segment import EMOTIONS, FEATURE_DIMS

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
