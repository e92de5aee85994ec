"""``python -m carat.data``: subcommands, help, exit statuses and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from carat.data.__main__ import main
from carat.data.card import read_card
from tests.data_fixtures import make_csd_fixture, make_pickle_fixture


@pytest.mark.parametrize("argv", [["--help"], ["synth", "--help"], ["prepare", "--help"], ["inspect", "--help"]])
def test_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_prepare_help_warns_about_pickles(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert "unpickling executes arbitrary code" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["bogus"], ["synth"], ["synth", "--out", "x", "--scale", "big"],
                                  ["prepare", "--source", "hdf5", "--input", "a", "--out", "b"],
                                  ["synth", "--out", "x", "--dtype", "float64"]])
def test_bad_arguments_exit_nonzero(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0


def test_synth_then_inspect(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert main(["synth", "--out", str(out), "--scale", "0.003", "--length-scale", "0.05", "--seed", "7",
                 "--dtype", "float32", "--shard-max-samples", "20"]) == 0
    card = read_card(out)
    assert card["config"]["synth"]["seed"] == 7 and card["config"]["storage"]["dtype"] == "float32"
    assert card["shards"]["train"]["count"] == int(np.ceil(card["counts"]["train"] / 20))
    capsys.readouterr()
    assert main(["inspect", str(out), "--plots", str(tmp_path / "plots"), "--token-budget", "500"]) == 0
    text = capsys.readouterr().out
    assert "segments: train 49, valid 8, test 14" in text
    assert "reference scorer" in text and "padding efficiency" in text
    for name in ("lengths.png", "label_prevalence.png", "padding_efficiency.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_errors_are_one_line_with_status_one(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "x"), "--scale", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # the message carat.train gives for the same key: the section, then the field's own check
    assert err[-1] == "error: [synth] synth.scale=2.0 must be in (0, 1] (a fraction of the real split sizes)"
    assert main(["inspect", str(tmp_path / "nothing")]) == 1
    assert "nothing: not a directory" in capsys.readouterr().err
    assert main(["prepare", "--source", "csd", "--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "CMU_MOSEI_TimestampedWordVectors.csd: missing text file" in err
    assert len(err.splitlines()) == 1


def test_prepare_csd_and_pickle(tmp_path, capsys):
    fx = make_csd_fixture(tmp_path / "src")
    out = tmp_path / "csd_out"
    assert main(["prepare", "--source", "csd", "--input", str(fx.directory), "--out", str(out),
                 "--no-reference", "--inf-policy", "clip"]) == 0
    card = read_card(out)
    assert card["counts"]["total"] == len(fx.expected)
    assert card["config"]["prepare"]["inf_policy"] == "clip" and card["reference_scorer"] is None

    px = make_pickle_fixture(tmp_path / "m.pkl", label_form="six")
    args = ["prepare", "--source", "pickle", "--input", str(px.path), "--out", str(tmp_path / "p_out"),
            "--no-reference"]
    assert main(args) == 1
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(args + ["--trust-pickle"]) == 0
    assert read_card(tmp_path / "p_out")["counts"]["total"] == sum(px.sizes.values())


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "carat.data", "synth", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--length-scale" in proc.stdout


def test_padding_comparison_uses_planner_and_sorted_beats_random():
    from carat.data.inspect import padding_comparison
    from carat.data.synth import SynthConfig, plan_corpus

    refs = plan_corpus(SynthConfig(scale=0.05))["train"]
    lengths = np.array([r.lengths for r in refs])
    comp = padding_comparison(lengths, token_budget=20000, max_batch_size=64, weights=(1.0, 1.0, 1.0))
    assert comp["sorted"]["cost"] > 0.9 and comp["random"]["cost"] < 0.6
    assert comp["sorted"]["batches"] < comp["random"]["batches"]
