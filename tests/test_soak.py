"""The soak test of bench/soak.py (random SIGKILLs of the training process, reruns until done, result
compared with an uninterrupted run). Minutes of CPU: runs only with CARAT_SOAK=1 (not in CI)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not os.environ.get("CARAT_SOAK"), reason="soak test: set CARAT_SOAK=1")


def test_random_kills_end_like_an_uninterrupted_run(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import soak

    args = soak.build_parser().parse_args(["--work", str(tmp_path), "--epochs", "4", "--kills",
                                           os.environ.get("CARAT_SOAK_KILLS", "5")])
    report = soak.soak(args)
    assert report["other_failures"] == [], report
    assert report["epochs_in_history"] == [0, 1, 2, 3], report
    assert report["samples_per_epoch"] == report["samples_per_epoch_uninterrupted"], report
    assert report["final_metrics_equal"], report
