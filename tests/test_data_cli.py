"""``python -m carat.data``: subcommands, help, exit statuses and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from carat.data.__main__ import main
from carat.data.corpus.card import read_card
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
    from carat.data.corpus.inspect import padding_comparison
    from carat.data.sources.synth import SynthConfig, plan_corpus

    refs = plan_corpus(SynthConfig(scale=0.05))["train"]
    lengths = np.array([r.lengths for r in refs])
    comp = padding_comparison(lengths, token_budget=20000, max_batch_size=64, weights=(1.0, 1.0, 1.0))
    assert comp["sorted"]["cost"] > 0.9 and comp["random"]["cost"] < 0.6
    assert comp["sorted"]["batches"] < comp["random"]["batches"]


# --------------------------------------------------------------- the config tree of carat.train
TINY_CORPUS = ["--no-reference", "--synth.scale=0.003", "--synth.length_scale=0.05"]
"""Overrides that keep a synthesized corpus to about 70 short segments."""


def write_toml(path, text):
    path.write_text(text)
    return str(path)


def test_config_file_sections_reach_the_corpus(tmp_path):
    # the file carat.train takes: its [synth] and [storage] apply, [model] and [train] are read and left alone
    config = write_toml(tmp_path / "run.toml", """
[synth]
seed = 5
scale = 0.003
length_scale = 0.05
cue_layout = "shuffled"
[storage]
dtype = "float32"
shard_max_samples = 20
[model]
hidden_size = 32
[train]
epochs = 2
""")
    out = tmp_path / "corpus"
    assert main(["synth", "--out", str(out), "--config", config, "--no-reference"]) == 0
    card = read_card(out)
    synth, storage = card["config"]["synth"], card["config"]["storage"]
    assert (synth["seed"], synth["scale"], synth["length_scale"], synth["cue_layout"]) == (5, 0.003, 0.05, "shuffled")
    assert (storage["dtype"], storage["shard_max_samples"]) == ("float32", 20)
    assert card["shards"]["train"]["count"] == int(np.ceil(card["counts"]["train"] / 20))


def test_override_beats_alias_flag_beats_file(tmp_path, capsys):
    config = write_toml(tmp_path / "run.toml", '[synth]\nseed = 5\nscale = 0.003\n[storage]\ndtype = "float32"\n')
    out = tmp_path / "corpus"
    assert main(["synth", "--out", str(out), "--config", config, "--seed", "6", "--synth.seed=7",
                 "--dtype", "float16", "--synth.length_scale=0.05", "--no-reference"]) == 0
    card = read_card(out)
    # --synth.seed beats --seed, which beats the file; --dtype beats the file; the file's scale stands
    assert card["config"]["synth"]["seed"] == 7 and card["config"]["synth"]["scale"] == 0.003
    assert card["config"]["storage"]["dtype"] == "float16"

    capsys.readouterr()
    assert main(["synth", "--config", config, "--scale", "0.5", "--shard-max-mb", "0.5", "--show-config"]) == 0
    shown = capsys.readouterr().out
    assert "scale = 0.5\n" in shown and "seed = 5\n" in shown and 'dtype = "float32"\n' in shown
    assert f"shard_max_bytes = {512 * 1024}\n" in shown  # MiB on the command line, bytes in the config


def test_show_config_prints_the_data_sections_as_toml_it_reads_back(tmp_path, capsys):
    from carat.config import load_config

    assert main(["synth", "--show-config", "--preset", "tiny", "--synth.seed=3"]) == 0
    shown = capsys.readouterr().out
    assert "[synth]" in shown and "[storage]" in shown and "[model]" not in shown and "[prepare]" not in shown
    assert "# Seed of everything" in shown  # the field docstrings become comments
    cfg = load_config(file=write_toml(tmp_path / "shown.toml", shown))
    assert cfg.preset == "tiny" and cfg.synth.seed == 3 and cfg.synth.scale == 0.2 and cfg.storage.dtype == "float32"

    assert main(["prepare", "--show-config", "--no-reference", "--inf-policy", "clip",
                 "--prepare.on_error=skip"]) == 0
    shown = capsys.readouterr().out
    assert "[prepare]" in shown and "[storage]" in shown and "[synth]" not in shown
    assert "reference = false\n" in shown and 'inf_policy = "clip"\n' in shown and 'on_error = "skip"\n' in shown


def test_typos_fail_with_one_line_naming_the_key(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["synth", "--out", str(out), "--synth.sclae=0.1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown key synth.sclae (did you mean 'scale'?)")
    config = write_toml(tmp_path / "typo.toml", "[synth]\nlenght_scale = 0.1\n")
    assert main(["synth", "--out", str(out), "--config", config]) == 1
    assert "unknown key synth.lenght_scale (did you mean 'length_scale'?)" in capsys.readouterr().err
    assert main(["synth", "--out", str(out), "--sytnh.scale=0.1"]) == 1
    assert "unknown section [sytnh] (did you mean 'synth'?)" in capsys.readouterr().err
    assert main(["prepare", "--input", str(tmp_path), "--out", str(out), "--prepare.nan_policy=drop"]) == 1
    assert "prepare.nan_policy: 'drop' is not allowed; choose one of 'zero', 'error'" in capsys.readouterr().err
    # a section the command does not read is refused rather than silently ignored
    assert main(["synth", "--out", str(out), "--model.hidden_size=8"]) == 1
    assert "--model.hidden_size has no effect on `synth`" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:  # a misspelt flag stays argparse's error, with a suggestion
        main(["synth", "--out", str(out), "--scael", "0.1"])
    assert exc.value.code == 2 and "did you mean --scale?" in capsys.readouterr().err


def test_inspect_token_budget_from_the_loader_section(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert main(["synth", "--out", str(out), *TINY_CORPUS]) == 0
    config = write_toml(tmp_path / "run.toml", "[loader]\ntoken_budget = 300\n")
    capsys.readouterr()
    assert main(["inspect", str(out), "--no-plots", "--config", config]) == 0
    assert "token budget 300," in capsys.readouterr().out
    assert main(["inspect", str(out), "--no-plots", "--config", config, "--loader.token_budget=700"]) == 0
    assert "token budget 700," in capsys.readouterr().out
    # the space form: 700 is the override's value, not the corpus directory
    assert main(["inspect", "--no-plots", "--loader.token_budget", "700", str(out)]) == 0
    assert "token budget 700," in capsys.readouterr().out
    # the whole [loader] plans the batches, as in training: batch-size bounds and modality weights too
    assert main(["inspect", str(out), "--no-plots", "--loader.max_batch_size=4", "--loader.min_batch_size", "2",
                 "--loader.modality_weights=[1.0, 0.5, 0.25]"]) == 0
    report = capsys.readouterr().out
    assert "max batch 4, min batch 2, modality weights 1, 0.5, 0.25;" in report
    small = [int(line.split()[2]) for line in report.splitlines() if line.strip().startswith(("sorted", "random"))]
    assert main(["inspect", str(out), "--no-plots", "--loader.max_batch_size=64"]) == 0
    large = [int(line.split()[2]) for line in capsys.readouterr().out.splitlines()
             if line.strip().startswith(("sorted", "random"))]
    assert len(small) == len(large) == 2 and all(s > l for s, l in zip(small, large))


def readme_data_commands() -> list[list[str]]:
    """The ``python -m carat.data`` commands of README.md's Data section, as argument lists."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Data\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:3] == ["python", "-m", "carat.data"]:
            commands.append([w for w in words[3:] if not w.startswith("[")])  # `[--quick]`: optional
    return commands


