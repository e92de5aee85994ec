"""carat.plots writes real PNGs (checked by magic bytes and by reading them back) and rejects bad input."""

import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from carat.errors import DataError
from carat.metrics import compute_metrics
from carat.plots import LOSS_PLOT, METRICS_PLOT, plot_per_emotion_f1, plot_pr_curves, plot_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0          # something was drawn


def _history(epochs=4):
    return [{"epoch": e, "train/total": 3.0 / (e + 1), "train/ctc": 10.0 / (e + 1), "train/bce": 0.7 - 0.1 * e,
             "valid/total": 2.5 / (e + 1) + 1.0, "valid/micro_f1": 0.3 + 0.05 * e, "valid/macro_f1": 0.2 + 0.04 * e,
             "valid/accuracy": 0.25 + 0.03 * e, "lr": 1e-4} for e in range(epochs)]


def _case(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 6)) < 0.3).astype(int)
    y[:, 5] = 0
    return y, np.clip(0.5 * y + 0.6 * rng.random((n, 6)), 0, 1)


def test_training_curves(tmp_path):
    history = _history()
    history[2].pop("valid/macro_f1")                      # a missing value is a gap, not an error
    paths = plot_training_curves(history, tmp_path / "plots")
    assert [p.name for p in paths] == [LOSS_PLOT, METRICS_PLOT]
    for p in paths:
        _assert_png(p)


def test_training_curves_from_compute_metrics_records(tmp_path, monkeypatch):
    # The training loop logs every numeric compute_metrics value as valid/<key>: counts and the threshold
    # must not land on the loss plot.
    import carat.plots as plots
    y, s = _case()
    metrics = compute_metrics(y, s, 0.2)
    history = [{"epoch": e, "train/total": 1.0 / (e + 1), **{f"valid/{k}": v for k, v in metrics.items()
                                                           if isinstance(v, (int, float))}} for e in range(3)]
    drawn = {}

    def record(epochs, series, path, *args, **kwargs):
        drawn[path.name] = sorted(series)
        return path

    monkeypatch.setattr(plots, "_plot_lines", record)
    plot_training_curves(history, tmp_path)
    assert drawn[LOSS_PLOT] == ["train/total"]
    assert "valid/micro_f1" in drawn[METRICS_PLOT] and "valid/hamming_loss" in drawn[METRICS_PLOT]
    assert not any(k.startswith(("valid/n_", "valid/threshold")) for k in drawn[METRICS_PLOT])


def test_training_curves_only_what_exists(tmp_path):
    paths = plot_training_curves([{"epoch": 0, "train/total": 1.0}, {"epoch": 1, "train/total": 0.5}], tmp_path)
    assert [p.name for p in paths] == [LOSS_PLOT]
    _assert_png(paths[0])


@pytest.mark.parametrize(
    ("history", "match"),
    [
        ([], "non-empty list"),
        ({"epoch": 0}, "non-empty list"),
        ([{"train/total": 1.0}], "history\\[0\\] has no 'epoch'"),
        ([{"epoch": 0, "train/total": "1.0"}], "history\\[0\\]\\['train/total'\\] must be a number"),
        ([{"epoch": 0, "lr": 1.0}], "no 'train/...' or 'valid/...'"),
        ([3], "history\\[0\\] must be a dict"),
    ],
)
def test_training_curves_bad_input(tmp_path, history, match):
    with pytest.raises(DataError, match=match):
        plot_training_curves(history, tmp_path)


def test_per_emotion_f1(tmp_path):
    y, s = _case()
    path = plot_per_emotion_f1(compute_metrics(y, s, 0.2), tmp_path / "sub" / "f1.png")
    _assert_png(path)
    with pytest.raises(DataError, match="per_emotion"):
        plot_per_emotion_f1({"micro_f1": 0.5}, tmp_path / "bad.png")
    with pytest.raises(DataError, match="must be a .png"):
        plot_per_emotion_f1(compute_metrics(y, s, 0.2), tmp_path / "f1.jpg")


def test_pr_curves(tmp_path):
    y, s = _case()
    _assert_png(plot_pr_curves(y, s, tmp_path / "pr.png"))
    with pytest.raises(DataError, match="scores has 5 samples"):
        plot_pr_curves(y, s[:5], tmp_path / "pr2.png")
    s_nan = s.copy()
    s_nan[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        plot_pr_curves(y, s_nan, tmp_path / "pr3.png")
    assert not (tmp_path / "pr2.png").exists() and not (tmp_path / "pr3.png").exists()


def test_import_is_free_and_pyplot_never_used():
    # Headless workers: importing loads no matplotlib; plotting never touches pyplot's global state/backend.
    code = ("import sys, tempfile, pathlib; import carat.plots as p; print('matplotlib' in sys.modules);"
            "p.plot_training_curves([{'epoch': 0, 'train/total': 1.0}], pathlib.Path(tempfile.mkdtemp()));"
            "print('matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
