"""DeepSpeed configuration: the shipped ``carat/ds_configs/*.json`` plus the values carat owns, set in one place.

The JSON files hold only DeepSpeed's own business (ZeRO stage, buckets, offload). Batch sizes, gradient
clipping, precision, optimizer and scheduler are carat's: they come from carat's config, and a file that
sets one of them differently is rejected rather than silently winning or losing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from carat.errors import ConfigError

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
"""The shipped DeepSpeed files: package data (carat/ds_configs/), so a non-editable install finds them."""

# Keys carat fills from its own config; a shipped file must not contain them.
OWNED_KEYS: tuple[str, ...] = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
)


def default_ds_config_path(zero_stage: int, offload: bool) -> Path:
    name = "zero3_offload.json" if offload else f"zero{zero_stage}.json"
    return DS_CONFIG_DIR / name


def read_ds_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist (shipped ones are in {DS_CONFIG_DIR})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "zero_optimization" not in data:
        raise ConfigError(f"DeepSpeed config {path} must be an object with a 'zero_optimization' block")
    return data


def build_ds_config(
    base: dict[str, Any],
    *,
    source: str,
    micro_batch: int,
    world_size: int,
    grad_clip: float,
    bf16: bool,
    zero_stage: int | None = None,
) -> dict[str, Any]:
    """``base`` completed with carat's values; a conflicting value already in ``base`` is a ConfigError.

    Batches vary in size (token budget); DeepSpeed only uses these batch numbers for bookkeeping, so the
    micro batch is the loader's cap and there is no gradient accumulation.
    """
    owned: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
    }
    config = json.loads(json.dumps(base))
    for key in OWNED_KEYS:
        if key in config and config[key] != owned.get(key):
            raise ConfigError(
                f"{source}: '{key}' is owned by carat's config and must not be set in a DeepSpeed file "
                f"(file has {config[key]!r}, carat uses {owned.get(key)!r}); remove it"
            )
    config.update(owned)
    stage = config["zero_optimization"].get("stage", 0)
    if zero_stage is not None and stage != zero_stage:
        raise ConfigError(f"{source}: zero_optimization.stage={stage} but train.zero_stage={zero_stage}")
    return config
