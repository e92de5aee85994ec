"""The run directory every launcher writes, and the logs in it.

    <storage_path>/<run_name>/
        config.toml        resolved configuration (reload with --config)
        environment.json   versions, launcher, world size, devices
        card.json          the dataset card of the shards trained on
        metrics.jsonl      one line per logged step: every loss term, lr, samples/s, frames/s
        history.jsonl      one line per epoch: mean loss terms and validation metrics
        tensorboard/       the same scalars for TensorBoard
        checkpoints/       DeepSpeed sharded checkpoints, one tag per epoch (deepspeed / none launchers;
                           Ray keeps its own copies as checkpoint_* directories beside them)
        best/              DeepSpeed checkpoint of the best validation micro-F1
        results.json       final validation and test metrics; results.txt the same as a table
        plots/             loss terms, validation metrics, per-emotion F1, precision-recall curves
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carat.atomic import write_atomic, write_text_atomic
from carat.storage import ObjectPath, as_location
from carat.threads import available_cpus


def new_run_name() -> str:
    return time.strftime("carat-%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def environment(self) -> Path:
        return self.root / "environment.json"

    @property
    def card(self) -> Path:
        return self.root / "card.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def history(self) -> Path:
        return self.root / "history.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def results_table(self) -> Path:
        return self.root / "results.txt"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def create(self) -> "RunDir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self


def to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(to_jsonable(data), indent=2, sort_keys=False) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(to_jsonable(record)) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_history(path: Path, completed_epochs: int, key: str = "epoch") -> None:
    """Drop log lines past the resumed epoch, so a resumed run's logs read like an uninterrupted run's."""
    if not path.is_file():
        return
    keep = [r for r in read_jsonl(path) if int(r.get(key, 0)) < completed_epochs]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


def rewrite_history(path: Path, history: list[dict[str, Any]]) -> None:
    """history.jsonl as the checkpoint's history says: the epochs it completed, each exactly once."""
    write_text_atomic(path, "".join(json.dumps(to_jsonable(r)) + "\n" for r in history))


def environment_report(launcher: str, world: int, device: torch.device,
                       ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What ran where: enough to reproduce or explain a result. ``ranks``: each rank's host and address."""
    import carat

    versions = {"python": platform.python_version(), "torch": torch.__version__, "carat": carat.__version__}
    for name in ("deepspeed", "ray", "webdataset", "numpy", "pyarrow"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # a missing optional package is reported, not fatal
            versions[name] = None
    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [f"cpu ({available_cpus()} of {os.cpu_count()} cores usable)"]
    )
    return {
        "launcher": launcher,
        "world_size": world,
        "device_type": device.type,
        "devices": devices,
        "host": socket.gethostname(),
        "ranks": ranks or [],
        "hosts": sorted({r["host"] for r in ranks or []}),
        "platform": platform.platform(),
        "versions": versions,
        "threads": {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def copy_card(shard_dir: Path, run: RunDir) -> None:
    """The corpus' dataset card into the run directory, atomically (a killed run never leaves half a card)."""
    card = as_location(shard_dir) / "card.json"
    if isinstance(card, ObjectPath):  # a corpus in object storage (carat.storage)
        if card.is_file():
            data = card.read_bytes()
            write_atomic(run.card, lambda tmp: tmp.write_bytes(data))
    elif card.is_file():
        write_atomic(run.card, lambda tmp: shutil.copyfile(card, tmp))
