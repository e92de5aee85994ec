"""The typed config tree: presets, TOML files, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from carat.config import (
    CaratConfig, coerce, config_from_dict, config_to_dict, config_to_toml, load_config, parse_overrides,
)
from carat.errors import ConfigError


def test_seed_defaults_are_the_seed_configuration():
    # The configuration of the variable-length derivative carat started from (not the authors' published one:
    # that is the official preset below).
    cfg = load_config("seed")
    assert isinstance(cfg, CaratConfig)
    assert cfg.train.epochs == 15
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.optim.grad_clip == pytest.approx(1.0)
    assert cfg.loader.max_batch_size == 64


def test_tiny_preset_differs_where_declared():
    tiny, seed = load_config("tiny"), load_config("seed")
    assert tiny.preset == "tiny"
    assert tiny.train.epochs < seed.train.epochs
    assert config_to_dict(tiny)["model"] != config_to_dict(seed)["model"]


def test_official_preset_is_the_authors_published_configuration():
    # Their train.sh / main.py / models at the parity test's commit (values checked against that code).
    cfg = load_config("official")
    m, loss, opt = cfg.model, cfg.loss, cfg.optim
    assert (m.hidden_size, m.intermediate_size, m.num_heads) == (256, 256, 8)
    assert (m.text_dropout, m.visual_dropout, m.audio_dropout) == (0.3, 0.3, 0.3)
    assert (m.text_layers, m.visual_layers, m.audio_layers) == (6, 4, 4)
    assert (m.threshold, m.ctc_target_length, m.projection_size, m.queue_size) == (0.25, 500, 64, 8192)
    assert (m.aligner, m.modality_fusion, m.score_rule, m.prototype_temperature, m.standardize_features) == (
        "lstm", "max", "reference", 1.0, False)
    assert m.queue_init == "noise" and load_config("seed").model.queue_init == "empty"
    assert loss.pos_weight == (1.0,) * 6 and not loss.detach_recon_targets and loss.recon_clf_weight == 0.0
    assert (loss.lsr_clf_weight, loss.aug_clf_weight, loss.cl_weight, loss.recon_mse_weight, loss.aug_mse_weight,
            loss.beta_mse_weight, loss.total_aug_clf_weight, loss.shuffle_aug_clf_weight) == (
        0.01, 0.1, 1.0, 1.0, 1.0, 0.0, 1.0, 0.1)
    assert (opt.lr, opt.warmup_fraction, opt.epoch_decay, opt.coef_lr, opt.grad_clip) == (5e-5, 0.1, 1.0, 1.0, 1.0)
    assert opt.decay_input_norm and opt.weight_decay == 0.01
    assert (cfg.loader.max_batch_size, cfg.train.epochs, cfg.train.select_metric) == (64, 20, "micro_f1")


def test_show_config_names_the_source_of_every_official_value():
    from carat.config import OFFICIAL, PRESET_SOURCES, describe_config

    lines = describe_config(load_config("official")).splitlines()
    for key in OFFICIAL:
        section, name = key.split(".")
        at = lines.index(f"[{section}]") + 1
        at += next(i for i, line in enumerate(lines[at:]) if line.startswith(f"{name} = "))
        comments = []
        while lines[at - 1].startswith("#"):
            at -= 1
            comments.insert(0, lines[at][2:])
        assert "official: github.com/chengzju/CARAT at 3210086, " in " ".join(comments), key
    assert set(PRESET_SOURCES["official"]) == set(OFFICIAL)
    overridden = describe_config(load_config("official", overrides=["--optim.lr=1e-4"]))
    assert "[overridden here; the preset's value: 5e-05]" in overridden.replace("\n# ", " ")
    assert "official:" not in describe_config(load_config("seed"))


@pytest.mark.parametrize("preset", ["seed", "official", "tiny", "small"])
def test_every_preset_aligns_at_about_ten_slots_per_second_of_its_corpus(preset):
    # The seed's ratios are ~10 aligned slots per real second; a preset for a length-scaled corpus keeps that
    # resolution (or one slot per frame, when a frame already spans more than a tenth of a second).
    cfg = load_config(preset)
    for modality, hz in (("visual", cfg.synth.visual_hz), ("audio", cfg.synth.audio_hz)):
        frames_per_second = hz * cfg.synth.length_scale
        slots_per_second = getattr(cfg.model, f"{modality}_compression_ratio") * frames_per_second
        assert slots_per_second == pytest.approx(min(10.0, frames_per_second), rel=0.02), (modality, slots_per_second)


def test_slots_per_second_ratios_reject_a_non_positive_rate():
    from carat.model.config import slots_per_second_ratios
    with pytest.raises(ConfigError, match="length_scale"):
        slots_per_second_ratios(30.0, 100.0, 0.0)


def test_overrides_are_typed_and_win_over_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny"\n[train]\nepochs = 7\nseed = 3\n')
    cfg = load_config(file=path, overrides=["--train.epochs=2", "--train.run_name", "abc", "--train.offload=false"])
    assert cfg.preset == "tiny"
    assert cfg.train.epochs == 2 and cfg.train.seed == 3 and cfg.train.run_name == "abc"


def test_unknown_key_lists_valid_ones_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown key train\.epoch .*did you mean 'epochs'.*valid:"):
        load_config(overrides=["--train.epoch=3"])


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"unknown section \[trian\].*did you mean 'train'"):
        load_config(overrides=["--trian.epochs=3"])


def test_wrong_type_and_impossible_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got 'three'"):
        load_config(overrides=["--train.epochs=three"])
    with pytest.raises(ConfigError, match=r"\[train\] epochs=0 must be >= 1"):
        load_config(overrides=["--train.epochs=0"])
    with pytest.raises(ConfigError, match=r"train\.launcher: 'slurm' is not allowed"):
        load_config(overrides=["--train.launcher=slurm"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(file=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(file=tmp_path / "missing.toml")


def test_heads_not_dividing_hidden_is_rejected():
    with pytest.raises(ConfigError, match="12"):
        load_config(overrides=["--model.num_heads=12"])


def test_resolved_config_round_trips_through_toml_and_dict(tmp_path):
    cfg = load_config("tiny", overrides=["--train.run_name=x", "--train.max_steps_per_epoch=3"])
    path = tmp_path / "config.toml"
    path.write_text(config_to_toml(cfg))
    assert config_to_dict(load_config(file=path)) == config_to_dict(cfg)
    assert config_to_dict(config_from_dict(config_to_dict(cfg))) == config_to_dict(cfg)


def test_coerce_handles_optionals_tuples_and_bools():
    assert coerce("none", int | None, "k") is None
    assert coerce("4", int | None, "k") == 4
    assert coerce("1.5,2", tuple[float, ...], "k") == (1.5, 2.0)
    assert coerce("[1, 2]", tuple[int, ...], "k") == (1, 2)
    assert coerce("off", bool, "k") is False
    with pytest.raises(ConfigError, match="k: expected true or false"):
        coerce("maybe", bool, "k")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="overrides look like"):
        parse_overrides(["epochs=3"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--train.epochs"])


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_file_loads(path):
    cfg = load_config(file=path)
    assert cfg.preset == ("official" if path.name == "official.toml" else "seed")


def test_split_overrides_keeps_values_with_their_keys():
    from carat.config import split_overrides

    rest, overrides = split_overrides(["inspect", "--loader.token_budget", "700", "DIR", "--loader.seed=3",
                                       "--no-plots", "--trian.epochs", "2", "--train.epochs", "--quick"])
    assert rest == ["inspect", "DIR", "--no-plots", "--quick"]
    # a typo travels with its value (carat.config names it); a key without a value stays alone (and is refused)
    assert overrides == ["--loader.token_budget", "700", "--loader.seed=3", "--trian.epochs", "2", "--train.epochs"]


# ---------------------------------------------------------------- sections outside the tree, and carat.cli
def test_command_sections_load_from_file_and_overrides_with_the_tree_checks(tmp_path):
    from carat.config import describe_sections, load_sections
    from carat.export import ExportConfig

    path = tmp_path / "export.toml"
    path.write_text('[export]\ncheckpoint = "runs/a"\nout = "a.pt"\n')
    loaded = load_sections({"export": ExportConfig}, path, ["--export.out=b.pt"])["export"]
    assert (loaded.checkpoint, loaded.tag, loaded.out) == ("runs/a", None, "b.pt")
    with pytest.raises(ConfigError, match=r"unknown key export\.chekpoint \(did you mean 'checkpoint'\?\)"):
        load_sections({"export": ExportConfig}, None, ["--export.chekpoint=x"])
    # a command's file holds its own table: the training tree's are not read here, so they are refused
    path.write_text('[export]\nout = "a.pt"\n[train]\nepochs = 3\n')
    with pytest.raises(ConfigError, match=r"unknown section \[train\]; valid: export"):
        load_sections({"export": ExportConfig}, path)
    shown = describe_sections({"export": loaded})
    path.write_text(shown)
    assert load_sections({"export": ExportConfig}, path)["export"] == loaded
    assert "# The plain PyTorch file to write" in shown and "# Checkpoint tag in a DeepSpeed" in shown


def test_a_deprecated_alias_works_prints_its_replacement_and_loses_to_the_key(capsys):
    from carat.cli import Alias, add_aliases, resolve_section, section_parser
    from carat.export import ExportConfig

    aliases = (Alias("--out", "export.out"), Alias("--model-file", "export.out", "old name of --out", deprecated=True))
    parser = section_parser("prog", None, "export")
    add_aliases(parser, aliases, {"export": ExportConfig()})
    _, cfg = resolve_section(parser, ["--model-file", "m.pt"], "export", ExportConfig, aliases)
    assert cfg.out == "m.pt"
    assert capsys.readouterr().err == ("carat: --model-file is deprecated and will be removed in the next release; "
                                       "use --export.out=m.pt instead\n")
    _, cfg = resolve_section(parser, ["--model-file", "m.pt", "--export.out=n.pt"], "export", ExportConfig, aliases)
    assert cfg.out == "n.pt"
    _, cfg = resolve_section(parser, ["--out", "m.pt"], "export", ExportConfig, aliases)
    assert cfg.out == "m.pt" and capsys.readouterr().err.count("deprecated") == 1  # the shorthand is silent
    assert "DEPRECATED, use --export.out=VALUE: old name of --out" in parser.format_help()


def test_train_and_tune_shorthands_are_aliases_of_their_keys(capsys):
    from carat.train.__main__ import resolve_config as train_config
    from carat.tune.__main__ import resolve_config as tune_config

    cfg, _ = train_config(["--launcher", "none", "--run-name", "r1"])
    assert (cfg.train.launcher, cfg.train.run_name) == ("none", "r1")
    cfg, _ = train_config(["--launcher", "none", "--train.launcher=deepspeed"])  # the key beats the flag
    assert cfg.train.launcher == "deepspeed"
    cfg, _ = tune_config(["--sweep-name", "s1"])
    assert cfg.tune.sweep_name == "s1"
    assert capsys.readouterr().err == ""


def test_the_command_line_layer_loads_no_torch():
    import subprocess
    import sys

    code = ("import sys, carat.cli, carat.inference_config; "
            "print(sorted(m for m in ('torch', 'pyarrow', 'ray', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]"]
