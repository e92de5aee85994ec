"""Every training-side command has --help and turns bad input into a one-line error and exit status 1
(2 is argparse's, for malformed command lines), as `python -m carat.data` does; evaluate, predict and export read
their sections (--config, --section.key=value, --show-config) through the machinery every command shares."""

from __future__ import annotations

import pytest

from carat import evaluate, export, predict
from carat.train import __main__ as train_main


@pytest.mark.parametrize("main", [train_main.main, evaluate.main, predict.main, export.main],
                         ids=["train", "evaluate", "predict", "export"])
def test_help_exits_zero(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_train_rejects_config_typos_before_starting_anything(capsys, tmp_path):
    assert train_main.main(["--launcher", "none", "--train.epocs=2"]) == 1
    assert "unknown key train.epocs" in capsys.readouterr().err
    assert train_main.main(["--config", str(tmp_path / "missing.toml")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_train_without_shards_and_synthesis_disabled_says_what_to_do(capsys, tmp_path):
    code = train_main.main(["--launcher", "none", f"--train.shard_dir={tmp_path / 'none'}",
                            "--train.synth_if_missing=false"])
    assert code == 1
    assert "no manifest.parquet" in capsys.readouterr().err


def test_checkpoint_commands_name_the_bad_path(capsys, tmp_path):
    missing = tmp_path / "nothing"
    missing.mkdir()
    assert export.main(["--checkpoint", str(missing), "--out", str(tmp_path / "m.pt")]) == 1
    assert "holds no DeepSpeed checkpoint" in capsys.readouterr().err
    not_carat = tmp_path / "other.pt"
    import torch

    torch.save({"weights": 1}, not_carat)
    assert evaluate.main(["--checkpoint", str(not_carat)]) == 1
    assert "is not a carat export" in capsys.readouterr().err
    assert predict.main(["--checkpoint", str(not_carat), "--npz", "x.npz", "--out", str(tmp_path / "p.txt")]) == 1
    assert "use a .json or .csv" in capsys.readouterr().err


def test_show_config_documents_every_key(capsys):
    assert train_main.main(["--show-config", "--model.hidden_size=64", "--model.num_heads=4"]) == 0
    out = capsys.readouterr().out
    assert "hidden_size = 64" in out and "[optim]" in out and "[train]" in out
    assert "# Encoder width d" in out  # field docstrings become comments


@pytest.mark.parametrize("override, named", [
    ("--loss.pos_weight=[1.0, 2.0]", "loss.pos_weight has 2 values; model.num_classes=6"),
    ("--model.visual_dim=36", "model.visual_dim=36, but carat's visual features are 35-d"),
    ("--model.num_classes=5", "model.num_classes=5 needs one per label"),
])
def test_cross_section_mismatches_fail_before_any_run_directory(override, named, capsys, tmp_path):
    runs = tmp_path / "runs"
    code = train_main.main(["--launcher", "none", override, f"--train.storage_path={runs}"])
    assert code == 1
    assert named in capsys.readouterr().err
    assert not runs.exists()


def test_text_longer_than_the_position_table_fails_before_training(capsys, tmp_path):
    from tests.data_fixtures import tiny_loop_corpus

    shards = tiny_loop_corpus(tmp_path / "shards")
    runs = tmp_path / "runs"
    code = train_main.main(["--launcher", "none", f"--train.shard_dir={shards}", f"--train.storage_path={runs}",
                            "--model.text_max_positions=2"])
    err = capsys.readouterr().err
    assert code == 1
    assert "more text steps than model.text_max_positions=2" in err and "text_overflow='truncate'" in err
    assert not (runs).exists() or not any(runs.iterdir())


# ------------------------------------------- evaluate, predict, export: the config machinery of every command
SECTION_COMMANDS = {"evaluate": evaluate.main, "predict": predict.main, "export": export.main}


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """An untrained tiny-preset model as a `carat.export` file, and the corpus its config names."""
    import torch

    from carat.config import config_to_dict, load_config
    from carat.model import CARAT
    from tests.data_fixtures import tiny_loop_corpus

    root = tmp_path_factory.mktemp("tiny-export")
    shards = tiny_loop_corpus(root / "shards")
    cfg = load_config("tiny", overrides=[f"--train.shard_dir={shards}", "--loader.num_workers=0"])
    torch.manual_seed(0)
    blob = {"state_dict": CARAT.from_config(cfg.model).state_dict(), "config": config_to_dict(cfg),
            "carat_version": "test", "source": {}}
    torch.save(blob, root / "model.pt")
    return shards, root / "model.pt"


@pytest.mark.parametrize("name", SECTION_COMMANDS)
def test_show_config_prints_the_resolved_section_as_toml_it_reads_back(name, capsys, tmp_path):
    main = SECTION_COMMANDS[name]
    assert main(["--show-config", "--checkpoint", "runs/x", "--tag", "epoch-002", f"--{name}.out=o.json"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"[{name}]\n")
    assert 'checkpoint = "runs/x"\n' in shown and 'tag = "epoch-002"\n' in shown and 'out = "o.json"\n' in shown
    assert "# Checkpoint tag in a DeepSpeed checkpoint folder" in shown  # inherited fields keep their docs
    (tmp_path / "shown.toml").write_text(shown)
    assert main(["--config", str(tmp_path / "shown.toml"), "--show-config"]) == 0
    assert capsys.readouterr().out == shown


@pytest.mark.parametrize("name, typo, meant", [("evaluate", "tune_no", "tune_on"), ("predict", "treshold", "threshold"),
                                               ("export", "tga", "tag")])
def test_section_commands_name_a_typo_and_suggest_the_key(name, typo, meant, capsys, tmp_path):
    main = SECTION_COMMANDS[name]
    assert main(["--checkpoint", "c", "--out", "o.json", f"--{name}.{typo}=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"error: unknown key {name}.{typo} (did you mean '{meant}'?)" in err[0]
    misspelt = tmp_path / "typo.toml"
    misspelt.write_text(f"[{name[:-2] + name[-1] + name[-2]}]\ncheckpoint = \"c\"\n")  # [evaluaet], [preditc], [expotr]
    assert main(["--config", str(misspelt), "--out", "o.json"]) == 1
    assert f"(did you mean '{name}'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a misspelt flag stays argparse's usage error, with a suggestion
        main(["--checkpont", "c", "--out", "o.json"])
    assert exit_info.value.code == 2 and "did you mean --checkpoint?" in capsys.readouterr().err


def test_wrong_values_name_the_key(capsys):
    assert evaluate.main(["--checkpoint", "c", "--evaluate.threshold=high"]) == 1
    assert "evaluate.threshold: 'high' is not a valid" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", "c", "--evaluate.split=dev"]) == 1
    assert "evaluate.split: 'dev' is not allowed; choose one of 'train', 'valid', 'test'" in capsys.readouterr().err
    assert predict.main(["--checkpoint", "c", "--npz", "x.npz", "--predict.out=p.txt"]) == 1
    assert "predict.out='p.txt': use a .json or .csv file name" in capsys.readouterr().err


def test_required_arguments_may_come_from_the_config_file(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([])
    assert exit_info.value.code == 2
    assert "required: --checkpoint (or evaluate.checkpoint in the --config file)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint", "c", "--out", "p.json"])
    assert exit_info.value.code == 2 and "one of the arguments --shards --npz is required" in capsys.readouterr().err
    config = tmp_path / "export.toml"
    config.write_text(f'[export]\ncheckpoint = "{tmp_path / "empty"}"\nout = "{tmp_path / "m.pt"}"\n')
    (tmp_path / "empty").mkdir()
    assert export.main(["--config", str(config)]) == 1  # the file's checkpoint is the one read
    assert f"{tmp_path / 'empty'} holds no DeepSpeed checkpoint" in capsys.readouterr().err


def test_evaluate_file_flags_and_overrides_in_their_order(tiny_export, tmp_path, capsys):
    import json

    shards, model = tiny_export
    config = tmp_path / "eval.toml"
    config.write_text(f'[evaluate]\ncheckpoint = "{model}"\nshards = "{shards}"\nsplit = "train"\nthreshold = 0.9\n')
    out = tmp_path / "m.json"
    # the file's split loses to --split, which loses to --evaluate.split; --threshold beats the file's 0.9
    assert evaluate.main(["--config", str(config), "--split", "test", "--evaluate.split=valid", "--threshold", "0.3",
                          "--evaluate.device=cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert list(results) == ["valid @0.3"]
    from carat.data.corpus.card import read_card

    assert results["valid @0.3"]["n_samples"] == read_card(shards)["counts"]["valid"]
    assert "deprecated" not in capsys.readouterr().err


def test_predict_override_reaches_the_predictions(tiny_export, tmp_path, capsys):
    import json

    import numpy as np

    _, model = tiny_export
    rng = np.random.default_rng(0)
    lengths = {"text": [3, 5], "visual": [4, 2], "audio": [6, 6]}
    dims = {"text": 300, "visual": 35, "audio": 74}
    arrays = {m: rng.standard_normal((2, max(n), dims[m])).astype(np.float32) for m, n in lengths.items()}
    arrays.update({f"{m}_lengths": np.array(n) for m, n in lengths.items()})
    np.savez(tmp_path / "feats.npz", ids=np.array(["a", "b"]), **arrays)
    out = tmp_path / "p.json"
    # a threshold above every probability: no label, whatever the untrained model scores
    assert predict.main(["--checkpoint", str(model), "--predict.npz", str(tmp_path / "feats.npz"), "--threshold", "0",
                         "--predict.threshold=1.0", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["threshold"] == 1.0 and [row["id"] for row in written["predictions"]] == ["a", "b"]
    assert all(row[e] == 0 for row in written["predictions"] for e in written["emotions"])
    assert "deprecated" not in capsys.readouterr().err


@pytest.mark.parametrize("name, argv", [
    ("evaluate", ["--checkpoint", "c", "--tag", "t", "--split", "valid", "--threshold", "0.3", "--device", "cpu",
                  "--shards", "s", "--tune-on", "train", "--out", "m.json"]),
    ("predict", ["--checkpoint", "c", "--tag", "t", "--split", "train", "--threshold", "0.3", "--device", "cpu",
                 "--npz", "f.npz", "--out", "p.csv"]),
    ("export", ["--checkpoint", "c", "--tag", "t", "--out", "m.pt"]),
])
def test_every_existing_flag_is_a_documented_shorthand_of_its_key(name, argv, capsys):
    """The flags of 0.1.0 keep their meaning and are not deprecated: each sets its [section] key, silently."""
    assert SECTION_COMMANDS[name](["--show-config", *argv]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    flags = dict(zip(argv[::2], argv[1::2]))
    for flag, value in flags.items():
        key = flag[2:].replace("-", "_")
        shown = value if key == "threshold" else f'"{value}"'
        assert f"\n{key} = {shown}\n" in captured.out, (flag, captured.out)
