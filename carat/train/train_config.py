"""The ``[train]`` section: how a run is launched, how long it trains and where it writes (the code is
:mod:`carat.train`: the loop, its launchers, the run directory).

Kept apart from that code so that reading a configuration (:mod:`carat.config`) loads no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from carat.errors import ConfigError


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
