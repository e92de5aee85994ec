"""The search space of a sweep, and how one trial's sampled values become a carat configuration.

Trial parameters are flat names of the config keys they set (``loss.temperature``, ``model.ctc_target_length``,
``loss.pos_weight.fear`` for one class weight, ``loss.pos_weight_scale`` for the shared factor), so the
trials table, the plots and Optuna all speak carat's own vocabulary.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from carat.config import CaratConfig, config_from_dict, config_to_dict
from carat.data.sources.segment import EMOTIONS
from carat.errors import ConfigError

POS_WEIGHT_PREFIX = "loss.pos_weight."
POS_WEIGHT_SCALE = "loss.pos_weight_scale"


def ctc_choices(cfg: CaratConfig) -> list[int | None]:
    """model.ctc_target_length choices: the configured ones, or adaptive + half / same / twice the current."""
    limit = min(cfg.model.visual_max_positions, cfg.model.audio_max_positions)
    if cfg.tune.ctc_target_lengths:
        choices = list(dict.fromkeys(cfg.tune.ctc_target_lengths))
    else:
        base = cfg.model.ctc_target_length or max(1, limit // 3)
        choices = list(dict.fromkeys([None, max(1, base // 2), base, min(2 * base, limit)]))
    too_long = [c for c in choices if c is not None and c > limit]
    if too_long:
        raise ConfigError(f"tune.ctc_target_lengths {too_long} exceed the position tables ({limit}: the min of "
                          f"model.visual_max_positions and model.audio_max_positions)")
    return choices


def search_ranges(cfg: CaratConfig) -> dict[str, tuple[str, Any]]:
    """``{parameter: (kind, values)}``, kind ``log`` / ``uniform`` with (low, high), or ``choice`` with a list."""
    t = cfg.tune
    ranges: dict[str, tuple[str, Any]] = {}
    weights = cfg.loss.pos_weight
    if t.pos_weight_mode == "per_class":
        if len(weights) != len(EMOTIONS):
            raise ConfigError(f"tune.pos_weight_mode=per_class needs {len(EMOTIONS)} loss.pos_weight values, "
                              f"got {len(weights)}")
        for name, w in zip(EMOTIONS, weights):
            ranges[POS_WEIGHT_PREFIX + name] = ("log", (w / t.pos_weight_spread, w * t.pos_weight_spread))
    elif t.pos_weight_mode == "shared":
        ranges[POS_WEIGHT_SCALE] = ("log", (1.0 / t.pos_weight_spread, t.pos_weight_spread))
    if t.temperature_range:
        ranges["loss.temperature"] = ("log", tuple(t.temperature_range))
    ranges["model.ctc_target_length"] = ("choice", ctc_choices(cfg))
    if t.lr_range:
        ranges["optim.lr"] = ("log", tuple(t.lr_range))
    if t.threshold_range:
        ranges["model.threshold"] = ("uniform", tuple(t.threshold_range))
    return ranges


def grid_points(kind: str, values: Any) -> list[Any]:
    """Three points per range (ends and middle, geometric for log ranges); every choice."""
    if kind == "choice":
        return list(values)
    low, high = values
    middle = math.sqrt(low * high) if kind == "log" else (low + high) / 2
    return [low, middle, high]


def param_space(cfg: CaratConfig) -> dict[str, Any]:
    """The Ray Tune ``param_space`` for ``cfg.tune.search``."""
    from ray import tune

    space: dict[str, Any] = {}
    for name, (kind, values) in search_ranges(cfg).items():
        if cfg.tune.search == "grid":
            space[name] = tune.grid_search(grid_points(kind, values))
        elif kind == "log":
            space[name] = tune.loguniform(*values)
        elif kind == "uniform":
            space[name] = tune.uniform(*values)
        else:
            space[name] = tune.choice(list(values))
    return space


def apply_params(cfg: CaratConfig, params: dict[str, Any]) -> CaratConfig:
    """``cfg`` with one trial's parameters set, validated by the config tree itself."""
    data = copy.deepcopy(config_to_dict(cfg))
    weights = list(data["loss"]["pos_weight"])
    for name, value in params.items():
        if name.startswith(POS_WEIGHT_PREFIX):
            weights[EMOTIONS.index(name.removeprefix(POS_WEIGHT_PREFIX))] = float(value)
        elif name == POS_WEIGHT_SCALE:
            continue  # applied after the per-class values
        else:
            section, _, key = name.partition(".")
            if section not in data or key not in data[section]:
                raise ConfigError(f"trial parameter {name!r} names no config key")
            data[section][key] = value
    if POS_WEIGHT_SCALE in params:
        weights = [w * float(params[POS_WEIGHT_SCALE]) for w in weights]
    data["loss"]["pos_weight"] = weights
    return config_from_dict(data)
