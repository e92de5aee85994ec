"""Crash injection for the resume tests: see ``sitecustomize.py`` in this directory."""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fault_env(spec: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with rank ``<rank>`` set to exit hard as epoch ``<epoch>`` begins
    (``spec`` = ``"<epoch>:<rank>"``), in every process the run starts."""
    env = dict(os.environ if env is None else env)
    env["CARAT_FAIL_AFTER_EPOCH"] = spec
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    return env