def test_readme_data_commands_still_parse_onto_the_config():
    from carat.config import split_overrides
    from carat.data.__main__ import build_parser, resolve_config

    commands = readme_data_commands()
    assert [c[0] for c in commands] == ["synth", "synth", "prepare", "prepare", "inspect", "verify"]
    resolved = {}
    for argv in commands:
        rest, overrides = split_overrides(argv)
        args, extras = build_parser().parse_known_args(rest)
        assert extras == [], argv  # every word is a flag of the command, or a --section.key=value override
        if args.sections:
            resolved[" ".join(argv)] = resolve_config(args, overrides)
    full = next(c for k, c in resolved.items() if "--scale 1.0" in k)
    assert full.synth.scale == 1.0 and full.synth.seed == 0
    csd = next(c for k, c in resolved.items() if "--format csd" in k)
    assert csd.synth.cue_layout == "shuffled" and csd.synth.feature_scale_spread == 2.0
    pickle = next(c for k, c in resolved.items() if "--source pickle" in k)
    assert pickle.prepare.source == "pickle" and pickle.prepare.trust_pickle is True


def test_readme_csd_round_trip_on_a_tiny_corpus(tmp_path, capsys):
    """README's `synth --format csd` then `prepare --source csd` then `verify`, made tiny by overrides."""
    raw, shards = tmp_path / "raw", tmp_path / "shards"
    synth = next(c for c in readme_data_commands() if "--format" in c)
    synth[synth.index("--out") + 1] = str(raw)
    assert main(synth + TINY_CORPUS[1:]) == 0
    prepare = next(c for c in readme_data_commands() if "csd" in c and c[0] == "prepare")
    prepare[prepare.index("--input") + 1] = str(raw)
    prepare[prepare.index("--out") + 1] = str(shards)
    assert main(prepare + ["--no-reference", "--storage.dtype=float32"]) == 0
    card = read_card(shards)
    assert card["counts"]["total"] > 0 and card["config"]["storage"]["dtype"] == "float32"
    assert main(["verify", str(shards)]) == 0


