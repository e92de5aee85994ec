"""Fault injection for carat's crash tests, kept out of carat's code.

A test that sets ``CARAT_FAIL_AFTER_EPOCH=<epoch>:<rank>`` puts this directory first on ``PYTHONPATH``
(:func:`tests.faults.fault_env`); every Python process of the run then loads this file at start-up (Ray's workers
and DeepSpeed's ranks inherit the environment). When a process imports ``carat.train.loop``, its
``Trainer.run_epoch`` is wrapped so that rank ``<rank>`` exits hard, once per run directory, as epoch
``<epoch>`` (0-based) begins: the crash the resume tests recover from. Other processes are left alone.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time

SPEC = os.environ.get("CARAT_FAIL_AFTER_EPOCH")
TARGET = "carat.train.loop"


def wrap_run_epoch(loop_module) -> None:
    epoch, rank = (int(x) for x in SPEC.split(":"))
    original = loop_module.Trainer.run_epoch

    def run_epoch(self) -> None:
        marker = self.run.root / f".fault-injected-{epoch}-{rank}"
        if self.epoch == epoch and self.rank == rank and not marker.exists():
            marker.write_text("1")
            print(f"[fault injection] rank {rank} exits as epoch {epoch} begins", flush=True)
            time.sleep(3.0)  # let Ray's controller register the last report first: a crash mid-run, not mid-report
            os._exit(17)
        return original(self)

    loop_module.Trainer.run_epoch = run_epoch


class PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``carat.train.loop`` with the regular finders, and wraps its loader to patch it once executed."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None:
            return None
        self.inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        wrap_run_epoch(module)


if SPEC:
    sys.meta_path.insert(0, PatchOnImport())
