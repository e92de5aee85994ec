"""Training pieces that need no processes: DeepSpeed config files, run directory helpers."""

from __future__ import annotations

import json

import pytest

from carat.errors import ConfigError
from carat.train.deepspeed_config import DS_CONFIG_DIR, OWNED_KEYS, build_ds_config, read_ds_config
from carat.train.rundir import append_jsonl, read_jsonl, truncate_history

SHIPPED = sorted(DS_CONFIG_DIR.glob("*.json"))


def test_every_stage_and_offload_is_shipped():
    names = {p.name for p in SHIPPED}
    assert {"zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_leave_carat_owned_values_to_carat(path):
    base = read_ds_config(path)
    assert not set(OWNED_KEYS) & set(base), f"{path.name} sets values carat owns"
    stage = base["zero_optimization"]["stage"]
    full = build_ds_config(base, source=path.name, micro_batch=8, world_size=2, grad_clip=1.0, bf16=False,
                           zero_stage=stage)
    assert full["train_batch_size"] == 16 and full["gradient_clipping"] == 1.0
    assert full["bf16"] == {"enabled": False}
    if "offload" in path.name:
        assert base["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert stage == 3


def test_conflicting_owned_value_is_rejected_with_the_key_named():
    base = {"zero_optimization": {"stage": 2}, "gradient_clipping": 5.0}
    with pytest.raises(ConfigError, match="'gradient_clipping' is owned by carat"):
        build_ds_config(base, source="mine.json", micro_batch=4, world_size=1, grad_clip=1.0, bf16=False)


def test_stage_mismatch_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="stage=2 but train.zero_stage=3"):
        build_ds_config({"zero_optimization": {"stage": 2}}, source="x", micro_batch=1, world_size=1,
                        grad_clip=1.0, bf16=False, zero_stage=3)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_ds_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        read_ds_config(tmp_path / "none.json")
    bad.write_text(json.dumps({"train_batch_size": 3}))
    with pytest.raises(ConfigError, match="zero_optimization"):
        read_ds_config(bad)


def test_history_truncation_on_resume(tmp_path):
    path = tmp_path / "history.jsonl"
    for epoch in range(4):
        append_jsonl(path, {"epoch": epoch, "loss": float(epoch)})
    truncate_history(path, 2)
    assert [r["epoch"] for r in read_jsonl(path)] == [0, 1]


def test_reference_floor_is_read_from_the_card():
    from carat.report import reference_floor

    assert reference_floor({}) is None
    line = reference_floor({"reference_scorer": {
        "fused": {"tuned_on_valid": {"micro_f1": 0.51, "macro_f1": 0.4}},
        "all_positive_baseline": {"micro_f1": 0.36, "macro_f1": 0.34}}})
    assert "micro-F1 0.5100" in line and "micro-F1 0.3600" in line
    assert reference_floor({"counts": {}}) is None  # a prepared (non-synthetic) corpus has no floor


def test_old_epoch_checkpoints_are_pruned(tmp_path):
    from carat.train.checkpointer import prune_checkpoints

    for epoch in range(1, 5):
        (tmp_path / f"epoch-{epoch:03d}").mkdir()
    (tmp_path / "latest").write_text("epoch-004")
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["epoch-001", "epoch-002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-003", "epoch-004", "latest"]


def test_a_carat_error_in_a_ray_worker_reaches_the_command_as_itself():
    """Ray wraps a worker's exception in WorkerGroupError (and RayTaskError): the command must still end with
    carat's one line (divergence, bad data), not Ray's traceback."""
    from ray.train import WorkerGroupError

    from carat.errors import DataError
    from carat.train.launch import worker_carat_error

    class Wrapped(Exception):  # the shape of ray.exceptions.RayTaskError: the worker's exception as .cause
        def __init__(self, cause):
            super().__init__(str(cause))
            self.cause = cause

    error = WorkerGroupError("snippet", {1: Wrapped(DataError("rank 1's own")), 0: DataError("rank 0's own")})
    assert str(worker_carat_error(error)) == "rank 0's own"
    assert str(worker_carat_error(WorkerGroupError("s", {1: Wrapped(DataError("only 1"))}))) == "only 1"
    assert worker_carat_error(WorkerGroupError("s", {0: RuntimeError("not ours")})) is None
    assert worker_carat_error(RuntimeError("no workers")) is None