def test_deprecated_flags_still_set_their_key_and_name_the_replacement(capsys):
    assert main(["synth", "--show-config", "--scale", "0.5", "--cue-layout", "shuffled", "--label-noise", "0.1",
                 "--shard-max-samples", "20"]) == 0
    captured = capsys.readouterr()
    assert 'cue_layout = "shuffled"\n' in captured.out and "label_noise = 0.1\n" in captured.out
    assert "shard_max_samples = 20\n" in captured.out and "scale = 0.5\n" in captured.out
    assert captured.err.splitlines() == [  # one line per deprecated flag; the shorthand --scale says nothing
        "carat: --cue-layout is deprecated and will be removed in the next release; use --synth.cue_layout=shuffled "
        "instead",
        "carat: --label-noise is deprecated and will be removed in the next release; use --synth.label_noise=0.1 "
        "instead",
        "carat: --shard-max-samples is deprecated and will be removed in the next release; use "
        "--storage.shard_max_samples=20 instead"]
    # the replacement beats the old flag, as any --section.key=value beats a flag
    assert main(["prepare", "--show-config", "--nan-policy", "error", "--prepare.nan_policy=zero",
                 "--on-error", "skip", "--inf-policy", "clip"]) == 0
    captured = capsys.readouterr()
    assert 'nan_policy = "zero"\n' in captured.out and 'on_error = "skip"\n' in captured.out
    assert 'inf_policy = "clip"\n' in captured.out and len(captured.err.splitlines()) == 3
    assert "use --prepare.on_error=skip instead" in captured.err
    assert main(["inspect", "--show-config", "--token-budget", "500"]) == 0
    captured = capsys.readouterr()
    assert "token_budget = 500\n" in captured.out and "use --loader.token_budget=500 instead" in captured.err
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert "DEPRECATED, use --synth.cue_strength=VALUE" in capsys.readouterr().out


def test_readme_data_commands_use_no_deprecated_flag(capsys):
    from carat.config import split_overrides
    from carat.data.__main__ import build_parser, resolve_config

    for argv in readme_data_commands():
        rest, overrides = split_overrides(argv)
        args, _ = build_parser().parse_known_args(rest)
        if args.sections:
            resolve_config(args, overrides)
    assert capsys.readouterr().err == ""
